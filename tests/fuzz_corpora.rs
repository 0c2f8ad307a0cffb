//! The fuzzers' corpora, replayed as ordinary tests on the stable toolchain:
//! every file under `fuzz/corpus/<target>/` goes through the same check the
//! fuzz target runs (`timbridge::fuzzing`), so an input that once broke an
//! invariant (kept in the corpus) keeps being checked on every `cargo test`,
//! with no nightly toolchain and no cargo-fuzz.
//!
//! `cargo test --test fuzz_corpora -- --ignored write_seeds` regenerates the
//! binary seeds of the `record` and `spool_recovery` targets from the
//! payload seeds, through the real normalizer and spool.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use timbridge::fuzzing;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

/// Runs `check` on every corpus file of `target`, then names every file
/// that broke an invariant (not only the first).
fn replay(target: &str, check: impl Fn(&[u8])) {
    let mut failed = Vec::new();
    let files = corpus(target);
    for file in &files {
        let data = fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(file.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus inputs broke an invariant (see the panics above): {failed:?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn query_corpus_holds_the_query_invariants() {
    replay("query", fuzzing::query);
}

#[test]
fn payload_corpus_holds_the_payload_invariants() {
    replay("payload", fuzzing::payload);
}

#[test]
fn record_corpus_holds_the_record_invariants() {
    replay("record", fuzzing::record);
}

/// Every input through both passes (the fuzz target takes the file pass for
/// a sample only).
#[test]
fn spool_recovery_corpus_holds_the_recovery_invariants() {
    let dir = tempfile::tempdir().unwrap();
    replay("spool_recovery", |data| fuzzing::recovery(dir.path(), data));
}

/// Writes the `record` and `spool_recovery` seeds: the records the payload
/// seeds normalize into, encoded as the spool stores them, and segments
/// holding them (whole, and with a torn tail) as the real spool writes them.
#[test]
#[ignore = "regenerates checked-in seeds; run by hand"]
fn write_seeds() {
    use timbridge::event::{Envelope, normalize};
    use timbridge::record::{Record, TopicRole};
    use timbridge::spool::{FsyncMode, Spool, SpoolConfig};
    use timbridge::tencent::payload;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let env = Envelope {
        sdk_app_id: 1400000000,
        received_at_ms: 1670574414130,
        client_ip: Some("127.0.0.1"),
        platform: Some("iOS"),
    };
    let mut records = Vec::new();
    for file in corpus("payload") {
        let body = fs::read(&file).unwrap();
        for command in [
            timbridge::tencent::GROUP_READ_RECEIPT,
            timbridge::tencent::C2C_READ_RECEIPT,
            timbridge::tencent::C2C_REPORT,
        ] {
            if let Some(Ok(cb)) = payload::parse(command, &body) {
                normalize(&cb, &env, &mut records);
            }
        }
    }
    records.push(Record {
        topic: TopicRole::Raw,
        key: b"@TGS#raw".to_vec(),
        value: br#"{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"@TGS#raw"}"#.to_vec(),
        event_id: None,
        command: "Group.CallbackAfterSendMsg".into(),
        sdk_app_id: 1400000000,
    });
    let encoded: Vec<Vec<u8>> = records.iter().map(Record::encode).collect();
    let record_dir = root.join("record");
    fs::create_dir_all(&record_dir).unwrap();
    // One seed per distinct kind of record is enough to start from.
    let mut seen = std::collections::BTreeSet::new();
    for (r, bytes) in records.iter().zip(&encoded) {
        if seen.insert((r.command.to_string(), r.topic.label())) {
            let name = format!("seed-{}-{}", r.topic.label(), seen.len());
            fs::write(record_dir.join(name), bytes).unwrap();
        }
    }

    let spool_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (spool, _reader, _) = Spool::open(SpoolConfig {
        dir: spool_dir.path().to_path_buf(),
        max_bytes: 1 << 30,
        fsync: FsyncMode::Never,
        segment_bytes: 1 << 20,
    })
    .unwrap();
    let payloads: Vec<bytes::Bytes> = encoded.iter().take(4).cloned().map(Into::into).collect();
    rt.block_on(spool.append(payloads)).unwrap();
    rt.block_on(spool.close()).unwrap();
    drop((spool, _reader));
    let segment = fs::read(spool_dir.path().join(format!("{:020}.seg", 1))).unwrap();
    let seg_dir = root.join("spool_recovery");
    fs::create_dir_all(&seg_dir).unwrap();
    fs::write(seg_dir.join("seed-four-records"), &segment).unwrap();
    fs::write(
        seg_dir.join("seed-torn-tail"),
        &segment[..segment.len() - 40],
    )
    .unwrap();
    fs::write(seg_dir.join("seed-header-only"), &segment[..24]).unwrap();
    let mut flipped = segment.clone();
    flipped[24 + 24 + 3] ^= 0x40;
    fs::write(seg_dir.join("seed-bad-crc-first-record"), &flipped).unwrap();
}
