//! The typed bodies of the three read-receipt callbacks.
//!
//! Shapes follow Tencent's pages (see the protocol notes in the README), with
//! the quirks real traffic has: `EventTime` comes as an integer or as a
//! string of digits, and unknown extra fields are ignored (Tencent adds
//! fields over time). A missing required field or a wrong type is an error
//! whose text names the field by its path, e.g.
//! `GroupMsgReceiptList[0].MsgSeq: invalid type: string "1", expected u64`.
//!
//! Strings borrow from the request body where they can (no escapes), so a
//! typical callback is parsed without copying its strings.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};

/// A checked read-receipt callback.
#[derive(Debug, PartialEq)]
pub enum Callback<'a> {
    Group(GroupReadReceipt<'a>),
    C2cReceipt(C2cReadReceipt<'a>),
    C2cReport(C2cReport<'a>),
}

/// `Group.CallbackAfterReadReceipt`.
#[derive(Debug, PartialEq, Deserialize)]
pub struct GroupReadReceipt<'a> {
    #[serde(rename = "GroupId", borrow)]
    pub group_id: Cow<'a, str>,
    /// Not every sample carries it; null in the event when absent.
    #[serde(rename = "Type", borrow, default)]
    pub group_type: Option<Cow<'a, str>>,
    #[serde(rename = "GroupMsgReceiptList", borrow)]
    pub receipts: Vec<GroupReceiptItem<'a>>,
    #[serde(rename = "EventTime", deserialize_with = "event_time")]
    pub event_time_ms: u64,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct GroupReceiptItem<'a> {
    #[serde(rename = "MsgSeq")]
    pub msg_seq: u64,
    #[serde(rename = "ReadNum")]
    pub read_num: u64,
    #[serde(rename = "UnreadNum")]
    pub unread_num: u64,
    /// Absent when nobody new read it (inferred); an empty list then.
    #[serde(rename = "ReadReceiptMembers", borrow, default)]
    pub members: Vec<Member<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct Member<'a> {
    #[serde(rename = "Member_Account", borrow)]
    pub account: Cow<'a, str>,
}

/// `C2C.CallbackAfterMsgReadReceipt`: one item per message read.
#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cReadReceipt<'a> {
    #[serde(rename = "Operator_Account", borrow)]
    pub operator: Cow<'a, str>,
    #[serde(rename = "Peer_Account", borrow)]
    pub peer: Cow<'a, str>,
    #[serde(rename = "C2CMsgInfo", borrow)]
    pub messages: Vec<C2cMsgInfo<'a>>,
    #[serde(rename = "EventTime", deserialize_with = "event_time")]
    pub event_time_ms: u64,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cMsgInfo<'a> {
    #[serde(rename = "From_Account", borrow, default)]
    pub from: Option<Cow<'a, str>>,
    #[serde(rename = "To_Account", borrow, default)]
    pub to: Option<Cow<'a, str>>,
    /// `MsgSeq_MsgRandom_MsgTime`: what identifies the message.
    #[serde(rename = "MsgKey", borrow)]
    pub msg_key: Cow<'a, str>,
    #[serde(rename = "MsgId", borrow, default)]
    pub msg_id: Option<Cow<'a, str>>,
}

/// `C2C.CallbackAfterMsgReport`: everything before `LastReadTime` is read.
#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cReport<'a> {
    #[serde(rename = "Report_Account", borrow)]
    pub reporter: Cow<'a, str>,
    #[serde(rename = "Peer_Account", borrow)]
    pub peer: Cow<'a, str>,
    /// Unix seconds (not milliseconds, unlike EventTime).
    #[serde(rename = "LastReadTime")]
    pub last_read_time_s: u64,
    /// In the EN sample only.
    #[serde(rename = "UnreadMsgNum", default)]
    pub unread_msg_num: Option<u64>,
    /// In the CN sample only.
    #[serde(rename = "EventTime", default, deserialize_with = "opt_event_time")]
    pub event_time_ms: Option<u64>,
}

/// What the body of any other command must have for raw forwarding: be JSON,
/// and maybe carry a GroupId to key the record by.
#[derive(Debug, Deserialize)]
pub struct OtherCallback<'a> {
    #[serde(rename = "GroupId", borrow, default)]
    pub group_id: Option<Cow<'a, str>>,
}

/// Whether `command` is one of the three read-receipt callbacks.
pub fn is_read_receipt(command: &str) -> bool {
    matches!(command, GROUP_READ_RECEIPT | C2C_READ_RECEIPT | C2C_REPORT)
}

/// Parses the body of a read-receipt `command`. `None` when `command` is not
/// one of the three.
pub fn parse<'a>(command: &str, body: &'a [u8]) -> Option<Result<Callback<'a>, String>> {
    Some(match command {
        GROUP_READ_RECEIPT => typed(body).map(Callback::Group),
        C2C_READ_RECEIPT => typed(body).map(Callback::C2cReceipt),
        C2C_REPORT => typed(body).map(Callback::C2cReport),
        _ => return None,
    })
}

/// Checks that any other command's body is JSON and finds its GroupId.
pub fn parse_other(body: &[u8]) -> Result<OtherCallback<'_>, String> {
    typed(body)
}

fn typed<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    // Plain serde_json first: tracking the path costs twice the parse, and
    // it is only needed to say which field was wrong.
    match serde_json::from_slice(body) {
        Ok(value) => Ok(value),
        Err(_) => Err(explain::<T>(body)),
    }
}

/// Parses again, tracking the path, to name the field in the error.
fn explain<'a, T: Deserialize<'a>>(body: &'a [u8]) -> String {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => describe(e),
        // Only trailing characters after a valid value remain.
        Ok(_) => match de.end() {
            Err(e) => format!("body is not JSON: {e}"),
            Ok(()) => "body could not be parsed".into(),
        },
    }
}

fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("body is not JSON: {inner}")
        }
        _ if path == "." => inner.to_string(),
        _ => format!("{path}: {inner}"),
    }
}

/// `EventTime` is documented as an integer (ms) but Tencent's own samples
/// send a string of digits; accept both.
fn event_time<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(EventTimeVisitor)
}

fn opt_event_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(OptEventTime)
}

struct EventTimeVisitor;

impl Visitor<'_> for EventTimeVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("milliseconds since the epoch, as an integer or a string of digits")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        v.trim()
            .parse()
            .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
    }
}

struct OptEventTime;

impl Visitor<'_> for OptEventTime {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        EventTimeVisitor.expecting(f)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<u64>, E> {
        EventTimeVisitor.visit_u64(v).map(Some)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u64>, E> {
        EventTimeVisitor.visit_i64(v).map(Some)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u64>, E> {
        EventTimeVisitor.visit_str(v).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed page's sample with its two defects mended (the missing comma
    /// after `"UnreadNum": 6` and the `//` comments) and nothing else changed.
    pub const SEED_GROUP: &str = r#"{
        "CallbackCommand": "Group.CallbackAfterReadReceipt",
        "GroupId": "@TGS#2TTV7VSII",
        "Type": "Public",
        "GroupMsgReceiptList": [
            {
                "MsgSeq": 1,
                "ReadNum": 1,
                "UnreadNum": 6,
                "ReadReceiptMembers": [ { "Member_Account": "user0" } ]
            }
        ],
        "EventTime": "1670574414123"
    }"#;

    /// The seed page's sample exactly as published: not JSON.
    pub const SEED_GROUP_AS_PUBLISHED: &str = r#"{
"CallbackCommand": "Group.CallbackAfterReadReceipt", // Callback after read receipt
"GroupId": "@TGS#2TTV7VSII", // Group ID
"Type": "Public", // Group Type
"GroupMsgReceiptList": [ // Read Receipt Information
{
"MsgSeq": 1,
"ReadNum": 1, // Group message read count
"UnreadNum": 6 // Group message unread count
"ReadReceiptMembers":[
{
"Member_Account":"user0"
}
]
}
],
"EventTime":"1670574414123"
}"#;

    fn group(body: &str) -> Result<GroupReadReceipt<'_>, String> {
        match parse(GROUP_READ_RECEIPT, body.as_bytes()).unwrap()? {
            Callback::Group(g) => Ok(g),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seed_sample_parses_with_string_event_time() {
        let g = group(SEED_GROUP).unwrap();
        assert_eq!(g.group_id, "@TGS#2TTV7VSII");
        assert_eq!(g.group_type.as_deref(), Some("Public"));
        assert_eq!(g.event_time_ms, 1670574414123);
        assert_eq!(g.receipts.len(), 1);
        assert_eq!(g.receipts[0].msg_seq, 1);
        assert_eq!(g.receipts[0].read_num, 1);
        assert_eq!(g.receipts[0].unread_num, 6);
        assert_eq!(g.receipts[0].members[0].account, "user0");
    }

    #[test]
    fn event_time_as_integer() {
        let body = SEED_GROUP.replace("\"1670574414123\"", "1670574414123");
        assert_eq!(group(&body).unwrap().event_time_ms, 1670574414123);
    }

    #[test]
    fn the_published_sample_is_not_json() {
        let err = group(SEED_GROUP_AS_PUBLISHED).unwrap_err();
        assert!(err.starts_with("body is not JSON"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = SEED_GROUP.replace(
            "\"Type\": \"Public\",",
            "\"Type\": \"Public\", \"NewField\": {\"x\": [1,2]},",
        );
        assert!(group(&body).is_ok());
    }

    #[test]
    fn missing_fields_are_named() {
        let body = SEED_GROUP.replace("\"GroupId\": \"@TGS#2TTV7VSII\",", "");
        let err = group(&body).unwrap_err();
        assert!(err.contains("GroupId"), "{err}");
        let body = SEED_GROUP.replace("\"MsgSeq\": 1,", "");
        let err = group(&body).unwrap_err();
        assert!(
            err.contains("GroupMsgReceiptList[0]") && err.contains("MsgSeq"),
            "{err}"
        );
        let body = SEED_GROUP.replace(",\n        \"EventTime\": \"1670574414123\"", "");
        let err = group(&body).unwrap_err();
        assert!(err.contains("EventTime"), "{err}");
    }

    #[test]
    fn wrong_types_are_named() {
        let body = SEED_GROUP.replace("\"MsgSeq\": 1", "\"MsgSeq\": \"one\"");
        let err = group(&body).unwrap_err();
        assert!(err.contains("GroupMsgReceiptList[0].MsgSeq"), "{err}");
        let body = SEED_GROUP.replace("\"1670574414123\"", "\"soon\"");
        let err = group(&body).unwrap_err();
        assert!(err.contains("EventTime"), "{err}");
        let body = SEED_GROUP.replace("\"Member_Account\": \"user0\"", "\"Member_Account\": 7");
        let err = group(&body).unwrap_err();
        assert!(
            err.contains("GroupMsgReceiptList[0].ReadReceiptMembers[0].Member_Account"),
            "{err}"
        );
        let err = group("[1,2]").unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn trailing_garbage_is_not_json() {
        let body = format!("{SEED_GROUP} x");
        assert!(group(&body).unwrap_err().starts_with("body is not JSON"));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = SEED_GROUP.replace("@TGS#2TTV7VSII", "@TGS#\\u00e9\\\"q");
        assert_eq!(group(&body).unwrap().group_id, "@TGS#é\"q");
    }

    const C2C_RECEIPT: &str = r#"{
        "CallbackCommand": "C2C.CallbackAfterMsgReadReceipt",
        "Operator_Account": "bob",
        "Peer_Account": "alice",
        "C2CMsgInfo": [
            {"From_Account": "alice", "To_Account": "bob", "MsgKey": "123_456_1670574414", "MsgId": "144115233406643804-1670574414-123"},
            {"From_Account": "alice", "To_Account": "bob", "MsgKey": "124_457_1670574415"}
        ],
        "EventTime": 1670574414123
    }"#;

    #[test]
    fn c2c_receipt_parses() {
        let Callback::C2cReceipt(c) = parse(C2C_READ_RECEIPT, C2C_RECEIPT.as_bytes())
            .unwrap()
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(c.operator, "bob");
        assert_eq!(c.peer, "alice");
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0].msg_key, "123_456_1670574414");
        assert_eq!(
            c.messages[0].msg_id.as_deref(),
            Some("144115233406643804-1670574414-123")
        );
        assert_eq!(c.messages[1].msg_id, None);
        assert_eq!(c.event_time_ms, 1670574414123);
        let err = parse(
            C2C_READ_RECEIPT,
            C2C_RECEIPT
                .replace("\"Peer_Account\": \"alice\",", "")
                .as_bytes(),
        )
        .unwrap()
        .unwrap_err();
        assert!(err.contains("Peer_Account"), "{err}");
        let err = parse(
            C2C_READ_RECEIPT,
            C2C_RECEIPT
                .replace("\"MsgKey\": \"124_457_1670574415\"", "\"MsgKey\": 5")
                .as_bytes(),
        )
        .unwrap()
        .unwrap_err();
        assert!(err.contains("C2CMsgInfo[1].MsgKey"), "{err}");
    }

    #[test]
    fn c2c_report_parses_with_either_sample_shape() {
        let en = r#"{"CallbackCommand":"C2C.CallbackAfterMsgReport","Report_Account":"bob","Peer_Account":"alice","LastReadTime":1670574414,"UnreadMsgNum":3}"#;
        let cn = r#"{"CallbackCommand":"C2C.CallbackAfterMsgReport","Report_Account":"bob","Peer_Account":"alice","LastReadTime":1670574414,"EventTime":"1670574414999"}"#;
        let Callback::C2cReport(r) = parse(C2C_REPORT, en.as_bytes()).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(r.unread_msg_num, Some(3));
        assert_eq!(r.event_time_ms, None);
        assert_eq!(r.last_read_time_s, 1670574414);
        let Callback::C2cReport(r) = parse(C2C_REPORT, cn.as_bytes()).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(r.unread_msg_num, None);
        assert_eq!(r.event_time_ms, Some(1670574414999));
        let err = parse(
            C2C_REPORT,
            en.replace("\"LastReadTime\":1670574414,", "").as_bytes(),
        )
        .unwrap()
        .unwrap_err();
        assert!(err.contains("LastReadTime"), "{err}");
        let err = parse(C2C_REPORT, en.replace("1670574414,", "\"x\",").as_bytes())
            .unwrap()
            .unwrap_err();
        assert!(err.contains("LastReadTime"), "{err}");
    }

    #[test]
    fn other_commands_are_not_read_receipts() {
        assert!(parse("Group.CallbackAfterSendMsg", b"{}").is_none());
        assert!(!is_read_receipt("State.StateChange"));
        let o = parse_other(br#"{"GroupId":"g1","Other":1}"#).unwrap();
        assert_eq!(o.group_id.as_deref(), Some("g1"));
        assert!(parse_other(b"{nope").is_err());
    }
}
