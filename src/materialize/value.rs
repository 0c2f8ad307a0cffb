//! `read_state.v1`: the state record's value as consumers read it, and back
//! again when a materializer rebuilds a partition from the state topic.
//!
//! The key is [`ReadEvent::key`](super::fold::ReadEvent::key); the value is
//! JSON in the field order of `schema/read_state.v1.json`, with the header
//! `timbridge-schema: read_state.v1` so consumers can tell it from other
//! records without parsing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::fold::{Kind, ReadState};

pub const SCHEMA: &str = "read_state.v1";
/// The header every state record carries, with [`SCHEMA`] as its value.
pub const SCHEMA_HEADER: &str = "timbridge-schema";

#[derive(Serialize)]
struct Out<'a> {
    schema: &'static str,
    kind: Kind,
    sdk_app_id: u64,
    conversation_id: &'a str,
    group_id: Option<&'a str>,
    msg_seq: Option<u64>,
    msg_key: Option<&'a str>,
    reader: Option<&'a str>,
    read_count: Option<u64>,
    unread_count: Option<u64>,
    readers: &'a BTreeSet<String>,
    readers_truncated: bool,
    read_up_to_ms: Option<u64>,
    first_event_time_ms: u64,
    last_event_time_ms: u64,
    updated_at_ms: u64,
}

/// The record value for `state`, stamped with the wall clock.
pub fn encode(state: &ReadState, updated_at_ms: u64) -> Vec<u8> {
    let out = Out {
        schema: SCHEMA,
        kind: state.kind,
        sdk_app_id: state.sdk_app_id,
        conversation_id: &state.conversation_id,
        group_id: state.group_id.as_deref(),
        msg_seq: state.msg_seq,
        msg_key: state.msg_key.as_deref(),
        reader: state.reader.as_deref(),
        read_count: state.read_count,
        unread_count: state.unread_count,
        readers: &state.readers,
        readers_truncated: state.readers_truncated,
        read_up_to_ms: state.read_up_to_ms,
        first_event_time_ms: state.first_event_time_ms,
        last_event_time_ms: state.last_event_time_ms,
        updated_at_ms,
    };
    // Strings, integers and booleans always serialize.
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Deserialize)]
struct In {
    schema: String,
    #[serde(flatten)]
    state: ReadState,
}

/// A state record's value read back; `None` for anything that is not a
/// `read_state.v1` value (a record someone else wrote to the topic).
pub fn decode(bytes: &[u8]) -> Option<ReadState> {
    let v: In = serde_json::from_slice(bytes).ok()?;
    (v.schema == SCHEMA).then_some(v.state)
}

/// Milliseconds since the Unix epoch, for `updated_at_ms`.
pub use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_reads_back_as_the_state_it_was_written_from() {
        let e = super::super::fold::ReadEvent::parse(
            br#"{"schema":"read_receipt.v1","kind":"c2c_message","sdk_app_id":3,"conversation_id":"c2c:a:b","msg_key":"k1","readers":["a"],"event_time_ms":9}"#,
        )
        .unwrap();
        let s = ReadState::of_event(&e, 5);
        let bytes = encode(&s, 1234);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with(r#"{"schema":"read_state.v1","kind":"c2c_message","#),
            "{text}"
        );
        assert!(text.ends_with(r#""updated_at_ms":1234}"#), "{text}");
        assert_eq!(decode(&bytes), Some(s));
        assert_eq!(decode(b"{\"schema\":\"other\"}"), None);
    }
}
