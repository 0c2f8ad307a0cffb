//! The fold: a message's read state as a join-semilattice.
//!
//! Each field only moves one way: the read count is the largest seen, the
//! unread count the smallest, readers are a union, the watermark the latest,
//! the first event time the earliest. [`ReadState::join`] merges two states
//! field by field with max / min / union, so it is commutative, associative
//! and idempotent: duplicates, replays after a crash and any arrival order
//! give the same state. An event is folded in as the state of that one event,
//! and a state rebuilt from the state topic is joined the same way.

use std::collections::BTreeSet;

use serde::Deserialize;

/// What a state describes: one group message, one one-to-one message, or
/// one reader's watermark in a one-to-one chat; the events' own `kind`.
pub use crate::event::Kind;

/// The fields of a `read_receipt.v1` event the fold reads; the rest of the
/// event is ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ReadEvent {
    pub schema: String,
    pub kind: Kind,
    pub sdk_app_id: u64,
    pub conversation_id: String,
    #[serde(default)]
    pub group_id: Option<String>,
    #[serde(default)]
    pub msg_seq: Option<u64>,
    #[serde(default)]
    pub msg_key: Option<String>,
    #[serde(default)]
    pub read_count: Option<u64>,
    #[serde(default)]
    pub unread_count: Option<u64>,
    #[serde(default)]
    pub readers: Vec<String>,
    #[serde(default)]
    pub read_up_to_ms: Option<u64>,
    pub event_time_ms: u64,
}

/// Why an input record cannot be folded.
#[derive(Debug, thiserror::Error)]
pub enum InvalidEvent {
    #[error("not a read_receipt.v1 event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema is {0:?}, not read_receipt.v1")]
    Schema(String),
    #[error("a {0} event without {1}")]
    Missing(&'static str, &'static str),
}

impl ReadEvent {
    pub fn parse(bytes: &[u8]) -> Result<ReadEvent, InvalidEvent> {
        let e: ReadEvent = serde_json::from_slice(bytes)?;
        if e.schema != crate::event::SCHEMA {
            return Err(InvalidEvent::Schema(e.schema));
        }
        let kind = e.kind.as_str();
        match e.kind {
            Kind::GroupMessage if e.msg_seq.is_none() => {
                Err(InvalidEvent::Missing(kind, "msg_seq"))
            }
            Kind::C2cMessage if e.msg_key.is_none() => Err(InvalidEvent::Missing(kind, "msg_key")),
            Kind::C2cWatermark if e.readers.is_empty() => {
                Err(InvalidEvent::Missing(kind, "readers"))
            }
            Kind::C2cWatermark if e.read_up_to_ms.is_none() => {
                Err(InvalidEvent::Missing(kind, "read_up_to_ms"))
            }
            _ => Ok(e),
        }
    }

    /// The state key: `<sdk_app_id>/<conversation_id>/<ref>`, ref being the
    /// msg_seq, the msg_key, or `watermark/<reader>`. In each id `%` and `/`
    /// are written `%25` and `%2F`, so a MsgKey `watermark/bob` is not bob's
    /// watermark; in a GroupId `:` is also written `%3A`, so a group named
    /// `c2c:alice:bob` is not that one-to-one chat (whose id always keeps its
    /// `c2c:` and `:` as they are). Ids without those characters give the
    /// same key as before.
    pub fn key(&self) -> String {
        let mut k = format!("{}/", self.sdk_app_id);
        push_key_part(
            &mut k,
            &self.conversation_id,
            self.kind == Kind::GroupMessage,
        );
        k.push('/');
        match self.kind {
            Kind::GroupMessage => k.push_str(&self.msg_seq.unwrap_or_default().to_string()),
            Kind::C2cMessage => push_key_part(&mut k, self.msg_key.as_deref().unwrap_or(""), false),
            Kind::C2cWatermark => {
                k.push_str("watermark/");
                push_key_part(&mut k, self.reader().unwrap_or_default(), false);
            }
        }
        k
    }

    /// Whose watermark this is: the one account a report names.
    fn reader(&self) -> Option<&str> {
        match self.kind {
            Kind::C2cWatermark => self.readers.first().map(String::as_str),
            _ => None,
        }
    }
}

/// Appends one id to a state key, escaped as [`ReadEvent::key`] says.
fn push_key_part(key: &mut String, id: &str, group: bool) {
    for c in id.chars() {
        match c {
            '%' => key.push_str("%25"),
            '/' => key.push_str("%2F"),
            ':' if group => key.push_str("%3A"),
            c => key.push(c),
        }
    }
}

/// The most bytes `readers` may take in a state record's JSON value: with
/// the other fields (ids within the input limits) the value stays well
/// under librdkafka's default `message.max.bytes` (1,000,000) and Kafka's
/// default `max.message.bytes` (1,048,588).
pub const READERS_MAX_JSON_BYTES: usize = 768 * 1024;

/// The readers a state may keep: `max_readers`, or fewer when that many
/// accounts of `account_bytes` (quoted, a comma each) would not fit in
/// [`READERS_MAX_JSON_BYTES`]. A count cap keeps the fold order-independent
/// (the n smallest of a union are the n smallest of each side's n
/// smallest); the byte cut of [`ReadState::cap_reader_bytes`] then only
/// catches accounts longer than the limit or full of escaped characters,
/// where which readers are listed near the cut can depend on the order of
/// the events.
pub fn readers_that_fit(max_readers: usize, account_bytes: usize) -> usize {
    max_readers
        .min(READERS_MAX_JSON_BYTES / (account_bytes + 3))
        .max(1)
}

/// `s` as a JSON string, quotes included, as serde_json writes it.
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// One message's read state (or one reader's watermark): a value of
/// `read_state.v1` without `updated_at_ms`, which is added at emission.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ReadState {
    pub kind: Kind,
    pub sdk_app_id: u64,
    pub conversation_id: String,
    pub group_id: Option<String>,
    pub msg_seq: Option<u64>,
    pub msg_key: Option<String>,
    pub reader: Option<String>,
    /// The largest count seen; `None` while no event gave one.
    pub read_count: Option<u64>,
    /// The smallest count seen; `None` while no event gave one.
    pub unread_count: Option<u64>,
    /// The `max_readers` smallest (bytewise) of all readers seen.
    pub readers: BTreeSet<String>,
    pub readers_truncated: bool,
    pub read_up_to_ms: Option<u64>,
    pub first_event_time_ms: u64,
    pub last_event_time_ms: u64,
}

impl ReadState {
    /// The state that one event alone gives.
    pub fn of_event(e: &ReadEvent, max_readers: usize) -> ReadState {
        let mut s = ReadState {
            kind: e.kind,
            sdk_app_id: e.sdk_app_id,
            conversation_id: e.conversation_id.clone(),
            group_id: match e.kind {
                Kind::GroupMessage => Some(
                    e.group_id
                        .clone()
                        .unwrap_or_else(|| e.conversation_id.clone()),
                ),
                _ => None,
            },
            msg_seq: e.msg_seq.filter(|_| e.kind == Kind::GroupMessage),
            msg_key: e.msg_key.clone().filter(|_| e.kind == Kind::C2cMessage),
            reader: e.reader().map(str::to_owned),
            read_count: e.read_count,
            unread_count: e.unread_count,
            readers: e.readers.iter().cloned().collect(),
            readers_truncated: false,
            read_up_to_ms: e.read_up_to_ms,
            first_event_time_ms: e.event_time_ms,
            last_event_time_ms: e.event_time_ms,
        };
        s.cap_readers(max_readers);
        s
    }

    /// Merges `other` into `self` (the least upper bound of the two);
    /// returns whether `self` changed. Both describe the same key.
    pub fn join(&mut self, other: &ReadState, max_readers: usize) -> bool {
        let before = (
            self.read_count,
            self.unread_count,
            self.readers.len(),
            self.readers_truncated,
            self.read_up_to_ms,
            self.first_event_time_ms,
            self.last_event_time_ms,
        );
        self.read_count = self.read_count.max(other.read_count);
        self.unread_count = match (self.unread_count, other.unread_count) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut added = Vec::new();
        for r in &other.readers {
            if !self.readers.contains(r) {
                self.readers.insert(r.clone());
                added.push(r);
            }
        }
        self.readers_truncated |= other.readers_truncated;
        self.cap_readers(max_readers);
        // A reader added and then cut off by the cap changes only the flag.
        let readers_changed = added.iter().any(|r| self.readers.contains(*r));
        self.read_up_to_ms = self.read_up_to_ms.max(other.read_up_to_ms);
        self.first_event_time_ms = self.first_event_time_ms.min(other.first_event_time_ms);
        self.last_event_time_ms = self.last_event_time_ms.max(other.last_event_time_ms);
        readers_changed
            || before
                != (
                    self.read_count,
                    self.unread_count,
                    self.readers.len(),
                    self.readers_truncated,
                    self.read_up_to_ms,
                    self.first_event_time_ms,
                    self.last_event_time_ms,
                )
    }

    /// Folds one event in; returns whether the state changed (and so must
    /// be written).
    pub fn fold(&mut self, e: &ReadEvent, max_readers: usize) -> bool {
        self.join(&ReadState::of_event(e, max_readers), max_readers)
    }

    /// Keeps the smallest readers whose JSON (quoted, escaped, a comma each)
    /// fits in [`READERS_MAX_JSON_BYTES`]; true when that dropped any. The
    /// last resort against a value Kafka refuses (the materializer would
    /// exit on it at every restart): [`readers_that_fit`] keeps the count
    /// within it for accounts within `limits.account_bytes`. Unlike the
    /// count cap, this cut is not order-independent in every case (a short
    /// reader may fit after a long one was dropped), so it is kept for
    /// inputs that pass the limits.
    pub fn cap_reader_bytes(&mut self) -> bool {
        // The brackets, and a comma after each but the last reader.
        let mut used = 1usize;
        let mut cut = None;
        for r in &self.readers {
            used += json_string_len(r) + 1;
            if used > READERS_MAX_JSON_BYTES {
                cut = Some(r.clone());
                break;
            }
        }
        let Some(first_out) = cut else {
            return false;
        };
        self.readers.split_off(&first_out);
        self.readers_truncated = true;
        true
    }

    /// Keeps the `max` smallest readers: the n smallest of a union are the n
    /// smallest of the union of each side's n smallest, so capping keeps
    /// the join order-independent.
    fn cap_readers(&mut self, max: usize) {
        while self.readers.len() > max {
            self.readers.pop_last();
            self.readers_truncated = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(seq: u64, read: u64, unread: u64, readers: &[&str], t: u64) -> ReadEvent {
        ReadEvent {
            schema: "read_receipt.v1".into(),
            kind: Kind::GroupMessage,
            sdk_app_id: 1,
            conversation_id: "@TGS#g".into(),
            group_id: Some("@TGS#g".into()),
            msg_seq: Some(seq),
            msg_key: None,
            read_count: Some(read),
            unread_count: Some(unread),
            readers: readers.iter().map(|s| s.to_string()).collect(),
            read_up_to_ms: None,
            event_time_ms: t,
        }
    }

    #[test]
    fn counts_readers_and_times_move_one_way_only() {
        let mut s = ReadState::of_event(&group(7, 2, 5, &["b"], 20), 10);
        assert!(s.fold(&group(7, 3, 4, &["c"], 30), 10));
        // An older callback lowers nothing but still adds its reader and time.
        assert!(s.fold(&group(7, 1, 6, &["a"], 10), 10));
        assert_eq!(s.read_count, Some(3));
        assert_eq!(s.unread_count, Some(4));
        assert_eq!(s.readers.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!((s.first_event_time_ms, s.last_event_time_ms), (10, 30));
        // A duplicate changes nothing: nothing is written.
        assert!(!s.fold(&group(7, 3, 4, &["c"], 30), 10));
        assert_eq!(ReadEvent::key(&group(7, 1, 1, &[], 1)), "1/@TGS#g/7");
    }

    #[test]
    fn readers_past_the_cap_are_the_smallest_and_flagged() {
        let mut s = ReadState::of_event(&group(1, 1, 1, &["m", "z"], 1), 2);
        assert!(!s.readers_truncated);
        assert!(s.fold(&group(1, 1, 1, &["a"], 1), 2));
        assert_eq!(s.readers.iter().collect::<Vec<_>>(), ["a", "m"]);
        assert!(s.readers_truncated);
        // A reader beyond the kept ones changes nothing more.
        assert!(!s.fold(&group(1, 1, 1, &["y"], 1), 2));
    }

    #[test]
    fn watermark_key_names_the_reader_and_counts_stay_null() {
        let e = ReadEvent {
            schema: "read_receipt.v1".into(),
            kind: Kind::C2cWatermark,
            sdk_app_id: 9,
            conversation_id: "c2c:alice:bob".into(),
            group_id: None,
            msg_seq: None,
            msg_key: None,
            read_count: None,
            unread_count: None,
            readers: vec!["bob".into()],
            read_up_to_ms: Some(5000),
            event_time_ms: 5005,
        };
        assert_eq!(e.key(), "9/c2c:alice:bob/watermark/bob");
        // A MsgKey shaped like a watermark ref, and a GroupId shaped like a
        // one-to-one conversation, get keys of their own.
        let msg = ReadEvent {
            kind: Kind::C2cMessage,
            msg_key: Some("watermark/bob".into()),
            readers: vec![],
            read_up_to_ms: None,
            ..e.clone()
        };
        assert_eq!(msg.key(), "9/c2c:alice:bob/watermark%2Fbob");
        let grp = ReadEvent {
            kind: Kind::GroupMessage,
            conversation_id: "c2c:alice:bob/watermark".into(),
            group_id: Some("c2c:alice:bob/watermark".into()),
            msg_seq: Some(1),
            readers: vec![],
            read_up_to_ms: None,
            ..e.clone()
        };
        assert_eq!(grp.key(), "9/c2c%3Aalice%3Abob%2Fwatermark/1");
        let pct = ReadEvent {
            conversation_id: "@TGS#1%2F".into(),
            group_id: Some("@TGS#1%2F".into()),
            ..grp.clone()
        };
        assert_eq!(pct.key(), "9/@TGS#1%252F/1");
        let s = ReadState::of_event(&e, 10);
        assert_eq!(s.reader.as_deref(), Some("bob"));
        assert_eq!((s.read_count, s.unread_count), (None, None));
    }

    #[test]
    fn events_missing_their_reference_are_invalid() {
        let v = br#"{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":1,"conversation_id":"g","event_time_ms":1}"#;
        assert!(matches!(
            ReadEvent::parse(v),
            Err(InvalidEvent::Missing(_, "msg_seq"))
        ));
        assert!(ReadEvent::parse(b"{").is_err());
        let v2 = br#"{"schema":"read_receipt.v2","kind":"group_message","sdk_app_id":1,"conversation_id":"g","msg_seq":1,"event_time_ms":1}"#;
        assert!(matches!(ReadEvent::parse(v2), Err(InvalidEvent::Schema(_))));
    }

    #[test]
    fn the_count_of_readers_fits_their_bytes() {
        assert_eq!(readers_that_fit(1000, 128), 1000);
        assert_eq!(readers_that_fit(100_000, 128), READERS_MAX_JSON_BYTES / 131);
        assert_eq!(readers_that_fit(100_000, 1 << 30), 1);
        // Readers at the limit, that many, fit.
        let n = readers_that_fit(100_000, 128);
        let readers: Vec<String> = (0..n).map(|i| format!("{i:0128}")).collect();
        assert!(serde_json::to_string(&readers).unwrap().len() <= READERS_MAX_JSON_BYTES);
    }

    #[test]
    fn the_byte_cap_keeps_the_same_readers_of_one_length_in_any_order() {
        let names: Vec<String> = (0..40_000)
            .map(|i| format!("reader-{i:08}-\"q\""))
            .collect();
        let refs = |r: std::ops::Range<usize>| -> Vec<&str> {
            names[r].iter().map(String::as_str).collect()
        };
        let a = group(1, 1, 0, &refs(0..20_000), 1);
        let b = group(1, 2, 0, &refs(20_000..40_000), 2);
        let capped = |first: &ReadEvent, second: &ReadEvent| {
            let mut s = ReadState::of_event(first, 100_000);
            s.cap_reader_bytes();
            s.fold(second, 100_000);
            s.cap_reader_bytes();
            s
        };
        let (ab, ba) = (capped(&a, &b), capped(&b, &a));
        assert_eq!(ab.readers, ba.readers);
        assert!(ab.readers_truncated);
        let json = serde_json::to_string(&ab.readers).unwrap();
        assert!(json.len() <= READERS_MAX_JSON_BYTES, "{}", json.len());
        // The smallest ones: a prefix of all the names, sorted.
        assert!(ab.readers.iter().zip(&names).all(|(x, y)| x == y));
        // Nothing to cut: nothing changes.
        let mut small = ReadState::of_event(&group(1, 1, 0, &["a"], 1), 10);
        assert!(!small.cap_reader_bytes());
        assert!(!small.readers_truncated);
    }
}
