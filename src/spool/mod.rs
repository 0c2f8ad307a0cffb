//! Durable on-disk spool between the HTTP answer and Kafka.
//!
//! Once timbridge has answered a callback with OK, Tencent will not send it
//! again, so until Kafka has the event the spool holds the only copy. The
//! spool is therefore an append-only log on local disk that survives process
//! crashes and restarts, and replays whatever Kafka has not confirmed.
//!
//! # Design
//!
//! * **Segments.** The log is a series of files named by the first record id
//!   they hold (`00000000000000000001.seg`). Every record carries a CRC, its
//!   id and its append time (format in `segment.rs`). A new segment starts
//!   once the current one has passed `segment_bytes`; old segments are
//!   deleted as soon as every record in them was delivered, which is how
//!   disk space comes back.
//! * **One writer, group commit.** All appends go through one writer under
//!   one lock (see `writer.rs`). In `Always` mode its thread writes
//!   everything queued since its last write in one system call and covers
//!   it with a single `fdatasync`; in the other modes, where no append
//!   waits for a sync, the caller writes its own records under that lock
//!   (or, when the lock is busy, hands them to the thread). Ids are
//!   assigned there, in the order appends reach the writer.
//! * **Acks.** Delivery confirmations are kept as one bit per record in
//!   memory and appended, buffered, to a sidecar `<first_id>.acks` file per
//!   segment, so a restart does not replay what Kafka already has. Losing
//!   the tail of an ack file (crash) only produces duplicates, which the
//!   at-least-once contract allows, so ack files are never synced.
//! * **Reader.** One consumer reads records back in id order, skipping
//!   records already delivered before a restart. While it is caught up it
//!   takes them from a bounded in-memory tail of the newest writes (the
//!   payloads given to `append`, see `tail.rs`); otherwise, and always
//!   after a restart, it reads them from the files, since a long Kafka
//!   outage may spool gigabytes. It moves from disk to memory by itself
//!   once it reaches the tail's first record.
//! * **Recovery.** At open, every segment is scanned and each record's CRC
//!   checked. A record whose checksum fails while its length and id hold
//!   and a valid record follows it (a flipped bit) is skipped alone, and
//!   counted. Anything else (a torn tail, a broken length, an id out of
//!   sequence) ends that segment's valid data; the last segment is cut
//!   there so appends continue after good data. What was skipped is
//!   reported in [`RecoveryReport`].
//!
//! # What each fsync mode guarantees
//!
//! * [`FsyncMode::Always`]: when `append` returns Ok, the records are on
//!   stable storage. Neither a process crash nor a power cut or kernel panic
//!   loses them. Costs one fdatasync per group of concurrent appends.
//! * [`FsyncMode::Interval`]: when `append` returns Ok, the records are in
//!   the operating system's page cache. A crash of timbridge loses nothing;
//!   a power cut or kernel crash may lose up to the last interval of
//!   appends.
//! * [`FsyncMode::Never`]: like `Interval`, but the kernel decides when data
//!   reaches the disk (typically within about 30 seconds); only `close`
//!   forces it.
//!
//! In every mode, a record whose append returned an error is not in the
//! spool and will never be delivered.

mod reader;
mod recovery;
mod segment;
mod state;
mod tail;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

pub use reader::{SpoolReader, SpooledRecord};
pub use recovery::{DamageAction, DamagedSegment, RecoveryReport};
pub(crate) use recovery::{KeptSegment, RecoveredBytes, SegmentBytes, recover_bytes};
pub use segment::MAX_RECORD_LEN;
pub(crate) use writer::PREFORMAT_BYTES;

use segment::{HEADER_LEN, record_size};
use state::{Counters, State};
use writer::{Msg, SharedWriter, Writer};

/// When appended data is forced to stable storage; see the module doc for
/// what each mode guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Sync before answering: survives power loss. One sync per group.
    Always,
    /// Answer once written to the page cache; sync every interval: survives
    /// process crashes, a power loss may cost up to one interval.
    Interval(Duration),
    /// Answer once written; sync only at close: survives process crashes.
    Never,
}

/// How the spool is laid out and how far it may grow.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory holding the segment files; created if missing, and owned
    /// exclusively by one process at a time.
    pub dir: PathBuf,
    /// Ceiling on the total size of segment files; appends beyond it fail
    /// with [`SpoolError::Full`] so the gateway can push back on callers
    /// instead of filling the disk.
    pub max_bytes: u64,
    /// Durability of appends.
    pub fsync: FsyncMode,
    /// A new segment is started once the current one has passed this size;
    /// smaller segments give disk space back sooner after delivery.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    /// The spool's own invariants; [`Spool::open`] checks them, and so does
    /// the configuration's validation, with the same messages.
    pub fn validate(&self) -> Result<(), SpoolError> {
        if self.max_bytes <= HEADER_LEN {
            return Err(SpoolError::Config(format!(
                "spool.max_bytes must be larger than {HEADER_LEN} bytes"
            )));
        }
        if self.segment_bytes <= HEADER_LEN {
            return Err(SpoolError::Config(format!(
                "spool.segment_bytes must be larger than {HEADER_LEN} bytes"
            )));
        }
        if self.fsync == FsyncMode::Interval(Duration::ZERO) {
            return Err(SpoolError::Config(
                "spool.fsync_interval must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// Everything the spool can fail with; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// Another process (or another `Spool` in this one) owns the directory;
    /// two writers would corrupt each other's segments.
    #[error(
        "spool directory {} is locked by another timbridge process{}; stop it or point spool.dir elsewhere",
        .dir.display(),
        pid_note(.pid)
    )]
    Locked {
        /// The contested directory.
        dir: PathBuf,
        /// Process id recorded by the holder, if readable.
        pid: Option<u32>,
    },
    /// `max_bytes` would be exceeded: Kafka is not keeping up. The caller
    /// should refuse the request so the sender retries later.
    #[error(
        "spool is full (spool.max_bytes reached) because events are not reaching Kafka; refuse the request so it is retried, and check the Kafka connection or raise spool.max_bytes"
    )]
    Full,
    /// Reading or writing the spool files failed (disk full, read-only
    /// file system, I/O error). A failed append left nothing behind, and
    /// later appends are tried again normally.
    #[error(
        "spool I/O error: {0}; check the disk under spool.dir (free space, permissions, read-only mount)"
    )]
    Io(#[source] io::Error),
    /// A single record above [`MAX_RECORD_LEN`]; it can never be stored.
    #[error(
        "record of {len} bytes exceeds the spool's limit of {max} bytes per record; reject the request"
    )]
    RecordTooLarge {
        /// Size of the offending record.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// One append larger than the whole spool (`max_bytes`): it can never
    /// be stored, however much is delivered.
    #[error(
        "append of {bytes} bytes can never fit in the spool's {max_bytes} bytes (spool.max_bytes); reject the request, or raise spool.max_bytes"
    )]
    RequestTooLarge {
        /// Encoded size of the append, with a segment header.
        bytes: u64,
        /// The spool's limit.
        max_bytes: u64,
    },
    /// The disk is not keeping up: appends of `waiting` bytes already
    /// wait for the writer thread (a stalled fdatasync, a roll on a slow
    /// disk). Queueing more would hold them in memory without end, for an
    /// answer the sender stopped waiting for.
    #[error(
        "spool disk is not keeping up: {waiting} bytes of appends already wait for it; refuse the request so it is retried, and check the disk under spool.dir"
    )]
    Behind {
        /// Bytes of appends waiting for the writer thread.
        waiting: u64,
    },
    /// `close` was called: the gateway is shutting down.
    #[error("spool is closed because timbridge is shutting down; the sender should retry later")]
    Closed,
    /// The writer thread is gone (it only stops after every handle is
    /// dropped, so this indicates a bug).
    #[error(
        "spool writer thread stopped unexpectedly; restart timbridge (data already acknowledged is on disk)"
    )]
    WriterStopped,
    /// The configuration cannot work.
    #[error("invalid spool configuration: {0}")]
    Config(String),
    /// A segment written by a newer timbridge: refusing is safer than
    /// guessing at its format or discarding it.
    #[error(
        "spool segment {} has format version {version}, written by a newer timbridge; run that version until the spool drains, or move the file aside",
        .file.display()
    )]
    UnsupportedFormat {
        /// The segment file.
        file: PathBuf,
        /// Version found in its header.
        version: u32,
    },
}

fn pid_note(pid: &Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// Adds the operation and file to an I/O error, keeping its kind so
/// callers can still tell "disk full" from "read-only".
pub(crate) fn io_context(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

/// Counters since open, for metrics. All zero in [`stat_dir`] results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolCounters {
    /// Successful append calls.
    pub appends: u64,
    /// Records appended by them.
    pub records_appended: u64,
    /// Writes to segment files; appends per group shows group commit at work.
    pub write_groups: u64,
    /// fdatasync calls on segment files (including new-segment headers).
    pub syncs: u64,
    /// How long those calls took.
    pub sync_durations: SyncDurations,
    /// How long the directory fsyncs below took.
    pub dir_sync_durations: SyncDurations,
    /// fsyncs of the directory, made when a segment is created.
    pub dir_syncs: u64,
    /// Appends refused with [`SpoolError::Full`].
    pub full_rejections: u64,
    /// Appends refused with [`SpoolError::Behind`].
    pub behind_rejections: u64,
    /// Failed writes or syncs.
    pub io_errors: u64,
    /// Distinct records acked.
    pub records_acked: u64,
    /// Segment files deleted after full delivery.
    pub segments_deleted: u64,
    /// Records skipped as unreadable: single corrupt records found by
    /// recovery at open, and records corrupted on disk while running. Each
    /// is logged; none is delivered.
    pub records_lost: u64,
    /// Reads of segment files that failed for a reason other than damage
    /// (no file descriptor left, an I/O error) and were tried again after
    /// a pause; nothing was skipped.
    pub read_retries: u64,
    /// Records the reader returned from the segment files: replay after a
    /// restart, and a backlog (Kafka away, or slower than the callbacks).
    pub records_read_disk: u64,
    /// Records the reader returned from the in-memory tail of the newest
    /// writes, while it was caught up.
    pub records_read_memory: u64,
}

/// Upper bounds, in seconds, of the buckets [`SyncDurations`] counts in:
/// from an NVMe drive's tens of microseconds to a disk stalled for half a
/// minute. With `fsync = always` every callback waits for one of these
/// syncs, so its answer time can be no better than this histogram.
pub const SYNC_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// A histogram of sync durations: how many took at most each of
/// [`SYNC_BUCKETS`] (not cumulative; the last count is those above the
/// last bound), and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncDurations {
    pub counts: [u64; SYNC_BUCKETS.len() + 1],
    pub sum_nanos: u64,
}

/// A snapshot of the spool for metrics, health checks and `spool stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records not yet delivered to Kafka.
    pub pending_events: u64,
    /// Total size of segment files on disk (what `max_bytes` limits).
    pub bytes: u64,
    /// Age of the oldest undelivered record (within about a second); the
    /// best single signal that Kafka delivery is stuck.
    pub oldest_pending_age: Option<Duration>,
    /// Number of segment files.
    pub segments: u64,
    /// Activity counters (zero for [`stat_dir`]).
    pub counters: SpoolCounters,
    /// Bytes of appends waiting in memory for the writer thread (zero for
    /// [`stat_dir`]); near `writer::MAX_QUEUED`, the disk is not keeping up.
    pub queued_bytes: u64,
}

/// State shared by the handle, the writer thread and the reader.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Wakes the reader when records become readable or the spool closes.
    pub(crate) data_ready: Notify,
    pub(crate) counters: Counters,
    closing: AtomicBool,
    /// Bytes of appends queued for the writer thread and not yet taken by
    /// it (see `writer::MAX_QUEUED`).
    pub(crate) queued_bytes: AtomicU64,
    /// When an append was last refused with [`SpoolError::Behind`]. Not in
    /// `state`, whose lock is held while ack files are written: a refusal
    /// must not wait for the disk it is refused for.
    pub(crate) behind_at: Mutex<Option<Instant>>,
    /// The writer thread has ended while the spool is in use (a panic): no
    /// append can succeed until a restart.
    pub(crate) writer_gone: AtomicBool,
    /// Holds the directory lock for as long as anything uses the spool.
    _lock: File,
    #[cfg(test)]
    pub(crate) hooks: tests::TestHooks,
}

impl Shared {
    /// The lock is only held for bookkeeping, never across I/O that can
    /// block for long. A poisoned lock still holds consistent counts (no
    /// code panics midway through an update), so it is used as is.
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle for appending and acking; cheap to clone and share across tasks.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: SharedWriter,
    /// Appends are written on the caller's thread (see `writer.rs`).
    inline: bool,
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    /// Waits for the writer to finish its final sync, so that once the last
    /// handle is gone the data is on disk and the directory can be reopened.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("spool writer thread panicked");
        }
    }
}

impl Spool {
    /// Opens (creating if needed) the spool directory, takes an exclusive
    /// lock on it so that no second gateway writes the same files, recovers
    /// every segment, and starts the writer thread. The report says what was
    /// recovered and what damaged data was skipped, for the caller to log.
    /// The lock is held until every `Spool` clone and the reader are dropped.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, SpoolReader, RecoveryReport), SpoolError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| SpoolError::Io(io_context(e, "create spool directory", &cfg.dir)))?;
        let lock = lock_dir(&cfg.dir)?;
        let recovered = recovery::recover(&cfg.dir)?;
        let shared = Arc::new(Shared {
            dir: cfg.dir.clone(),
            max_bytes: cfg.max_bytes,
            state: Mutex::new(recovered.state),
            data_ready: Notify::new(),
            // Records recovery had to skip are the first ones lost.
            counters: Counters::starting_lost(recovered.report.records_skipped),
            closing: AtomicBool::new(false),
            queued_bytes: AtomicU64::new(0),
            behind_at: Mutex::new(None),
            writer_gone: AtomicBool::new(false),
            _lock: lock,
            #[cfg(test)]
            hooks: tests::TestHooks::default(),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Arc::new(Mutex::new(Writer::new(
            shared.clone(),
            &cfg,
            recovered.active,
            recovered.next_id,
        )));
        let for_thread = writer.clone();
        let fsync = cfg.fsync;
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                if !writer::writes_inline(fsync) {
                    writer::yield_to_callers();
                }
                writer::run(for_thread, rx)
            })
            .map_err(|e| SpoolError::Io(io_context(e, "start writer thread for", &cfg.dir)))?;
        let reader = SpoolReader::new(shared.clone(), recovered.reader_start);
        let spool = Spool {
            inner: Arc::new(Inner {
                shared,
                writer,
                inline: writer::writes_inline(cfg.fsync),
                tx: Some(tx),
                thread: Some(thread),
            }),
        };
        Ok((spool, reader, recovered.report))
    }

    /// Appends one request's records atomically, as consecutive ids, and
    /// resolves once they are in the file as the fsync mode promises.
    ///
    /// The request is queued when this is *called*, not when the future is
    /// first polled: one caller's appends, each awaited before the next, get
    /// ids in call order (in `Always` mode all appends do), and dropping the
    /// future does not cancel the append. In the other modes an append that
    /// found the writer busy is handed to its thread, and one called after
    /// it may be written first. Errors: [`SpoolError::Full`] when `max_bytes` would
    /// be exceeded, [`SpoolError::Io`] when the write failed (nothing of the
    /// batch stays visible and later appends are tried normally),
    /// [`SpoolError::RecordTooLarge`], [`SpoolError::RequestTooLarge`] (the
    /// batch exceeds `max_bytes` itself; nothing else changes),
    /// [`SpoolError::Behind`] (appends already waiting for a stalled disk
    /// fill `writer::MAX_QUEUED`), [`SpoolError::Closed`].
    pub fn append(
        &self,
        records: Vec<Bytes>,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + use<> {
        let queued = self.enqueue(records);
        async move { queued?.finish().await }
    }

    fn enqueue(&self, records: Vec<Bytes>) -> Result<Queued, SpoolError> {
        if records.is_empty() {
            return Ok(Queued::Done);
        }
        if let Some(r) = records.iter().find(|r| r.len() > MAX_RECORD_LEN) {
            return Err(SpoolError::RecordTooLarge {
                len: r.len(),
                max: MAX_RECORD_LEN,
            });
        }
        if self.inner.shared.closing.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let bytes: u64 = records.iter().map(|r| record_size(r.len())).sum();
        // Even an empty spool needs a fresh segment's header besides.
        if bytes.saturating_add(HEADER_LEN) > self.inner.shared.max_bytes {
            return Err(SpoolError::RequestTooLarge {
                bytes: bytes.saturating_add(HEADER_LEN),
                max_bytes: self.inner.shared.max_bytes,
            });
        }
        let tx = self.inner.tx.as_ref().ok_or(SpoolError::WriterStopped)?;
        if self.inner.inline {
            return writer::append_now(&self.inner.writer, &self.inner.shared, tx, records, bytes);
        }
        writer::queue_bounded(&self.inner.shared, tx, records, bytes)
    }

    /// Records that `id` was positively delivered to Kafka, so it is never
    /// replayed, and deletes its segment once everything in it is delivered.
    /// Unknown or repeated ids are ignored (Kafka may confirm twice).
    pub fn ack(&self, id: u64) {
        let shared = &self.inner.shared;
        let deletions = {
            let mut st = shared.lock_state();
            if !st.ack(&shared.dir, id) {
                return;
            }
            Counters::add(&shared.counters.records_acked, 1);
            if !st.segment_of(id).is_some_and(state::SegMeta::fully_acked) {
                return;
            }
            // Room has returned even when this is the active segment: the
            // next append that needs the room rolls over and deletes it.
            st.refused_at = None;
            st.take_deletable(&shared.dir)
        };
        if !deletions.is_empty() {
            Counters::add(&shared.counters.segments_deleted, deletions.len() as u64);
            deletions.run();
        }
    }

    /// Writes buffered acks to their files, unsynced: the page cache
    /// survives a crash of the process, so a restart then replays only
    /// records whose delivery reports had not been handled yet. Called by
    /// the publisher after each round of delivery reports.
    pub fn flush_acks(&self) {
        let shared = &self.inner.shared;
        shared.lock_state().flush_acks(&shared.dir);
    }

    /// Current figures for metrics and health checks; never blocks on I/O.
    pub fn stats(&self) -> SpoolStats {
        let shared = &self.inner.shared;
        let queued = shared.queued_bytes.load(Ordering::Relaxed);
        shared
            .lock_state()
            .stats(shared.counters.snapshot(), queued)
    }

    /// True while the gateway should not be sent new work, judged from the
    /// spool's actual room: the space not taken by undelivered data is below
    /// [`room_margin`] of `max_bytes`, or an append failed (Full or I/O)
    /// within the last [`REFUSAL_HOLD`], or was refused because the disk
    /// is not keeping up ([`Spool::is_behind`]), or the writer thread has
    /// stopped ([`Spool::writer_stopped`], for good). Turns false by itself: when
    /// deliveries free room, when a write succeeds, and in any case
    /// `REFUSAL_HOLD` after the last failure, so that neither a one-off disk
    /// error nor one oversized request can hold a drained spool unready.
    /// A request larger than the whole spool is refused before it reaches
    /// the writer ([`SpoolError::RequestTooLarge`]) and changes nothing here.
    pub fn is_full(&self) -> bool {
        let shared = &self.inner.shared;
        let st = shared.lock_state();
        let used = st.bytes.saturating_sub(st.reclaimable_bytes());
        let room = shared.max_bytes.saturating_sub(used);
        room < room_margin(shared.max_bytes)
            || st.refused_at.is_some_and(|at| at.elapsed() < REFUSAL_HOLD)
            || self.is_behind()
            || self.writer_stopped()
    }

    /// True once the writer thread has ended under a running gateway (it
    /// panicked: a bug). Every append fails with
    /// [`SpoolError::WriterStopped`] from then on; only a restart helps.
    pub fn writer_stopped(&self) -> bool {
        self.inner.shared.writer_gone.load(Ordering::Relaxed)
    }

    /// True for [`REFUSAL_HOLD`] after an append was refused because the
    /// disk was not keeping up ([`SpoolError::Behind`]). Only time clears
    /// it: on a disk that stalls now and then, one write getting through
    /// does not make the gateway ready.
    pub fn is_behind(&self) -> bool {
        let at = *self
            .inner
            .shared
            .behind_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        at.is_some_and(|at| at.elapsed() < REFUSAL_HOLD)
    }

    /// Shutdown: refuses new appends, waits for the writer to finish the
    /// ones already queued, and syncs everything whatever the fsync mode.
    /// Acks keep being accepted (and are flushed when the last handle
    /// drops). The reader returns None once it has returned everything.
    pub async fn close(&self) -> Result<(), SpoolError> {
        self.inner.shared.closing.store(true, Ordering::Release);
        let (reply, rx) = oneshot::channel();
        let tx = self.inner.tx.as_ref().ok_or(SpoolError::WriterStopped)?;
        tx.send(Msg::Close { reply })
            .map_err(|_| SpoolError::WriterStopped)?;
        rx.await.unwrap_or(Err(SpoolError::WriterStopped))
    }
}

/// Where an append stands once its call returns.
pub(crate) enum Queued {
    /// Written (or nothing to write).
    Done,
    /// Queued for the writer thread, which answers here.
    Waiting(oneshot::Receiver<Result<(), SpoolError>>),
}

impl Queued {
    /// The append's outcome, once the writer has it.
    async fn finish(self) -> Result<(), SpoolError> {
        match self {
            Queued::Done => Ok(()),
            Queued::Waiting(rx) => rx.await.unwrap_or(Err(SpoolError::WriterStopped)),
        }
    }
}

/// How long a failed append (Full or I/O error) keeps the spool reported
/// full: long enough for a load balancer's probe to see it, short enough
/// that readiness comes back by itself when nothing else changes.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(2);

/// Room below which the spool counts as full: 1/64 of `max_bytes`, at most
/// 1 MiB (a callback's largest body), so that a spool that can no longer
/// take a typical request is not reported ready.
pub fn room_margin(max_bytes: u64) -> u64 {
    (max_bytes / 64).min(1 << 20)
}

/// Offline statistics of a spool directory, for `timbridge spool stat` on a
/// stopped gateway. Reads the files without taking the lock and without
/// modifying anything, so it is safe next to a running gateway too (the
/// figures are then a few buffered acks behind).
pub fn stat_dir(dir: &Path) -> Result<SpoolStats, SpoolError> {
    recovery::stat_dir(dir)
}

/// Takes the exclusive lock on `dir/LOCK` (released by the OS when the
/// process dies, so a crash never leaves a stale lock).
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("LOCK");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| SpoolError::Io(io_context(e, "open lock file", &path)))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
                pid: holder.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => {
            return Err(SpoolError::Io(io_context(e, "lock", &path)));
        }
    }
    // Only to make the error above more helpful; the lock is what matters.
    let pid = format!("{}\n", std::process::id());
    let _ = f
        .set_len(0)
        .and_then(|()| f.write_all_at(pid.as_bytes(), 0));
    Ok(f)
}
