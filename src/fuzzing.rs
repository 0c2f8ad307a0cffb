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

use crate::event::{Envelope, normalize};
use crate::record::{EventId, Record, RecordRef, TopicRole};
use crate::spool::{DamageAction, FsyncMode, Spool, SpoolConfig, SpoolError};
use crate::tencent::payload::{self, Callback};
use crate::tencent::query::CallbackQuery;
use crate::tencent::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};

/// The most bytes a callback may add to the spool per byte of its request
/// (query + body); issue 8's bound on the work one request can cause.
pub const SPOOL_BYTES_PER_REQUEST_BYTE: usize = 16;

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
/// standard `application/x-www-form-urlencoded` reading (first value wins),
/// whichever of its two paths it takes, and no value longer than the query.
pub fn query(data: &[u8]) {
    // A request line's query is always a str by the time intake sees it.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let q = CallbackQuery::parse(raw);
    let mut want = CallbackQuery::default();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
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

/// One body through the parser of each read-receipt command and of raw
/// forwarding. Refusals must be errors that can go into an answer and a log
/// line; acceptances must normalize into well-formed records whose spool
/// bytes are bounded by the request's bytes.
pub fn payload(body: &[u8]) {
    let mut group_id = None;
    for command in [GROUP_READ_RECEIPT, C2C_READ_RECEIPT, C2C_REPORT] {
        let parsed = payload::parse(command, body).expect("a read-receipt command is parsed");
        match parsed {
            Err(e) => check_error(command, &e),
            Ok(cb) => {
                if let Callback::Group(g) = &cb {
                    group_id = Some(g.group_id.to_string());
                }
                check_events(command, &cb, body);
            }
        }
    }
    match payload::parse_other(body) {
        Err(e) => {
            check_error("other", &e);
            assert!(
                group_id.is_none(),
                "a group read receipt is not accepted for raw forwarding: {e}"
            );
        }
        Ok(other) => {
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

/// An error text goes into Tencent's `ErrorInfo` and a log line.
fn check_error(command: &str, e: &str) {
    assert!(!e.is_empty(), "{command}: an empty error");
    assert!(
        !e.chars().any(char::is_control),
        "{command}: error text with a raw control character could forge a log line: {e:?}"
    );
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

    let request_bytes = QUERY.len() + body.len();
    let spool_bytes: usize = records
        .iter()
        .map(|r| SPOOL_RECORD_HEADER + r.encoded_len())
        .sum();
    assert!(
        spool_bytes <= SPOOL_BYTES_PER_REQUEST_BYTE * request_bytes,
        "{command}: {request_bytes} request bytes became {spool_bytes} spool bytes, \
         more than {SPOOL_BYTES_PER_REQUEST_BYTE} times as many"
    );

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
            assert!(conversation.starts_with("c2c:"));
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
    assert_eq!(back, built, "a record changed through encode and decode");
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
    let event_id = (byte(take(1)) & 1 == 1).then(|| {
        let mut hex_id = [b'0'; 32];
        let raw = take(16);
        let mut full = [0u8; 16];
        full[..raw.len()].copy_from_slice(raw);
        hex::encode_to_slice(full, &mut hex_id).expect("32 hex digits for 16 bytes");
        EventId(hex_id)
    });
    let command_len = usize::from(byte(take(1)));
    let command = String::from_utf8_lossy(take(command_len)).into_owned();
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

/// Opening a spool whose only segment holds `data` (in the empty directory
/// `dir`, which is left empty again): it opens (only a segment from a newer
/// version may be refused), never reports more records than the bytes can
/// hold, hands back exactly the records it reports and only records that are
/// in the bytes, takes a new append after them, and a second open finds the
/// files in order, with the new record after the recovered ones.
pub fn recovery(dir: &Path, data: &[u8]) {
    let result = recovery_in(dir, data);
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

fn recovery_in(dir: &Path, data: &[u8]) -> Result<(), String> {
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
            // Only a well-formed header with another version may stop the
            // gateway: anything else is damage to set aside.
            if data.len() >= SEGMENT_HEADER
                && data[..8] == *b"TBSPOOL\0"
                && data[8..12] == version.to_le_bytes()
                && version != 1
            {
                return Ok(());
            }
            return Err(format!("refused a segment as version {version}"));
        }
        Err(e) => return Err(format!("the spool did not open: {e}")),
    };

    let len = data.len() as u64;
    let most = len.saturating_sub(SEGMENT_HEADER as u64) / SPOOL_RECORD_HEADER as u64;
    if report.records_recovered > most {
        return Err(format!(
            "{} records recovered from {len} bytes, which hold at most {most}",
            report.records_recovered
        ));
    }
    if report.records_pending != report.records_recovered {
        return Err(format!(
            "{} records pending of {} recovered, without any acks",
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
    if spool.stats().pending_events != report.records_pending {
        return Err("the spool's figures disagree with its recovery report".into());
    }

    let rt = runtime();
    let pending = report.records_pending as usize;
    let mut read = Vec::new();
    while read.len() < pending {
        let batch = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), reader.next_batch(pending, 1 << 30)).await
        });
        match batch {
            Ok(Some(b)) => read.extend(b),
            Ok(None) => return Err("the reader ended early".into()),
            Err(_) => {
                return Err(format!(
                    "{} of {pending} recovered records could be read",
                    read.len()
                ));
            }
        }
    }
    if read.len() != pending {
        return Err(format!("read {} records, {pending} pending", read.len()));
    }
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
    rt.block_on(spool.append(vec![probe.clone()]))
        .map_err(|e| format!("no append after recovery: {e}"))?;
    rt.block_on(spool.close())
        .map_err(|e| format!("cannot close: {e}"))?;
    drop((spool, reader));

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
    if again.records_pending != report.records_pending + 1 {
        return Err(format!(
            "{} records after one append to {}",
            again.records_pending, report.records_pending
        ));
    }
    let mut last = None;
    let total = pending + 1;
    let mut seen = 0;
    while seen < total {
        let batch = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), reader.next_batch(total, 1 << 30)).await
        });
        match batch {
            Ok(Some(b)) => {
                seen += b.len();
                last = b.last().cloned();
            }
            _ => return Err(format!("{seen} of {total} records read after reopening")),
        }
    }
    if last.map(|r| r.payload) != Some(probe) {
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
