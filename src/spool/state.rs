//! In-memory bookkeeping shared by the writer, the reader and `ack`.
//!
//! Per segment it keeps only what is needed to answer "what is still
//! pending, and since when": a bitmap of delivered records (one bit per
//! record) and sparse time/offset samples. Payloads are never held per
//! segment, which is what lets the spool hold gigabytes during a Kafka
//! outage; only the newest few MiB are kept, in the bounded [`Tail`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::segment::{acks_path, segment_path};
use super::tail::Tail;
use super::{SYNC_BUCKETS, SpoolCounters, SyncDurations};

/// A sample is kept at least every this many records, so a reader that must
/// skip delivered records can seek close to the first one it needs.
pub(crate) const SAMPLE_EVERY: u64 = 4096;
/// A sample is kept whenever the append time moved by this much, which is
/// what bounds the error of `oldest_pending_age`.
const SAMPLE_TIME_MS: u64 = 1000;
/// Buffer for each segment's ack file: 512 acks per write syscall.
const ACK_BUF: usize = 4096;
/// Below this many acks per [`ACK_PACE_WINDOW`] (20,000/s), each ack is
/// written as it comes: a crash then replays nothing already acked, and a
/// system call per ack costs under 2 % of a core. Above it (a backlog
/// draining), acks are buffered and written once the oldest is
/// [`ACK_MAX_AGE`] old, and after each round of delivery reports (see
/// `Spool::flush_acks`): a crash replays well under a millisecond's worth.
const ACK_WRITE_THROUGH_MAX: u32 = 200;
const ACK_PACE_WINDOW: Duration = Duration::from_millis(10);
const ACK_MAX_AGE: Duration = Duration::from_micros(500);

/// How fast acks come to one segment, measured per [`ACK_PACE_WINDOW`].
#[derive(Debug)]
struct AckPace {
    window_start: Instant,
    count: u32,
    write_through: bool,
}

impl AckPace {
    fn new() -> AckPace {
        AckPace {
            window_start: Instant::now(),
            count: 0,
            write_through: true,
        }
    }

    /// Counts one ack; true if it should be written at once.
    fn tick(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= ACK_PACE_WINDOW {
            self.write_through = self.count < ACK_WRITE_THROUGH_MAX;
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.write_through && self.count < ACK_WRITE_THROUGH_MAX
    }
}

pub(crate) use crate::clock::now_ms;

/// A point in a segment: record index, its append time, its file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub idx: u64,
    pub ts: u64,
    pub offset: u64,
}

/// What is known about one segment file.
#[derive(Debug)]
pub(crate) struct SegMeta {
    pub first_id: u64,
    /// Readable records, consecutive ids from `first_id`.
    pub count: u64,
    /// Offset just past the last readable record; the reader never reads
    /// past it, so it never sees a write in progress or a damaged tail.
    pub data_len: u64,
    /// Size of the file on disk (what counts against `max_bytes`).
    pub disk_len: u64,
    acked: Vec<u64>,
    acked_count: u64,
    /// Index of the lowest record not yet acked (only moves forward).
    first_unacked: u64,
    samples: Vec<Sample>,
    ack_writer: Option<BufWriter<File>>,
    /// When the oldest ack still in `ack_writer`'s buffer was written.
    acks_buffered_since: Option<Instant>,
    ack_pace: AckPace,
    ack_write_failed: bool,
}

impl SegMeta {
    pub(crate) fn new(first_id: u64, data_len: u64, disk_len: u64) -> Self {
        Self {
            first_id,
            count: 0,
            data_len,
            disk_len,
            acked: Vec::new(),
            acked_count: 0,
            first_unacked: 0,
            samples: Vec::new(),
            ack_writer: None,
            acks_buffered_since: None,
            ack_pace: AckPace::new(),
            ack_write_failed: false,
        }
    }

    pub(crate) fn end_id(&self) -> u64 {
        self.first_id.saturating_add(self.count)
    }

    fn index(&self, id: u64) -> Option<u64> {
        (id >= self.first_id && id < self.end_id()).then(|| id - self.first_id)
    }

    fn bit(&self, idx: u64) -> bool {
        self.acked
            .get((idx / 64) as usize)
            .is_some_and(|w| w & (1 << (idx % 64)) != 0)
    }

    pub(crate) fn is_acked(&self, id: u64) -> bool {
        self.index(id).is_some_and(|i| self.bit(i))
    }

    pub(crate) fn pending(&self) -> u64 {
        self.count - self.acked_count
    }

    pub(crate) fn fully_acked(&self) -> bool {
        self.acked_count == self.count
    }

    /// Id of the lowest record not yet acked, if any.
    pub(crate) fn first_unacked_id(&self) -> Option<u64> {
        (self.first_unacked < self.count).then(|| self.first_id + self.first_unacked)
    }

    /// The lowest id at or after `id` not yet acked (records given up on
    /// as corrupt are acked), if any.
    pub(crate) fn next_unacked_from(&self, id: u64) -> Option<u64> {
        let from = id.max(self.first_id + self.first_unacked);
        (self.index(from)?..self.count)
            .find(|&idx| !self.bit(idx))
            .map(|idx| self.first_id + idx)
    }

    /// Marks `id` delivered; false if it was already, or is not in here.
    pub(crate) fn set_acked(&mut self, id: u64) -> bool {
        let Some(idx) = self.index(id) else {
            return false;
        };
        if self.bit(idx) {
            return false;
        }
        let word = (idx / 64) as usize;
        if self.acked.len() <= word {
            self.acked.resize(word + 1, 0);
        }
        self.acked[word] |= 1 << (idx % 64);
        self.acked_count += 1;
        while self.first_unacked < self.count && self.bit(self.first_unacked) {
            self.first_unacked += 1;
        }
        true
    }

    /// Extends the segment by `n` records just made readable.
    pub(crate) fn extend(&mut self, n: u64, new_data_len: u64) {
        self.count += n;
        self.data_len = new_data_len;
        self.disk_len = self.disk_len.max(new_data_len);
        self.acked.resize(self.count.div_ceil(64) as usize, 0);
    }

    /// Offers a record's time and offset; kept only if it is the first, a
    /// multiple of [`SAMPLE_EVERY`], or the clock moved enough (or backwards).
    pub(crate) fn note(&mut self, s: Sample) {
        let keep = match self.samples.last() {
            None => true,
            Some(last) => {
                s.idx > last.idx
                    && (s.idx.is_multiple_of(SAMPLE_EVERY)
                        || s.ts >= last.ts.saturating_add(SAMPLE_TIME_MS)
                        || s.ts < last.ts)
            }
        };
        if keep {
            self.samples.push(s);
        }
    }

    /// Nearest sample at or before `idx`.
    pub(crate) fn sample_at_or_before(&self, idx: u64) -> Option<Sample> {
        let n = self.samples.partition_point(|s| s.idx <= idx);
        n.checked_sub(1).map(|i| self.samples[i])
    }

    /// Append time of the oldest pending record, within [`SAMPLE_TIME_MS`]
    /// (earlier, never later: the age errs on the side of alerting).
    pub(crate) fn oldest_pending_ts(&self) -> Option<u64> {
        if self.first_unacked >= self.count {
            return None;
        }
        self.sample_at_or_before(self.first_unacked).map(|s| s.ts)
    }

    /// Appends `id` to this segment's ack file (buffered; see module doc of
    /// `segment` for why losing it is harmless). Failures are logged once
    /// per segment and otherwise ignored for the same reason.
    fn persist_ack(&mut self, dir: &Path, id: u64) {
        if self.ack_write_failed {
            return;
        }
        let res = match &mut self.ack_writer {
            Some(w) => w.write_all(&id.to_le_bytes()),
            None => open_ack_writer(dir, self.first_id).and_then(|mut w| {
                w.write_all(&id.to_le_bytes())?;
                self.ack_writer = Some(w);
                Ok(())
            }),
        };
        let res = res.and_then(|()| {
            let now = Instant::now();
            let due = self.ack_pace.tick(now)
                || self
                    .acks_buffered_since
                    .is_some_and(|since| now.duration_since(since) >= ACK_MAX_AGE);
            if due {
                self.acks_buffered_since = None;
                if let Some(w) = &mut self.ack_writer {
                    w.flush()?;
                }
            } else if self.acks_buffered_since.is_none() {
                self.acks_buffered_since = Some(now);
            }
            Ok(())
        });
        if let Err(e) = res {
            self.ack_write_failed = true;
            self.ack_writer = None;
            tracing::warn!(
                file = %acks_path(dir, self.first_id).display(),
                error = %e,
                "cannot record acks; these records will be delivered again after a restart"
            );
        }
    }

    fn flush_acks(&mut self, dir: &Path) {
        self.acks_buffered_since = None;
        if let Some(w) = &mut self.ack_writer
            && let Err(e) = w.flush()
        {
            self.ack_writer = None;
            self.ack_write_failed = true;
            tracing::warn!(
                file = %acks_path(dir, self.first_id).display(),
                error = %e,
                "cannot flush acks; these records will be delivered again after a restart"
            );
        }
    }

    /// Drops the ack writer without flushing: used when the files are
    /// about to be deleted.
    fn discard_ack_writer(&mut self) {
        if let Some(w) = self.ack_writer.take() {
            let _ = w.into_parts();
        }
    }
}

/// Opens an ack file for appending, cutting a torn tail first so that new
/// ids stay 8-byte aligned.
fn open_ack_writer(dir: &Path, first_id: u64) -> std::io::Result<BufWriter<File>> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(acks_path(dir, first_id))?;
    let len = f.metadata()?.len();
    if !len.is_multiple_of(8) {
        f.set_len(len - len % 8)?;
    }
    Ok(BufWriter::with_capacity(ACK_BUF, f))
}

/// Segment files to unlink once the state lock is released.
#[must_use]
pub(crate) struct Deletions {
    dir: PathBuf,
    first_ids: Vec<u64>,
}

impl Deletions {
    pub(crate) fn is_empty(&self) -> bool {
        self.first_ids.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.first_ids.len()
    }

    /// Removes the segment before its ack file: a crash in between leaves an
    /// orphan ack file (cleaned at open), never a segment without its acks
    /// (which would replay everything in it).
    pub(crate) fn run(self) {
        for id in self.first_ids {
            let seg = segment_path(&self.dir, id);
            if let Err(e) = fs::remove_file(&seg) {
                tracing::warn!(file = %seg.display(), error = %e, "cannot delete delivered spool segment");
                continue;
            }
            let acks = acks_path(&self.dir, id);
            if let Err(e) = fs::remove_file(&acks)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %acks.display(), error = %e, "cannot delete spool ack file");
            }
        }
    }
}

/// Everything about the spool that more than one thread looks at.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub segments: BTreeMap<u64, SegMeta>,
    /// First id of the segment the writer appends to; never deleted.
    pub active: Option<u64>,
    /// Sum of `disk_len`.
    pub bytes: u64,
    /// When an append last failed for lack of room or by I/O error;
    /// cleared by the next successful append or when a deletion frees room.
    /// Readiness only looks at it for a short while (see `Spool::is_full`),
    /// so it can never hold a drained spool unready.
    pub refused_at: Option<Instant>,
    /// No more records will ever be appended.
    pub closed: bool,
    /// The newest records written, for a reader that is caught up.
    pub tail: Tail,
}

impl State {
    pub(crate) fn segment_of(&self, id: u64) -> Option<&SegMeta> {
        self.segments
            .range(..=id)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| id < s.end_id())
    }

    fn segment_of_mut(&mut self, id: u64) -> Option<&mut SegMeta> {
        self.segments
            .range_mut(..=id)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| id < s.end_id())
    }

    /// A record counts as delivered if its bit is set or its segment is gone
    /// (segments are only deleted once everything in them was delivered).
    pub(crate) fn is_acked(&self, id: u64) -> bool {
        self.segment_of(id).is_none_or(|s| s.is_acked(id))
    }

    /// Records a delivery; true if it was new.
    pub(crate) fn ack(&mut self, dir: &Path, id: u64) -> bool {
        let Some(seg) = self.segment_of_mut(id) else {
            return false;
        };
        if !seg.set_acked(id) {
            return false;
        }
        seg.persist_ack(dir, id);
        true
    }

    /// Gives up on ids `from..to` of one segment (unreadable data), so that
    /// the segment can still be deleted. Not persisted: recovery finds the
    /// same damage again by itself. Returns how many were newly given up.
    pub(crate) fn mark_lost(&mut self, first_id: u64, from: u64, to: u64) -> u64 {
        let Some(seg) = self.segments.get_mut(&first_id) else {
            return 0;
        };
        (from..to.min(seg.end_id()))
            .filter(|&id| seg.set_acked(id))
            .count() as u64
    }

    pub(crate) fn pending(&self) -> u64 {
        self.segments.values().map(SegMeta::pending).sum()
    }

    pub(crate) fn oldest_pending_ts(&self) -> Option<u64> {
        self.segments
            .values()
            .find(|s| s.pending() > 0)?
            .oldest_pending_ts()
    }

    /// Takes out every segment whose records are all delivered, except the
    /// active one and the highest one (kept so ids continue after a
    /// restart). Clears `refused_at` if that freed room.
    pub(crate) fn take_deletable(&mut self, dir: &Path) -> Deletions {
        let highest = self.segments.keys().next_back().copied();
        let doomed: Vec<u64> = self
            .segments
            .values()
            .filter(|s| {
                s.fully_acked() && Some(s.first_id) != self.active && Some(s.first_id) != highest
            })
            .map(|s| s.first_id)
            .collect();
        for id in &doomed {
            if let Some(mut seg) = self.segments.remove(id) {
                seg.discard_ack_writer();
                self.bytes = self.bytes.saturating_sub(seg.disk_len);
            }
        }
        if !doomed.is_empty() {
            self.refused_at = None;
        }
        Deletions {
            dir: dir.to_path_buf(),
            first_ids: doomed,
        }
    }

    /// Bytes of fully delivered segments still on disk (the active one, and
    /// the highest one kept for id continuity): the writer deletes them as
    /// soon as an append needs the room, so they do not make the spool full.
    pub(crate) fn reclaimable_bytes(&self) -> u64 {
        self.segments
            .values()
            .filter(|s| s.count > 0 && s.fully_acked())
            .map(|s| s.disk_len)
            .sum()
    }

    pub(crate) fn flush_acks(&mut self, dir: &Path) {
        for seg in self.segments.values_mut() {
            seg.flush_acks(dir);
        }
    }

    /// Pending/size figures, with the counters and the bytes queued for the
    /// writer thread (kept outside the state) supplied by the caller.
    pub(crate) fn stats(&self, counters: SpoolCounters, queued_bytes: u64) -> super::SpoolStats {
        let now = now_ms();
        super::SpoolStats {
            pending_events: self.pending(),
            bytes: self.bytes,
            oldest_pending_age: self
                .oldest_pending_ts()
                .map(|ts| Duration::from_millis(now.saturating_sub(ts))),
            segments: self.segments.len() as u64,
            counters,
            queued_bytes,
        }
    }
}

/// [`SyncDurations`] as it is counted: atomics, so that a sync never
/// waits for a scrape.
#[derive(Debug, Default)]
struct SyncTimes {
    buckets: [AtomicU64; SYNC_BUCKETS.len() + 1],
    nanos: AtomicU64,
}

impl SyncTimes {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = SYNC_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(SYNC_BUCKETS.len());
        Counters::add(&self.buckets[bucket], 1);
        Counters::add(&self.nanos, took.as_nanos() as u64);
    }

    fn snapshot(&self) -> SyncDurations {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SyncDurations {
            counts: std::array::from_fn(|i| g(&self.buckets[i])),
            sum_nanos: g(&self.nanos),
        }
    }
}

/// Monotonic counters for metrics; atomics so `stats()` never waits on I/O.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub appends: AtomicU64,
    pub records_appended: AtomicU64,
    pub write_groups: AtomicU64,
    pub syncs: AtomicU64,
    sync_times: SyncTimes,
    pub dir_syncs: AtomicU64,
    dir_sync_times: SyncTimes,
    pub full_rejections: AtomicU64,
    pub behind_rejections: AtomicU64,
    pub io_errors: AtomicU64,
    pub records_acked: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub records_lost: AtomicU64,
    pub read_retries: AtomicU64,
    pub records_read_disk: AtomicU64,
    pub records_read_memory: AtomicU64,
}

impl Counters {
    pub(crate) fn starting_lost(records_lost: u64) -> Self {
        Self {
            records_lost: AtomicU64::new(records_lost),
            ..Self::default()
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// One fdatasync of a segment file, which took `took`.
    pub(crate) fn synced(&self, took: Duration) {
        self.sync_times.observe(took);
        Self::add(&self.syncs, 1);
    }

    /// One fsync of the spool directory, which took `took`.
    pub(crate) fn dir_synced(&self, took: Duration) {
        self.dir_sync_times.observe(took);
        Self::add(&self.dir_syncs, 1);
    }

    pub(crate) fn snapshot(&self) -> SpoolCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SpoolCounters {
            appends: g(&self.appends),
            records_appended: g(&self.records_appended),
            write_groups: g(&self.write_groups),
            syncs: g(&self.syncs),
            sync_durations: self.sync_times.snapshot(),
            dir_sync_durations: self.dir_sync_times.snapshot(),
            dir_syncs: g(&self.dir_syncs),
            full_rejections: g(&self.full_rejections),
            behind_rejections: g(&self.behind_rejections),
            io_errors: g(&self.io_errors),
            records_acked: g(&self.records_acked),
            segments_deleted: g(&self.segments_deleted),
            records_lost: g(&self.records_lost),
            read_retries: g(&self.read_retries),
            records_read_disk: g(&self.records_read_disk),
            records_read_memory: g(&self.records_read_memory),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first_id: u64, n: u64) -> SegMeta {
        let mut s = SegMeta::new(first_id, 24, 24);
        s.extend(n, 24 + n * 30);
        s
    }

    /// A sync lands in the first bucket whose bound is at least its
    /// duration (Prometheus' `le`), past the last bound in the overflow
    /// count, and adds its own nanoseconds to the sum; segment and
    /// directory syncs are kept apart.
    #[test]
    fn sync_times_bucket_by_upper_bound() {
        let c = Counters::default();
        let idx = |le: f64| SYNC_BUCKETS.iter().position(|&b| b == le).unwrap();
        c.synced(Duration::from_micros(250)); // exactly a bound
        c.synced(Duration::from_micros(251)); // just past it
        c.synced(Duration::from_nanos(300)); // tmpfs-fast
        c.synced(Duration::from_secs(45)); // past the last bound
        c.dir_synced(Duration::from_millis(40));
        let s = c.snapshot();
        let d = s.sync_durations;
        let mut want = [0; SYNC_BUCKETS.len() + 1];
        want[idx(0.00025)] += 1;
        want[idx(0.0005)] += 1;
        want[idx(0.00005)] += 1;
        want[SYNC_BUCKETS.len()] += 1;
        assert_eq!(d.counts, want);
        assert_eq!(d.sum_nanos, 250_000 + 251_000 + 300 + 45_000_000_000);
        assert_eq!(s.syncs, 4);
        let mut want = [0; SYNC_BUCKETS.len() + 1];
        want[idx(0.05)] += 1;
        assert_eq!(s.dir_sync_durations.counts, want);
        assert_eq!(s.dir_sync_durations.sum_nanos, 40_000_000);
        assert_eq!(s.dir_syncs, 1);
        assert!(
            SYNC_BUCKETS.windows(2).all(|w| w[0] < w[1]),
            "bounds out of order"
        );
    }

    #[test]
    fn bitmap_tracks_lowest_unacked() {
        let mut s = seg(10, 200);
        assert_eq!(s.first_unacked_id(), Some(10));
        assert!(s.set_acked(11));
        assert_eq!(s.first_unacked_id(), Some(10));
        assert!(s.set_acked(10));
        assert_eq!(s.first_unacked_id(), Some(12));
        assert!(!s.set_acked(10), "duplicate ack counted twice");
        assert!(
            !s.set_acked(9) && !s.set_acked(210),
            "out-of-range ack accepted"
        );
        assert_eq!(s.pending(), 198);
        for id in 12..210 {
            s.set_acked(id);
        }
        assert!(s.fully_acked());
        assert_eq!(s.first_unacked_id(), None);
    }

    #[test]
    fn samples_are_sparse_and_bound_the_age() {
        let mut s = seg(1, 10_000);
        for idx in 0..10_000u64 {
            // 10 records per millisecond: 1 s worth of appends.
            s.note(Sample {
                idx,
                ts: 5_000 + idx / 10,
                offset: idx,
            });
        }
        assert!(
            s.samples.len() <= 4,
            "too many samples: {}",
            s.samples.len()
        );
        for id in 1..=5000 {
            s.set_acked(id);
        }
        let ts = s.oldest_pending_ts().expect("pending");
        let exact = 5_000 + 5000 / 10;
        assert!(
            ts <= exact && exact - ts < SAMPLE_TIME_MS,
            "ts {ts} vs {exact}"
        );
        let near = s.sample_at_or_before(5000).expect("sample");
        assert!(near.idx <= 5000 && 5000 - near.idx <= SAMPLE_EVERY);
    }

    #[test]
    fn deletable_spares_active_and_highest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut st = State::default();
        for first in [1, 11, 21] {
            let s = seg(first, 10);
            st.bytes += s.disk_len;
            st.segments.insert(first, s);
        }
        st.active = Some(11);
        st.refused_at = Some(Instant::now());
        for id in 1..31 {
            assert!(st.ack(dir.path(), id));
        }
        let d = st.take_deletable(dir.path());
        assert_eq!(d.first_ids, vec![1]);
        assert!(st.refused_at.is_none());
        assert_eq!(st.segments.len(), 2);
        assert_eq!(st.bytes, 2 * (24 + 300));
        d.run();
    }
}
