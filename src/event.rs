//! `read_receipt.v1`: the normalized event other teams consume (README,
//! "The event, `read_receipt.v1`").
//!
//! One event per message read: one per `GroupMsgReceiptList` item, one per
//! `C2CMsgInfo` item, one per `C2C.CallbackAfterMsgReport`. Each event knows
//! its topic (group or one-to-one) and its key (GroupId, or `c2c:<a>:<b>` with
//! the two accounts in byte order), so every conversation lands in one
//! partition, in order.
//!
//! Accounts are the sender's to choose, so the conversation id escapes `%`
//! and `:` in them (`%25`, `%3A`): two different pairs of accounts never share
//! a key. Tencent's UserIDs have neither, so real ids are unchanged.
//!
//! `event_id` is a hash of the callback's content, not of its arrival: the
//! same receipt gets the same id on whichever replica receives it and however
//! often Tencent (or a replay after a crash) delivers it, which is what lets
//! consumers drop duplicates.
//!
//! A callback may add at most [`OUTPUT_BYTES_PER_REQUEST_BYTE`] bytes to the
//! spool per byte of its request (or a small fixed allowance, whichever is
//! more): [`normalize_within`] measures each record before building it and
//! stops at the budget.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::limits::{OUTPUT_BYTES_ALLOWANCE, OUTPUT_BYTES_PER_REQUEST_BYTE};
use crate::record::{EventId, Record, TopicRole};
use crate::tencent::payload::{C2cReadReceipt, C2cReport, Callback, GroupReadReceipt};
use crate::tencent::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};

pub const SCHEMA: &str = "read_receipt.v1";

/// An event's `kind`: one group message read, one one-to-one message read,
/// or one reader's watermark in a one-to-one chat. Each kind comes from one
/// callback command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    GroupMessage,
    C2cMessage,
    C2cWatermark,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::GroupMessage, Kind::C2cMessage, Kind::C2cWatermark];

    /// The `kind` field's value (serde spells it the same; a test holds them
    /// together).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::GroupMessage => "group_message",
            Kind::C2cMessage => "c2c_message",
            Kind::C2cWatermark => "c2c_watermark",
        }
    }

    /// The callback command whose events are of this kind.
    pub const fn command(self) -> &'static str {
        match self {
            Kind::GroupMessage => GROUP_READ_RECEIPT,
            Kind::C2cMessage => C2C_READ_RECEIPT,
            Kind::C2cWatermark => C2C_REPORT,
        }
    }

    /// The kind of the events a callback command makes, if it makes any.
    pub fn of_command(command: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.command() == command)
    }

    /// Group events go to `kafka.group_topic`, the others to `kafka.c2c_topic`.
    pub fn is_group(self) -> bool {
        self == Kind::GroupMessage
    }
}

/// What the HTTP request adds to the body: who sent it, when it arrived, and
/// the query string's client details.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub sdk_app_id: u64,
    pub received_at_ms: u64,
    pub client_ip: Option<&'a str>,
    pub platform: Option<&'a str>,
}

/// The event as it is serialized; field order is the README's ("The event,
/// `read_receipt.v1`").
#[derive(Debug, Serialize)]
struct Event<'a> {
    schema: &'static str,
    event_id: &'a str,
    kind: Kind,
    sdk_app_id: u64,
    callback_command: &'static str,
    conversation_type: &'static str,
    conversation_id: &'a str,
    group_id: Option<&'a str>,
    group_type: Option<&'a str>,
    msg_seq: Option<u64>,
    msg_key: Option<&'a str>,
    msg_id: Option<&'a str>,
    read_count: Option<u64>,
    unread_count: Option<u64>,
    readers: &'a [&'a str],
    peer: Option<&'a str>,
    read_up_to_ms: Option<u64>,
    unread_total: Option<u64>,
    event_time_ms: u64,
    received_at_ms: u64,
    client_ip: Option<&'a str>,
    platform: Option<&'a str>,
}

impl Event<'_> {
    /// Writes the event's JSON: byte for byte what `serde_json` writes for
    /// the derived `Serialize` (debug builds, the tests and the fuzzers
    /// among them, compare the two for every event), without its
    /// per-field machinery. Through serde it was about 4% of the CPU under
    /// load: 22 keys escaped byte by byte on every event, each value
    /// through a formatter call or three (bench/README.md, eighth pass).
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"schema\":");
        json_str(out, self.schema);
        out.extend_from_slice(b",\"event_id\":");
        json_str(out, self.event_id);
        out.extend_from_slice(b",\"kind\":");
        json_str(out, self.kind.as_str());
        out.extend_from_slice(b",\"sdk_app_id\":");
        json_u64(out, self.sdk_app_id);
        out.extend_from_slice(b",\"callback_command\":");
        json_str(out, self.callback_command);
        out.extend_from_slice(b",\"conversation_type\":");
        json_str(out, self.conversation_type);
        out.extend_from_slice(b",\"conversation_id\":");
        json_str(out, self.conversation_id);
        out.extend_from_slice(b",\"group_id\":");
        json_opt_str(out, self.group_id);
        out.extend_from_slice(b",\"group_type\":");
        json_opt_str(out, self.group_type);
        out.extend_from_slice(b",\"msg_seq\":");
        json_opt_u64(out, self.msg_seq);
        out.extend_from_slice(b",\"msg_key\":");
        json_opt_str(out, self.msg_key);
        out.extend_from_slice(b",\"msg_id\":");
        json_opt_str(out, self.msg_id);
        out.extend_from_slice(b",\"read_count\":");
        json_opt_u64(out, self.read_count);
        out.extend_from_slice(b",\"unread_count\":");
        json_opt_u64(out, self.unread_count);
        out.extend_from_slice(b",\"readers\":[");
        for (i, reader) in self.readers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, reader);
        }
        out.extend_from_slice(b"],\"peer\":");
        json_opt_str(out, self.peer);
        out.extend_from_slice(b",\"read_up_to_ms\":");
        json_opt_u64(out, self.read_up_to_ms);
        out.extend_from_slice(b",\"unread_total\":");
        json_opt_u64(out, self.unread_total);
        out.extend_from_slice(b",\"event_time_ms\":");
        json_u64(out, self.event_time_ms);
        out.extend_from_slice(b",\"received_at_ms\":");
        json_u64(out, self.received_at_ms);
        out.extend_from_slice(b",\"client_ip\":");
        json_opt_str(out, self.client_ip);
        out.extend_from_slice(b",\"platform\":");
        json_opt_str(out, self.platform);
        out.push(b'}');
    }
}

/// A JSON string. Nearly every value needs no escape: those are copied
/// whole after one pass that the compiler vectorizes; the rest go through
/// `serde_json`, so that escapes are spelled exactly as it spells them.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if needs_escape {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json_opt_u64(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => json_u64(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// The conversation id of a one-to-one chat: `c2c:<a>:<b>`, `a` ≤ `b` in byte
/// order, so both directions of a chat share one key and one partition.
/// `%` and `:` in an account are written `%25` and `%3A`, so that the id
/// names exactly one pair: `a:b:a`+`a:b` and `a:b:a`+`b:a` would otherwise
/// both give `c2c:a:b:a:b:a`.
pub fn c2c_conversation_id(x: &str, y: &str) -> String {
    let (a, b) = if x.as_bytes() <= y.as_bytes() {
        (x, y)
    } else {
        (y, x)
    };
    let mut id = String::with_capacity(5 + a.len() + b.len());
    id.push_str("c2c:");
    push_escaped(&mut id, a);
    id.push(':');
    push_escaped(&mut id, b);
    id
}

fn push_escaped(id: &mut String, account: &str) {
    for c in account.chars() {
        match c {
            '%' => id.push_str("%25"),
            ':' => id.push_str("%3A"),
            c => id.push(c),
        }
    }
}

/// Tencent's `OptPlatform` spellings vary (`iOS`, `IOS`; `Mac`, `macOS`):
/// known values get one spelling, unknown ones are kept as sent.
pub fn canonical_platform(p: &str) -> &str {
    const KNOWN: [&str; 8] = [
        "RESTAPI", "Web", "Android", "iOS", "Windows", "Mac", "iPad", "Unknown",
    ];
    if p.eq_ignore_ascii_case("macos") {
        return "Mac";
    }
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(p))
        .copied()
        .unwrap_or(p)
}

/// Who the event is between, as the event id hashes it.
#[derive(Clone, Copy)]
enum Parties<'a> {
    Group(&'a str),
    /// The reader (operator or reporter) and the peer, each its own part:
    /// no joined string that two different pairs could share.
    C2c {
        reader: &'a str,
        peer: &'a str,
    },
}

/// The parts of an event that identify it; `received_at_ms` is not one.
struct Identity<'a> {
    sdk_app_id: u64,
    command: &'a str,
    parties: Parties<'a>,
    message_ref: &'a str,
    readers: &'a [&'a str],
    event_time_ms: u64,
}

impl Identity<'_> {
    /// The first 16 bytes of a SHA-256 over the parts, each length-prefixed so
    /// that no two different part lists hash the same bytes.
    fn event_id(&self) -> EventId {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(SCHEMA.as_bytes());
        part(&self.sdk_app_id.to_le_bytes());
        part(self.command.as_bytes());
        match self.parties {
            Parties::Group(group_id) => part(group_id.as_bytes()),
            Parties::C2c { reader, peer } => {
                part(b"c2c");
                part(reader.as_bytes());
                part(peer.as_bytes());
            }
        }
        part(self.message_ref.as_bytes());
        part(&(self.readers.len() as u64).to_le_bytes());
        for r in self.readers {
            part(r.as_bytes());
        }
        part(&self.event_time_ms.to_le_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 32];
        // 16 bytes → 32 hex characters; cannot fail with these lengths.
        let _ = hex::encode_to_slice(&digest[..16], &mut id);
        EventId(id)
    }
}

/// A callback whose records would take more than its budget of spool bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    pub budget: usize,
}

/// Turns a checked callback into its Kafka records, appending to `out`,
/// with no budget (for callers that bound the input otherwise).
pub fn normalize(cb: &Callback<'_>, env: &Envelope<'_>, out: &mut Vec<Record>) {
    // Cannot fail: no callback's records exceed the address space.
    let _ = normalize_within(cb, env, usize::MAX, out);
}

/// The spool bytes a callback of `request_bytes` (query string + body) may
/// add: [`OUTPUT_BYTES_PER_REQUEST_BYTE`] per byte, plus
/// [`OUTPUT_BYTES_ALLOWANCE`].
pub fn budget_for(request_bytes: usize) -> usize {
    request_bytes
        .saturating_mul(OUTPUT_BYTES_PER_REQUEST_BYTE)
        .saturating_add(OUTPUT_BYTES_ALLOWANCE)
}

/// Turns a checked callback into its Kafka records, appending to `out`, as
/// long as they fit in `budget` bytes of spool (each record's encoding plus
/// the spool's framing). Records are built one at a time and each is
/// measured as it is built, so a callback over its budget costs at most the
/// one record that did not fit (a record is bounded by the body it came
/// from); `out` may then hold the records before it.
pub fn normalize_within(
    cb: &Callback<'_>,
    env: &Envelope<'_>,
    budget: usize,
    out: &mut Vec<Record>,
) -> Result<(), OverBudget> {
    let base = Base {
        env,
        platform: env.platform.map(canonical_platform),
    };
    let mut out = Out {
        budget,
        left: budget,
        records: out,
    };
    match cb {
        Callback::Group(g) => group_events(g, &base, &mut out),
        Callback::C2cReceipt(c) => c2c_events(c, &base, &mut out),
        Callback::C2cReport(r) => watermark_event(r, &base, &mut out),
    }
}

/// One event per `GroupMsgReceiptList` item.
fn group_events(g: &GroupReadReceipt<'_>, base: &Base<'_>, out: &mut Out<'_>) -> Fallible {
    let kind = Kind::GroupMessage;
    for item in &g.receipts {
        let readers: Vec<&str> = item.members.iter().map(|m| m.account.as_ref()).collect();
        let msg_ref = item.msg_seq.to_string();
        let parties = Parties::Group(&g.group_id);
        let id = base.event_id(kind, parties, &msg_ref, &readers, g.event_time_ms);
        let event = Event {
            group_id: Some(&g.group_id),
            group_type: g.group_type.as_deref(),
            msg_seq: Some(item.msg_seq),
            read_count: Some(item.read_num),
            unread_count: Some(item.unread_num),
            ..base.event(kind, &id, &g.group_id, &readers, g.event_time_ms)
        };
        out.push(g.group_id.as_bytes(), id, &event)?;
    }
    Ok(())
}

/// One event per `C2CMsgInfo` item: the operator read the peer's message.
fn c2c_events(c: &C2cReadReceipt<'_>, base: &Base<'_>, out: &mut Out<'_>) -> Fallible {
    let kind = Kind::C2cMessage;
    let conversation_id = c2c_conversation_id(&c.operator, &c.peer);
    let readers = [c.operator.as_ref()];
    let parties = Parties::C2c {
        reader: &c.operator,
        peer: &c.peer,
    };
    for item in &c.messages {
        let id = base.event_id(kind, parties, &item.msg_key, &readers, c.event_time_ms);
        let event = Event {
            msg_key: Some(&item.msg_key),
            msg_id: item.msg_id.as_deref(),
            peer: Some(&c.peer),
            ..base.event(kind, &id, &conversation_id, &readers, c.event_time_ms)
        };
        out.push(conversation_id.as_bytes(), id, &event)?;
    }
    Ok(())
}

/// One event: the reporter has read everything up to `LastReadTime`.
fn watermark_event(r: &C2cReport<'_>, base: &Base<'_>, out: &mut Out<'_>) -> Fallible {
    let kind = Kind::C2cWatermark;
    let conversation_id = c2c_conversation_id(&r.reporter, &r.peer);
    let readers = [r.reporter.as_ref()];
    // The parser refuses seconds whose milliseconds overflow, so this is
    // exact for every parsed body.
    let read_up_to_ms = r.last_read_time_s.saturating_mul(MS_PER_S);
    let event_time_ms = r.event_time_ms.unwrap_or(read_up_to_ms);
    let parties = Parties::C2c {
        reader: &r.reporter,
        peer: &r.peer,
    };
    let msg_ref = read_up_to_ms.to_string();
    let id = base.event_id(kind, parties, &msg_ref, &readers, event_time_ms);
    let event = Event {
        peer: Some(&r.peer),
        read_up_to_ms: Some(read_up_to_ms),
        unread_total: r.unread_msg_num,
        ..base.event(kind, &id, &conversation_id, &readers, event_time_ms)
    };
    out.push(conversation_id.as_bytes(), id, &event)
}

const MS_PER_S: u64 = 1000;

type Fallible = Result<(), OverBudget>;

/// What every event of one callback shares: the request's envelope.
struct Base<'a> {
    env: &'a Envelope<'a>,
    platform: Option<&'a str>,
}

impl<'a> Base<'a> {
    fn event_id(
        &self,
        kind: Kind,
        parties: Parties<'_>,
        message_ref: &str,
        readers: &[&str],
        event_time_ms: u64,
    ) -> EventId {
        Identity {
            sdk_app_id: self.env.sdk_app_id,
            command: kind.command(),
            parties,
            message_ref,
            readers,
            event_time_ms,
        }
        .event_id()
    }

    /// An event of `kind` with the fields every kind fills; the kind's own
    /// fields are `None` until its builder sets them.
    fn event<'e>(
        &'e self,
        kind: Kind,
        id: &'e EventId,
        conversation_id: &'e str,
        readers: &'e [&'e str],
        event_time_ms: u64,
    ) -> Event<'e> {
        Event {
            schema: SCHEMA,
            event_id: id.as_str(),
            kind,
            sdk_app_id: self.env.sdk_app_id,
            callback_command: kind.command(),
            conversation_type: if kind.is_group() { "group" } else { "c2c" },
            conversation_id,
            group_id: None,
            group_type: None,
            msg_seq: None,
            msg_key: None,
            msg_id: None,
            read_count: None,
            unread_count: None,
            readers,
            peer: None,
            read_up_to_ms: None,
            unread_total: None,
            event_time_ms,
            received_at_ms: self.env.received_at_ms,
            client_ip: self.env.client_ip,
            platform: self.platform,
        }
    }
}

/// The spool's framing around each record (its record header).
const SPOOL_FRAMING: usize = 24;

/// A typical event's JSON is 400-600 bytes: one allocation holds it, and
/// a larger one grows as usual.
const VALUE_CAPACITY_HINT: usize = 640;

/// Where a callback's records go, and how many spool bytes they have left.
struct Out<'o> {
    budget: usize,
    left: usize,
    records: &'o mut Vec<Record>,
}

impl Out<'_> {
    /// Appends the record of `event`, keyed by `key`, if it fits the budget.
    fn push(&mut self, key: &[u8], event_id: EventId, event: &Event<'_>) -> Fallible {
        // Serialized once, then measured: a record over the budget costs
        // its own size once (bounded by the body it came from) and is
        // dropped; serializing twice to measure first cost every record.
        // A struct of strings and integers cannot fail to serialize.
        let mut value = Vec::with_capacity(VALUE_CAPACITY_HINT);
        event.write_json(&mut value);
        debug_assert_eq!(
            value,
            serde_json::to_vec(event).unwrap_or_default(),
            "write_json differs from serde_json"
        );
        let record = Record {
            topic: if event.kind.is_group() {
                TopicRole::Group
            } else {
                TopicRole::C2c
            },
            key: key.to_vec(),
            value,
            event_id: Some(event_id),
            command: event.callback_command.into(),
            sdk_app_id: event.sdk_app_id,
        };
        let size = record.encoded_len() + SPOOL_FRAMING;
        self.left = self.left.checked_sub(size).ok_or(OverBudget {
            budget: self.budget,
        })?;
        self.records.push(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tencent::payload::parse;
    use serde_json::{Value, json};

    /// `write_json` against serde_json over the strings that need escapes
    /// and those that do not, every optional field present and absent, and
    /// the extremes of each number.
    #[test]
    fn write_json_is_what_serde_json_writes() {
        let strings = [
            "",
            "plain",
            "@TGS#2J4SZEAEL",
            "quote\"inside",
            "back\\slash",
            "new\nline and tab\t",
            "\u{0}\u{1}\u{1f} controls",
            "\u{7f} is not escaped",
            "slash / stays",
            "é, 中文, 😀",
            "</script>",
        ];
        let numbers = [0, 1, 9, 10, 1_670_574_414_123, u64::MAX];
        for (i, s) in strings.iter().enumerate() {
            for (j, &n) in numbers.iter().enumerate() {
                let some = (i + j) % 2 == 0;
                let opt = |v: &'static str| some.then_some(v);
                let readers: Vec<&str> = strings.iter().copied().take(j).collect();
                let event = Event {
                    schema: SCHEMA,
                    event_id: s,
                    kind: Kind::ALL[(i + j) % 3],
                    sdk_app_id: n,
                    callback_command: Kind::ALL[i % 3].command(),
                    conversation_type: "c2c",
                    conversation_id: s,
                    group_id: opt(s),
                    group_type: opt("Public"),
                    msg_seq: some.then_some(n),
                    msg_key: opt(s),
                    msg_id: (!some).then_some(*s),
                    read_count: some.then_some(n),
                    unread_count: (!some).then_some(n),
                    readers: &readers,
                    peer: opt(s),
                    read_up_to_ms: some.then_some(n),
                    unread_total: (!some).then_some(n),
                    event_time_ms: n,
                    received_at_ms: numbers[(j + 1) % numbers.len()],
                    client_ip: opt("127.0.0.1"),
                    platform: (!some).then_some(*s),
                };
                let mut ours = Vec::new();
                event.write_json(&mut ours);
                let theirs = serde_json::to_vec(&event).expect("serialize");
                assert!(
                    ours == theirs,
                    "string {s:?}, number {n}:\n ours   {}\n theirs {}",
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }

    const ENV: Envelope<'static> = Envelope {
        sdk_app_id: 1400000000,
        received_at_ms: 1670574414130,
        client_ip: Some("127.0.0.1"),
        platform: Some("iOS"),
    };

    fn events(command: &str, body: &str, env: &Envelope) -> Vec<(Record, Value)> {
        let cb = parse(command, body.as_bytes()).unwrap().unwrap();
        let mut out = Vec::new();
        normalize(&cb, env, &mut out);
        out.into_iter()
            .map(|r| {
                let v: Value = serde_json::from_slice(&r.value).unwrap();
                (r, v)
            })
            .collect()
    }

    const GROUP: &str = r#"{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"@TGS#2TTV7VSII","Type":"Public",
        "GroupMsgReceiptList":[
          {"MsgSeq":1,"ReadNum":1,"UnreadNum":6,"ReadReceiptMembers":[{"Member_Account":"user0"}]},
          {"MsgSeq":2,"ReadNum":2,"UnreadNum":5,"ReadReceiptMembers":[{"Member_Account":"user0"},{"Member_Account":"user1"}]}],
        "EventTime":"1670574414123"}"#;

    #[test]
    fn group_receipt_gives_one_event_per_item_with_every_field() {
        let evs = events(GROUP_READ_RECEIPT, GROUP, &ENV);
        assert_eq!(evs.len(), 2);
        let (r, v) = &evs[0];
        assert_eq!(r.topic, TopicRole::Group);
        assert_eq!(r.key, b"@TGS#2TTV7VSII");
        assert_eq!(r.event_id.as_ref().unwrap().as_str(), v["event_id"]);
        let id = v["event_id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let mut expected = json!({
            "schema": "read_receipt.v1",
            "event_id": id,
            "kind": "group_message",
            "sdk_app_id": 1400000000u64,
            "callback_command": "Group.CallbackAfterReadReceipt",
            "conversation_type": "group",
            "conversation_id": "@TGS#2TTV7VSII",
            "group_id": "@TGS#2TTV7VSII",
            "group_type": "Public",
            "msg_seq": 1,
            "msg_key": null,
            "msg_id": null,
            "read_count": 1,
            "unread_count": 6,
            "readers": ["user0"],
            "peer": null,
            "read_up_to_ms": null,
            "unread_total": null,
            "event_time_ms": 1670574414123u64,
            "received_at_ms": 1670574414130u64,
            "client_ip": "127.0.0.1",
            "platform": "iOS"
        });
        assert_eq!(v, &expected);
        // Field order is the README's.
        let text = String::from_utf8(r.value.clone()).unwrap();
        assert!(text.starts_with("{\"schema\":\"read_receipt.v1\",\"event_id\":"));
        expected["msg_seq"] = json!(2);
        expected["read_count"] = json!(2);
        expected["unread_count"] = json!(5);
        expected["readers"] = json!(["user0", "user1"]);
        expected["event_id"] = evs[1].1["event_id"].clone();
        assert_eq!(evs[1].1, expected);
        assert_ne!(evs[0].1["event_id"], evs[1].1["event_id"]);
    }

    #[test]
    fn c2c_receipt_gives_one_event_per_message() {
        let body = r#"{"Operator_Account":"zed","Peer_Account":"amy","C2CMsgInfo":[
            {"From_Account":"amy","To_Account":"zed","MsgKey":"1_2_3","MsgId":"m-1"},
            {"From_Account":"amy","To_Account":"zed","MsgKey":"4_5_6"}],"EventTime":1670574414123}"#;
        let env = Envelope {
            client_ip: None,
            platform: None,
            ..ENV
        };
        let evs = events(C2C_READ_RECEIPT, body, &env);
        assert_eq!(evs.len(), 2);
        let (r, v) = &evs[0];
        assert_eq!(r.topic, TopicRole::C2c);
        assert_eq!(r.key, b"c2c:amy:zed");
        let expected = json!({
            "schema": "read_receipt.v1",
            "event_id": v["event_id"],
            "kind": "c2c_message",
            "sdk_app_id": 1400000000u64,
            "callback_command": "C2C.CallbackAfterMsgReadReceipt",
            "conversation_type": "c2c",
            "conversation_id": "c2c:amy:zed",
            "group_id": null,
            "group_type": null,
            "msg_seq": null,
            "msg_key": "1_2_3",
            "msg_id": "m-1",
            "read_count": null,
            "unread_count": null,
            "readers": ["zed"],
            "peer": "amy",
            "read_up_to_ms": null,
            "unread_total": null,
            "event_time_ms": 1670574414123u64,
            "received_at_ms": 1670574414130u64,
            "client_ip": null,
            "platform": null
        });
        assert_eq!(v, &expected);
        assert_eq!(evs[1].1["msg_key"], "4_5_6");
        assert_eq!(evs[1].1["msg_id"], Value::Null);
    }

    #[test]
    fn c2c_report_gives_one_watermark_event() {
        let body = r#"{"Report_Account":"amy","Peer_Account":"zed","LastReadTime":1670574414,"UnreadMsgNum":3}"#;
        let evs = events(C2C_REPORT, body, &ENV);
        assert_eq!(evs.len(), 1);
        let (r, v) = &evs[0];
        assert_eq!(r.topic, TopicRole::C2c);
        assert_eq!(r.key, b"c2c:amy:zed");
        let expected = json!({
            "schema": "read_receipt.v1",
            "event_id": v["event_id"],
            "kind": "c2c_watermark",
            "sdk_app_id": 1400000000u64,
            "callback_command": "C2C.CallbackAfterMsgReport",
            "conversation_type": "c2c",
            "conversation_id": "c2c:amy:zed",
            "group_id": null,
            "group_type": null,
            "msg_seq": null,
            "msg_key": null,
            "msg_id": null,
            "read_count": null,
            "unread_count": null,
            "readers": ["amy"],
            "peer": "zed",
            "read_up_to_ms": 1670574414000u64,
            "unread_total": 3,
            // No EventTime in the body: LastReadTime × 1000.
            "event_time_ms": 1670574414000u64,
            "received_at_ms": 1670574414130u64,
            "client_ip": "127.0.0.1",
            "platform": "iOS"
        });
        assert_eq!(v, &expected);
        let with_time = r#"{"Report_Account":"amy","Peer_Account":"zed","LastReadTime":1670574414,"EventTime":"1670574415000"}"#;
        let evs = events(C2C_REPORT, with_time, &ENV);
        assert_eq!(evs[0].1["event_time_ms"], 1670574415000u64);
        assert_eq!(evs[0].1["unread_total"], Value::Null);
    }

    #[test]
    fn event_id_is_deterministic_and_ignores_arrival() {
        let a = events(GROUP_READ_RECEIPT, GROUP, &ENV);
        let later = Envelope {
            received_at_ms: ENV.received_at_ms + 5000,
            client_ip: Some("10.0.0.9"),
            ..ENV
        };
        let b = events(GROUP_READ_RECEIPT, GROUP, &later);
        assert_eq!(a[0].1["event_id"], b[0].1["event_id"]);
        assert_eq!(a[1].1["event_id"], b[1].1["event_id"]);
        // Content changes change it.
        let other_app = Envelope {
            sdk_app_id: 1400000001,
            ..ENV
        };
        let c = events(GROUP_READ_RECEIPT, GROUP, &other_app);
        assert_ne!(a[0].1["event_id"], c[0].1["event_id"]);
        let d = events(
            GROUP_READ_RECEIPT,
            &GROUP.replace("1670574414123", "1670574414124"),
            &ENV,
        );
        assert_ne!(a[0].1["event_id"], d[0].1["event_id"]);
        let e = events(GROUP_READ_RECEIPT, &GROUP.replace("user1", "user2"), &ENV);
        assert_eq!(a[0].1["event_id"], e[0].1["event_id"]);
        assert_ne!(a[1].1["event_id"], e[1].1["event_id"]);
    }

    #[test]
    fn c2c_key_is_ordered_by_bytes_whoever_reads() {
        assert_eq!(c2c_conversation_id("bob", "alice"), "c2c:alice:bob");
        assert_eq!(c2c_conversation_id("alice", "bob"), "c2c:alice:bob");
        // Byte order, not case-insensitive or locale order: 'Z' < 'a'.
        assert_eq!(c2c_conversation_id("alice", "Zoe"), "c2c:Zoe:alice");
        assert_eq!(c2c_conversation_id("same", "same"), "c2c:same:same");
        let body_ab = r#"{"Report_Account":"amy","Peer_Account":"zed","LastReadTime":1}"#;
        let body_ba = r#"{"Report_Account":"zed","Peer_Account":"amy","LastReadTime":1}"#;
        let ab = events(C2C_REPORT, body_ab, &ENV);
        let ba = events(C2C_REPORT, body_ba, &ENV);
        assert_eq!(ab[0].0.key, ba[0].0.key);
        // Different readers: different events.
        assert_ne!(ab[0].1["event_id"], ba[0].1["event_id"]);
    }

    #[test]
    fn each_kind_is_spelled_the_same_by_serde_and_as_str() {
        for kind in Kind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
            assert_eq!(Kind::of_command(kind.command()), Some(kind));
        }
        assert_eq!(Kind::of_command("Group.CallbackAfterSendMsg"), None);
    }

    #[test]
    fn platform_spellings_are_canonical_and_unknown_ones_kept() {
        assert_eq!(canonical_platform("IOS"), "iOS");
        assert_eq!(canonical_platform("ios"), "iOS");
        assert_eq!(canonical_platform("macOS"), "Mac");
        assert_eq!(canonical_platform("android"), "Android");
        assert_eq!(canonical_platform("HarmonyOS"), "HarmonyOS");
    }

    #[test]
    fn an_empty_list_gives_no_events() {
        let body = r#"{"GroupId":"g","GroupMsgReceiptList":[],"EventTime":1}"#;
        assert!(events(GROUP_READ_RECEIPT, body, &ENV).is_empty());
    }

    #[test]
    fn accounts_with_colons_give_distinct_conversations_and_events() {
        // Joined without escaping, both pairs were "c2c:a:b:a:b:a".
        assert_eq!(c2c_conversation_id("a:b:a", "a:b"), "c2c:a%3Ab:a%3Ab%3Aa");
        assert_eq!(c2c_conversation_id("a:b:a", "b:a"), "c2c:a%3Ab%3Aa:b%3Aa");
        assert_eq!(c2c_conversation_id("100%", "x"), "c2c:100%25:x");
        let body = |peer: &str| {
            format!(
                r#"{{"Operator_Account":"a:b:a","Peer_Account":"{peer}","C2CMsgInfo":[{{"MsgKey":"k1"}}],"EventTime":1}}"#
            )
        };
        let one = events(C2C_READ_RECEIPT, &body("a:b"), &ENV);
        let two = events(C2C_READ_RECEIPT, &body("b:a"), &ENV);
        assert_ne!(one[0].0.key, two[0].0.key);
        assert_ne!(one[0].1["conversation_id"], two[0].1["conversation_id"]);
        assert_ne!(one[0].1["event_id"], two[0].1["event_id"]);
    }

    #[test]
    fn the_event_id_hashes_reader_and_peer_apart() {
        // Same conversation id by construction (escaping makes this the only
        // way): the identity still tells the pairs apart by their parts.
        let id = |reader: &str, peer: &str| {
            Identity {
                sdk_app_id: 1,
                command: C2C_READ_RECEIPT,
                parties: Parties::C2c { reader, peer },
                message_ref: "k",
                readers: &[],
                event_time_ms: 1,
            }
            .event_id()
        };
        assert_ne!(id("ab", "c"), id("a", "bc"));
        assert_ne!(id("a", "b"), id("b", "a"));
        assert_eq!(id("a", "b"), id("a", "b"));
    }

    #[test]
    fn records_stop_at_the_budget() {
        let cb = parse(GROUP_READ_RECEIPT, GROUP.as_bytes())
            .unwrap()
            .unwrap();
        let mut all = Vec::new();
        normalize(&cb, &ENV, &mut all);
        let sizes: Vec<usize> = all
            .iter()
            .map(|r| r.encoded_len() + SPOOL_FRAMING)
            .collect();
        let exact = sizes.iter().sum::<usize>();
        let mut out = Vec::new();
        assert_eq!(normalize_within(&cb, &ENV, exact, &mut out), Ok(()));
        assert_eq!(out, all);
        let mut out = Vec::new();
        assert_eq!(
            normalize_within(&cb, &ENV, exact - 1, &mut out),
            Err(OverBudget { budget: exact - 1 })
        );
        // The first record fitted; the second was built, measured and
        // dropped, and nothing after it was built.
        assert_eq!(out.len(), 1);
        assert_eq!(budget_for(100), 1600 + OUTPUT_BYTES_ALLOWANCE);
        assert_eq!(budget_for(1 << 20), (16 << 20) + OUTPUT_BYTES_ALLOWANCE);
    }

    #[test]
    fn genuine_callbacks_fit_their_budget() {
        // The most a genuine callback asks per byte: Tencent's longest custom
        // GroupId (48 bytes), an IPv6 ClientIP, and items without readers
        // (50 of them, the most an admin receipt covers).
        let query = "SdkAppid=1400000000&CallbackCommand=Group.CallbackAfterReadReceipt&contenttype=json&ClientIP=2001:db8:85a3:8d3:1319:8a2e:370:7348&OptPlatform=iOS";
        let items: Vec<String> = (0..50)
            .map(|i| format!(r#"{{"MsgSeq":{i},"ReadNum":1,"UnreadNum":6}}"#))
            .collect();
        let body = format!(
            r#"{{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"{}","Type":"Public","GroupMsgReceiptList":[{}],"EventTime":1670574414123}}"#,
            "g".repeat(48),
            items.join(",")
        );
        let env = Envelope {
            client_ip: Some("2001:db8:85a3:8d3:1319:8a2e:370:7348"),
            ..ENV
        };
        for body in [GROUP, body.as_str()] {
            let cb = parse(GROUP_READ_RECEIPT, body.as_bytes()).unwrap().unwrap();
            let mut out = Vec::new();
            let budget = budget_for(query.len() + body.len());
            assert_eq!(normalize_within(&cb, &env, budget, &mut out), Ok(()));
        }
    }
}
