//! The single consumer: hands out records in id order, from memory while
//! it is caught up, from the segment files otherwise.
//!
//! Each batch is planned under the state lock. When the first record the
//! plan would read is the first one in the in-memory tail (`tail.rs`), the
//! batch is taken from there in that same step, with no file access and no
//! thread hand-off. Otherwise (replay after a restart, a backlog) it is
//! read from disk.
//!
//! The reader never reads past a segment's `data_len`, which the writer
//! moves only after a write succeeded, so it can share files with the
//! writer without seeing partial or rolled-back data; the writer fills the
//! tail in the same step and for the same writes. File reads run on the
//! blocking pool so a cold disk does not stall the async runtime.
//!
//! A read that fails is one of two things. Damage (bytes that do not parse,
//! a file shorter than its records, a file gone) will be there after any
//! wait: its records are skipped, logged and counted as lost. Anything else
//! (no file descriptor left, an I/O error of the device) may pass, and the
//! records behind it were answered OK: nothing is skipped, the same read is
//! tried again after a pause. Skipping them would let the segment be
//! deleted once the rest is delivered, and the data with it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::Shared;
use super::segment::{
    Damage, HEADER_LEN, Parsed, RECORD_HEADER_LEN, RecordHeader, parse_record, segment_path,
};
use super::state::{Counters, Sample, State};

/// What `wait_for_data` found.
enum Ready {
    /// A batch taken from the in-memory tail; the cursor is already past it.
    Memory(Vec<SpooledRecord>),
    /// Records to read from a segment file.
    Disk(ReadPlan),
}

/// Bounds of one read from disk: big enough to amortise the system call,
/// small enough not to pull in far more than a batch needs.
const MIN_WINDOW: u64 = 64 << 10;
const MAX_WINDOW: u64 = 16 << 20;

/// The pause before a read that failed for now is tried again; it doubles
/// up to [`RETRY_MAX`] while the reads keep failing.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledRecord {
    /// Spool id; pass it to [`super::Spool::ack`] once Kafka has the record.
    pub id: u64,
    /// When it was appended (Unix ms), for latency metrics and event age.
    pub append_time_ms: u64,
    /// The bytes given to `append`.
    pub payload: Bytes,
}

/// Reads spooled records in id order; there is exactly one, since records
/// are handed out once per run (acks decide what is replayed after restart).
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// Lowest id not yet returned.
    next_id: u64,
    pos: Option<ReadPos>,
    /// See [`SpoolReader::gather_after_waiting`].
    gather: Duration,
    /// The pause before the next retry of a read that failed for now.
    retry_in: Duration,
}

/// An open segment and the offset of record `id` in it, so consecutive
/// batches continue without rescanning.
struct ReadPos {
    first_id: u64,
    file: File,
    offset: u64,
    id: u64,
}

/// What to read next, decided under the state lock.
#[derive(Debug, Clone, Copy)]
struct ReadPlan {
    first_id: u64,
    data_len: u64,
    end_id: u64,
    start_id: u64,
    /// Nearest known offset at or before `start_id`.
    hint: Option<Sample>,
}

/// Records that cannot be read although the bookkeeping says they exist.
pub(super) struct ReadFailure {
    pub(super) at_id: u64,
    /// First id after the unreadable stretch; None for the rest of the
    /// segment (when the damage hides where the next record starts).
    until_id: Option<u64>,
    reason: String,
    /// The disk refused the read for now, rather than the data being
    /// damaged: read it again later (see the module doc).
    pub(super) retry: bool,
}

impl SpoolReader {
    pub(crate) fn new(shared: Arc<Shared>, next_id: u64) -> Self {
        // Until its first look, the tail knows where the reader starts.
        shared.lock_state().tail.set_reader_at(next_id);
        Self {
            shared,
            next_id,
            pos: None,
            gather: Duration::ZERO,
            retry_in: RETRY_MIN,
        }
    }

    /// Once a call had to wait for new records, it waits `gather` more
    /// after the first arrives before it looks, so that a reader that keeps
    /// up takes the records of many appends at once instead of waking for
    /// each. Zero (the default) returns as soon as a record is there. A
    /// reader that is behind never waits, so this never slows a replay.
    pub fn gather_after_waiting(&mut self, gather: Duration) {
        self.gather = gather;
    }

    /// Waits until at least one undelivered record beyond the cursor exists
    /// (and, when it had to wait, for [`SpoolReader::gather_after_waiting`]),
    /// then returns up to `max_records` of them (and up to `max_bytes` of
    /// payload, but always at least one record) in id order. Records acked
    /// before a restart are skipped. Returns None once the spool is closed
    /// and everything written has been returned.
    ///
    /// Cancel-safe: dropping the future (e.g. in `select!`) loses nothing;
    /// the next call returns the same records. (A batch from memory is
    /// taken and returned within one poll, with no await in between.)
    pub async fn next_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<SpooledRecord>> {
        let max_records = max_records.max(1);
        loop {
            let plan = match self.wait_for_data(max_records, max_bytes).await? {
                Ready::Memory(records) => {
                    // A file kept open would hold on to a segment's disk
                    // space after its deletion, for as long as memory serves.
                    self.pos = None;
                    return Some(records);
                }
                Ready::Disk(plan) => plan,
            };
            self.next_id = plan.start_id;
            let mut pos = self.pos.take();
            let dir = self.shared.dir.clone();
            #[cfg(test)]
            let injected = self.shared.hooks.take_read_failure();
            let joined = tokio::task::spawn_blocking(move || {
                #[cfg(test)]
                if let Some(e) = injected {
                    return (pos, Err(io_failure(plan.start_id, "open", &e)));
                }
                let res = read_plan(&dir, &mut pos, &plan, max_records, max_bytes);
                (pos, res)
            })
            .await;
            let res = match joined {
                Ok((pos, res)) => {
                    self.pos = pos;
                    res
                }
                // A panic or a runtime shutting down, not the data.
                Err(e) => Err(ReadFailure {
                    at_id: plan.start_id,
                    until_id: None,
                    reason: format!("read task failed: {e}"),
                    retry: true,
                }),
            };
            match res {
                Ok(mut records) => {
                    self.retry_in = RETRY_MIN;
                    self.next_id += records.len() as u64;
                    let mut st = self.shared.lock_state();
                    st.tail.set_reader_at(self.next_id);
                    let read = records.len();
                    records.retain(|r| !st.is_acked(r.id));
                    drop(st);
                    unpin_sparse(&mut records, read);
                    if !records.is_empty() {
                        Counters::add(
                            &self.shared.counters.records_read_disk,
                            records.len() as u64,
                        );
                        return Some(records);
                    }
                }
                Err(f) if f.retry => self.pause_before_retry(&plan, &f).await,
                Err(f) => self.give_up(&plan, f),
            }
        }
    }

    /// A read the disk refused for now: nothing is skipped and the cursor
    /// stays at the plan's start, so the next look plans the same records.
    /// Cancel-safe like `next_batch`: a pause cut short loses nothing, and
    /// the next one is longer all the same.
    async fn pause_before_retry(&mut self, plan: &ReadPlan, f: &ReadFailure) {
        // Opened afresh next time: the error may belong to this descriptor.
        self.pos = None;
        let shared = &self.shared;
        Counters::add(&shared.counters.read_retries, 1);
        tracing::error!(
            file = %segment_path(&shared.dir, plan.first_id).display(),
            from_id = f.at_id,
            reason = %f.reason,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "cannot read the spool for now; nothing is skipped, the read is tried again (if the file descriptor limit is reached, raise it; if the disk is failing for good, see the README's Guarantees)"
        );
        let pause = self.retry_in;
        self.retry_in = (pause * 2).min(RETRY_MAX);
        tokio::time::sleep(pause).await;
    }

    /// Waits until there is something to return: a batch from the tail,
    /// taken here under the lock (so it cannot be lost to a cancellation
    /// between taking and returning), or a plan for reading from disk.
    async fn wait_for_data(&mut self, max_records: usize, max_bytes: usize) -> Option<Ready> {
        let shared = &*self.shared;
        loop {
            // notify_one leaves a permit when nobody waits, so a wake-up sent
            // between the look and the wait is not missed.
            let notified = shared.data_ready.notified();
            match look(shared, &mut self.next_id, max_records, max_bytes) {
                Look::Ready(ready) => return Some(ready),
                Look::Done => return None,
                Look::Wait => {
                    notified.await;
                    if !self.gather.is_zero() {
                        tokio::time::sleep(self.gather).await;
                    }
                }
            }
        }
    }

    /// Skips unreadable records. They are not marked in the ack file: a
    /// restart re-scans and meets the same damage, while the in-memory mark
    /// lets the segment be deleted once the rest is delivered.
    fn give_up(&mut self, plan: &ReadPlan, f: ReadFailure) {
        let until = f.until_id.unwrap_or(plan.end_id);
        self.next_id = until;
        let shared = &self.shared;
        let deletions = {
            let mut st = shared.lock_state();
            if !st.segments.contains_key(&plan.first_id) {
                // Delivered and deleted between planning and reading.
                return;
            }
            let lost = st.mark_lost(plan.first_id, f.at_id, until);
            Counters::add(&shared.counters.records_lost, lost);
            tracing::error!(
                file = %segment_path(&shared.dir, plan.first_id).display(),
                from_id = f.at_id,
                to_id = until - 1,
                lost,
                reason = %f.reason,
                "spool data became unreadable; these events are skipped"
            );
            st.take_deletable(&shared.dir)
        };
        Counters::add(&shared.counters.segments_deleted, deletions.len() as u64);
        deletions.run();
    }
}

/// What one look under the state lock found.
enum Look {
    Ready(Ready),
    /// Closed, and everything was returned.
    Done,
    /// Nothing to return yet.
    Wait,
}

/// Plans the next batch under the state lock, and takes it from the tail
/// when the tail starts exactly where the plan would read, moving
/// `next_id` past it.
fn look(shared: &Shared, next_id: &mut u64, max_records: usize, max_bytes: usize) -> Look {
    let mut st = shared.lock_state();
    loop {
        let plan = plan_read(&st, *next_id);
        st.tail
            .set_reader_at(plan.as_ref().map_or(*next_id, |p| p.start_id));
        let Some(plan) = plan else {
            // Nothing undelivered from the cursor on: whatever the tail
            // holds below it was returned already.
            st.tail.drop_below(*next_id);
            return if st.closed { Look::Done } else { Look::Wait };
        };
        let Some(mut records) = st.tail.take_from(plan.start_id, max_records, max_bytes) else {
            return Look::Ready(Ready::Disk(plan));
        };
        if let Some(last) = records.last() {
            *next_id = last.id + 1;
            st.tail.set_reader_at(*next_id);
        }
        // Only an ack for a record not yet handed out could match.
        records.retain(|r| !st.is_acked(r.id));
        if !records.is_empty() {
            Counters::add(&shared.counters.records_read_memory, records.len() as u64);
            return Look::Ready(Ready::Memory(records));
        }
    }
}

/// Finds the first segment with an undelivered record at or after
/// `next_id`, starting past its delivered prefix.
fn plan_read(st: &State, next_id: u64) -> Option<ReadPlan> {
    let from = st
        .segments
        .range(..=next_id)
        .next_back()
        .map_or(0, |(k, _)| *k);
    st.segments.range(from..).map(|(_, s)| s).find_map(|s| {
        if s.end_id() <= next_id || s.pending() == 0 {
            return None;
        }
        // Past records already delivered or given up on (a corrupt record
        // recovery skipped), which are then passed by their headers alone.
        let start_id = s.next_unacked_from(next_id.max(s.first_id))?;
        (start_id < s.end_id()).then(|| ReadPlan {
            first_id: s.first_id,
            data_len: s.data_len,
            end_id: s.end_id(),
            start_id,
            hint: s.sample_at_or_before(start_id - s.first_id),
        })
    })
}

/// Blocking part of `next_batch`: positions on `plan.start_id` and reads
/// one window of records. Leaves `pos` after the last record returned or
/// skipped (after damage of unknown extent: at the end of the known data).
fn read_plan(
    dir: &Path,
    pos: &mut Option<ReadPos>,
    plan: &ReadPlan,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<SpooledRecord>, ReadFailure> {
    let res = read_window(dir, pos, plan, max_records, max_bytes);
    if let Err(f) = &res
        && f.until_id.is_none()
        && let Some(p) = pos.as_mut()
        && p.first_id == plan.first_id
    {
        p.offset = plan.data_len;
        p.id = plan.end_id;
    }
    res
}

fn read_window(
    dir: &Path,
    pos: &mut Option<ReadPos>,
    plan: &ReadPlan,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<SpooledRecord>, ReadFailure> {
    let p = position(dir, pos, plan)?;
    skip_delivered(p, plan)?;
    let buf = read_buffer(p, plan, max_records, max_bytes)?;
    Ok(split_records(p, plan, &buf, max_records, max_bytes))
}

/// Damage at `at_id` whose extent is unknown.
fn failure(at_id: u64, reason: String) -> ReadFailure {
    ReadFailure {
        at_id,
        until_id: None,
        reason,
        retry: false,
    }
}

/// An error of the file system while doing `what` to a segment at
/// `at_id` (the log line that reports it names the file). A file that is
/// gone, or shorter than the records it had (cut by someone else), is
/// damage; any other error may pass (out of file descriptors, an I/O error
/// of the device), so it is retried.
pub(super) fn io_failure(at_id: u64, what: &str, e: &io::Error) -> ReadFailure {
    let damage = matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
    );
    ReadFailure {
        at_id,
        until_id: None,
        reason: format!("cannot {what} the segment: {e}"),
        retry: !damage,
    }
}

/// The read position for `plan`: the one left by the last read when it is
/// in this segment between the plan's hint and its start, else the segment
/// opened afresh at the hint (or its first record).
fn position<'p>(
    dir: &Path,
    pos: &'p mut Option<ReadPos>,
    plan: &ReadPlan,
) -> Result<&'p mut ReadPos, ReadFailure> {
    let hint_id = plan.hint.map_or(plan.first_id, |h| plan.first_id + h.idx);
    let usable = pos
        .as_ref()
        .is_some_and(|p| p.first_id == plan.first_id && p.id <= plan.start_id && p.id >= hint_id);
    if !usable {
        let path = segment_path(dir, plan.first_id);
        let file = File::open(&path).map_err(|e| io_failure(plan.start_id, "open", &e))?;
        let (offset, id) = plan
            .hint
            .map_or((HEADER_LEN, plan.first_id), |h| (h.offset, hint_id));
        *pos = Some(ReadPos {
            first_id: plan.first_id,
            file,
            offset,
            id,
        });
    }
    pos.as_mut()
        .ok_or_else(|| failure(plan.start_id, "no read position".into()))
}

/// Skips delivered records by their headers alone, up to `plan.start_id`.
fn skip_delivered(p: &mut ReadPos, plan: &ReadPlan) -> Result<(), ReadFailure> {
    while p.id < plan.start_id {
        let mut head = [0u8; RECORD_HEADER_LEN];
        if p.offset + RECORD_HEADER_LEN as u64 > plan.data_len {
            return Err(failure(
                p.id,
                "record header beyond the written data".into(),
            ));
        }
        p.file
            .read_exact_at(&mut head, p.offset)
            .map_err(|e| io_failure(p.id, "read", &e))?;
        let h = RecordHeader::parse(&head);
        h.validate(p.id).map_err(|d| failure(p.id, d.to_string()))?;
        if p.offset + h.total_len() > plan.data_len {
            return Err(failure(p.id, "record beyond the written data".into()));
        }
        p.offset += h.total_len();
        p.id += 1;
    }
    Ok(())
}

/// Reads one window from `p`, holding at least its first record whole. A
/// first record with a bad checksum is stepped over (its length and id check
/// out, so the next record starts right after it) and reported alone.
fn read_buffer(
    p: &mut ReadPos,
    plan: &ReadPlan,
    max_records: usize,
    max_bytes: usize,
) -> Result<Bytes, ReadFailure> {
    let avail = plan.data_len.saturating_sub(p.offset);
    let window = (max_bytes as u64)
        .saturating_add(max_records as u64 * RECORD_HEADER_LEN as u64)
        .clamp(MIN_WINDOW, MAX_WINDOW);
    let mut want = avail.min(window);
    loop {
        let mut b = BytesMut::zeroed(usize::try_from(want).unwrap_or(usize::MAX));
        p.file
            .read_exact_at(&mut b, p.offset)
            .map_err(|e| io_failure(p.id, "read", &e))?;
        match parse_record(&b, p.id) {
            Parsed::Record { .. } => return Ok(b.freeze()),
            // A record larger than the window: read exactly that record.
            Parsed::NeedMore(n) if n as u64 > want && n as u64 <= avail => want = n as u64,
            Parsed::NeedMore(_) => {
                return Err(failure(p.id, "record beyond the written data".into()));
            }
            Parsed::Damaged(Damage::BadCrc) => {
                let Some(head) = b.first_chunk::<RECORD_HEADER_LEN>() else {
                    return Err(failure(p.id, Damage::BadCrc.to_string()));
                };
                let at_id = p.id;
                p.offset += RecordHeader::parse(head).total_len();
                p.id += 1;
                return Err(ReadFailure {
                    at_id,
                    until_id: Some(p.id),
                    reason: Damage::BadCrc.to_string(),
                    retry: false,
                });
            }
            Parsed::Damaged(d) => return Err(failure(p.id, d.to_string())),
        }
    }
}

/// Copies the payloads out of their read window when a window keeps fewer
/// than a quarter of the records it read. Replayed after a restart in which
/// most records had been delivered, a window of 128 KiB can keep one record;
/// as a slice, that record's payload would pin the whole window for as long
/// as it waits in Kafka's queue (up to `message.timeout.ms`), and 2,048 such
/// records in flight would pin 270 MB (a review measured 66 KiB per record).
fn unpin_sparse(records: &mut [SpooledRecord], read: usize) {
    if records.len() * 4 < read {
        for r in records {
            r.payload = Bytes::copy_from_slice(&r.payload);
        }
    }
}

/// The whole records at the start of `buf`, up to `max_records` and (past
/// the first) `max_bytes` of payload, advancing `p` past them.
fn split_records(
    p: &mut ReadPos,
    plan: &ReadPlan,
    buf: &Bytes,
    max_records: usize,
    max_bytes: usize,
) -> Vec<SpooledRecord> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut at = 0usize;
    while p.id < plan.end_id && out.len() < max_records {
        // Damage after the first record is reported when it comes first in
        // a later window, so the good records before it are not held back.
        let Parsed::Record { header, total } = parse_record(&buf[at..], p.id) else {
            break;
        };
        let len = header.len as usize;
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        out.push(SpooledRecord {
            id: header.id,
            append_time_ms: header.ts,
            payload: buf.slice(at + RECORD_HEADER_LEN..at + total),
        });
        bytes += len;
        at += total;
        p.offset += total as u64;
        p.id += 1;
    }
    out
}

#[cfg(test)]
mod unpin_tests {
    use super::*;

    fn slices(buf: &Bytes, n: usize) -> Vec<SpooledRecord> {
        (0..n)
            .map(|i| SpooledRecord {
                id: i as u64,
                append_time_ms: 0,
                payload: buf.slice(i * 10..i * 10 + 10),
            })
            .collect()
    }

    fn inside(buf: &Bytes, r: &SpooledRecord) -> bool {
        let (start, p) = (buf.as_ptr() as usize, r.payload.as_ptr() as usize);
        p >= start && p < start + buf.len()
    }

    #[test]
    fn a_window_that_keeps_few_records_lets_go_of_the_window() {
        let buf = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<u8>>());
        // 2 kept of 100 read: copied, and the same bytes.
        let mut kept: Vec<SpooledRecord> = slices(&buf, 100).into_iter().step_by(50).collect();
        unpin_sparse(&mut kept, 100);
        assert!(kept.iter().all(|r| !inside(&buf, r)));
        assert_eq!(kept[1].payload, buf.slice(500..510));
        // Most kept: the slices stay (no copy on the usual path).
        let mut kept: Vec<SpooledRecord> = slices(&buf, 100).into_iter().skip(10).collect();
        unpin_sparse(&mut kept, 100);
        assert!(kept.iter().all(|r| inside(&buf, r)));
    }
}
