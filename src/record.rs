//! A Kafka record as it waits in the spool: which topic, key, value, and what
//! the headers are made of.
//!
//! The topic is stored as its role (group, one-to-one, raw), not its name, so
//! a record replayed after a restart goes to the topic configured now. The
//! encoding is a small versioned binary layout; the spool adds its own
//! framing and checksum around it.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// An event id: 32 lower-case hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(pub [u8; 32]);

impl EventId {
    pub fn as_str(&self) -> &str {
        // Built from hex digits only.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TopicRole {
    Group = 1,
    C2c = 2,
    Raw = 3,
}

impl TopicRole {
    pub fn label(self) -> &'static str {
        match self {
            TopicRole::Group => "group",
            TopicRole::C2c => "c2c",
            TopicRole::Raw => "raw",
        }
    }
}

/// One record bound for Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: TopicRole,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Set for `read_receipt.v1` events; raw forwards have none.
    pub event_id: Option<EventId>,
    /// Static for the read-receipt commands; owned only for raw forwards.
    pub command: Cow<'static, str>,
    pub sdk_app_id: u64,
}

const VERSION: u8 = 1;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "spooled record is malformed ({0}); it was written by an incompatible timbridge version or the file is damaged"
)]
pub struct DecodeError(&'static str);

impl Record {
    /// The command as stored: at most `u16::MAX` bytes, cut on a character
    /// boundary so that it still decodes. Intake refuses longer commands
    /// (`limits.command_bytes`), so the cut is only a backstop.
    fn stored_command(&self) -> &[u8] {
        crate::limits::clip(&self.command, u16::MAX as usize).as_bytes()
    }

    /// Bytes `encode_into` writes.
    pub fn encoded_len(&self) -> usize {
        let id = if self.event_id.is_some() { 32 } else { 0 };
        1 + 1 + 8 + 1 + id + 2 + self.stored_command().len() + 4 + self.key.len() + self.value.len()
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_u8(VERSION);
        out.put_u8(self.topic as u8);
        out.put_slice(&self.sdk_app_id.to_le_bytes());
        match &self.event_id {
            Some(id) => {
                out.put_u8(1);
                out.put_slice(&id.0);
            }
            None => out.put_u8(0),
        }
        let command = self.stored_command();
        out.put_slice(&(command.len() as u16).to_le_bytes());
        out.put_slice(command);
        out.put_slice(&(self.key.len() as u32).to_le_bytes());
        out.put_slice(&self.key);
        out.put_slice(&self.value);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// A request's records encoded into one allocation, one `Bytes` each,
    /// as the spool takes them.
    pub fn encode_all(records: &[Record]) -> Vec<Bytes> {
        let mut buf = BytesMut::with_capacity(records.iter().map(Record::encoded_len).sum());
        records
            .iter()
            .map(|r| {
                r.encode_into(&mut buf);
                buf.split().freeze()
            })
            .collect()
    }

    /// Decodes an owned copy; the publisher uses [`RecordRef::decode`].
    pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
        let r = RecordRef::decode(b)?;
        Ok(Record {
            topic: r.topic,
            key: r.key.to_vec(),
            value: r.value.to_vec(),
            event_id: r.event_id,
            command: Cow::Owned(r.command.to_owned()),
            sdk_app_id: r.sdk_app_id,
        })
    }
}

/// A spooled record viewed in place: what the publisher hands librdkafka
/// (which copies it) without copying it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub topic: TopicRole,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub event_id: Option<EventId>,
    pub command: &'a str,
    pub sdk_app_id: u64,
}

impl<'a> RecordRef<'a> {
    pub fn decode(mut b: &'a [u8]) -> Result<RecordRef<'a>, DecodeError> {
        let version = take(&mut b, 1)?[0];
        if version != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let topic = match take(&mut b, 1)?[0] {
            1 => TopicRole::Group,
            2 => TopicRole::C2c,
            3 => TopicRole::Raw,
            _ => return Err(DecodeError("unknown topic role")),
        };
        let sdk_app_id = u64::from_le_bytes(array(take(&mut b, 8)?)?);
        let event_id = match take(&mut b, 1)?[0] {
            0 => None,
            1 => {
                let id: [u8; 32] = array(take(&mut b, 32)?)?;
                // Not `all`: without its early exit the 32 checks become a
                // few vector instructions (this runs for every record the
                // publisher sends).
                if !id.iter().fold(true, |ok, c| ok & c.is_ascii_hexdigit()) {
                    return Err(DecodeError("event id is not hex"));
                }
                Some(EventId(id))
            }
            _ => return Err(DecodeError("bad event id flag")),
        };
        let cmd_len = u16::from_le_bytes(array(take(&mut b, 2)?)?) as usize;
        let command = std::str::from_utf8(take(&mut b, cmd_len)?)
            .map_err(|_| DecodeError("command is not UTF-8"))?;
        let key_len = u32::from_le_bytes(array(take(&mut b, 4)?)?) as usize;
        let key = take(&mut b, key_len)?;
        Ok(RecordRef {
            topic,
            key,
            value: b,
            event_id,
            command,
            sdk_app_id,
        })
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if b.len() < n {
        return Err(DecodeError("truncated"));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn array<const N: usize>(b: &[u8]) -> Result<[u8; N], DecodeError> {
    b.try_into().map_err(|_| DecodeError("truncated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(event_id: Option<EventId>) -> Record {
        Record {
            topic: TopicRole::C2c,
            key: b"c2c:a:b".to_vec(),
            value: br#"{"x":1}"#.to_vec(),
            event_id,
            command: "C2C.CallbackAfterMsgReport".into(),
            sdk_app_id: 1400000000,
        }
    }

    #[test]
    fn round_trips() {
        for r in [sample(Some(EventId([b'a'; 32]))), sample(None)] {
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
        let raw = Record {
            topic: TopicRole::Raw,
            key: vec![],
            value: vec![],
            ..sample(None)
        };
        assert_eq!(Record::decode(&raw.encode()).unwrap(), raw);
    }

    #[test]
    fn encode_all_gives_each_record_its_own_bytes() {
        let a = sample(Some(EventId([b'a'; 32])));
        let b = Record {
            key: b"other".to_vec(),
            ..sample(None)
        };
        let out = Record::encode_all(&[a.clone(), b.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), a.encoded_len());
        assert_eq!(Record::decode(&out[0]).unwrap(), a);
        assert_eq!(Record::decode(&out[1]).unwrap(), b);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample(Some(EventId([b'f'; 32]))).encode();
        let header_len = bytes.len() - br#"{"x":1}"#.len();
        for cut in 0..header_len {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(Record::decode(&bad).is_err());
        let mut bad = bytes;
        bad[1] = 9;
        assert!(Record::decode(&bad).is_err());
    }

    /// The publisher hands an event id to Kafka as a header's bytes,
    /// trusting this check that they are hex: one bad byte anywhere fails.
    #[test]
    fn an_event_id_with_any_byte_not_hex_is_an_error() {
        let good = *b"0123456789abcdefABCDEF0123456789";
        assert!(Record::decode(&sample(Some(EventId(good))).encode()).is_ok());
        for at in 0..32 {
            for bad in [b'g', b'G', b'/', b':', b'@', b'`', 0, 0xff] {
                let mut id = good;
                id[at] = bad;
                let r = Record::decode(&sample(Some(EventId(id))).encode());
                assert!(r.is_err(), "{bad:#x} at {at} passed");
            }
        }
    }

    #[test]
    fn an_over_long_command_is_cut_on_a_character_boundary_and_decodes() {
        // 65,536 bytes of two-byte characters: a cut at 65,535 split one.
        let r = Record {
            command: "é".repeat(32_768).into(),
            ..sample(None)
        };
        let decoded = Record::decode(&r.encode()).unwrap();
        assert_eq!(decoded.command, "é".repeat(32_767));
        assert_eq!(r.encoded_len(), r.encode().len());
    }
}
