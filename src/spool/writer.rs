//! The writer: the only code that appends to segment files, on its own
//! thread or (see below) on the caller's, always under one lock.
//!
//! Group commit: the thread blocks for one request, then drains every
//! request queued meanwhile, encodes them all into one reused buffer, writes
//! that buffer with a single positioned write and, in `Always` mode, issues
//! a single `fdatasync` before answering any of them. While that sync runs
//! (milliseconds), new requests queue up and form the next group, so the
//! number of syncs tracks the disk's speed, not the request rate.
//!
//! In `Interval` mode the periodic `fdatasync` runs on a syncer thread of
//! its own, on a second descriptor of the active file: appends go on while
//! the disk flushes, so no answer ever waits behind that sync (it takes
//! milliseconds here, tens of them at worst).
//!
//! A failed write or sync fails the whole group, cuts the file back to its
//! last good length and retires the segment: the next group starts a fresh
//! file. Ids handed out to the failed group are never reused. Should the
//! truncation fail too, the first leftover record's header is zeroed, since
//! whole leftover records carry the next ids in sequence and recovery would
//! otherwise replay events that were answered with an error.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::segment::{
    HEADER_LEN, RECORD_HEADER_LEN, acks_path, encode_header, encode_record, segment_path,
};
use super::state::{Counters, SAMPLE_EVERY, Sample, SegMeta, now_ms};
use super::{FsyncMode, Queued, Shared, SpoolError, io_context};

/// Acks still buffered are flushed to their files at least this often.
/// Under load they are written within milliseconds anyway (see
/// `state::ACK_MAX_AGE`); this covers the last acks before a quiet spell.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes of appends that may wait for the writer thread. Past this the
/// disk is stalled (a roll's syncs, an fdatasync, writeback that cannot
/// keep up), and nothing more is queued in memory: an append that found
/// the lock busy waits for it instead, which holds back new callbacks on
/// that runtime thread; one that must go to the thread (`Always` mode, a
/// roll) is refused with [`SpoolError::Behind`]. One append is always
/// taken when none waits, whatever its size.
pub(crate) const MAX_QUEUED: u64 = 16 << 20;

/// `Always` mode writes this many zeros ahead of the data whenever fewer
/// than [`PREFORMAT_LOW`] are left, so that each group's `fdatasync`
/// overwrites blocks the file already has. Extending the file instead costs
/// every sync a journal commit for the new size and blocks: 0.32 against
/// 0.18 ms per sync on the benchmark's disk, and a group commit waits for
/// its sync (PostgreSQL zero-fills its WAL segments for the same reason).
/// Recovery reads up to this many zeros, from a record boundary to the end
/// of the last segment, as the end of the data, and cuts them; a clean stop
/// and a roll cut them too. Counted against `max_bytes` only once data
/// fills them: they are written only while the spool has room for them
/// too.
pub(crate) const PREFORMAT_BYTES: u64 = 1 << 20;
/// See [`PREFORMAT_BYTES`].
const PREFORMAT_LOW: u64 = 256 << 10;

/// The group buffer keeps its capacity between groups (no allocation per
/// group) but gives back anything above this after an unusually large one.
const BUF_KEEP: usize = 16 << 20;

pub(crate) type Reply = oneshot::Sender<Result<(), SpoolError>>;

/// What the async side asks of the writer thread.
pub(crate) enum Msg {
    /// One request's records; `bytes` is their encoded size.
    Append {
        records: Vec<Bytes>,
        bytes: u64,
        reply: Reply,
    },
    /// Sync everything, flush acks, refuse further appends.
    Close { reply: Reply },
    /// An append on the caller's thread set a new sync deadline: the thread
    /// looks at its timers again.
    Tick,
}

/// The segment currently appended to, as the writer sees it.
pub(crate) struct ActiveFile {
    pub first_id: u64,
    pub file: File,
    /// Length of the good data; the next write goes exactly here.
    pub len: u64,
    pub count: u64,
    /// The file holds zeros from `len` up to here (`Always` mode writes
    /// them ahead; see [`PREFORMAT_BYTES`]).
    pub preformatted_to: u64,
}

struct Request {
    records: Vec<Bytes>,
    bytes: u64,
    reply: Reply,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    fsync: FsyncMode,
    segment_bytes: u64,
    max_bytes: u64,
    active: Option<ActiveFile>,
    next_id: u64,
    buf: Vec<u8>,
    group: Vec<Request>,
    accepted: Vec<Reply>,
    /// The accepted requests' payloads, in id order, for the reader's
    /// in-memory tail once the write succeeds.
    written: Vec<Bytes>,
    samples: Vec<(u64, u64)>,
    /// Written but not yet synced.
    dirty: bool,
    sync_due: Option<Instant>,
    acks_due: Instant,
    /// The active file is suspect (after a failed write); start a new one.
    roll_needed: bool,
    /// Segments retired with unsynced data in `Never` mode, synced at close.
    pub(super) retired_unsynced: Vec<u64>,
    /// `Interval` mode: where the periodic syncs run.
    syncer: Option<Syncer>,
    closed: bool,
    /// Set when an append on the caller's thread started a sync deadline
    /// that the writer thread, asleep on an older one, must be told of.
    tick_needed: bool,
    /// A new segment is due: appends go to the writer thread until it has
    /// started one (see [`append_now`]).
    rolling: bool,
}

/// The writer, shared between its thread and (outside `Always` mode) the
/// callers appending on their own threads.
pub(crate) type SharedWriter = Arc<Mutex<Writer>>;

pub(crate) fn lock(w: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    // Every path that can panic leaves the writer's fields consistent (a
    // group is either written and published, or failed and answered).
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether appends in this mode are written on the caller's thread.
pub(crate) fn writes_inline(fsync: FsyncMode) -> bool {
    !matches!(fsync, FsyncMode::Always)
}

/// `Interval`/`Never` modes: writes one request's records now, on the
/// caller's thread, and returns the outcome. Wakes the writer thread when
/// the write started a sync deadline it does not know of yet.
///
/// An append that starts a new segment is the exception: creating one
/// syncs the segment it retires, the new file and the directory, which may
/// take as long as the disk likes. It goes to the writer thread instead,
/// and so does every append after it until the thread has rolled, so that
/// no append overtakes one queued before it and no runtime thread waits
/// for a disk.
///
/// So does an append that finds the lock taken: the writer thread holds it
/// through a roll's syncs, and another caller through its write. Waiting
/// for it would stall this runtime thread and every connection on it; the
/// writer thread instead writes whatever queued meanwhile as one group.
pub(crate) fn append_now(
    writer: &Mutex<Writer>,
    shared: &Shared,
    thread: &std::sync::mpsc::Sender<Msg>,
    records: Vec<Bytes>,
    bytes: u64,
) -> Result<Queued, SpoolError> {
    let mut w = match writer.try_lock() {
        Ok(w) => w,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) if reserve_queue_room(shared, bytes) => {
            return queue_append(shared, thread, records, bytes);
        }
        Err(TryLockError::WouldBlock) => lock(writer),
    };
    if w.closed {
        return Err(SpoolError::Closed);
    }
    if shared.writer_gone.load(Ordering::Relaxed) {
        // Without the thread nothing syncs or flushes acks: refuse
        // rather than answer for data only the page cache holds.
        return Err(SpoolError::WriterStopped);
    }
    if w.rolling || w.must_roll(bytes) {
        // Queued while holding the lock (see `run`).
        w.rolling = true;
        return queue_bounded(shared, thread, records, bytes);
    }
    let (reply, mut rx) = oneshot::channel();
    w.group.push(Request {
        records,
        bytes,
        reply,
    });
    w.commit();
    let tick = std::mem::take(&mut w.tick_needed);
    drop(w);
    if tick && thread.send(Msg::Tick).is_err() {
        return Err(SpoolError::WriterStopped);
    }
    rx.try_recv()
        .unwrap_or(Err(SpoolError::WriterStopped))
        .map(|()| Queued::Done)
}

/// Queues one append, already counted in `Shared::queued_bytes`, for the
/// writer thread, which answers on the returned [`Queued::Waiting`].
fn queue_append(
    shared: &Shared,
    thread: &std::sync::mpsc::Sender<Msg>,
    records: Vec<Bytes>,
    bytes: u64,
) -> Result<Queued, SpoolError> {
    let (reply, rx) = oneshot::channel();
    thread
        .send(Msg::Append {
            records,
            bytes,
            reply,
        })
        .map_err(|_| {
            shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            SpoolError::WriterStopped
        })?;
    Ok(Queued::Waiting(rx))
}

/// Queues an append that only the writer thread can write, unless
/// [`MAX_QUEUED`] bytes already wait for it: then the disk is stalled, and
/// the append is refused (and readiness drops for a while, so that a load
/// balancer sends elsewhere).
pub(crate) fn queue_bounded(
    shared: &Shared,
    thread: &std::sync::mpsc::Sender<Msg>,
    records: Vec<Bytes>,
    bytes: u64,
) -> Result<Queued, SpoolError> {
    if reserve_queue_room(shared, bytes) {
        return queue_append(shared, thread, records, bytes);
    }
    // A thread that died leaves its queue counted: say so, not "behind".
    if shared.writer_gone.load(Ordering::Relaxed) {
        return Err(SpoolError::WriterStopped);
    }
    *shared
        .behind_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    Counters::add(&shared.counters.behind_rejections, 1);
    Err(SpoolError::Behind {
        waiting: shared.queued_bytes.load(Ordering::Relaxed),
    })
}

/// Counts `bytes` as waiting for the writer thread, unless that would pass
/// [`MAX_QUEUED`] with something already waiting.
fn reserve_queue_room(shared: &Shared, bytes: u64) -> bool {
    shared
        .queued_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |before| {
            (before == 0 || before.saturating_add(bytes) <= MAX_QUEUED)
                .then(|| before.saturating_add(bytes))
        })
        .is_ok()
}

/// How much lower than the rest of the process the writer thread runs in
/// `Always` mode (a nice increment).
const ALWAYS_NICE: i32 = 5;

/// `Always` mode: lowers the writer thread's priority by [`ALWAYS_NICE`].
///
/// Every callback then waits for a group's `fdatasync`, and the throughput
/// is how many callbacks each sync carries. Woken from a sync while both
/// CPUs were busy, the writer preempted the connection thread that was
/// turning the answers just sent into the next requests, and synced the
/// few it had: about 8.5 callbacks per sync under wrk with 32 connections.
/// At nice 5 it waits for that thread's turn to end, and the next group
/// holds those requests too: 12-13 per sync, 1.2-2.8 us less CPU per
/// callback and 2-10% more callbacks per second in seven pairs (the
/// writer at nice -10 instead synced groups of 5 and lost 5-11%).
///
/// Lower, not starved: under contention the scheduler still gives a nice-5
/// thread about a third of a nice-0 thread's share, and a group needs tens
/// of microseconds of CPU; threads waiting for a lock it holds sleep and
/// leave it the CPU. Other modes keep the process's priority, as there an
/// append handed to this thread holds up its callback until it runs.
pub(crate) fn yield_to_callers() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: nice(2) takes an integer and touches no memory of ours;
        // errno is this thread's. On Linux nice applies to the calling
        // thread only. It returns the new value or -1 with errno set, and
        // -1 is also a valid nice value, hence errno cleared first.
        let failed = unsafe {
            *libc::__errno_location() = 0;
            libc::nice(ALWAYS_NICE) == -1 && *libc::__errno_location() != 0
        };
        if failed {
            // Only slower, never wrong: nothing to tell an operator to do.
            tracing::debug!(error = %io::Error::last_os_error(), "cannot lower the spool writer thread's priority");
        }
    }
}

/// Marks the writer as without its thread when the thread ends, however it
/// ends (a panic included), so that appends on callers' threads stop and
/// readiness says the gateway cannot take callbacks.
struct ThreadGone(SharedWriter);

impl Drop for ThreadGone {
    fn drop(&mut self) {
        // Under the lock: an append on a caller's thread, which holds it,
        // sees the thread either alive or gone for the whole append.
        let w = lock(&self.0);
        w.shared.writer_gone.store(true, Ordering::Relaxed);
    }
}

/// Thread body. Ends when every `Spool` handle is gone, after a final sync,
/// so dropping the spool never loses appended data.
pub(crate) fn run(writer: SharedWriter, rx: Receiver<Msg>) {
    let _gone = ThreadGone(writer.clone());
    let mut msgs = Vec::new();
    #[cfg(test)]
    let shared = lock(&writer).shared.clone();
    while let Some(first) = next_message(
        &writer,
        &rx,
        #[cfg(test)]
        &shared.hooks,
    ) {
        #[cfg(test)]
        shared.hooks.wait_while_paused();
        msgs.push(first);
        let mut w = lock(&writer);
        // Drained under the lock: appends queued behind a roll are queued
        // only while holding it, so once `rolling` is cleared below none
        // of them is left behind. (One handed over because the lock was
        // busy may still arrive; it overtakes nothing it was not
        // concurrent with.)
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        for m in msgs.drain(..) {
            w.handle(m);
        }
        w.commit();
        w.rolling = false;
    }
    if let Err(e) = lock(&writer).close() {
        tracing::error!(error = %e, "final spool sync failed; data appended since the last sync may be lost if the machine crashes");
    }
}

/// Blocks for the next message, running the periodic sync and ack flush
/// when they fall due. None once every sender is gone.
fn next_message(
    writer: &Mutex<Writer>,
    rx: &Receiver<Msg>,
    #[cfg(test)] hooks: &super::tests::TestHooks,
) -> Option<Msg> {
    loop {
        // A paused writer thread takes no lock, timers included: a test can
        // then tell appends written on the caller's thread from those
        // handed to this one.
        #[cfg(test)]
        hooks.wait_while_paused();
        #[cfg(test)]
        if hooks.take_crash() {
            panic!("injected spool writer panic");
        }
        // Checked before every wait, so sustained load cannot starve the
        // periodic sync.
        let deadline = {
            let mut w = lock(writer);
            w.on_timer();
            w.tick_needed = false;
            w.sync_due.map_or(w.acks_due, |d| d.min(w.acks_due))
        };
        #[cfg(test)]
        hooks.sleeps_until(deadline);
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Msg::Tick) => {}
            Ok(m) => return Some(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// A thread that runs `fdatasync` for the writer, so that appends never
/// wait behind one. It takes one job at a time: when the previous sync is
/// still running at the next tick, that tick's sync is simply tried again
/// at the one after.
struct Syncer {
    jobs: Option<SyncSender<(File, PathBuf)>>,
    /// The error of a background sync, for the writer to act on.
    failed: Arc<Mutex<Option<io::Error>>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(shared: Arc<Shared>) -> io::Result<Syncer> {
        // Capacity 0: a job is handed over only when the thread is idle.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<(File, PathBuf)>(0);
        let failed = Arc::new(Mutex::new(None));
        let report = failed.clone();
        let thread = std::thread::Builder::new()
            .name("spool-syncer".into())
            .spawn(move || {
                for (file, path) in rx {
                    let start = Instant::now();
                    #[cfg(test)]
                    shared.hooks.background_sync_starts();
                    match file.sync_data() {
                        Ok(()) => shared.counters.synced(start.elapsed()),
                        Err(e) => {
                            *report.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(io_context(e, "sync", &path));
                        }
                    }
                }
            })?;
        Ok(Syncer {
            jobs: Some(jobs),
            failed,
            thread: Some(thread),
        })
    }

    fn take_failure(&self) -> Option<io::Error> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        cfg: &super::SpoolConfig,
        active: Option<ActiveFile>,
        next_id: u64,
    ) -> Self {
        let shared_for_syncer = shared.clone();
        Self {
            shared,
            fsync: cfg.fsync,
            segment_bytes: cfg.segment_bytes,
            max_bytes: cfg.max_bytes,
            active,
            next_id,
            buf: Vec::new(),
            group: Vec::new(),
            accepted: Vec::new(),
            written: Vec::new(),
            samples: Vec::new(),
            dirty: false,
            sync_due: None,
            acks_due: Instant::now() + ACK_FLUSH_INTERVAL,
            roll_needed: false,
            retired_unsynced: Vec::new(),
            syncer: match cfg.fsync {
                FsyncMode::Interval(_) => match Syncer::start(shared_for_syncer) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // Still correct, only slower: syncs run inline.
                        tracing::warn!(error = %e, "cannot start the spool syncer thread; syncing on the writer thread");
                        None
                    }
                },
                _ => None,
            },
            closed: false,
            tick_needed: false,
            rolling: false,
        }
    }

    /// One message taken from the queue by the thread.
    fn handle(&mut self, m: Msg) {
        if let Msg::Append { bytes, .. } = m {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        match m {
            Msg::Append { reply, .. } if self.closed => {
                let _ = reply.send(Err(SpoolError::Closed));
            }
            Msg::Append {
                records,
                bytes,
                reply,
                ..
            } => {
                self.group.push(Request {
                    records,
                    bytes,
                    reply,
                });
            }
            Msg::Close { reply } => {
                // Appends queued before the close are part of what close
                // waits for.
                self.commit();
                let _ = reply.send(self.close());
            }
            Msg::Tick => {}
        }
    }

    /// Moves the next ack flush, so that a test can tell what else wakes
    /// the writer thread.
    #[cfg(test)]
    pub(crate) fn set_acks_due(&mut self, at: Instant) {
        self.acks_due = at;
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(e) = self.syncer.as_ref().and_then(Syncer::take_failure) {
            Counters::add(&self.shared.counters.io_errors, 1);
            self.roll_needed = true;
            tracing::error!(error = %e, "periodic spool sync failed; recent events may be lost if the machine crashes");
        }
        if self.sync_due.is_some_and(|d| now >= d) {
            self.sync_due = None;
            if let Err(e) = self.periodic_sync() {
                Counters::add(&self.shared.counters.io_errors, 1);
                // After a failed fsync the kernel may have dropped the dirty
                // pages; do not keep appending to a file in unknown state.
                self.roll_needed = true;
                tracing::error!(error = %e, "periodic spool sync failed; recent events may be lost if the machine crashes");
            }
        }
        if now >= self.acks_due {
            self.shared.lock_state().flush_acks(&self.shared.dir);
            self.acks_due = now + ACK_FLUSH_INTERVAL;
        }
    }

    /// Writes the queued group (see module doc) and answers every request.
    fn commit(&mut self) {
        if self.group.is_empty() {
            return;
        }
        let needed: u64 = self.group.iter().map(|r| r.bytes).sum();
        if let Err(e) = self.ensure_segment(needed) {
            self.fail_group(&e);
            return;
        }
        let Some(active) = self.active.as_ref() else {
            self.fail_group(&io::Error::other("no active spool segment"));
            return;
        };
        let (seg_first, base_len) = (active.first_id, active.len);
        let ts = now_ms();
        let (id, full_hit) = self.encode_group(seg_first, base_len, ts);
        if self.accepted.is_empty() {
            return;
        }
        let n = id - self.next_id;
        // Ids are spent whether or not the write succeeds (see module doc).
        self.next_id = id;
        if let Err(e) = self.write_group() {
            self.abandon_write();
            self.fail_accepted(&e);
            return;
        }
        self.publish_group(seg_first, base_len, n, ts, full_hit);
        for reply in self.accepted.drain(..) {
            let _ = reply.send(Ok(()));
        }
        if self.buf.capacity() > BUF_KEEP {
            self.buf.clear();
            self.buf.shrink_to(BUF_KEEP);
        }
    }

    /// Encodes the queued requests into `buf`, from id `next_id` on, while
    /// the spool has room; a request that does not fit is answered Full.
    /// Returns the id after the last record, and whether one was refused.
    fn encode_group(&mut self, seg_first: u64, base_len: u64, ts: u64) -> (u64, bool) {
        let used = self.shared.lock_state().bytes;
        self.buf.clear();
        self.samples.clear();
        self.accepted.clear();
        self.written.clear();
        let mut id = self.next_id;
        let mut full_hit = false;
        for req in self.group.drain(..) {
            // `used` can only shrink meanwhile (acks), so this never admits
            // more than max_bytes.
            if used + self.buf.len() as u64 + req.bytes > self.max_bytes {
                full_hit = true;
                Counters::add(&self.shared.counters.full_rejections, 1);
                // Flag first: a caller that sees Full must also see is_full.
                self.shared.lock_state().refused_at = Some(Instant::now());
                let _ = req.reply.send(Err(SpoolError::Full));
                continue;
            }
            for (i, payload) in req.records.iter().enumerate() {
                let idx = id - seg_first;
                if i == 0 || idx.is_multiple_of(SAMPLE_EVERY) {
                    self.samples.push((idx, base_len + self.buf.len() as u64));
                }
                encode_record(&mut self.buf, id, ts, payload);
                id += 1;
            }
            self.accepted.push(req.reply);
            self.written.extend(req.records);
        }
        (id, full_hit)
    }

    /// After the group's write: its `n` records become visible to the
    /// reader (segment length, samples, bytes) and are counted.
    fn publish_group(&mut self, seg_first: u64, base_len: u64, n: u64, ts: u64, full_hit: bool) {
        let new_len = base_len + self.buf.len() as u64;
        if let Some(a) = self.active.as_mut() {
            a.len = new_len;
            a.count += n;
        }
        {
            let mut st = self.shared.lock_state();
            if let Some(seg) = st.segments.get_mut(&seg_first) {
                seg.extend(n, new_len);
                for &(idx, offset) in &self.samples {
                    seg.note(Sample { idx, ts, offset });
                }
            }
            st.bytes += self.buf.len() as u64;
            // Ids `next_id - n..next_id`, readable from this moment on.
            st.tail.push_group(self.next_id - n, ts, &mut self.written);
            if !full_hit {
                st.refused_at = None;
            }
        }
        self.shared.data_ready.notify_one();
        let c = &self.shared.counters;
        Counters::add(&c.write_groups, 1);
        Counters::add(&c.appends, self.accepted.len() as u64);
        Counters::add(&c.records_appended, n);
    }

    /// One positioned write of the whole group, then the sync its mode asks
    /// for. Positioned, so a failed earlier write never shifts the offset.
    fn write_group(&mut self) -> io::Result<()> {
        let Some(a) = self.active.as_ref() else {
            return Err(io::Error::other("no active spool segment"));
        };
        // The path is formatted only for an error: done every time, it took
        // about 8% of a group's time on a connection thread (perf).
        let failed = |e| io_context(e, "write", &segment_path(&self.shared.dir, a.first_id));
        #[cfg(test)]
        if self.shared.hooks.take_write_failure() {
            // Like a disk filling up mid-write: part of the data lands.
            let _ = a.file.write_all_at(&self.buf[..self.buf.len() / 2], a.len);
            return Err(failed(io::Error::new(
                io::ErrorKind::StorageFull,
                "injected write failure",
            )));
        }
        a.file.write_all_at(&self.buf, a.len).map_err(failed)?;
        match self.fsync {
            FsyncMode::Always => {
                self.dirty = true;
                self.preformat();
                self.sync_active()
            }
            FsyncMode::Interval(d) => {
                self.dirty = true;
                if self.sync_due.is_none() {
                    // An interval too long to represent means "never".
                    self.sync_due = Instant::now().checked_add(d);
                    self.tick_needed = self.sync_due.is_some();
                }
                Ok(())
            }
            FsyncMode::Never => {
                self.dirty = true;
                Ok(())
            }
        }
    }

    /// `Always` mode, after a group's write: zeros ahead of the data (see
    /// [`PREFORMAT_BYTES`]), synced with the group. Never past the
    /// segment's size, where it rolls, nor past `max_bytes` with the data.
    /// Best effort: a disk that cannot take them (full) leaves the appends
    /// as they were.
    fn preformat(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let end = a.len + self.buf.len() as u64;
        let from = a.preformatted_to.max(end);
        let to = (from + PREFORMAT_BYTES).min(self.segment_bytes);
        if from >= end + PREFORMAT_LOW || to <= from {
            return;
        }
        let used = self.shared.lock_state().bytes + self.buf.len() as u64;
        if used + (to - end) > self.max_bytes {
            return;
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if let Err(e) = a.file.write_all_at(&ZEROS[..n], at) {
                tracing::debug!(error = %e, "cannot write zeros ahead of the spool's data; appends go on without");
                // Part of the block may have landed: cut that too later.
                if let Ok(m) = a.file.metadata() {
                    at = at.max(m.len());
                }
                break;
            }
            at += n as u64;
        }
        a.preformatted_to = at;
    }

    /// Cuts the zeros written ahead (see [`PREFORMAT_BYTES`]) off the active
    /// segment: before it is retired, and at close. Best effort and not
    /// synced: recovery cuts them too. (A segment normally rolls once its
    /// data reaches `segment_bytes`, where the zeros stop; this covers the
    /// other rolls.)
    fn cut_preformatted(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.preformatted_to <= a.len {
            return;
        }
        match a.file.set_len(a.len) {
            Ok(()) => a.preformatted_to = a.len,
            Err(e) => {
                tracing::debug!(error = %e, "cannot cut the zeros off a spool segment")
            }
        }
    }

    /// The `Interval` tick: hands the sync to the syncer thread when there is
    /// one and it is idle; inline otherwise.
    fn periodic_sync(&mut self) -> io::Result<()> {
        let (Some(syncer), Some(a)) = (self.syncer.as_ref(), self.active.as_ref()) else {
            return self.sync_active();
        };
        let Some(jobs) = syncer.jobs.as_ref() else {
            return self.sync_active();
        };
        if !self.dirty {
            return Ok(());
        }
        let path = segment_path(&self.shared.dir, a.first_id);
        let file = a
            .file
            .try_clone()
            .map_err(|e| io_context(e, "sync", &path))?;
        match jobs.try_send((file, path)) {
            Ok(()) => {
                self.dirty = false;
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                // The last sync is still running: try again next interval.
                if let FsyncMode::Interval(d) = self.fsync {
                    self.sync_due = Instant::now().checked_add(d);
                }
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => self.sync_active(),
        }
    }

    /// fdatasync of the active segment if it has unsynced writes.
    fn sync_active(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let Some(a) = self.active.as_ref() else {
            self.dirty = false;
            return Ok(());
        };
        // As in `write_group`: the path only for an error. In `Always` mode
        // this runs once per group on the writer thread, whose cycle sets
        // the throughput.
        let failed = |e| io_context(e, "sync", &segment_path(&self.shared.dir, a.first_id));
        #[cfg(test)]
        if self.shared.hooks.take_sync_failure() {
            return Err(failed(io::Error::other("injected sync failure")));
        }
        sync_timed(&a.file, &self.shared.counters).map_err(failed)?;
        self.dirty = false;
        Ok(())
    }

    /// fsync works on the file, not the descriptor, so reopening a retired
    /// segment by name is enough to flush what `Never` mode left unsynced.
    fn sync_retired(&mut self) -> io::Result<()> {
        let mut first_err = None;
        for first_id in std::mem::take(&mut self.retired_unsynced) {
            if !self.shared.lock_state().segments.contains_key(&first_id) {
                continue; // delivered and deleted meanwhile
            }
            let path = segment_path(&self.shared.dir, first_id);
            match File::open(&path).and_then(|f| sync_timed(&f, &self.shared.counters)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(io_context(e, "sync", &path));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Cuts the active file back to its last good length and retires it.
    fn abandon_write(&mut self) {
        Counters::add(&self.shared.counters.io_errors, 1);
        self.roll_needed = true;
        self.shared.lock_state().refused_at = Some(Instant::now());
        let Some(a) = self.active.as_mut() else {
            return;
        };
        #[cfg(test)]
        let truncated = if self.shared.hooks.take_truncate_failure() {
            Err(io::Error::other("injected truncate failure"))
        } else {
            a.file.set_len(a.len)
        };
        #[cfg(not(test))]
        let truncated = a.file.set_len(a.len);
        // Synced: the zeros written ahead made the file's size durable
        // already, so an unsynced cut could lose the cut and bring back
        // the failed group's records (answered 503) after a power loss.
        let truncated = truncated.and_then(|()| a.file.sync_data());
        if truncated.is_ok() {
            a.preformatted_to = a.len;
        }
        if let Err(e) = truncated {
            // Readers stop at the good length, but whole records that did
            // land carry the next ids in sequence: recovery would take them
            // for records and replay events that were answered with an
            // error. Spoil the first one's header instead (an overwrite in
            // place needs no new space), so recovery stops there.
            let spoiled = a
                .file
                .write_all_at(&[0u8; RECORD_HEADER_LEN], a.len)
                .and_then(|()| a.file.sync_data());
            match spoiled {
                Ok(()) => {
                    tracing::warn!(error = %e, "cannot cut spool segment back after a failed write; its leftovers were marked unusable instead")
                }
                Err(e2) => {
                    tracing::error!(error = %e, error_marking = %e2, "cannot cut spool segment back after a failed write, nor mark its leftovers unusable; a restart may deliver events that were answered 503")
                }
            }
        }
    }

    fn fail_group(&mut self, e: &io::Error) {
        Counters::add(&self.shared.counters.io_errors, 1);
        self.shared.lock_state().refused_at = Some(Instant::now());
        for req in self.group.drain(..) {
            let _ = req.reply.send(Err(SpoolError::Io(clone_io(e))));
        }
    }

    fn fail_accepted(&mut self, e: &io::Error) {
        // Answered with an error: never readable, so never in the tail.
        self.written.clear();
        for reply in self.accepted.drain(..) {
            let _ = reply.send(Err(SpoolError::Io(clone_io(e))));
        }
    }

    /// Makes sure there is a segment to write `needed` bytes to, rolling to
    /// a new one when the current one is big enough, suspect, or fully
    /// delivered while the spool is out of room (deleting it is the only way
    /// to get that room back).
    fn ensure_segment(&mut self, needed: u64) -> io::Result<()> {
        if self.must_roll(needed) {
            self.roll()
        } else {
            Ok(())
        }
    }

    /// Whether writing `needed` more bytes starts a new segment first.
    fn must_roll(&self, needed: u64) -> bool {
        match &self.active {
            None => true,
            Some(a) => {
                self.roll_needed
                    || (a.count > 0 && a.len >= self.segment_bytes)
                    || (a.count > 0 && {
                        let st = self.shared.lock_state();
                        st.segments
                            .get(&a.first_id)
                            .is_some_and(SegMeta::fully_acked)
                            && st.bytes + needed > self.max_bytes
                    })
            }
        }
    }

    fn roll(&mut self) -> io::Result<()> {
        let first_id = self.next_id;
        let durable = !matches!(self.fsync, FsyncMode::Never);
        let file = create_segment(&self.shared, first_id, durable)?;
        self.cut_preformatted();
        if durable {
            if let Err(e) = self.sync_active() {
                Counters::add(&self.shared.counters.io_errors, 1);
                tracing::error!(error = %e, "sync of the previous spool segment failed; its recent events may be lost if the machine crashes");
            }
        } else if self.dirty
            && let Some(a) = &self.active
        {
            // Segments delivered and deleted since need no sync at close:
            // forgetting them here keeps the list as short as the spool,
            // where it grew by one id per roll for the life of the process.
            let st = self.shared.lock_state();
            self.retired_unsynced
                .retain(|id| st.segments.contains_key(id));
            drop(st);
            self.retired_unsynced.push(a.first_id);
        }
        self.dirty = false;
        self.sync_due = None;
        self.roll_needed = false;
        self.active = Some(ActiveFile {
            first_id,
            file,
            len: HEADER_LEN,
            count: 0,
            preformatted_to: HEADER_LEN,
        });
        let deletions = {
            let mut st = self.shared.lock_state();
            st.segments
                .insert(first_id, SegMeta::new(first_id, HEADER_LEN, HEADER_LEN));
            st.bytes += HEADER_LEN;
            st.active = Some(first_id);
            st.take_deletable(&self.shared.dir)
        };
        Counters::add(
            &self.shared.counters.segments_deleted,
            deletions.len() as u64,
        );
        deletions.run();
        Ok(())
    }

    /// Syncs whatever is unsynced (every mode), flushes acks and stops
    /// accepting appends.
    fn close(&mut self) -> Result<(), SpoolError> {
        // A background sync may still be running on data it was handed;
        // the final sync here covers everything written, whatever it was.
        if self.syncer.is_some() && self.active.is_some() {
            self.dirty = true;
        }
        // A clean stop leaves each file as long as its data.
        self.cut_preformatted();
        let res = self
            .sync_retired()
            .and(self.sync_active())
            .map_err(SpoolError::Io);
        if res.is_err() {
            Counters::add(&self.shared.counters.io_errors, 1);
        }
        {
            let mut st = self.shared.lock_state();
            st.flush_acks(&self.shared.dir);
            st.closed = true;
        }
        self.closed = true;
        self.shared.data_ready.notify_one();
        res
    }
}

/// Creates `<first_id>.seg` with its header. Unless durability is off, the
/// header and the directory entry are synced too: an fdatasync of the file
/// alone does not make a new file's name survive a power cut.
fn create_segment(shared: &Shared, first_id: u64, durable: bool) -> io::Result<File> {
    let dir = &shared.dir;
    let path = segment_path(dir, first_id);
    let res = (|| {
        // A stale ack file under this name would mark new records delivered.
        remove_if_exists(&acks_path(dir, first_id))?;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        f.write_all_at(&encode_header(first_id), 0)?;
        if durable {
            sync_timed(&f, &shared.counters)?;
            let start = Instant::now();
            File::open(dir)?.sync_all()?;
            shared.counters.dir_synced(start.elapsed());
        }
        Ok(f)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&path);
    }
    res.map_err(|e| io_context(e, "create segment", &path))
}

/// `fdatasync` of a segment file, counted and timed in the spool's counters.
fn sync_timed(file: &File, counters: &Counters) -> io::Result<()> {
    let start = Instant::now();
    file.sync_data()?;
    counters.synced(start.elapsed());
    Ok(())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// io::Error is not Clone; every request of a failed group gets its own
/// copy with the same kind and message.
fn clone_io(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}
