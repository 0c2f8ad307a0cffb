//! Behaviour tests of the spool as a whole, on real files in temp dirs.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::segment::{HEADER_LEN, acks_path, record_size, segment_path};
use super::*;

/// Fault injection and flow control for the writer thread, compiled into
/// test builds only.
#[derive(Default)]
pub(crate) struct TestHooks {
    paused: Mutex<bool>,
    resumed: Condvar,
    /// The writer thread is waiting in `wait_while_paused`.
    parked: AtomicBool,
    /// The deadline the writer thread last went to sleep with.
    sleeping_until: Mutex<Option<std::time::Instant>>,
    fail_writes: AtomicU32,
    fail_syncs: AtomicU32,
    fail_truncates: AtomicU32,
    /// Reads of segment files fail as if the process were out of file
    /// descriptors.
    fail_reads: AtomicU32,
    /// Background syncs wait here while true, as if the disk were slow.
    syncs_held: Mutex<bool>,
    syncs_released: Condvar,
    background_syncs_started: AtomicU32,
    /// The writer thread panics when it next wakes, as a bug would make it.
    crash: AtomicBool,
}

impl TestHooks {
    /// Makes the writer stop after receiving its next request, before
    /// draining the queue, so a test can queue a known set of requests.
    fn pause(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }

    fn resume(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.resumed.notify_all();
    }

    pub(crate) fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        while *paused {
            self.parked.store(true, Ordering::SeqCst);
            paused = self
                .resumed
                .wait(paused)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.parked.store(false, Ordering::SeqCst);
    }

    /// Called by the writer thread as it waits for its next message.
    pub(crate) fn sleeps_until(&self, deadline: std::time::Instant) {
        *self
            .sleeping_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(deadline);
    }

    pub(crate) fn take_crash(&self) -> bool {
        self.crash.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn take_read_failure(&self) -> Option<std::io::Error> {
        take(&self.fail_reads).then(|| std::io::Error::from_raw_os_error(libc::EMFILE))
    }

    fn fail_reads(&self, n: u32) {
        self.fail_reads.store(n, Ordering::SeqCst);
    }

    pub(crate) fn take_write_failure(&self) -> bool {
        take(&self.fail_writes)
    }

    pub(crate) fn take_sync_failure(&self) -> bool {
        take(&self.fail_syncs)
    }

    pub(crate) fn take_truncate_failure(&self) -> bool {
        take(&self.fail_truncates)
    }

    fn hold_syncs(&self, held: bool) {
        *self
            .syncs_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = held;
        self.syncs_released.notify_all();
    }

    /// Called by the syncer thread before each background sync.
    pub(crate) fn background_sync_starts(&self) {
        self.background_syncs_started.fetch_add(1, Ordering::SeqCst);
        let mut held = self
            .syncs_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *held {
            held = self
                .syncs_released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn take(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl TestHooks {
    /// The next `n` segment writes fail (as on a full disk).
    fn fail_writes(&self, n: u32) {
        self.fail_writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` fdatasyncs fail.
    fn fail_syncs(&self, n: u32) {
        self.fail_syncs.store(n, Ordering::SeqCst);
    }

    /// The next `n` cuts back of a partial write fail.
    fn fail_truncates(&self, n: u32) {
        self.fail_truncates.store(n, Ordering::SeqCst);
    }
}

impl Spool {
    /// The writer's fault injection and flow control.
    fn hooks(&self) -> &TestHooks {
        &self.inner.shared.hooks
    }

    /// Pauses the writer thread and returns once it waits without holding
    /// the writer's lock, so that nothing it does can race the appends that
    /// follow.
    async fn park_writer(&self) {
        self.hooks().pause();
        let tx = self.inner.tx.as_ref().expect("writer thread");
        tx.send(Msg::Tick).expect("writer thread alive");
        let parked = async {
            while !self.hooks().parked.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(WAIT, parked)
            .await
            .expect("the writer thread never paused");
    }

    /// Empties the in-memory tail and sets its caps; `(0, 0)` keeps
    /// nothing there, so that every read goes to disk.
    fn tail_caps(&self, max_bytes: usize, max_records: usize) {
        self.inner
            .shared
            .lock_state()
            .tail
            .set_caps(max_bytes, max_records);
    }

    /// Ids in the in-memory tail.
    fn tail_ids(&self) -> Vec<u64> {
        self.inner.shared.lock_state().tail.ids()
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds; fails the test with `what` after `WAIT`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        fsync: FsyncMode::Always,
        segment_bytes: 16 << 20,
    }
}

fn open(cfg: &SpoolConfig) -> (Spool, SpoolReader, RecoveryReport) {
    Spool::open(cfg.clone()).expect("open spool")
}

/// A fresh spool directory and the test config for it.
fn fresh() -> (tempfile::TempDir, SpoolConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cfg(dir.path());
    (dir, c)
}

/// A fresh spool directory with the spool open on the test config.
fn fresh_open() -> (tempfile::TempDir, Spool, SpoolReader) {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    (dir, spool, reader)
}

/// What an earlier run leaves in `c.dir`: `payloads` appended one per
/// call, then the spool closed.
async fn left_behind(c: &SpoolConfig, payloads: impl IntoIterator<Item = Bytes>) {
    let (spool, reader, _) = open(c);
    append_each(&spool, payloads).await;
    shut(spool, reader).await;
}

/// Where record `n` (from 0) starts in a segment of `len`-byte payloads.
fn record_at(n: u64, len: usize) -> u64 {
    HEADER_LEN + n * record_size(len)
}

/// The offset of a record's payload from the record's start (length, crc,
/// id, time).
const PAYLOAD_AT: u64 = 24;

/// Flips the bits of `mask` in the byte at `at` of `file`.
fn flip(file: &Path, at: u64, mask: u8) {
    let mut bytes = fs::read(file).expect("read");
    bytes[usize::try_from(at).expect("offset")] ^= mask;
    fs::write(file, &bytes).expect("write");
}

/// Cuts `file` to `len` bytes, as a crash mid-write leaves it.
fn cut(file: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open")
        .set_len(len)
        .expect("cut");
}

/// Overwrites `file` at `at` with `bytes`, in place (the spool may have it
/// open).
fn poke(file: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(file).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).expect("poke");
}

fn payloads(records: &[SpooledRecord]) -> Vec<Bytes> {
    records.iter().map(|r| r.payload.clone()).collect()
}

fn ev(i: u64) -> Bytes {
    Bytes::from(format!("event-{i:04}"))
}

fn sized(i: u64, len: usize) -> Bytes {
    let mut v = format!("event-{i:04}-").into_bytes();
    v.resize(len, b'x');
    Bytes::from(v)
}

async fn append_each(spool: &Spool, payloads: impl IntoIterator<Item = Bytes>) {
    for p in payloads {
        spool.append(vec![p]).await.expect("append");
    }
}

/// Reads until `n` records arrived; fails instead of hanging.
async fn read_n(reader: &mut SpoolReader, n: usize) -> Vec<SpooledRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(WAIT, reader.next_batch(1000, 1 << 20))
            .await
            .expect("reader timed out")
            .expect("reader ended early");
        out.extend(batch);
    }
    assert_eq!(out.len(), n, "read more than expected");
    out
}

/// Reads everything up to the end of a closed spool.
async fn drain(reader: &mut SpoolReader) -> Vec<SpooledRecord> {
    let mut out = Vec::new();
    while let Some(batch) = tokio::time::timeout(WAIT, reader.next_batch(7, 1 << 20))
        .await
        .expect("reader timed out")
    {
        out.extend(batch);
    }
    out
}

fn ids(records: &[SpooledRecord]) -> Vec<u64> {
    records.iter().map(|r| r.id).collect()
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).expect("metadata").len()
}

/// Closes and drops everything, releasing the directory lock.
async fn shut(spool: Spool, reader: SpoolReader) {
    spool.close().await.expect("close");
    drop(reader);
    drop(spool);
}

#[tokio::test]
async fn append_then_read_back_in_order_with_ids_from_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, mut reader, report) = open(&cfg(dir.path()));
    assert_eq!(report.next_id, 1);
    let before = state::now_ms();
    spool.append(vec![ev(1), ev(2)]).await.expect("append");
    spool.append(vec![ev(3)]).await.expect("append");
    spool
        .append(vec![ev(4), ev(5), ev(6)])
        .await
        .expect("append");
    let after = state::now_ms();
    let got = read_n(&mut reader, 6).await;
    assert_eq!(ids(&got), vec![1, 2, 3, 4, 5, 6]);
    for r in &got {
        assert_eq!(r.payload, ev(r.id));
        assert!((before..=after).contains(&r.append_time_ms));
    }
    assert_eq!(stats_pending(&spool), 6);
    shut(spool, reader).await;
}

fn stats_pending(spool: &Spool) -> u64 {
    spool.stats().pending_events
}

#[tokio::test]
async fn ids_follow_call_order_even_before_polling() {
    let (_dir, spool, mut reader) = fresh_open();
    // Futures created in order, awaited in reverse: ids follow the calls.
    let futs: Vec<_> = (1..=5).map(|i| spool.append(vec![ev(i)])).collect();
    for f in futs.into_iter().rev() {
        f.await.expect("append");
    }
    let got = read_n(&mut reader, 5).await;
    for r in &got {
        assert_eq!(r.payload, ev(r.id));
    }
    assert_eq!(ids(&got), vec![1, 2, 3, 4, 5]);
    shut(spool, reader).await;
}

#[tokio::test]
async fn ids_continue_after_reopen() {
    let (_dir, c) = fresh();
    left_behind(&c, (1..=3).map(ev)).await;

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.next_id, 4);
    assert_eq!(report.records_recovered, 3);
    spool.append(vec![ev(4)]).await.expect("append");
    let got = read_n(&mut reader, 4).await;
    assert_eq!(ids(&got), vec![1, 2, 3, 4]);
    assert_eq!(got[3].payload, ev(4));
    shut(spool, reader).await;
}

#[tokio::test]
async fn reopen_replays_unacked_in_order_and_skips_acked() {
    let (_dir, c) = fresh();
    let (spool, mut reader, _) = open(&c);
    append_each(&spool, (1..=10).map(ev)).await;
    let got = read_n(&mut reader, 10).await;
    for r in got.iter().filter(|r| r.id % 2 == 1) {
        spool.ack(r.id);
    }
    assert_eq!(stats_pending(&spool), 5);
    shut(spool, reader).await;

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_recovered, 10);
    assert_eq!(report.records_pending, 5);
    assert_eq!(spool.stats().pending_events, 5);
    spool.close().await.expect("close");
    let replay = drain(&mut reader).await;
    assert_eq!(ids(&replay), vec![2, 4, 6, 8, 10]);
    for r in &replay {
        assert_eq!(r.payload, ev(r.id));
    }
}

#[tokio::test]
async fn reader_starts_at_lowest_unacked_even_if_acked_unread() {
    let (_dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=8).map(ev)).await;
    for id in [1, 2, 3, 4, 5, 7] {
        spool.ack(id);
    }
    shut(spool, reader).await;

    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(9)]).await.expect("append");
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![6, 8, 9]);
}

#[tokio::test]
async fn torn_tail_is_cut_reported_and_appends_continue() {
    let (dir, c) = fresh();
    left_behind(&c, (1..=5).map(|i| sized(i, 100))).await;

    let seg = segment_path(dir.path(), 1);
    let full_len = file_len(&seg);
    assert_eq!(full_len, HEADER_LEN + 5 * record_size(100));
    // A crash in the middle of writing the fifth record.
    let cut_at = full_len - 30;
    cut(&seg, cut_at);

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_recovered, 4);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let d = &report.damaged[0];
    assert_eq!(d.file, seg);
    assert_eq!(d.offset, HEADER_LEN + 4 * record_size(100));
    assert_eq!(d.bytes_skipped, record_size(100) - 30);
    assert_eq!(d.action, DamageAction::Truncated);
    assert!(d.reason.contains("torn"), "{}", d.reason);
    assert_eq!(report.bytes_skipped(), record_size(100) - 30);
    assert_eq!(file_len(&seg), HEADER_LEN + 4 * record_size(100));
    assert_eq!(report.next_id, 5);

    spool
        .append(vec![sized(5, 50)])
        .await
        .expect("append after recovery");
    let got = read_n(&mut reader, 5).await;
    assert_eq!(ids(&got), vec![1, 2, 3, 4, 5]);
    assert_eq!(got[4].payload, sized(5, 50));
    shut(spool, reader).await;

    // The repaired file is clean now.
    let (spool, reader, report) = open(&c);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(report.records_recovered, 5);
    shut(spool, reader).await;
}

#[tokio::test]
async fn a_corrupt_record_mid_segment_is_skipped_alone_and_counted() {
    let (dir, c) = fresh();
    left_behind(&c, (1..=5).map(|i| sized(i, 100))).await;

    let seg = segment_path(dir.path(), 1);
    let len_before = file_len(&seg);
    let third = record_at(2, 100);
    flip(&seg, third + PAYLOAD_AT + 50, 0x01); // payload of record 3; length and id intact

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_recovered, 5);
    assert_eq!(report.records_pending, 4);
    assert_eq!(report.records_skipped, 1);
    assert_eq!(report.damaged.len(), 1);
    let d = &report.damaged[0];
    assert!(d.reason.contains("checksum"), "{}", d.reason);
    assert_eq!(d.offset, third);
    assert_eq!(d.bytes_skipped, record_size(100));
    assert_eq!(d.action, DamageAction::RecordSkipped);
    assert_eq!(file_len(&seg), len_before, "nothing may be cut");
    assert_eq!(spool.stats().counters.records_lost, 1);
    assert_eq!(spool.stats().pending_events, 4);
    spool.append(vec![ev(6)]).await.expect("append");
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(ids(&got), vec![1, 2, 4, 5, 6]);
    assert_eq!(got[2].payload, sized(4, 100));
    assert_eq!(got[4].payload, ev(6));
    drop(spool);
    drop(reader);

    // Once the rest is delivered, the segment can go: the skipped record
    // does not hold it.
    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 5);
    for r in drain_after_close(&spool, &mut reader).await {
        spool.ack(r.id);
    }
    assert_eq!(spool.stats().pending_events, 0);
}

/// Closes the spool and returns everything the reader still hands out.
async fn drain_after_close(spool: &Spool, reader: &mut SpoolReader) -> Vec<SpooledRecord> {
    spool.close().await.expect("close");
    drain(reader).await
}

#[tokio::test]
async fn a_run_of_corrupt_records_is_one_report_entry() {
    let (dir, c) = fresh();
    left_behind(&c, (1..=6).map(|i| sized(i, 100))).await;
    let seg = segment_path(dir.path(), 1);
    for n in [1, 2, 3] {
        flip(&seg, record_at(n, 100) + PAYLOAD_AT + 50, 0x01);
    }

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_skipped, 3);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].bytes_skipped, 3 * record_size(100));
    assert!(report.damaged[0].reason.contains("3 records"), "{report:?}");
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![1, 5, 6]);
}

#[tokio::test]
async fn a_corrupt_last_record_is_a_torn_tail_and_cut() {
    let (dir, c) = fresh();
    left_behind(&c, (1..=3).map(|i| sized(i, 100))).await;
    let seg = segment_path(dir.path(), 1);
    let third = record_at(2, 100);
    flip(&seg, third + PAYLOAD_AT + 50, 0x01);

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_recovered, 2);
    assert_eq!(report.records_skipped, 0);
    assert_eq!(report.damaged[0].action, DamageAction::Truncated);
    assert_eq!(file_len(&seg), third);
    spool.append(vec![ev(3)]).await.expect("append");
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(ids(&got), vec![1, 2, 3]);
    assert_eq!(got[2].payload, ev(3), "corrupt record must not be returned");
}

#[tokio::test]
async fn corruption_in_older_segment_skips_its_rest_and_keeps_going() {
    let (dir, mut c) = fresh();
    c.segment_bytes = HEADER_LEN + 2 * record_size(100);
    left_behind(&c, (1..=6).map(|i| sized(i, 100))).await;
    let segs = seg_files(dir.path());
    assert_eq!(segs.len(), 3, "{segs:?}");

    // Corrupt the second record of the first segment.
    let len_before = file_len(&segs[0]);
    flip(&segs[0], record_at(1, 100) + 30, 0xff);

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_recovered, 5);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].action, DamageAction::SkippedRest);
    assert_eq!(report.damaged[0].bytes_skipped, record_size(100));
    assert_eq!(
        file_len(&segs[0]),
        len_before,
        "older segment must not be modified"
    );
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![1, 3, 4, 5, 6]);
}

#[tokio::test]
async fn segments_roll_and_are_deleted_once_fully_acked() {
    let (dir, mut c) = fresh();
    c.segment_bytes = 1000;
    let (spool, mut reader, _) = open(&c);
    append_each(&spool, (1..=30).map(|i| sized(i, 200))).await;
    let segs = seg_files(dir.path());
    assert!(segs.len() >= 5, "segments did not roll: {segs:?}");
    for s in &segs {
        // Rolling happens once a segment has passed segment_bytes.
        assert!(file_len(s) <= 1000 + record_size(200), "{s:?} too big");
    }
    let st = spool.stats();
    assert_eq!(st.segments, segs.len() as u64);
    assert_eq!(st.bytes, segs.iter().map(|s| file_len(s)).sum::<u64>());

    let got = read_n(&mut reader, 30).await;
    assert_eq!(ids(&got), (1..=30).collect::<Vec<_>>());
    // Ack all but the first record: nothing can be deleted yet.
    for r in &got[1..] {
        spool.ack(r.id);
    }
    let first_seg = segs[0].clone();
    assert!(
        first_seg.exists(),
        "segment with a pending record was deleted"
    );
    let later_sealed = &segs[1..segs.len() - 1];
    assert!(
        later_sealed.iter().all(|s| !s.exists()),
        "fully acked sealed segments were kept"
    );
    spool.ack(1);
    assert!(!first_seg.exists(), "fully acked segment was kept");
    assert!(
        !acks_path(dir.path(), 1).exists(),
        "ack file of deleted segment was kept"
    );
    let remaining = seg_files(dir.path());
    assert_eq!(
        remaining,
        vec![segs[segs.len() - 1].clone()],
        "active segment must stay"
    );
    let st = spool.stats();
    assert_eq!(st.pending_events, 0);
    assert_eq!(st.segments, 1);
    assert_eq!(st.bytes, file_len(&remaining[0]));
    assert_eq!(st.counters.segments_deleted, segs.len() as u64 - 1);
    assert_eq!(st.oldest_pending_age, None);
    shut(spool, reader).await;
}

#[tokio::test]
async fn full_rejects_until_acks_free_room() {
    let (_dir, mut c) = fresh();
    c.segment_bytes = 300;
    c.max_bytes = 1000;
    let (spool, mut reader, _) = open(&c);
    let mut ok = 0u64;
    let err = loop {
        match spool.append(vec![sized(ok + 1, 100)]).await {
            Ok(()) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok < 100, "never became full");
    };
    assert!(matches!(err, SpoolError::Full), "{err}");
    assert!(spool.is_full());
    let st = spool.stats();
    assert!(st.bytes <= c.max_bytes, "{} > {}", st.bytes, c.max_bytes);
    assert_eq!(st.counters.full_rejections, 1);
    // Still full on retry.
    assert!(matches!(
        spool.append(vec![sized(99, 100)]).await,
        Err(SpoolError::Full)
    ));

    let got = read_n(&mut reader, ok as usize).await;
    for r in &got {
        spool.ack(r.id);
    }
    assert!(!spool.is_full(), "acks freed room but is_full stayed true");
    spool
        .append(vec![sized(100, 100)])
        .await
        .expect("append after room returned");
    assert!(!spool.is_full());
    let got = read_n(&mut reader, 1).await;
    assert_eq!(got[0].payload, sized(100, 100));
    shut(spool, reader).await;
}

#[tokio::test]
async fn full_single_segment_recovers_by_rolling_over_acked_data() {
    let (dir, mut c) = fresh();
    c.max_bytes = 600;
    c.segment_bytes = 1 << 20; // never rolls by size
    let (spool, mut reader, _) = open(&c);
    let mut ok = 0;
    while spool.append(vec![sized(ok + 1, 100)]).await.is_ok() {
        ok += 1;
    }
    assert!(spool.is_full());
    for r in read_n(&mut reader, ok as usize).await {
        spool.ack(r.id);
    }
    assert!(!spool.is_full(), "everything delivered, yet still full");
    spool
        .append(vec![sized(50, 100)])
        .await
        .expect("append after room returned");
    assert_eq!(
        seg_files(dir.path()).len(),
        1,
        "old fully acked segment not deleted"
    );
    assert_eq!(read_n(&mut reader, 1).await[0].payload, sized(50, 100));
    shut(spool, reader).await;
}

#[tokio::test]
async fn group_commit_serves_many_appends_with_one_sync() {
    let (_dir, spool, mut reader) = fresh_open();
    spool.append(vec![ev(0)]).await.expect("warm-up append");
    let before = spool.stats().counters;

    let hooks = spool.hooks();
    hooks.pause();
    let futs: Vec<_> = (1..=50).map(|i| spool.append(vec![ev(i), ev(i)])).collect();
    hooks.resume();
    for f in futs {
        f.await.expect("append");
    }
    let after = spool.stats().counters;
    assert_eq!(after.appends - before.appends, 50);
    assert_eq!(
        after.syncs - before.syncs,
        1,
        "expected one fdatasync for the whole group"
    );
    assert_eq!(after.write_groups - before.write_groups, 1);
    assert_eq!(read_n(&mut reader, 101).await.len(), 101);
    shut(spool, reader).await;
}

#[tokio::test]
async fn always_mode_writes_zeros_ahead_and_recovery_reads_them_as_the_end() {
    let (dir, spool, reader) = fresh_open();
    append_each(&spool, (1..=5).map(ev)).await;
    let seg = segment_path(dir.path(), 1);
    let data_len = record_at(5, ev(1).len());
    let bytes = fs::read(&seg).expect("read");
    assert!(
        bytes.len() as u64 > data_len + (256 << 10),
        "no zeros ahead of the data: {} bytes",
        bytes.len()
    );
    assert!(bytes[data_len as usize..].iter().all(|&b| b == 0));
    // Counted as what they will hold: room is checked for them up front.
    assert_eq!(spool.stats().bytes, data_len);

    // What a kill leaves: the files as they are while the spool runs.
    let crashed = tempfile::tempdir().expect("tempdir");
    let copy = crashed.path().join(seg.file_name().expect("name"));
    fs::copy(&seg, &copy).expect("copy");
    shut(spool, reader).await;
    assert_eq!(file_len(&seg), data_len, "a clean stop leaves no zeros");

    let c = cfg(crashed.path());
    let (spool, mut reader, report) = open(&c);
    assert!(
        report.damaged.is_empty(),
        "zeros reported as damage: {report:?}"
    );
    assert_eq!(report.records_pending, 5);
    assert_eq!(report.zeros_cut, bytes.len() as u64 - data_len);
    assert_eq!(file_len(&copy), data_len, "recovery left the zeros");
    assert_eq!(spool.stats().bytes, data_len);
    spool.append(vec![ev(6)]).await.expect("append");
    spool.close().await.expect("close");
    let replay = drain(&mut reader).await;
    assert_eq!(ids(&replay), (1..=6).collect::<Vec<_>>());
    assert_eq!(payloads(&replay), (1..=6).map(ev).collect::<Vec<_>>());
    assert_eq!(file_len(&copy), record_at(6, ev(1).len()));
}

#[tokio::test]
async fn zeros_ahead_stay_within_the_segment_and_the_spool() {
    let (dir, mut c) = fresh();
    c.segment_bytes = 64 << 10;
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=100).map(|i| sized(i, 1000))).await;
    let segs = seg_files(dir.path());
    assert!(segs.len() >= 2, "segments did not roll: {segs:?}");
    for s in &segs {
        let bytes = fs::read(s).expect("read");
        assert!(
            bytes.len() as u64 <= (64 << 10) + record_size(1000),
            "{s:?}"
        );
        if s != segs.last().expect("last") {
            // Retired: it ends with its last record ('x'-padded), as the
            // zeros stop at segment_bytes, where it rolls.
            assert_eq!(bytes.last(), Some(&b'x'), "{s:?} keeps its zeros");
        }
    }
    let on_disk: u64 = segs.iter().map(|s| file_len(s)).sum();
    let zeros = on_disk - spool.stats().bytes;
    assert!(
        zeros > 0 && zeros <= writer::PREFORMAT_BYTES,
        "{zeros} bytes of zeros"
    );
    shut(spool, reader).await;

    // Data and zeros never pass max_bytes together: near it, none.
    let (dir, mut c) = fresh();
    c.max_bytes = 256 << 10;
    c.segment_bytes = 64 << 10;
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=200).map(|i| sized(i, 1000))).await;
    let segs = seg_files(dir.path());
    let on_disk: u64 = segs.iter().map(|s| file_len(s)).sum();
    assert!(on_disk <= c.max_bytes, "{on_disk} bytes on disk");
    let last = fs::read(segs.last().expect("last")).expect("read");
    assert_eq!(last.last(), Some(&b'x'), "zeros written past the room left");
    shut(spool, reader).await;
}

#[tokio::test]
async fn always_mode_syncs_before_each_reply() {
    let (_dir, spool, reader) = fresh_open();
    spool.append(vec![ev(0)]).await.expect("warm-up append");
    let before = spool.stats().counters.syncs;
    for i in 1..=5 {
        spool.append(vec![ev(i)]).await.expect("append");
        assert_eq!(
            spool.stats().counters.syncs - before,
            i,
            "append {i} replied before its sync"
        );
    }
    shut(spool, reader).await;
}

#[tokio::test]
async fn interval_mode_replies_before_syncing_and_syncs_in_background() {
    let (dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    let (spool, reader, _) = open(&c);
    spool.append(vec![ev(1)]).await.expect("append");
    spool.append(vec![ev(2)]).await.expect("append");
    let base = spool.stats().counters.syncs; // header sync of the new segment
    assert_eq!(base, 1);
    shut(spool, reader).await;

    let mut c = cfg(dir.path());
    c.fsync = FsyncMode::Interval(Duration::from_millis(20));
    let (spool, reader, _) = open(&c);
    spool.append(vec![ev(3)]).await.expect("append");
    assert_eq!(
        spool.stats().counters.syncs,
        0,
        "interval mode synced before replying"
    );
    wait_for("interval sync never happened", || {
        spool.stats().counters.syncs > 0
    })
    .await;
    shut(spool, reader).await;
}

/// A spool in `Interval` mode with one record appended and the periodic
/// sync of it started and held on the "disk" (release it with
/// `spool.hooks().hold_syncs(false)`).
async fn with_a_periodic_sync_held() -> (tempfile::TempDir, Spool, SpoolReader) {
    let (dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_millis(5));
    let (spool, reader, _) = open(&c);
    let hooks = spool.hooks();
    hooks.hold_syncs(true);
    spool.append(vec![ev(1)]).await.expect("append");
    wait_for("no periodic sync started", || {
        hooks.background_syncs_started.load(Ordering::SeqCst) > 0
    })
    .await;
    (dir, spool, reader)
}

#[tokio::test]
async fn interval_mode_appends_do_not_wait_for_a_slow_periodic_sync() {
    let (_dir, spool, reader) = with_a_periodic_sync_held().await;
    let hooks = spool.hooks();
    // Appends are answered while that sync is still running.
    for i in 2..20 {
        tokio::time::timeout(Duration::from_secs(2), spool.append(vec![ev(i)]))
            .await
            .expect("an append waited for the periodic sync")
            .expect("append");
    }
    let synced = spool.stats().counters.syncs;
    hooks.hold_syncs(false);
    wait_for("the held sync never finished", || {
        spool.stats().counters.syncs != synced
    })
    .await;
    shut(spool, reader).await;
}

/// The sync-duration histogram counts every sync in the bucket its time
/// falls in: here a sync the "disk" holds for at least 120 ms, which must
/// land above the 0.1 s bound (and, when broken into buckets by the wrong
/// bound or not timed at all, would not).
#[tokio::test]
async fn sync_durations_count_a_stalled_sync_as_slow() {
    let (_dir, spool, reader) = with_a_periodic_sync_held().await;
    let hooks = spool.hooks();
    let before = spool.stats().counters;
    // Holding the sync is the stall under test, not a wait for a condition.
    std::thread::sleep(Duration::from_millis(120));
    hooks.hold_syncs(false);
    wait_for("the held sync never finished", || {
        spool.stats().counters.syncs != before.syncs
    })
    .await;
    let after = spool.stats().counters;
    let d = after.sync_durations;
    let slow_from = SYNC_BUCKETS.iter().position(|&le| le > 0.1).unwrap();
    let slow: u64 = d.counts[slow_from..].iter().sum();
    let slow_before: u64 = before.sync_durations.counts[slow_from..].iter().sum();
    assert_eq!(slow - slow_before, 1, "{d:?}");
    assert!(d.sum_nanos >= 120_000_000, "{d:?}");
    shut(spool, reader).await;
}

#[tokio::test]
async fn never_mode_syncs_only_at_close() {
    let (dir, mut c) = fresh();
    c.fsync = FsyncMode::Never;
    c.segment_bytes = 100;
    let (spool, mut reader, _) = open(&c);
    append_each(&spool, (1..=5).map(|i| sized(i, 100))).await;
    assert!(seg_files(dir.path()).len() >= 3);
    assert_eq!(spool.stats().counters.syncs, 0);
    spool.close().await.expect("close");
    // The active segment plus every retired one written since open.
    assert_eq!(
        spool.stats().counters.syncs,
        seg_files(dir.path()).len() as u64
    );
    assert_eq!(ids(&drain(&mut reader).await), vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn failed_write_fails_append_leaves_nothing_and_later_appends_work() {
    let (dir, c) = fresh();
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(1)]).await.expect("append");
    let seg = segment_path(dir.path(), 1);
    let data_len = record_at(1, ev(1).len());

    spool.hooks().fail_writes(1);
    let err = spool
        .append(vec![sized(2, 300), sized(3, 300)])
        .await
        .expect_err("injected failure");
    match &err {
        SpoolError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::StorageFull),
        other => panic!("expected Io, got {other}"),
    }
    assert!(err.to_string().contains("free space"), "{err}");
    assert!(spool.is_full(), "is_full must report the failed append");
    // Cut back to the data: the partial write, and any zeros written ahead.
    assert_eq!(file_len(&seg), data_len, "partial write was not cut back");
    assert_eq!(spool.stats().counters.io_errors, 1);

    spool
        .append(vec![ev(4)])
        .await
        .expect("append after failure");
    assert!(!spool.is_full());
    let got = read_n(&mut reader, 2).await;
    assert_eq!(got[0].payload, ev(1));
    assert_eq!(got[1].payload, ev(4));
    assert!(got[1].id > 3, "ids of the failed batch were reused");
    shut(spool, reader).await;

    let (spool, mut reader, report) = open(&c);
    assert!(report.damaged.is_empty(), "{report:?}");
    spool.close().await.expect("close");
    let replay = drain(&mut reader).await;
    assert_eq!(payloads(&replay), vec![ev(1), ev(4)]);
}

#[tokio::test]
async fn a_failed_write_that_cannot_be_cut_back_is_not_replayed() {
    let (_dir, c) = fresh();
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(1)]).await.expect("append");
    spool.hooks().fail_writes(1);
    spool.hooks().fail_truncates(1);
    // Half of this lands: the whole first record of the batch.
    spool
        .append(vec![sized(2, 300), sized(3, 300)])
        .await
        .expect_err("injected failure");
    spool
        .append(vec![ev(4)])
        .await
        .expect("append after failure");
    let got = read_n(&mut reader, 2).await;
    assert_eq!(got[1].payload, ev(4));
    shut(spool, reader).await;

    // Answered with an error, so it must never be delivered, not even
    // after a restart.
    let (spool, mut reader, _) = open(&c);
    spool.close().await.expect("close");
    let replay = drain(&mut reader).await;
    assert_eq!(payloads(&replay), vec![ev(1), ev(4)]);
}

#[tokio::test]
async fn after_a_failed_write_readiness_returns_by_itself() {
    let (_dir, spool, reader) = fresh_open();
    spool.hooks().fail_writes(1);
    spool
        .append(vec![ev(1)])
        .await
        .expect_err("injected failure");
    assert!(spool.is_full(), "a failed write must show for a moment");
    // No appends, no acks: only time passes.
    wait_for("readiness after a one-off disk error", || !spool.is_full()).await;
    shut(spool, reader).await;
}

#[tokio::test]
async fn an_append_larger_than_the_spool_is_refused_and_changes_nothing() {
    let (_dir, mut c) = fresh();
    c.max_bytes = 4096;
    c.segment_bytes = 1024;
    let (spool, reader, _) = open(&c);
    let err = spool
        .append(vec![sized(1, 2100), sized(2, 2100)])
        .await
        .expect_err("larger than max_bytes");
    assert!(
        matches!(
            err,
            SpoolError::RequestTooLarge {
                max_bytes: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("spool.max_bytes"), "{err}");
    assert!(!spool.is_full());
    assert_eq!(spool.stats().counters.full_rejections, 0);
    spool.append(vec![ev(3)]).await.expect("a normal append");
    shut(spool, reader).await;
}

#[tokio::test]
async fn failed_sync_fails_append_and_hides_its_records() {
    let (_dir, spool, mut reader) = fresh_open();
    spool.append(vec![ev(1)]).await.expect("append");
    spool.hooks().fail_syncs(1);
    assert!(matches!(
        spool.append(vec![ev(2)]).await,
        Err(SpoolError::Io(_))
    ));
    spool
        .append(vec![ev(3)])
        .await
        .expect("append after failure");
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(payloads(&got), vec![ev(1), ev(3)]);
}

#[tokio::test]
async fn second_open_of_same_dir_is_refused_clearly() {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    let err = Spool::open(c.clone()).err().expect("second open must fail");
    assert!(
        matches!(&err, SpoolError::Locked { dir: d, .. } if d == dir.path()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("locked by another timbridge process"), "{msg}");
    assert!(msg.contains("spool.dir"), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    shut(spool, reader).await;
    let (spool, reader, _) = open(&c);
    shut(spool, reader).await;
}

#[tokio::test]
async fn stat_dir_matches_live_stats_and_changes_nothing() {
    let (dir, mut c) = fresh();
    c.segment_bytes = 500;
    let (spool, mut reader, _) = open(&c);
    append_each(&spool, (1..=20).map(|i| sized(i, 100))).await;
    for r in read_n(&mut reader, 20).await {
        if r.id % 3 != 0 && r.id != 14 {
            spool.ack(r.id);
        }
    }
    spool.close().await.expect("close"); // flushes acks
    let live = spool.stats();
    let listing = |d: &Path| -> BTreeMap<PathBuf, u64> {
        fs::read_dir(d)
            .expect("ls")
            .map(|e| e.expect("e").path())
            .map(|p| (p.clone(), file_len(&p)))
            .collect()
    };
    let files_before = listing(dir.path());
    let offline = stat_dir(dir.path()).expect("stat_dir");
    assert_eq!(
        listing(dir.path()),
        files_before,
        "stat_dir modified the directory"
    );
    assert_eq!(offline.pending_events, live.pending_events);
    assert_eq!(offline.pending_events, 7);
    assert_eq!(offline.bytes, live.bytes);
    assert_eq!(offline.segments, live.segments);
    assert!(offline.oldest_pending_age.is_some());
    assert_eq!(offline.counters, SpoolCounters::default());
    drop(reader);
    drop(spool);

    // A torn tail is counted but not repaired by stat_dir.
    let last = seg_files(dir.path()).pop().expect("a segment");
    let len = file_len(&last);
    cut(&last, len - 5);
    stat_dir(dir.path()).expect("stat_dir");
    assert_eq!(file_len(&last), len - 5);
    assert!(stat_dir(&dir.path().join("missing")).is_err());
}

#[tokio::test]
async fn reader_waits_for_appends_and_ends_after_close() {
    let (_dir, spool, mut reader) = fresh_open();
    let waiting = tokio::spawn(async move {
        let batch = reader.next_batch(10, 1 << 20).await;
        (reader, batch)
    });
    spool.append(vec![ev(1)]).await.expect("append");
    let (mut reader, batch) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("reader never woke")
        .expect("join");
    assert_eq!(ids(&batch.expect("a batch")), vec![1]);

    spool.append(vec![ev(2), ev(3)]).await.expect("append");
    spool.close().await.expect("close");
    assert!(matches!(
        spool.append(vec![ev(4)]).await,
        Err(SpoolError::Closed)
    ));
    assert_eq!(ids(&drain(&mut reader).await), vec![2, 3]);
    assert!(reader.next_batch(10, 1 << 20).await.is_none());
}

/// A reader that had to wait lets the appends of the next moment gather
/// and returns them as one batch: the publisher then wakes once for them,
/// not once per append. (A real clock: the appends may wait for the writer
/// thread, and a paused clock would jump ahead meanwhile. A second is far
/// longer than three appends take.)
#[tokio::test]
async fn a_waiting_reader_gathers_the_appends_that_follow_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No fdatasync per append, so that a busy disk cannot stretch the
    // appends past the gathering.
    let (spool, mut reader, _) = open(&SpoolConfig {
        fsync: FsyncMode::Never,
        ..cfg(dir.path())
    });
    reader.gather_after_waiting(Duration::from_secs(1));
    let waiting = tokio::spawn(async move {
        let batch = reader.next_batch(10, 1 << 20).await;
        (reader, batch)
    });
    // Each yield lets the reader run: without the gathering it would
    // return the first record alone.
    for i in 1..=3 {
        tokio::task::yield_now().await;
        spool.append(vec![ev(i)]).await.expect("append");
    }
    let (reader, batch) = waiting.await.expect("join");
    assert_eq!(ids(&batch.expect("a batch")), vec![1, 2, 3]);
    shut(spool, reader).await;
}

/// Gathering never delays a reader that has records waiting (one catching
/// up from disk, or behind the writer): it returns them at once.
#[tokio::test]
async fn a_reader_with_records_waiting_does_not_gather() {
    let (_dir, spool, mut reader) = fresh_open();
    reader.gather_after_waiting(Duration::from_secs(3600));
    append_each(&spool, [ev(1), ev(2)]).await;
    let batch = tokio::time::timeout(WAIT, reader.next_batch(10, 1 << 20))
        .await
        .expect("the reader gathered although records were waiting");
    assert_eq!(ids(&batch.expect("a batch")), vec![1, 2]);
    shut(spool, reader).await;
}

#[tokio::test]
async fn reader_respects_batch_limits_and_large_records() {
    // Both ways of reading: from disk alone, and from the in-memory tail.
    for (tail_bytes, tail_records) in [(0, 0), (1 << 20, 100)] {
        batch_limits_and_large_records(tail_bytes, tail_records).await;
    }
}

async fn batch_limits_and_large_records(tail_bytes: usize, tail_records: usize) {
    let (_dir, spool, mut reader) = fresh_open();
    spool.tail_caps(tail_bytes, tail_records);
    append_each(&spool, (1..=10).map(|i| sized(i, 100))).await;
    let big = sized(11, 300 << 10); // larger than a read window
    spool.append(vec![big.clone()]).await.expect("append");
    spool.close().await.expect("close");

    assert_eq!(
        ids(&reader.next_batch(3, 1 << 20).await.expect("batch")),
        vec![1, 2, 3]
    );
    assert_eq!(
        ids(&reader.next_batch(100, 250).await.expect("batch")),
        vec![4, 5]
    );
    assert_eq!(
        ids(&reader.next_batch(100, 1 << 20).await.expect("batch")),
        vec![6, 7, 8, 9, 10, 11]
    );
    assert!(reader.next_batch(100, 1 << 20).await.is_none());

    let (_dir, spool, mut reader) = fresh_open();
    spool.tail_caps(tail_bytes, tail_records);
    spool
        .append(vec![big.clone(), ev(2)])
        .await
        .expect("append");
    let first = reader.next_batch(100, 10).await.expect("batch");
    assert_eq!(first.len(), 1, "record over max_bytes must come alone");
    assert_eq!(first[0].payload, big);
    shut(spool, reader).await;
}

#[tokio::test]
async fn reader_jumps_over_delivered_prefix_without_reading_it() {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    for chunk in 0..4u64 {
        let recs: Vec<Bytes> = (0..3000).map(|i| ev(chunk * 3000 + i + 1)).collect();
        spool.append(recs).await.expect("append");
    }
    for id in 1..=9000 {
        spool.ack(id);
    }
    shut(spool, reader).await;

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 3000);
    // Wreck the length field of a delivered record: a reader that walked
    // the delivered prefix would stumble on it.
    let rec100 = record_at(99, ev(1).len());
    poke(
        &segment_path(dir.path(), 1),
        rec100,
        &u32::MAX.to_le_bytes(),
    );
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(ids(&got), (9001..=12000).collect::<Vec<_>>());
    assert!(got.iter().all(|r| r.payload == ev(r.id)));
    assert_eq!(spool.stats().counters.records_lost, 0);
}

#[tokio::test]
async fn data_corrupted_while_running_is_skipped_and_counted() {
    let (dir, spool, mut reader) = fresh_open();
    // Damage on disk only shows to reads from disk.
    spool.tail_caps(0, 0);
    append_each(&spool, (1..=5).map(ev)).await;
    let seg = segment_path(dir.path(), 1);
    let rec3 = record_at(2, ev(1).len());
    poke(&seg, rec3 + PAYLOAD_AT + 2, b"X");

    assert_eq!(ids(&read_n(&mut reader, 2).await), vec![1, 2]);
    spool.append(vec![ev(6)]).await.expect("append");
    let got = read_n(&mut reader, 3).await;
    assert_eq!(
        ids(&got),
        vec![4, 5, 6],
        "reader must skip just the bad record and go on"
    );
    assert!(got.iter().all(|r| r.payload == ev(r.id)));
    let st = spool.stats();
    assert_eq!(st.counters.records_lost, 1);
    assert_eq!(
        st.pending_events, 5,
        "a lost record must not count as pending"
    );

    // Damage that hides where the next record starts costs the rest of
    // what is written, but new appends are still delivered.
    let rec7 = record_at(6, ev(1).len());
    spool.append(vec![ev(7), ev(8)]).await.expect("append");
    poke(&seg, rec7, &u32::MAX.to_le_bytes());
    let next = tokio::spawn(async move { reader.next_batch(10, 1 << 20).await.map(|b| ids(&b)) });
    wait_for("damage never detected", || {
        spool.stats().counters.records_lost >= 3
    })
    .await;
    spool.append(vec![ev(9)]).await.expect("append");
    let got = tokio::time::timeout(WAIT, next)
        .await
        .expect("reader timed out")
        .expect("join");
    assert_eq!(got, Some(vec![9]), "damaged records were returned");
    assert_eq!(spool.stats().counters.records_lost, 3);
    spool.close().await.expect("close");
}

/// A spool left with records 1..=30 undelivered, five to a segment: the
/// backlog a restart reads from disk.
async fn backlog_over_six_segments() -> (tempfile::TempDir, SpoolConfig) {
    let (dir, mut c) = fresh();
    c.segment_bytes = 1000;
    left_behind(&c, (1..=30).map(|i| sized(i, 200))).await;
    assert_eq!(seg_files(dir.path()).len(), 6, "five records a segment");
    (dir, c)
}

#[tokio::test]
async fn a_segment_the_disk_refuses_for_now_is_read_again_not_skipped() {
    // The backlog read the way a run out of file descriptors meets it: the
    // records were answered OK, so they must all come, and no segment may
    // go.
    let (dir, c) = backlog_over_six_segments().await;
    let before = seg_files(dir.path());
    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 30);
    spool.hooks().fail_reads(3);
    let got = ids(&read_n(&mut reader, 30).await);
    assert_eq!(got, (1..=30).collect::<Vec<_>>());
    let counters = spool.stats().counters;
    assert_eq!(counters.records_lost, 0, "records were skipped as lost");
    assert_eq!(counters.read_retries, 3);
    assert_eq!(
        seg_files(dir.path()),
        before,
        "a segment went before Kafka had its records"
    );
    spool.close().await.expect("close");
}

#[tokio::test]
async fn a_segment_moved_out_of_the_spool_dir_is_skipped_and_counted() {
    // What the README tells an operator to do with a segment the disk will
    // never give back: delivery goes on past it, and nothing else is lost.
    let (dir, c) = backlog_over_six_segments().await;
    let (spool, mut reader, _) = open(&c);
    let second = seg_files(dir.path())[1].clone();
    let moved = tempfile::tempdir().expect("tempdir");
    fs::rename(&second, moved.path().join("kept.seg")).expect("move the segment away");
    let got = ids(&read_n(&mut reader, 25).await);
    let lost: Vec<u64> = (1..=30).filter(|id| !got.contains(id)).collect();
    assert_eq!(
        lost,
        (6..=10).collect::<Vec<_>>(),
        "only the moved segment's records are missing"
    );
    let counters = spool.stats().counters;
    assert_eq!(counters.records_lost, 5);
    assert_eq!(
        counters.read_retries, 0,
        "a file that is gone is not waited for"
    );
    spool.close().await.expect("close");
}

#[test]
fn a_file_gone_or_cut_short_is_damage_any_other_read_error_is_retried() {
    use std::io::{Error, ErrorKind};
    for (e, retried) in [
        (Error::from(ErrorKind::NotFound), false),
        (Error::from(ErrorKind::UnexpectedEof), false),
        (Error::from_raw_os_error(libc::EMFILE), true),
        (Error::from_raw_os_error(libc::ENFILE), true),
        (Error::from_raw_os_error(libc::EIO), true),
        (Error::from_raw_os_error(libc::ENOMEM), true),
    ] {
        let f = super::reader::io_failure(7, "read", &e);
        assert_eq!(f.retry, retried, "{e}");
        assert_eq!(f.at_id, 7);
    }
}

#[tokio::test]
async fn oldest_pending_age_follows_lowest_unacked() {
    let (_dir, spool, mut reader) = fresh_open();
    assert_eq!(spool.stats().oldest_pending_age, None);
    append_each(&spool, (1..=3).map(ev)).await;
    let age = spool.stats().oldest_pending_age.expect("pending");
    assert!(age < WAIT);
    read_n(&mut reader, 3).await;
    spool.ack(3);
    spool.ack(1);
    assert!(
        spool.stats().oldest_pending_age.is_some(),
        "record 2 is still pending"
    );
    spool.ack(2);
    assert_eq!(spool.stats().oldest_pending_age, None);

    // Precision: force an old append time on the lowest pending record.
    spool.append(vec![ev(4)]).await.expect("append");
    {
        let mut st = spool.inner.shared.lock_state();
        let seg = st.segments.values_mut().next().expect("segment");
        let mut fresh = state::SegMeta::new(seg.first_id, seg.data_len, seg.disk_len);
        fresh.extend(seg.count, seg.data_len);
        for id in seg.first_id..seg.end_id() - 1 {
            fresh.set_acked(id);
        }
        fresh.note(state::Sample {
            idx: 0,
            ts: state::now_ms() - 3_600_000,
            offset: HEADER_LEN,
        });
        *seg = fresh;
    }
    let age = spool.stats().oldest_pending_age.expect("pending");
    assert!(age >= Duration::from_secs(3599), "{age:?}");
    shut(spool, reader).await;
}

#[tokio::test]
async fn torn_ack_file_is_tolerated_and_later_acks_still_count() {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=4).map(ev)).await;
    spool.ack(1);
    spool.ack(2);
    shut(spool, reader).await;
    let acks = acks_path(dir.path(), 1);
    let mut bytes = fs::read(&acks).expect("acks");
    assert_eq!(bytes.len(), 16);
    bytes.extend_from_slice(&[3, 0, 0]); // torn write of the next ack
    fs::write(&acks, &bytes).expect("write");

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 2);
    assert_eq!(ids(&read_n(&mut reader, 2).await), vec![3, 4]);
    spool.ack(3);
    shut(spool, reader).await;
    let (spool, mut reader, report) = open(&c);
    assert_eq!(
        report.records_pending, 1,
        "ack written after a torn tail was lost"
    );
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![4]);
}

#[tokio::test]
async fn acked_ids_lost_in_a_crash_are_not_reused() {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=5).map(|i| sized(i, 100))).await;
    spool.ack(4);
    spool.ack(5);
    shut(spool, reader).await;
    // Power cut: records 4 and 5 never reached the disk, their acks did.
    let seg = segment_path(dir.path(), 1);
    cut(&seg, HEADER_LEN + 3 * record_size(100));

    let (spool, reader, report) = open(&c);
    assert_eq!(report.next_id, 6);
    spool.append(vec![ev(6)]).await.expect("append");
    shut(spool, reader).await;
    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 4);
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(ids(&got), vec![1, 2, 3, 6]);
    assert_eq!(got[3].payload, ev(6));
}

#[tokio::test]
async fn unusable_segment_files_are_set_aside() {
    let (dir, c) = fresh();
    left_behind(&c, (1..=2).map(ev)).await;
    let garbage = segment_path(dir.path(), 50);
    fs::write(&garbage, vec![0xAB; 100]).expect("write");
    let empty = segment_path(dir.path(), 60);
    fs::write(&empty, b"").expect("write");

    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.damaged.len(), 2, "{report:?}");
    assert!(!garbage.exists() && !empty.exists());
    let quarantined = dir.path().join("00000000000000000050.seg.corrupt");
    assert!(quarantined.exists());
    assert!(
        report
            .damaged
            .iter()
            .any(|d| d.action == DamageAction::Quarantined(quarantined.clone()))
    );
    assert!(
        report
            .damaged
            .iter()
            .any(|d| d.action == DamageAction::Removed)
    );
    assert_eq!(report.next_id, 3);
    spool.append(vec![ev(3)]).await.expect("append");
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![1, 2, 3]);
}

#[tokio::test]
async fn newer_format_is_refused_not_discarded() {
    let (dir, c) = fresh();
    let (spool, reader, _) = open(&c);
    spool.append(vec![ev(1)]).await.expect("append");
    shut(spool, reader).await;
    let seg = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&seg).expect("read");
    bytes[8] = 9;
    fs::write(&seg, &bytes).expect("write");
    let err = Spool::open(c).err().expect("must refuse");
    assert!(
        matches!(err, SpoolError::UnsupportedFormat { version: 9, .. }),
        "{err}"
    );
    assert_eq!(fs::read(&seg).expect("read"), bytes);
}

#[tokio::test]
async fn arbitrary_damage_never_panics_and_keeps_a_valid_prefix() {
    let (dir, mut c) = fresh();
    c.segment_bytes = 400;
    c.fsync = FsyncMode::Never;
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=12).map(|i| sized(i, 90))).await;
    for id in [2, 5, 9] {
        spool.ack(id);
    }
    shut(spool, reader).await;
    let pristine: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("e").path())
        .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
        .map(|p| (p.clone(), fs::read(&p).expect("read")))
        .collect();

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..150 {
        let work = tempfile::tempdir().expect("tempdir");
        for (p, b) in &pristine {
            fs::write(work.path().join(p.file_name().expect("name")), b).expect("copy");
        }
        let (victim, bytes) = &pristine[(next() % pristine.len() as u64) as usize];
        let target = work.path().join(victim.file_name().expect("name"));
        let mut b = bytes.clone();
        match next() % 3 {
            0 if !b.is_empty() => {
                let i = (next() % b.len() as u64) as usize;
                b[i] ^= 1 << (next() % 8);
            }
            1 => b.truncate((next() % (b.len() as u64 + 1)) as usize),
            _ => b.extend((0..next() % 64).map(|_| next() as u8)),
        }
        fs::write(&target, &b).expect("damage");

        let mut wc = c.clone();
        wc.dir = work.path().to_path_buf();
        match Spool::open(wc) {
            Err(SpoolError::UnsupportedFormat { .. }) => continue,
            Err(e) => panic!("round {round}: open failed: {e}"),
            Ok((spool, mut reader, _)) => {
                spool
                    .append(vec![ev(100)])
                    .await
                    .expect("append after damage");
                spool.close().await.expect("close");
                let got = drain(&mut reader).await;
                let got_ids = ids(&got);
                assert!(
                    got_ids.windows(2).all(|w| w[0] < w[1]),
                    "round {round}: {got_ids:?}"
                );
                let (last, rest) = got.split_last().expect("at least the new record");
                assert_eq!(last.payload, ev(100), "round {round}");
                for r in rest {
                    assert_eq!(
                        r.payload,
                        sized(r.id, 90),
                        "round {round}: wrong data for id {}",
                        r.id
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn empty_and_oversized_appends() {
    let (_dir, spool, mut reader) = fresh_open();
    spool
        .append(Vec::new())
        .await
        .expect("empty append is a no-op");
    let huge = Bytes::from(vec![0u8; MAX_RECORD_LEN + 1]);
    assert!(matches!(
        spool.append(vec![ev(1), huge]).await,
        Err(SpoolError::RecordTooLarge { .. })
    ));
    spool.append(vec![ev(1)]).await.expect("append");
    assert_eq!(
        ids(&read_n(&mut reader, 1).await),
        vec![1],
        "rejected appends consumed ids"
    );
    shut(spool, reader).await;
}

#[tokio::test]
async fn dropping_without_close_keeps_data_and_releases_lock() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Never;
    let (spool, reader, _) = open(&c);
    append_each(&spool, (1..=3).map(ev)).await;
    spool.ack(1);
    drop(reader);
    drop(spool);
    let (spool, mut reader, report) = open(&c);
    assert_eq!(report.records_pending, 2, "ack not flushed on drop");
    spool.close().await.expect("close");
    assert_eq!(ids(&drain(&mut reader).await), vec![2, 3]);
}

#[test]
fn config_is_validated() {
    let (dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::ZERO);
    assert!(matches!(Spool::open(c), Err(SpoolError::Config(_))));
    let mut c = cfg(dir.path());
    c.max_bytes = 10;
    assert!(matches!(Spool::open(c), Err(SpoolError::Config(_))));
}

#[tokio::test]
async fn interval_and_never_appends_are_written_without_the_writer_thread() {
    for fsync in [
        FsyncMode::Interval(Duration::from_secs(3600)),
        FsyncMode::Never,
    ] {
        let (_dir, mut c) = fresh();
        c.fsync = fsync;
        let (spool, mut reader, _) = open(&c);
        // The first append starts the first segment, on the writer thread.
        spool.append(vec![ev(0)]).await.expect("first append");
        let hooks = spool.hooks();
        // A paused writer thread answers nothing it is sent; these appends
        // must not need it.
        spool.park_writer().await;
        for i in 1..=20 {
            tokio::time::timeout(Duration::from_secs(2), spool.append(vec![ev(i)]))
                .await
                .expect("an append waited for the writer thread")
                .expect("append");
        }
        assert_eq!(spool.stats().counters.write_groups, 21, "{fsync:?}");
        assert_eq!(
            ids(&read_n(&mut reader, 21).await),
            (1..=21).collect::<Vec<_>>()
        );
        hooks.resume();
        shut(spool, reader).await;
    }
}

/// Resumes a parked writer thread when dropped, so that a test failing
/// while the thread is parked fails instead of hanging in the spool's drop.
struct Unpark<'a>(&'a Spool);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        self.0.hooks().resume();
    }
}

/// Enqueues 1 MiB appends (ids from 1) for as long as they fit in
/// `writer::MAX_QUEUED`, with the writer thread parked: each must be
/// queued. Returns how many, and their answers to come.
fn fill_the_queue(spool: &Spool) -> (u64, Vec<Queued>) {
    let fits = writer::MAX_QUEUED / record_size(1 << 20);
    let queued = (1..=fits)
        .map(|i| spool.enqueue(vec![sized(i, 1 << 20)]).expect("queued"))
        .collect();
    (fits, queued)
}

/// Waits until the writer thread has written every one of `queued`.
async fn all_written(queued: Vec<Queued>) {
    for q in queued {
        tokio::time::timeout(WAIT, q.finish())
            .await
            .expect("a queued append was never written")
            .expect("append");
    }
}

/// A thread's calls to `enqueue`, with what each returned.
type Appender = std::thread::JoinHandle<Vec<Result<Queued, SpoolError>>>;

/// Calls `enqueue` for each batch in turn on a thread of its own, telling
/// the channel how many calls have returned, so that a test holding the
/// writer's lock can tell an append that blocks from one that is queued.
fn enqueue_on_a_thread(
    spool: &Spool,
    batches: Vec<Vec<Bytes>>,
) -> (std::sync::mpsc::Receiver<usize>, Appender) {
    let (tx, rx) = std::sync::mpsc::channel();
    let spool = spool.clone();
    let appender = std::thread::spawn(move || {
        let mut answers = Vec::new();
        for batch in batches {
            answers.push(spool.enqueue(batch));
            let _ = tx.send(answers.len());
        }
        answers
    });
    (rx, appender)
}

#[tokio::test]
async fn an_append_that_finds_the_writer_busy_is_handed_to_the_writer_thread() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(0)]).await.expect("first append");
    // Another append (or the writer thread) is in the middle of a write.
    let busy = writer::lock(&spool.inner.writer);
    // Waiting for that lock would stall a runtime thread: the append must
    // come back at once, queued for the writer thread.
    let (returns, appender) = enqueue_on_a_thread(&spool, vec![vec![ev(1)]]);
    let returned = returns.recv_timeout(Duration::from_secs(2));
    drop(busy);
    assert!(
        returned.is_ok(),
        "the append blocked on the writer's lock instead of queueing"
    );
    let queued = appender.join().expect("appender").remove(0);
    assert!(
        matches!(queued, Ok(Queued::Waiting(_))),
        "the append was not queued for the writer thread"
    );
    tokio::time::timeout(WAIT, queued.expect("append").finish())
        .await
        .expect("the writer thread never wrote the queued append")
        .expect("append");
    assert_eq!(ids(&read_n(&mut reader, 2).await), vec![1, 2]);
    shut(spool, reader).await;
}

#[tokio::test]
async fn appends_waiting_for_a_stalled_writer_are_bounded_in_memory() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    c.segment_bytes = 1 << 30;
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(0)]).await.expect("first append");
    // The writer is stuck, as behind a roll's sync on a stalled disk.
    let busy = writer::lock(&spool.inner.writer);
    let batches = (1..=20).map(|i| vec![sized(i, 1 << 20)]).collect();
    let (returns, appender) = enqueue_on_a_thread(&spool, batches);
    // The appends that fit in MAX_QUEUED come back at once, queued;
    // the next one waits for the lock.
    let mut returned = 0;
    while let Ok(n) = returns.recv_timeout(Duration::from_millis(500)) {
        returned = n as u64;
    }
    let fits = writer::MAX_QUEUED / record_size(1 << 20);
    drop(busy);
    assert_eq!(returned, fits, "appends queued before one waited");
    let queued = appender.join().expect("appender");
    all_written(queued.into_iter().map(|q| q.expect("append")).collect()).await;
    assert_eq!(read_n(&mut reader, 21).await.len(), 21);
    assert_eq!(spool.inner.shared.queued_bytes.load(Ordering::Relaxed), 0);
    shut(spool, reader).await;
}

#[tokio::test]
async fn always_mode_refuses_appends_past_the_bound_while_the_disk_is_stalled() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Always;
    c.segment_bytes = 1 << 30;
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![ev(0)]).await.expect("first append");
    // The writer thread is stuck, as in an fdatasync on a stalled disk.
    spool.park_writer().await;
    let unpark = Unpark(&spool);
    let (fits, mut queued) = fill_the_queue(&spool);
    assert_eq!(spool.stats().queued_bytes, fits * record_size(1 << 20));
    // The next one would only add to memory that waits for the disk.
    let refused = spool.enqueue(vec![sized(fits + 1, 1 << 20)]);
    let unready = spool.is_full() && spool.is_behind();
    drop(unpark);
    let refused = match refused {
        Err(SpoolError::Behind { .. }) => true,
        Ok(q) => {
            queued.push(q);
            false
        }
        Err(e) => panic!("{e}"),
    };
    assert!(refused, "an append past the bound was queued");
    assert!(unready, "readiness did not drop while the disk lagged");
    assert_eq!(spool.stats().counters.behind_rejections, 1);
    all_written(queued).await;
    assert_eq!(spool.stats().queued_bytes, 0);
    // Once the disk is back, appends are taken again; readiness returns
    // only with time, not with the first write that gets through.
    spool
        .append(vec![ev(fits + 2)])
        .await
        .expect("append after");
    assert!(spool.is_behind(), "one write made a lagging disk ready");
    assert_eq!(
        read_n(&mut reader, fits as usize + 2).await.len(),
        fits as usize + 2
    );
    shut(spool, reader).await;
}

#[tokio::test]
async fn appends_behind_a_stalled_roll_are_bounded_too() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    c.segment_bytes = 1 << 20;
    let (spool, mut reader, _) = open(&c);
    // A full segment: the next append must start a new one.
    spool
        .append(vec![sized(0, 1 << 20)])
        .await
        .expect("first append");
    // The writer thread is stuck in a roll's syncs: every append that needs
    // a new segment, and every one after it, waits for the thread.
    spool.park_writer().await;
    let unpark = Unpark(&spool);
    let (fits, queued) = fill_the_queue(&spool);
    let refused = spool.enqueue(vec![sized(fits + 1, 1 << 20)]);
    drop(unpark);
    assert!(
        matches!(refused, Err(SpoolError::Behind { .. })),
        "an append behind the roll was queued past the bound"
    );
    all_written(queued).await;
    spool
        .append(vec![ev(fits + 2)])
        .await
        .expect("append after");
    assert_eq!(
        read_n(&mut reader, fits as usize + 2).await.len(),
        fits as usize + 2
    );
    shut(spool, reader).await;
}

#[tokio::test]
async fn a_writer_thread_that_died_makes_the_spool_unready_for_good() {
    for fsync in [
        FsyncMode::Always,
        FsyncMode::Interval(Duration::from_secs(3600)),
    ] {
        let (_dir, mut c) = fresh();
        c.fsync = fsync;
        let (spool, _reader, _) = open(&c);
        spool.append(vec![ev(0)]).await.expect("first append");
        assert!(!spool.is_full());
        spool.hooks().crash.store(true, Ordering::SeqCst);
        let tx = spool.inner.tx.as_ref().expect("writer thread");
        tx.send(Msg::Tick).expect("writer thread alive");
        let stopped = async {
            while !spool.writer_stopped() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(WAIT, stopped)
            .await
            .expect("the writer thread never ended");
        assert!(spool.is_full(), "{fsync:?}: ready without a writer thread");
        let refused = spool.append(vec![ev(1)]).await;
        assert!(
            matches!(refused, Err(SpoolError::WriterStopped)),
            "{fsync:?}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn one_append_larger_than_the_bound_is_taken_when_none_waits() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Always;
    c.segment_bytes = 1 << 30;
    let (spool, mut reader, _) = open(&c);
    let big: Vec<Bytes> = (0..20).map(|i| sized(i, 1 << 20)).collect();
    assert!(big.iter().map(|r| record_size(r.len())).sum::<u64>() > writer::MAX_QUEUED);
    spool.append(big).await.expect("a large append alone");
    assert_eq!(read_n(&mut reader, 20).await.len(), 20);
    shut(spool, reader).await;
}

#[tokio::test]
async fn an_append_on_the_callers_thread_wakes_the_writer_thread_for_its_sync() {
    let (_dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_millis(20));
    let (spool, reader, _) = open(&c);
    spool.append(vec![ev(0)]).await.expect("first append");
    let synced = |n: u64| {
        let spool = spool.clone();
        async move {
            while spool.stats().counters.syncs < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Two syncs: the new segment's, then the first append's periodic one,
    // which must be counted before `before` is read below.
    tokio::time::timeout(WAIT, synced(2))
        .await
        .expect("the first append was never synced");
    // Nothing else would wake the writer thread for an hour: its next ack
    // flush is put that far away, and it is asleep on that deadline.
    let far = std::time::Instant::now() + Duration::from_secs(3600);
    writer::lock(&spool.inner.writer).set_acks_due(far);
    let tx = spool.inner.tx.as_ref().expect("writer thread");
    tx.send(Msg::Tick).expect("writer thread alive");
    let asleep = async {
        loop {
            let until = *spool
                .hooks()
                .sleeping_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if until.is_some_and(|u| u >= far) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(WAIT, asleep)
        .await
        .expect("the writer thread never slept on the far deadline");
    let before = spool.stats().counters.syncs;
    // Written on this thread; its sync is due in 20 ms, and only the
    // writer thread's timers run it.
    spool.append(vec![ev(1)]).await.expect("append");
    tokio::time::timeout(WAIT, synced(before + 1))
        .await
        .expect("the writer thread slept through the sync an append on the caller's thread set");
    shut(spool, reader).await;
}

/// Records read so far from disk and from memory.
fn reads(spool: &Spool) -> (u64, u64) {
    let c = spool.stats().counters;
    (c.records_read_disk, c.records_read_memory)
}

#[tokio::test]
async fn a_caught_up_reader_takes_new_records_from_memory() {
    let (dir, spool, mut reader) = fresh_open();
    let waiting = tokio::spawn(async move {
        let batch = reader.next_batch(100, 1 << 20).await;
        (reader, batch)
    });
    let sent = vec![ev(1), ev(2), ev(3)];
    spool.append(sent.clone()).await.expect("append");
    let (mut reader, batch) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("reader never woke")
        .expect("join");
    let got = batch.expect("a batch");
    assert_eq!(ids(&got), vec![1, 2, 3]);
    for (r, p) in got.iter().zip(&sent) {
        assert_eq!(
            r.payload.as_ptr(),
            p.as_ptr(),
            "not the bytes given to append"
        );
    }
    assert_eq!(reads(&spool), (0, 3));

    // Proof that the file was not read: records spoiled on disk after
    // their write still arrive whole, and nothing is counted lost.
    let seg = segment_path(dir.path(), 1);
    let rec4 = file_len(&seg);
    spool.append(vec![ev(4), ev(5)]).await.expect("append");
    poke(&seg, rec4 + PAYLOAD_AT, b"XXXX");
    let got = read_n(&mut reader, 2).await;
    assert_eq!(payloads(&got), vec![ev(4), ev(5)]);
    assert_eq!(reads(&spool), (0, 5));
    assert_eq!(spool.stats().counters.records_lost, 0);
    assert!(
        spool.tail_ids().is_empty(),
        "returned records kept in memory"
    );
    shut(spool, reader).await;
}

#[tokio::test]
async fn a_reader_behind_reads_from_disk_then_switches_to_memory() {
    let (_dir, mut c) = fresh();
    // Small segments, so that the disk reads cross segments and delivered
    // segments are deleted while the tail serves.
    c.segment_bytes = 500;
    let (spool, mut reader, _) = open(&c);
    spool.tail_caps(1 << 20, 10);
    // The reader stands still (Kafka away): once the tail is full, no
    // memory is held for it.
    append_each(&spool, (1..=100).map(ev)).await;
    assert!(
        spool.tail_ids().is_empty(),
        "the tail holds {:?} for a reader 100 records behind",
        spool.tail_ids()
    );

    // The reader catches up from disk while writes go on, one record per
    // batch it reads, and moves to memory once it reaches the tail.
    let mut got = Vec::new();
    let mut written = 100u64;
    let mut switched_at = None;
    loop {
        let batch = tokio::time::timeout(WAIT, reader.next_batch(7, 1 << 20))
            .await
            .expect("reader timed out")
            .expect("reader ended early");
        got.extend(batch);
        let (disk, memory) = reads(&spool);
        if memory > 0 && switched_at.is_none() {
            switched_at = Some(disk);
        }
        assert!(
            switched_at.is_none() || switched_at == Some(disk),
            "back to disk after reaching the tail"
        );
        if written == 130 {
            if got.len() as u64 == written {
                break;
            }
            continue;
        }
        written += 1;
        spool.append(vec![ev(written)]).await.expect("append");
    }
    let (disk, memory) = reads(&spool);
    assert_eq!(disk + memory, written);
    assert!(
        disk >= 100 && memory >= 10,
        "disk {disk}, memory {memory}: the reader must switch once it reaches the tail"
    );

    // Caught up: new records come from memory only, in groups as large
    // as the tail and one by one.
    spool
        .append((1..=10).map(|i| ev(written + i)).collect())
        .await
        .expect("append");
    got.extend(read_n(&mut reader, 10).await);
    append_each(&spool, (11..=15).map(|i| ev(written + i))).await;
    got.extend(read_n(&mut reader, 5).await);
    assert_eq!(
        ids(&got),
        (1..=written + 15).collect::<Vec<_>>(),
        "each id once, in order"
    );
    assert!(got.iter().all(|r| r.payload == ev(r.id)));
    assert_eq!(reads(&spool), (disk, memory + 15));

    // Deleting delivered segments is unaffected: no file stays open.
    for r in &got {
        spool.ack(r.id);
    }
    assert_eq!(spool.stats().segments, 1, "delivered segments were kept");
    assert!(
        deleted_files_held_open(&c.dir).is_empty(),
        "deleted segments still open: {:?}",
        deleted_files_held_open(&c.dir)
    );
    shut(spool, reader).await;
}

/// Files under `dir` this process still has open although they were
/// deleted (their disk space does not come back until they are closed).
fn deleted_files_held_open(dir: &Path) -> Vec<PathBuf> {
    let Ok(fds) = fs::read_dir("/proc/self/fd") else {
        return Vec::new(); // not Linux: nothing to check
    };
    fds.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir) && p.to_string_lossy().ends_with(" (deleted)"))
        .collect()
}

#[tokio::test]
async fn records_written_before_a_restart_are_replayed_from_disk() {
    let (_dir, c) = fresh();
    left_behind(&c, (1..=5).map(ev)).await;
    let (spool, mut reader, _) = open(&c);
    assert!(spool.tail_ids().is_empty());
    let got = read_n(&mut reader, 5).await;
    assert_eq!(ids(&got), vec![1, 2, 3, 4, 5]);
    assert_eq!(reads(&spool), (5, 0));
    spool.append(vec![ev(6)]).await.expect("append");
    assert_eq!(ids(&read_n(&mut reader, 1).await), vec![6]);
    assert_eq!(reads(&spool), (5, 1), "caught up after the replay");
    shut(spool, reader).await;
}

#[tokio::test]
async fn a_failed_write_or_sync_puts_nothing_in_the_tail() {
    let (_dir, spool, mut reader) = fresh_open();
    spool.append(vec![ev(1)]).await.expect("append");
    assert_eq!(spool.tail_ids(), vec![1]);

    spool.hooks().fail_writes(1);
    spool
        .append(vec![sized(2, 300), sized(3, 300)])
        .await
        .expect_err("injected write failure");
    assert_eq!(spool.tail_ids(), vec![1], "a failed write reached the tail");
    spool.append(vec![ev(4)]).await.expect("append");
    assert_eq!(
        spool.tail_ids(),
        vec![4],
        "ids 2 and 3 were spent: the tail starts afresh after the gap"
    );
    let got = read_n(&mut reader, 2).await;
    assert_eq!(ids(&got), vec![1, 4]);
    assert_eq!(payloads(&got), vec![ev(1), ev(4)]);
    // 1 was taken from disk: the tail had moved on to 4 meanwhile.
    assert_eq!(reads(&spool), (1, 1));

    // Written, then the sync failed: answered with an error all the same.
    spool.hooks().fail_syncs(1);
    spool
        .append(vec![ev(5)])
        .await
        .expect_err("injected sync failure");
    assert!(
        spool.tail_ids().is_empty(),
        "a failed sync reached the tail"
    );
    spool.append(vec![ev(6)]).await.expect("append");
    assert_eq!(spool.tail_ids(), vec![6]);
    spool.close().await.expect("close");
    let got = drain(&mut reader).await;
    assert_eq!(ids(&got), vec![6]);
    assert_eq!(payloads(&got), vec![ev(6)]);
    assert_eq!(reads(&spool), (1, 2));
}

/// Polls `fut` exactly once.
async fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut fut = Some(fut);
    std::future::poll_fn(|cx| {
        let f = fut.take().expect("polled once");
        std::task::Poll::Ready(f.poll(cx))
    })
    .await
}

#[tokio::test]
async fn a_batch_from_memory_comes_in_one_poll_and_a_dropped_wait_loses_nothing() {
    let (_dir, spool, mut reader) = fresh_open();
    {
        let waiting = std::pin::pin!(reader.next_batch(10, 1 << 20));
        assert!(poll_once(waiting).await.is_pending(), "nothing to read yet");
        // Dropped while waiting, as `select!` does.
    }
    spool.append(vec![ev(1), ev(2)]).await.expect("append");
    // Taken from the tail and returned in the same poll: no await lies
    // between them, so no cancellation can drop a taken batch.
    {
        let ready = std::pin::pin!(reader.next_batch(10, 1 << 20));
        match poll_once(ready).await {
            std::task::Poll::Ready(Some(batch)) => assert_eq!(ids(&batch), vec![1, 2]),
            other => panic!("expected a batch in one poll, got {other:?}"),
        }
    }
    assert_eq!(reads(&spool), (0, 2));
    shut(spool, reader).await;
}

#[tokio::test]
async fn an_append_that_starts_a_segment_is_left_to_the_writer_thread() {
    let (dir, mut c) = fresh();
    c.fsync = FsyncMode::Interval(Duration::from_secs(3600));
    c.segment_bytes = 200;
    let (spool, mut reader, _) = open(&c);
    spool.append(vec![sized(1, 150)]).await.expect("append");
    spool.append(vec![sized(2, 150)]).await.expect("append");
    let hooks = spool.hooks();
    // The segment is past its size: the next append rolls, and a roll
    // syncs files, which no caller's thread may wait for.
    hooks.pause();
    let rolling = spool.append(vec![sized(3, 150)]);
    let behind = spool.append(vec![sized(4, 150)]);
    let both = async { (rolling.await, behind.await) };
    tokio::pin!(both);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut both)
            .await
            .is_err(),
        "the rolling append (or the one behind it) was written on the caller's thread"
    );
    hooks.resume();
    let (a, b) = both.await;
    a.expect("rolling append");
    b.expect("append behind it");
    assert!(seg_files(dir.path()).len() >= 2);
    assert_eq!(ids(&read_n(&mut reader, 4).await), vec![1, 2, 3, 4]);
    // The next append rolls again (3 and 4 filled the segment); after it,
    // appends are written on the caller's thread again.
    spool.append(vec![sized(5, 10)]).await.expect("append");
    spool.park_writer().await;
    tokio::time::timeout(Duration::from_secs(2), spool.append(vec![sized(6, 10)]))
        .await
        .expect("appends stayed with the writer thread after the roll")
        .expect("append");
    hooks.resume();
    shut(spool, reader).await;
}

/// `never` mode remembers the segments it retired unsynced, to sync them at
/// close. Once delivered and deleted they need no sync: the list stays as
/// short as the spool (it grew by one id per roll for the life of the
/// process).
#[tokio::test]
async fn never_mode_forgets_deleted_segments_it_would_sync_at_close() {
    let (_dir, mut c) = fresh();
    c.segment_bytes = 400;
    c.fsync = FsyncMode::Never;
    let (spool, mut reader, _) = open(&c);
    for round in 0..40u64 {
        append_each(&spool, (0..4).map(|i| sized(round * 4 + i + 1, 90))).await;
        for r in read_n(&mut reader, 4).await {
            spool.ack(r.id);
        }
    }
    let remembered = spool
        .inner
        .writer
        .lock()
        .expect("writer")
        .retired_unsynced
        .len();
    let segments = spool.inner.shared.lock_state().segments.len();
    assert!(
        remembered <= segments,
        "{remembered} retired ids remembered for {segments} segments"
    );
    shut(spool, reader).await;
}
