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
//!
//! The body comes from the internet, so the parse is also where its cost is
//! bounded: every string and list that ends up in the records is checked
//! against the [`Limits`] as it is read (an over-long GroupId fails before
//! the items are even looked at, the 1,001st item before it is stored), ids
//! must not be empty, and bodies and items must be JSON objects (serde would
//! otherwise take `[1,0,0]` for an item, 8 bytes that become a whole record).

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};
use crate::limits::{Limit, Limits, clip};

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
    #[serde(rename = "GroupId", borrow, deserialize_with = "group_id")]
    pub group_id: Cow<'a, str>,
    /// Not every sample carries it; null in the event when absent.
    #[serde(rename = "Type", borrow, default, deserialize_with = "group_type")]
    pub group_type: Option<Cow<'a, str>>,
    #[serde(rename = "GroupMsgReceiptList", borrow, deserialize_with = "items")]
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
    #[serde(
        rename = "ReadReceiptMembers",
        borrow,
        default,
        deserialize_with = "readers"
    )]
    pub members: Vec<Member<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct Member<'a> {
    #[serde(rename = "Member_Account", borrow, deserialize_with = "account")]
    pub account: Cow<'a, str>,
}

/// `C2C.CallbackAfterMsgReadReceipt`: one item per message read.
#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cReadReceipt<'a> {
    #[serde(rename = "Operator_Account", borrow, deserialize_with = "account")]
    pub operator: Cow<'a, str>,
    #[serde(rename = "Peer_Account", borrow, deserialize_with = "account")]
    pub peer: Cow<'a, str>,
    #[serde(rename = "C2CMsgInfo", borrow, deserialize_with = "items")]
    pub messages: Vec<C2cMsgInfo<'a>>,
    #[serde(rename = "EventTime", deserialize_with = "event_time")]
    pub event_time_ms: u64,
}

#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cMsgInfo<'a> {
    #[serde(
        rename = "From_Account",
        borrow,
        default,
        deserialize_with = "opt_account"
    )]
    pub from: Option<Cow<'a, str>>,
    #[serde(
        rename = "To_Account",
        borrow,
        default,
        deserialize_with = "opt_account"
    )]
    pub to: Option<Cow<'a, str>>,
    /// `MsgSeq_MsgRandom_MsgTime`: what identifies the message.
    #[serde(rename = "MsgKey", borrow, deserialize_with = "msg_key")]
    pub msg_key: Cow<'a, str>,
    #[serde(rename = "MsgId", borrow, default, deserialize_with = "msg_id")]
    pub msg_id: Option<Cow<'a, str>>,
}

/// `C2C.CallbackAfterMsgReport`: everything before `LastReadTime` is read.
#[derive(Debug, PartialEq, Deserialize)]
pub struct C2cReport<'a> {
    #[serde(rename = "Report_Account", borrow, deserialize_with = "account")]
    pub reporter: Cow<'a, str>,
    #[serde(rename = "Peer_Account", borrow, deserialize_with = "account")]
    pub peer: Cow<'a, str>,
    /// Unix seconds (not milliseconds, unlike EventTime); small enough that
    /// × 1000 is exact.
    #[serde(rename = "LastReadTime", deserialize_with = "last_read_time")]
    pub last_read_time_s: u64,
    /// In the EN sample only.
    #[serde(rename = "UnreadMsgNum", default)]
    pub unread_msg_num: Option<u64>,
    /// In the CN sample only.
    #[serde(rename = "EventTime", default, deserialize_with = "opt_event_time")]
    pub event_time_ms: Option<u64>,
}

/// What the body of any other command must have for raw forwarding: be a
/// JSON object, and maybe carry a GroupId to key the record by.
#[derive(Debug, Deserialize)]
pub struct OtherCallback<'a> {
    #[serde(rename = "GroupId", borrow, default, deserialize_with = "opt_group_id")]
    pub group_id: Option<Cow<'a, str>>,
}

/// Why a body was refused: the text for ErrorInfo, and the limit it broke
/// when it broke one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub message: String,
    pub limit: Option<Limit>,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether `command` is one of the three read-receipt callbacks.
pub fn is_read_receipt(command: &str) -> bool {
    matches!(command, GROUP_READ_RECEIPT | C2C_READ_RECEIPT | C2C_REPORT)
}

/// Parses the body of a read-receipt `command` under the default limits.
/// `None` when `command` is not one of the three.
pub fn parse<'a>(command: &str, body: &'a [u8]) -> Option<Result<Callback<'a>, String>> {
    parse_within(command, body, &Limits::DEFAULT).map(|r| r.map_err(|e| e.message))
}

/// Parses the body of a read-receipt `command`, refusing it as soon as it
/// breaks one of `limits`. `None` when `command` is not one of the three.
pub fn parse_within<'a>(
    command: &str,
    body: &'a [u8],
    limits: &Limits,
) -> Option<Result<Callback<'a>, BodyError>> {
    Some(match command {
        GROUP_READ_RECEIPT => typed(body, limits).map(Callback::Group),
        C2C_READ_RECEIPT => typed(body, limits).map(Callback::C2cReceipt),
        C2C_REPORT => typed(body, limits).map(Callback::C2cReport),
        _ => return None,
    })
}

/// Checks that any other command's body is a JSON object and finds its
/// GroupId, under the default limits.
pub fn parse_other(body: &[u8]) -> Result<OtherCallback<'_>, String> {
    parse_other_within(body, &Limits::DEFAULT).map_err(|e| e.message)
}

/// [`parse_other`] under `limits`.
pub fn parse_other_within<'a>(
    body: &'a [u8],
    limits: &Limits,
) -> Result<OtherCallback<'a>, BodyError> {
    typed(body, limits)
}

/// The longest ErrorInfo text: serde quotes offending values, and those are
/// the attacker's to choose.
const MAX_MESSAGE: usize = 512;

thread_local! {
    /// The limits of the parse running on this thread. serde's derive has no
    /// way to hand a visitor run-time settings; a parse is synchronous, so a
    /// per-thread slot set around it is exact.
    static ACTIVE: Cell<Limits> = const { Cell::new(Limits::DEFAULT) };
    /// The limit the running parse broke, if any.
    static BROKEN: Cell<Option<Limit>> = const { Cell::new(None) };
}

/// Sets the limits for the parses in `f`, restoring the previous ones after.
fn with_limits<R>(limits: &Limits, f: impl FnOnce() -> R) -> R {
    let before = ACTIVE.with(|a| a.replace(*limits));
    BROKEN.with(|b| b.set(None));
    let r = f();
    ACTIVE.with(|a| a.set(before));
    r
}

fn active(limit: Limit) -> usize {
    ACTIVE.with(|a| a.get().get(limit))
}

fn broke<E: de::Error>(limit: Limit, what: fmt::Arguments<'_>) -> E {
    BROKEN.with(|b| b.set(Some(limit)));
    E::custom(format_args!(
        "{what}, over the limit of {} (limits.{} in the gateway's configuration)",
        active(limit),
        limit.key()
    ))
}

fn typed<'a, T: Deserialize<'a>>(body: &'a [u8], limits: &Limits) -> Result<T, BodyError> {
    with_limits(limits, || {
        // Plain serde_json first: tracking the path costs twice the parse,
        // and it is only needed to say which field was wrong.
        match serde_json::from_slice::<Object<T>>(body) {
            Ok(Object(value)) => Ok(value),
            Err(_) => {
                let message = explain::<T>(body);
                Err(BodyError {
                    message,
                    limit: BROKEN.with(|b| b.get()),
                })
            }
        }
    })
}

/// Parses again, tracking the path, to name the field in the error.
fn explain<'a, T: Deserialize<'a>>(body: &'a [u8]) -> String {
    let mut de = serde_json::Deserializer::from_slice(body);
    let message = match serde_path_to_error::deserialize::<_, Object<T>>(&mut de) {
        Err(e) => describe(e),
        // Only trailing characters after a valid value remain.
        Ok(_) => match de.end() {
            Err(e) => format!("body is not JSON: {e}"),
            Ok(()) => "body could not be parsed".into(),
        },
    };
    if message.len() > MAX_MESSAGE {
        format!("{}…", clip(&message, MAX_MESSAGE))
    } else {
        message
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

/// A `T` that must be written as a JSON object. serde's derived structs
/// also take a JSON array of the field values, which Tencent never sends.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Object)
    }
}

/// A list of JSON objects, at most the active value of `limit` long.
fn bounded_list<'de, D, T>(d: D, limit: Limit) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T> {
        limit: Limit,
        max: usize,
        item: PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {} JSON objects", self.max)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // serde_json gives no size hint; grow as the items come.
            let mut out = Vec::new();
            while let Some(Object(item)) = seq.next_element::<Object<T>>()? {
                if out.len() == self.max {
                    return Err(broke(
                        self.limit,
                        format_args!("more than {} items", self.max),
                    ));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V {
        limit,
        max: active(limit),
        item: PhantomData,
    })
}

/// A string of at most the active value of `limit` bytes; not empty when
/// `required` (an empty id identifies nothing and breaks the schema).
struct BoundedStr {
    limit: Limit,
    required: bool,
}

impl BoundedStr {
    fn check<E: de::Error>(&self, v: &str) -> Result<(), E> {
        let max = active(self.limit);
        if v.len() > max {
            return Err(broke(self.limit, format_args!("{} bytes", v.len())));
        }
        if self.required && v.is_empty() {
            return Err(E::invalid_length(0, self));
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for BoundedStr {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let min = if self.required { 1 } else { 0 };
        write!(f, "a string of {min} to {} bytes", active(self.limit))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.check(v)?;
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.check(v)?;
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// An optional (absent or null) [`BoundedStr`].
struct OptBoundedStr(BoundedStr);

impl<'de> Visitor<'de> for OptBoundedStr {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)?;
        f.write_str(" or null")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self.0).map(Some)
    }
}

fn bounded<'de, D: Deserializer<'de>>(
    d: D,
    limit: Limit,
    required: bool,
) -> Result<Cow<'de, str>, D::Error> {
    d.deserialize_str(BoundedStr { limit, required })
}

fn opt_bounded<'de, D: Deserializer<'de>>(
    d: D,
    limit: Limit,
    required: bool,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    d.deserialize_option(OptBoundedStr(BoundedStr { limit, required }))
}

fn group_id<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    bounded(d, Limit::GroupIdBytes, true)
}

fn opt_group_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    opt_bounded(d, Limit::GroupIdBytes, false)
}

fn group_type<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    opt_bounded(d, Limit::GroupTypeBytes, false)
}

fn account<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    bounded(d, Limit::AccountBytes, true)
}

fn opt_account<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    opt_bounded(d, Limit::AccountBytes, false)
}

fn msg_key<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    bounded(d, Limit::MsgKeyBytes, true)
}

fn msg_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    opt_bounded(d, Limit::MsgKeyBytes, false)
}

fn items<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded_list(d, Limit::ReceiptItems)
}

fn readers<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded_list(d, Limit::ReadersPerItem)
}

/// Seconds whose milliseconds fit a u64: `read_up_to_ms` is then exact, and
/// two different values never become one event.
fn last_read_time<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = u64::deserialize(d)?;
    if s > u64::MAX / 1000 {
        return Err(de::Error::invalid_value(
            de::Unexpected::Unsigned(s),
            &"seconds since the epoch (at most 18446744073709551)",
        ));
    }
    Ok(s)
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
        // Digits only, as documented: Rust's parse would also take a "+",
        // and a trim would take spaces.
        let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| v.parse().ok())
            .flatten()
            .ok_or_else(|| E::invalid_value(de::Unexpected::Str(clip(v, 32)), &self))
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

    fn group_within<'a>(body: &'a str, limits: &Limits) -> Result<GroupReadReceipt<'a>, BodyError> {
        match parse_within(GROUP_READ_RECEIPT, body.as_bytes(), limits).unwrap()? {
            Callback::Group(g) => Ok(g),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_over_long_group_id_names_the_field_and_the_limit() {
        let body = SEED_GROUP.replace("@TGS#2TTV7VSII", &"G".repeat(129));
        let err = group_within(&body, &Limits::DEFAULT).unwrap_err();
        assert_eq!(err.limit, Some(Limit::GroupIdBytes));
        assert!(
            err.message.starts_with(
                "GroupId: 129 bytes, over the limit of 128 (limits.group_id_bytes in the gateway's configuration)"
            ),
            "{err}"
        );
        assert!(err.message.contains("limit of 128"), "{err}");
        assert!(err.message.contains("limits.group_id_bytes"), "{err}");
        // At the limit is fine; a configured limit is the one applied.
        let body = SEED_GROUP.replace("@TGS#2TTV7VSII", &"G".repeat(128));
        assert!(group_within(&body, &Limits::DEFAULT).is_ok());
        let small = Limits {
            group_id_bytes: 5,
            ..Limits::DEFAULT
        };
        let err = group_within(SEED_GROUP, &small).unwrap_err();
        assert!(err.message.contains("limit of 5"), "{err}");
    }

    #[test]
    fn too_many_items_or_readers_are_refused_with_the_limit_named() {
        let limits = Limits {
            receipt_items: 2,
            readers_per_item: 1,
            ..Limits::DEFAULT
        };
        let item = r#"{"MsgSeq":1,"ReadNum":0,"UnreadNum":0}"#;
        let body = |n: usize| {
            format!(
                r#"{{"GroupId":"g","EventTime":1,"GroupMsgReceiptList":[{}]}}"#,
                vec![item; n].join(",")
            )
        };
        assert!(group_within(&body(2), &limits).is_ok());
        let err = group_within(&body(3), &limits).unwrap_err();
        assert_eq!(err.limit, Some(Limit::ReceiptItems));
        assert!(err.message.starts_with("GroupMsgReceiptList"), "{err}");
        assert!(err.message.contains("limits.receipt_items"), "{err}");
        let two_readers = SEED_GROUP.replace(
            r#"{ "Member_Account": "user0" }"#,
            r#"{ "Member_Account": "user0" }, { "Member_Account": "user1" }"#,
        );
        let err = group_within(&two_readers, &limits).unwrap_err();
        assert_eq!(err.limit, Some(Limit::ReadersPerItem));
        assert!(
            err.message
                .starts_with("GroupMsgReceiptList[0].ReadReceiptMembers"),
            "{err}"
        );
        // The C2C list shares the item limit; accounts have theirs.
        let c2c = C2C_RECEIPT.replace(r#""bob","#, r#""bob", "X": 1,"#);
        let one = Limits {
            receipt_items: 1,
            ..Limits::DEFAULT
        };
        let err = parse_within(C2C_READ_RECEIPT, c2c.as_bytes(), &one)
            .unwrap()
            .unwrap_err();
        assert!(err.message.starts_with("C2CMsgInfo"), "{err}");
        let long = C2C_RECEIPT.replace(
            "\"Operator_Account\": \"bob\"",
            &format!("\"Operator_Account\": \"{}\"", "b".repeat(129)),
        );
        let err = parse_within(C2C_READ_RECEIPT, long.as_bytes(), &Limits::DEFAULT)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.limit, Some(Limit::AccountBytes));
        assert!(
            err.message.starts_with("Operator_Account: 129 bytes"),
            "{err}"
        );
    }

    #[test]
    fn bodies_and_items_must_be_objects() {
        for body in [
            r#"{"GroupId":"g","EventTime":1,"GroupMsgReceiptList":[[1,0,0],[2,0,0]]}"#,
            r#"["g",null,[[1,0,0]],1]"#,
            r#"{"GroupId":"g","EventTime":1,"GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":0,"UnreadNum":0,"ReadReceiptMembers":[["u"]]}]}"#,
        ] {
            let err = group(body).unwrap_err();
            assert!(err.contains("expected a JSON object"), "{body}: {err}");
        }
        let err = parse_other(b"[1]").unwrap_err();
        assert!(err.contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn empty_ids_are_refused() {
        let err = group(&SEED_GROUP.replace("@TGS#2TTV7VSII", "")).unwrap_err();
        assert!(err.starts_with("GroupId: invalid length 0"), "{err}");
        let err = group(&SEED_GROUP.replace("user0", "")).unwrap_err();
        assert!(err.contains("Member_Account: invalid length 0"), "{err}");
        let err = parse(
            C2C_READ_RECEIPT,
            C2C_RECEIPT.replace("alice", "").as_bytes(),
        )
        .unwrap()
        .unwrap_err();
        assert!(err.starts_with("Peer_Account: invalid length 0"), "{err}");
        let err = parse(
            C2C_READ_RECEIPT,
            C2C_RECEIPT.replace("124_457_1670574415", "").as_bytes(),
        )
        .unwrap()
        .unwrap_err();
        assert!(
            err.contains("C2CMsgInfo[1].MsgKey: invalid length 0"),
            "{err}"
        );
    }

    #[test]
    fn event_time_strings_are_digits_only() {
        for bad in [
            "+1670574414123",
            " 1 ",
            "1 ",
            "",
            "-1",
            "1e3",
            "99999999999999999999",
        ] {
            let body = SEED_GROUP.replace("1670574414123", bad);
            let err = group(&body).unwrap_err();
            assert!(
                err.starts_with("EventTime: invalid value"),
                "{bad:?}: {err}"
            );
        }
        // An attacker-sized value is not echoed whole.
        let body = SEED_GROUP.replace("1670574414123", &"x".repeat(100_000));
        assert!(group(&body).unwrap_err().len() < 400);
    }

    #[test]
    fn last_read_time_must_be_exact_in_milliseconds() {
        let body =
            |s: u64| format!(r#"{{"Report_Account":"a","Peer_Account":"b","LastReadTime":{s}}}"#);
        assert!(
            parse(C2C_REPORT, body(u64::MAX / 1000).as_bytes())
                .unwrap()
                .is_ok()
        );
        let err = parse(C2C_REPORT, body(u64::MAX / 1000 + 1).as_bytes())
            .unwrap()
            .unwrap_err();
        assert!(err.starts_with("LastReadTime: invalid value"), "{err}");
    }

    #[test]
    fn deep_nesting_in_an_unknown_field_is_skipped_not_recursed() {
        let depth = 200_000;
        let body = format!(
            r#"{{"GroupId":"gn","Other":{}{},"EventTime":1,"GroupMsgReceiptList":[]}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(group(&body).unwrap().receipts.is_empty());
        // Nesting where a value is read hits serde_json's recursion limit.
        let body = format!(
            r#"{{"GroupId":"gn","EventTime":{}1{},"GroupMsgReceiptList":[]}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(group(&body).is_err());
    }
}
