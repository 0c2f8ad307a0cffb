//! The invariants the fuzz targets check, in one place so that the fuzzers
//! (`fuzz/`, nightly) and the corpus replay (`tests/fuzz_corpora.rs`, stable)
//! hold the code to the same promises.
//!
//! Each function takes one input and panics, with a message saying which
//! promise broke, when the code under test misbehaves on it; an input the code
//! rightly refuses is not a failure. "Does not panic" is the least of it: every
//! check also asserts what a user relies on (a record decodes to what was
//! encoded, recovery never invents records, an event's size is bounded by its
//! request's).
//!
//! Not part of timbridge's API: hidden from the docs, free to change.

use std::fs;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::event::{self, Envelope, normalize};
use crate::limits::{Limits, OUTPUT_BYTES_ALLOWANCE};
use crate::record::{EventId, Record, RecordRef, TopicRole};
use crate::spool::{
    DamageAction, DamagedSegment, FsyncMode, KeptSegment, MAX_RECORD_LEN, RecoveredBytes,
    RecoveryReport, SegmentBytes, Spool, SpoolConfig, SpoolError, SpoolReader, SpooledRecord,
    recover_bytes,
};
use crate::tencent::payload::{self, BodyError, Callback};
use crate::tencent::query::{CallbackQuery, KNOWN};
use crate::tencent::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};

/// The most bytes a callback may add to the spool per byte of its request
/// (query + body); issue 8's bound on the work one request can cause.
pub const SPOOL_BYTES_PER_REQUEST_BYTE: usize = 16;

/// What any callback may add to the spool on top of 16 bytes per byte (a
/// genuine callback of 50 items without readers needs a little over 16
/// times). Added, not a floor: a floor let tiny callbacks amplify far more.
const SPOOL_BYTES_ALLOWANCE: usize = 8 * 1024;
const _: () = assert!(SPOOL_BYTES_ALLOWANCE == OUTPUT_BYTES_ALLOWANCE);

/// Bytes of a spool record's framing (length, CRC, id, append time), which
/// count towards what a callback adds to the spool.
const SPOOL_RECORD_HEADER: usize = 24;

/// A segment header: magic, version, header length, first id.
const SEGMENT_HEADER: usize = 24;

/// The query Tencent sends with a callback, as the payload check assumes it:
/// its bytes count towards the request's size.
const QUERY: &str = "SdkAppid=1400000000&CallbackCommand=Group.CallbackAfterReadReceipt\
                     &contenttype=json&ClientIP=127.0.0.1&OptPlatform=iOS\
                     &Sign=0000000000000000000000000000000000000000000000000000000000000000\
                     &RequestTime=1670574414";

/// `CallbackQuery::parse` on any query string: the same parameters as the
/// standard `application/x-www-form-urlencoded` reading (first value wins,
/// and the first parameter to come twice named as repeated), whichever of
/// its two paths it takes, and no value longer than the query.
pub fn query(data: &[u8]) {
    // A request line's query is always a str by the time intake sees it.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let q = CallbackQuery::parse(raw);
    let mut want = CallbackQuery::default();
    // The first known parameter to come a second time, in query order,
    // names compared without case.
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        let lower = name.to_ascii_lowercase();
        if let Some(&k) = KNOWN.iter().find(|k| k.to_ascii_lowercase() == lower) {
            if seen.contains(&lower) {
                want.repeated = want.repeated.or(Some(k));
            } else {
                seen.push(lower);
            }
        }
        let slot = match name.as_ref() {
            "SdkAppid" => &mut want.sdk_app_id,
            "CallbackCommand" => &mut want.callback_command,
            "Sign" => &mut want.sign,
            "RequestTime" => &mut want.request_time,
            "ClientIP" => &mut want.client_ip,
            "OptPlatform" => &mut want.platform,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value);
        }
    }
    assert_eq!(q, want, "query {raw:?} parsed unlike form-urlencoded");
    for value in [
        &q.sdk_app_id,
        &q.callback_command,
        &q.sign,
        &q.request_time,
        &q.client_ip,
        &q.platform,
    ]
    .into_iter()
    .flatten()
    {
        assert!(value.len() <= raw.len(), "a value longer than its query");
    }
}

/// Limits small enough that short inputs reach every one of them: a body of
/// odd length is parsed under these, one of even length under the defaults.
const TIGHT: Limits = Limits {
    group_id_bytes: 8,
    account_bytes: 6,
    msg_key_bytes: 10,
    group_type_bytes: 4,
    receipt_items: 3,
    readers_per_item: 2,
    client_ip_bytes: 8,
    platform_bytes: 4,
    command_bytes: 40,
};

/// One body through the parser of each read-receipt command and of raw
/// forwarding. Refusals must be errors that can go into an answer and a log
/// line; acceptances must respect every input limit and normalize into
/// well-formed records whose spool bytes stay within the request's budget,
/// and the budget must refuse exactly the callbacks whose records exceed it.
pub fn payload(body: &[u8]) {
    let limits = if body.len() % 2 == 1 {
        &TIGHT
    } else {
        &Limits::DEFAULT
    };
    let mut group_id = None;
    for command in [GROUP_READ_RECEIPT, C2C_READ_RECEIPT, C2C_REPORT] {
        let parsed =
            payload::parse_within(command, body, limits).expect("a read-receipt command is parsed");
        match parsed {
            Err(e) => check_error(command, &e),
            Ok(cb) => {
                check_limits(command, &cb, limits);
                if let Callback::Group(g) = &cb {
                    group_id = Some(g.group_id.to_string());
                }
                check_events(command, &cb, body);
            }
        }
    }
    match payload::parse_other_within(body, limits) {
        Err(e) => {
            check_error("other", &e);
            // A group body within the limits is a JSON object with a
            // GroupId: raw forwarding must take it too.
            assert!(
                group_id.is_none(),
                "a group read receipt is not accepted for raw forwarding: {e}"
            );
        }
        Ok(other) => {
            if let Some(g) = &other.group_id {
                assert!(
                    g.len() <= limits.group_id_bytes,
                    "raw GroupId over its limit"
                );
            }
            if let Some(g) = group_id {
                assert_eq!(
                    other.group_id.as_deref(),
                    Some(g.as_str()),
                    "raw forwarding keys a group callback by another GroupId"
                );
            }
        }
    }
}

/// The longest ErrorInfo: 512 bytes and an ellipsis.
const MAX_ERROR_BYTES: usize = 512 + '…'.len_utf8();

/// An error text goes into Tencent's `ErrorInfo` and a log line.
fn check_error(command: &str, e: &BodyError) {
    let text = &e.message;
    assert!(!text.is_empty(), "{command}: an empty error");
    assert!(
        text.len() <= MAX_ERROR_BYTES,
        "{command}: an error of {} bytes; ErrorInfo is bounded",
        text.len()
    );
    assert!(
        !text.chars().any(char::is_control),
        "{command}: error text with a raw control character could forge a log line: {text:?}"
    );
    if let Some(limit) = e.limit {
        let key = format!("limits.{}", limit.key());
        assert!(
            text.contains(&key),
            "{command}: a limit error that does not name {key}: {text}"
        );
    }
}

/// What the parser accepted respects every limit it was given, and no id
/// is empty.
fn check_limits(command: &str, cb: &Callback<'_>, l: &Limits) {
    let id = |what: &str, s: &str, max: usize| {
        assert!(!s.is_empty(), "{command}: an empty {what} was accepted");
        assert!(
            s.len() <= max,
            "{command}: a {what} of {} bytes passed the limit of {max}",
            s.len()
        );
    };
    match cb {
        Callback::Group(g) => {
            id("GroupId", &g.group_id, l.group_id_bytes);
            if let Some(t) = &g.group_type {
                assert!(
                    t.len() <= l.group_type_bytes,
                    "{command}: Type over its limit"
                );
            }
            assert!(
                g.receipts.len() <= l.receipt_items,
                "{command}: too many items"
            );
            for item in &g.receipts {
                assert!(
                    item.members.len() <= l.readers_per_item,
                    "{command}: too many readers"
                );
                for m in &item.members {
                    id("Member_Account", &m.account, l.account_bytes);
                }
            }
        }
        Callback::C2cReceipt(c) => {
            id("Operator_Account", &c.operator, l.account_bytes);
            id("Peer_Account", &c.peer, l.account_bytes);
            assert!(
                c.messages.len() <= l.receipt_items,
                "{command}: too many items"
            );
            for m in &c.messages {
                id("MsgKey", &m.msg_key, l.msg_key_bytes);
                for a in [&m.from, &m.to].into_iter().flatten() {
                    assert!(
                        a.len() <= l.account_bytes,
                        "{command}: account over its limit"
                    );
                }
                if let Some(msg_id) = &m.msg_id {
                    assert!(
                        msg_id.len() <= l.msg_key_bytes,
                        "{command}: MsgId over its limit"
                    );
                }
            }
        }
        Callback::C2cReport(r) => {
            id("Report_Account", &r.reporter, l.account_bytes);
            id("Peer_Account", &r.peer, l.account_bytes);
        }
    }
}

/// The spool bytes records take: their encoding and the spool's framing.
fn spool_bytes(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| SPOOL_RECORD_HEADER + r.encoded_len())
        .sum()
}

fn check_events(command: &'static str, cb: &Callback<'_>, body: &[u8]) {
    let env = Envelope {
        sdk_app_id: 1400000000,
        received_at_ms: 1670574414130,
        client_ip: Some("127.0.0.1"),
        platform: Some("iOS"),
    };
    let mut records = Vec::new();
    normalize(cb, &env, &mut records);

    let expected = match cb {
        Callback::Group(g) => g.receipts.len(),
        Callback::C2cReceipt(c) => c.messages.len(),
        Callback::C2cReport(_) => 1,
    };
    assert_eq!(records.len(), expected, "{command}: one event per item");

    // The budget: what intake lets one request add to the spool. It must
    // refuse exactly the callbacks whose records would not fit.
    let request_bytes = QUERY.len() + body.len();
    let budget = SPOOL_BYTES_PER_REQUEST_BYTE * request_bytes + SPOOL_BYTES_ALLOWANCE;
    assert_eq!(
        budget,
        event::budget_for(request_bytes),
        "the budget changed"
    );
    let needed = spool_bytes(&records);
    let mut within = Vec::new();
    match event::normalize_within(cb, &env, budget, &mut within) {
        Ok(()) => {
            assert_eq!(within, records, "{command}: the budget changed the records");
            assert!(
                needed <= budget,
                "{command}: {request_bytes} request bytes became {needed} spool bytes, \
                 over the budget of {budget}"
            );
        }
        Err(_) => assert!(
            needed > budget,
            "{command}: refused as over its budget of {budget} spool bytes, \
             but its records take {needed}"
        ),
    }

    for r in &records {
        check_event_record(command, cb, r);
    }

    // The id is the content's, not the arrival's: another replica, later,
    // gives every event the same id, key and topic.
    let later = Envelope {
        received_at_ms: env.received_at_ms + 60_000,
        client_ip: Some("10.1.2.3"),
        platform: None,
        ..env
    };
    let mut again = Vec::new();
    normalize(cb, &later, &mut again);
    let ids = |rs: &[Record]| -> Vec<_> {
        rs.iter()
            .map(|r| (r.event_id, r.topic, r.key.clone()))
            .collect()
    };
    assert_eq!(
        ids(&records),
        ids(&again),
        "{command}: ids depend on arrival"
    );
}

/// `c2c:<a>:<b>` with `%` and `:` escaped inside the accounts: split and
/// unescaped, it must give back the two accounts, so no two conversations
/// share an id.
fn c2c_accounts(conversation: &str) -> Option<(String, String)> {
    let rest = conversation.strip_prefix("c2c:")?;
    let (a, b) = rest.split_once(':')?;
    if b.contains(':') {
        return None;
    }
    let unescape = |s: &str| -> Option<String> {
        let mut out = String::with_capacity(s.len());
        let mut parts = s.split('%');
        out.push_str(parts.next()?);
        for p in parts {
            if let Some(tail) = p.strip_prefix("25") {
                out.push('%');
                out.push_str(tail);
            } else if let Some(tail) = p.strip_prefix("3A") {
                out.push(':');
                out.push_str(tail);
            } else {
                return None;
            }
        }
        Some(out)
    };
    Some((unescape(a)?, unescape(b)?))
}

fn check_event_record(command: &'static str, cb: &Callback<'_>, r: &Record) {
    let id = r.event_id.expect("an event has an id");
    assert!(
        id.0.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
        "{command}: event id {:?} is not lower-case hex",
        id.as_str()
    );
    assert_eq!(r.command, command);
    assert_eq!(r.sdk_app_id, 1400000000);
    let v: serde_json::Value = serde_json::from_slice(&r.value)
        .unwrap_or_else(|e| panic!("{command}: event value is not JSON: {e}"));
    assert_eq!(v["schema"], crate::event::SCHEMA);
    assert_eq!(v["event_id"], id.as_str());
    assert_eq!(v["callback_command"], command);
    let conversation = v["conversation_id"]
        .as_str()
        .expect("conversation_id is a string");
    assert_eq!(
        r.key,
        conversation.as_bytes(),
        "{command}: key is not the conversation"
    );
    match cb {
        Callback::Group(g) => {
            assert_eq!(r.topic, TopicRole::Group);
            assert_eq!(conversation, g.group_id);
            assert_eq!(v["group_id"], g.group_id.as_ref());
        }
        Callback::C2cReceipt(_) | Callback::C2cReport(_) => {
            assert_eq!(r.topic, TopicRole::C2c);
            let (reader, peer) = match cb {
                Callback::C2cReceipt(c) => (&c.operator, &c.peer),
                Callback::C2cReport(c) => (&c.reporter, &c.peer),
                Callback::Group(_) => unreachable!("matched above"),
            };
            let (a, b) = c2c_accounts(conversation).unwrap_or_else(|| {
                panic!("{command}: conversation id {conversation:?} cannot be read back")
            });
            let mut want = [reader.as_ref(), peer.as_ref()];
            want.sort_unstable_by_key(|s| s.as_bytes());
            assert_eq!(
                [a.as_str(), b.as_str()],
                want,
                "{command}: conversation id {conversation:?} names other accounts"
            );
            assert_eq!(v["peer"], peer.as_ref());
            assert_eq!(v["readers"], serde_json::json!([reader.as_ref()]));
        }
    }
    let back = Record::decode(&r.encode())
        .unwrap_or_else(|e| panic!("{command}: an event record does not decode: {e}"));
    assert_eq!(&back, r, "{command}: an event record changed in the spool");
}

/// Decoding spooled record bytes: what decodes re-encodes to the very same
/// bytes (so nothing is lost or invented between the spool and Kafka), the
/// borrowed and owned decoders agree, and a record built from the input's
/// bytes survives encode and decode unchanged.
pub fn record(data: &[u8]) {
    match RecordRef::decode(data) {
        Ok(r) => {
            let owned = Record::decode(data).expect("the owned decoder takes what the view takes");
            assert_eq!(owned.topic, r.topic);
            assert_eq!(owned.key, r.key);
            assert_eq!(owned.value, r.value);
            assert_eq!(owned.event_id, r.event_id);
            assert_eq!(owned.command, r.command);
            assert_eq!(owned.sdk_app_id, r.sdk_app_id);
            assert_eq!(owned.encoded_len(), data.len());
            assert_eq!(
                owned.encode(),
                data,
                "a decoded record re-encodes differently"
            );
        }
        Err(e) => {
            assert_eq!(Record::decode(data).err(), Some(e));
        }
    }

    let built = record_from(data);
    let bytes = built.encode();
    assert_eq!(bytes.len(), built.encoded_len());
    let all = Record::encode_all(std::slice::from_ref(&built));
    assert_eq!(all[0].as_ref(), bytes.as_slice());
    let back = Record::decode(&bytes).expect("an encoded record decodes");
    let mut want = built.clone();
    if want.command.len() > usize::from(u16::MAX) {
        let mut end = usize::from(u16::MAX);
        while !want.command.is_char_boundary(end) {
            end -= 1;
        }
        want.command = want.command[..end].to_owned().into();
    }
    assert_eq!(back, want, "a record changed through encode and decode");
}

/// A record whose fields are cut from `data`, so the fuzzer steers them.
fn record_from(data: &[u8]) -> Record {
    let mut d = data;
    let mut take = |n: usize| -> &[u8] {
        let (head, tail) = d.split_at(n.min(d.len()));
        d = tail;
        head
    };
    let byte = |b: &[u8]| b.first().copied().unwrap_or(0);
    let topic = match byte(take(1)) % 3 {
        0 => TopicRole::Group,
        1 => TopicRole::C2c,
        _ => TopicRole::Raw,
    };
    let mut app = [0u8; 8];
    let a = take(8);
    app[..a.len()].copy_from_slice(a);
    let flags = byte(take(1));
    let event_id = (flags & 1 == 1).then(|| {
        let mut hex_id = [b'0'; 32];
        let raw = take(16);
        let mut full = [0u8; 16];
        full[..raw.len()].copy_from_slice(raw);
        hex::encode_to_slice(full, &mut hex_id).expect("32 hex digits for 16 bytes");
        EventId(hex_id)
    });
    let command_len = usize::from(byte(take(1)));
    let mut command = String::from_utf8_lossy(take(command_len)).into_owned();
    if flags & 2 == 2 && !command.is_empty() {
        // Longer than the two-byte length can say: stored cut short, on a
        // character boundary.
        command = command.repeat(usize::from(u16::MAX) / command.len() + 1);
    }
    let key_len = usize::from(byte(take(1)));
    let key = take(key_len).to_vec();
    let value = d.to_vec();
    Record {
        topic,
        key,
        value,
        event_id,
        command: command.into(),
        sdk_app_id: u64::from_le_bytes(app),
    }
}

/// Spool recovery on one segment holding `data`: in memory (the same
/// decisions as at open, no file touched), then through real files in the
/// empty directory `dir` (left empty again). See [`recovery_in_memory`] and
/// [`recovery_on_files`] for what must hold.
pub fn recovery(dir: &Path, data: &[u8]) {
    recovery_in_memory(data);
    recovery_on_files(dir, data);
}

/// The file pass costs about twenty times the in-memory one: the fuzz
/// target takes it for one input in this many (chosen by the input's hash,
/// so an input always gets the same passes and a failure reproduces).
const FILE_PASS_EVERY: u32 = 64;

/// What the `spool_recovery` fuzz target runs: [`recovery_in_memory`] on
/// every input, [`recovery_on_files`] on one in 64 (`FILE_PASS_EVERY`).
pub fn recovery_sampled(dir: &Path, data: &[u8]) {
    recovery_in_memory(data);
    if crc32fast::hash(data).is_multiple_of(FILE_PASS_EVERY) {
        recovery_on_files(dir, data);
    }
}

/// Where the in-memory segments "are": only their names in the report.
const MEMORY_DIR: &str = "spool";

/// Recovery's decisions on a segment (first id 1) holding `data`, in memory:
/// only a well-formed header of another version is refused; the records kept
/// are exactly the input's records up to the cut, every one of them with a
/// right checksum is delivered and every other one is counted as skipped;
/// the cut is at a genuine torn tail (no valid record after it); an append
/// after recovery and a second recovery find the same records plus the new
/// one and nothing more to repair; acks hide exactly the acked records and
/// keep the next id beyond every plausible one.
pub fn recovery_in_memory(data: &[u8]) {
    if let Err(e) = recovery_in_memory_checks(data) {
        panic!("{e}");
    }
}

fn recovery_in_memory_checks(data: &[u8]) -> Result<(), String> {
    let Some(r) = recover_in_memory(data, None)? else {
        return Ok(());
    };
    check_report(&r.report, data.len() as u64)?;
    match r.segments.as_slice() {
        [] => check_set_aside(data, &r),
        [seg] => {
            let frames = check_kept(data, &r, seg)?;
            check_torn_tail(data, seg)?;
            check_append(data, &r, seg)?;
            check_acks(data, &r, &frames)
        }
        more => Err(format!("{} segments recovered from one", more.len())),
    }
}

/// `Ok(None)`: refused, rightly.
fn recover_in_memory(data: &[u8], acks: Option<&[u8]>) -> Result<Option<RecoveredBytes>, String> {
    let segment = SegmentBytes {
        first_id: 1,
        data,
        acks,
    };
    match recover_bytes(Path::new(MEMORY_DIR), &[segment]) {
        Ok(r) => Ok(Some(r)),
        Err(SpoolError::UnsupportedFormat { version, .. }) => {
            refused_rightly(data, version).map(|()| None)
        }
        Err(e) => Err(format!("recovery in memory failed: {e}")),
    }
}

/// Only a well-formed header with another version may stop the gateway:
/// anything else is damage to set aside.
fn refused_rightly(data: &[u8], version: u32) -> Result<(), String> {
    if data.len() >= SEGMENT_HEADER
        && data[..8] == *b"TBSPOOL\0"
        && data[8..12] == version.to_le_bytes()
        && version != 1
    {
        return Ok(());
    }
    Err(format!("refused a segment as version {version}"))
}

/// The figures of a report on a single segment file of `len` bytes.
fn check_report(report: &RecoveryReport, len: u64) -> Result<(), String> {
    let most = len.saturating_sub(SEGMENT_HEADER as u64) / SPOOL_RECORD_HEADER as u64;
    if report.records_recovered > most {
        return Err(format!(
            "{} records recovered from {len} bytes, which hold at most {most}",
            report.records_recovered
        ));
    }
    // Without acks every readable record is pending; a corrupt record
    // skipped alone keeps its id and may be counted as recovered, but is
    // never pending.
    if report.records_pending > report.records_recovered {
        return Err(format!(
            "{} records pending of {} recovered",
            report.records_pending, report.records_recovered
        ));
    }
    if report.bytes_skipped() > len {
        return Err(format!("{} bytes skipped of {len}", report.bytes_skipped()));
    }
    for d in &report.damaged {
        if d.offset.saturating_add(d.bytes_skipped) > len {
            return Err(format!("damage reported past the end of the file: {d}"));
        }
    }
    Ok(())
}

/// No segment kept: its header was unusable, and the whole file is set
/// aside (removed when shorter than a header).
fn check_set_aside(data: &[u8], r: &RecoveredBytes) -> Result<(), String> {
    if header_usable(data) {
        return Err("a segment with a usable header was not kept".into());
    }
    let removed = data.len() < SEGMENT_HEADER;
    match r.report.damaged.as_slice() {
        [d] if d.offset == 0
            && d.bytes_skipped == data.len() as u64
            && matches!(d.action, DamageAction::Removed) == removed
            && matches!(d.action, DamageAction::Quarantined(_)) != removed => {}
        other => return Err(format!("an unusable header reported as {other:?}")),
    }
    if r.report.records_recovered != 0 || r.report.next_id != 1 || r.active.is_some() {
        return Err(format!(
            "records or ids from an unusable file: {:?}",
            r.report
        ));
    }
    Ok(())
}

/// The magic, version 1 and first id 1, as `segment.rs` documents the
/// header (its length field is not checked).
fn header_usable(data: &[u8]) -> bool {
    data.len() >= SEGMENT_HEADER
        && data[..8] == *b"TBSPOOL\0"
        && data[8..12] == 1u32.to_le_bytes()
        && data[16..24] == 1u64.to_le_bytes()
}

/// One record as the input's bytes hold it, read independently of the
/// code under test: where it is, and whether its checksum holds.
struct Frame {
    id: u64,
    offset: u64,
    size: u64,
    crc_ok: bool,
}

/// The records whose framing (length in bounds, consecutive id, all bytes
/// present) holds, from `offset` on, the first having id `first`.
fn frames(data: &[u8], mut offset: usize, first: u64) -> Vec<Frame> {
    let mut out = Vec::new();
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    while let Some(head) = data.get(offset..offset + SPOOL_RECORD_HEADER) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let id = first + out.len() as u64;
        let end = offset + SPOOL_RECORD_HEADER + len;
        if len > MAX_RECORD_LEN || u64_at(offset + 8) != id || end > data.len() {
            break;
        }
        let payload = &data[offset + SPOOL_RECORD_HEADER..end];
        let framed = frame(id, u64_at(offset + 16), payload);
        out.push(Frame {
            id,
            offset: offset as u64,
            size: (end - offset) as u64,
            crc_ok: framed == data[offset..end],
        });
        offset = end;
    }
    out
}

/// The kept segment is exactly the input's records up to its data length,
/// the last of them valid; the valid ones are delivered, the others counted
/// as skipped.
fn check_kept(data: &[u8], r: &RecoveredBytes, seg: &KeptSegment) -> Result<Vec<Frame>, String> {
    let len = data.len() as u64;
    let data_len = seg.data_len;
    if !header_usable(data) || seg.first_id != 1 || data_len > len || seg.disk_len != data_len {
        return Err(format!("kept {seg:?} of a {len}-byte segment"));
    }
    let frames = frames(&data[..data_len as usize], SEGMENT_HEADER, 1);
    let end = frames
        .last()
        .map_or(SEGMENT_HEADER as u64, |f| f.offset + f.size);
    if end != data_len || frames.len() as u64 != seg.count {
        return Err(format!(
            "{seg:?} is not the input's records up to its length"
        ));
    }
    if frames.last().is_some_and(|f| !f.crc_ok) {
        return Err("the kept data ends in a record whose checksum fails".into());
    }
    let valid: Vec<u64> = frames.iter().filter(|f| f.crc_ok).map(|f| f.id).collect();
    if seg.pending != valid {
        return Err(format!(
            "{:?} pending, but the valid records are {valid:?}",
            seg.pending
        ));
    }
    let bad = frames.len() - valid.len();
    let rep = &r.report;
    if rep.records_skipped != bad as u64 || rep.records_recovered != seg.count {
        return Err(format!(
            "{bad} bad of {} records, reported as {rep:?}",
            frames.len()
        ));
    }
    let tail = rep
        .damaged
        .iter()
        .find(|d| d.action == DamageAction::Truncated);
    let cut = tail.map(|d| (d.offset, d.bytes_skipped));
    // Zeros from the kept data to the end, a header's worth at least, are
    // what `always` mode writes ahead: cut, but not reported as damage.
    let rest = &data[data_len as usize..];
    let zeros = rest.len() >= SPOOL_RECORD_HEADER
        && rest.len() as u64 <= crate::spool::PREFORMAT_BYTES
        && rest.iter().all(|&b| b == 0);
    if cut != (data_len < len && !zeros).then_some((data_len, len - data_len)) {
        return Err(format!(
            "{seg:?} of {len} bytes, but the cut reported is {tail:?}"
        ));
    }
    let next = seg.count + 1;
    if rep.next_id != next
        || r.active != Some(1)
        || r.reader_start != valid.first().map_or(next, |&id| id)
    {
        return Err(format!(
            "{r:?}: wrong next id, active segment or reader start"
        ));
    }
    Ok(frames)
}

/// Recovery cuts only a genuine torn tail: no record with a right checksum
/// follows the kept data (bad-checksum records before a valid one are
/// skipped alone, not cut).
fn check_torn_tail(data: &[u8], seg: &KeptSegment) -> Result<(), String> {
    let after = frames(data, seg.data_len as usize, seg.count + 1);
    match after.iter().find(|f| f.crc_ok) {
        Some(f) => Err(format!(
            "cut at {}, before the valid record {}",
            seg.data_len, f.id
        )),
        None => Ok(()),
    }
}

/// A record appended where recovery says appends continue is found by the
/// next recovery after the same records, with nothing more to repair.
fn check_append(data: &[u8], r: &RecoveredBytes, seg: &KeptSegment) -> Result<(), String> {
    let next = r.report.next_id;
    let mut file = data[..seg.data_len as usize].to_vec();
    file.extend(frame(next, 1670574414130, b"appended after recovery"));
    let again = recover_in_memory(&file, None)?.ok_or("refused after an append")?;
    let (skipped, repairs): (Vec<&DamagedSegment>, Vec<_>) = again
        .report
        .damaged
        .iter()
        .partition(|d| d.action == DamageAction::RecordSkipped);
    if !repairs.is_empty() {
        return Err(format!(
            "recovery left damage for the next one: {repairs:?}"
        ));
    }
    let skipped_before: Vec<&DamagedSegment> = r
        .report
        .damaged
        .iter()
        .filter(|d| d.action == DamageAction::RecordSkipped)
        .collect();
    let mut want = seg.pending.clone();
    want.push(next);
    match again.segments.as_slice() {
        [s] if s.pending == want
            && s.count == seg.count + 1
            && skipped == skipped_before
            && again.report.next_id == next + 1 =>
        {
            Ok(())
        }
        _ => Err(format!(
            "after one append to {r:?}, recovery found {again:?}"
        )),
    }
}

/// Acks hide exactly the acked records; a plausible ack beyond the records
/// moves the next id past it (ids never go backwards), an implausible one
/// and a torn or zero-filled tail of the ack file do not count.
fn check_acks(data: &[u8], r: &RecoveredBytes, frames: &[Frame]) -> Result<(), String> {
    let seg = &r.segments[0];
    let acked: Vec<u64> = seg.pending.iter().copied().step_by(2).collect();
    let beyond = seg.count + 3;
    let mut acks: Vec<u8> = [acked.as_slice(), &[0, beyond, 1 << 40]]
        .concat()
        .iter()
        .flat_map(|id| id.to_le_bytes())
        .collect();
    acks.extend_from_slice(&[7, 0, 0]);
    let with = recover_in_memory(data, Some(&acks))?.ok_or("refused with an ack file")?;
    let want: Vec<u64> = seg
        .pending
        .iter()
        .copied()
        .filter(|id| !acked.contains(id))
        .collect();
    let ok = match with.segments.as_slice() {
        [s] => s.pending == want && s.count == frames.len() as u64,
        _ => false,
    };
    if !ok || with.report.next_id != beyond + 1 || with.report.damaged != r.report.damaged {
        return Err(format!(
            "acks {acked:?} and {beyond} on {r:?} gave {with:?}"
        ));
    }
    Ok(())
}

/// Opening a spool whose only segment holds `data` (in the empty directory
/// `dir`, which is left empty again): it opens (only a segment from a newer
/// version may be refused), reports what recovery in memory reports, hands
/// back exactly the records it reports and only records that are in the
/// bytes, takes a new append after them, and a second open finds the files
/// in order, with the new record after the recovered ones.
pub fn recovery_on_files(dir: &Path, data: &[u8]) {
    let result = recovery_on_files_checks(dir, data);
    // Leave the directory empty whatever happened, for the next input.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn recovery_on_files_checks(dir: &Path, data: &[u8]) -> Result<(), String> {
    let segment = dir.join(format!("{:020}.seg", 1));
    fs::write(&segment, data).map_err(|e| format!("cannot write the segment: {e}"))?;
    let config = SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        fsync: FsyncMode::Never,
        segment_bytes: 1 << 20,
    };
    let (spool, mut reader, report) = match Spool::open(config.clone()) {
        Ok(opened) => opened,
        Err(SpoolError::UnsupportedFormat { version, .. }) => {
            return refused_rightly(data, version);
        }
        Err(e) => return Err(format!("the spool did not open: {e}")),
    };
    check_report(&report, data.len() as u64)?;
    let segment = SegmentBytes {
        first_id: 1,
        data,
        acks: None,
    };
    match recover_bytes(dir, &[segment]) {
        Ok(r) if r.report == report => {}
        other => {
            return Err(format!(
                "recovery of the file gave {report:?}, in memory {other:?}"
            ));
        }
    }
    if spool.stats().pending_events != report.records_pending {
        return Err("the spool's figures disagree with its recovery report".into());
    }
    let read = read_records(&mut reader, report.records_pending as usize)?;
    for (i, r) in read.iter().enumerate() {
        if i > 0 && r.id <= read[i - 1].id {
            return Err("records read out of id order".into());
        }
        let framed = frame(r.id, r.append_time_ms, &r.payload);
        if !data.windows(framed.len()).any(|w| w == framed.as_slice()) {
            return Err(format!("record {} is not in the segment's bytes", r.id));
        }
    }
    let probe = Bytes::from_static(b"appended after recovery");
    let rt = runtime();
    rt.block_on(spool.append(vec![probe.clone()]))
        .map_err(|e| format!("no append after recovery: {e}"))?;
    rt.block_on(spool.close())
        .map_err(|e| format!("cannot close: {e}"))?;
    drop((spool, reader));
    check_reopened(config, &report, probe)
}

/// Reads `n` records, failing if they do not come within 10 s.
fn read_records(reader: &mut SpoolReader, n: usize) -> Result<Vec<SpooledRecord>, String> {
    let mut read = Vec::new();
    while read.len() < n {
        let batch = runtime().block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                reader.next_batch(n - read.len(), 1 << 30),
            )
            .await
        });
        match batch {
            Ok(Some(b)) => read.extend(b),
            Ok(None) => return Err("the reader ended early".into()),
            Err(_) => {
                return Err(format!(
                    "{} of {n} recovered records could be read",
                    read.len()
                ));
            }
        }
    }
    if read.len() != n {
        return Err(format!("read {} records, {n} pending", read.len()));
    }
    Ok(read)
}

/// The second open, after one append to what the first recovered.
fn check_reopened(config: SpoolConfig, first: &RecoveryReport, probe: Bytes) -> Result<(), String> {
    let (spool, mut reader, again) =
        Spool::open(config).map_err(|e| format!("the second open failed: {e}"))?;
    if let Some(d) = again.damaged.iter().find(|d| {
        matches!(
            d.action,
            DamageAction::Truncated | DamageAction::Quarantined(_) | DamageAction::Removed
        )
    }) {
        return Err(format!("recovery left damage for the next open: {d}"));
    }
    if again.records_pending != first.records_pending + 1 {
        return Err(format!(
            "{} records after one append to {}",
            again.records_pending, first.records_pending
        ));
    }
    let read = read_records(&mut reader, again.records_pending as usize)?;
    if read.last().map(|r| &r.payload) != Some(&probe) {
        return Err("the appended record is not the last one after reopening".into());
    }
    drop((spool, reader));
    Ok(())
}

/// A spool record as `segment.rs` documents its layout, written out here
/// independently of the code under test.
fn frame(id: u64, ts: u64, payload: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&id.to_le_bytes());
    crc.update(&ts.to_le_bytes());
    crc.update(payload);
    let mut out = Vec::with_capacity(SPOOL_RECORD_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// One runtime per thread for the spool's async calls; building one per
/// input would dominate the fuzzer's time.
fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RT: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime"),
        ));
    }
    RT.with(|rt| *rt)
}
