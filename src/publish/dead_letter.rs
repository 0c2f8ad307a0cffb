//! The dead-letter file: one JSON line per record Kafka will never take.
//!
//! A record leaves the spool on the strength of its line here, so the line
//! is synced (and the directory too, when the file is new) before the
//! record is acknowledged. That I/O runs on a thread of its own: on
//! librdkafka's delivery-report thread one slow disk would stall every
//! delivery report behind it. The file has a budget
//! (`kafka.dead_letter_max_bytes`): once it is spent (or while the file
//! cannot be written), dead letters stay in the spool, parked here (with
//! bytes of their own, so no spool read buffer stays pinned) and written
//! once there is room again; they never go back to Kafka. While many are
//! parked the pump reads no fresh records, so a flood of bad records fills
//! the spool (bounded, alerted on, pushing back on callers) rather than
//! memory or the disk under it.
//!
//! A line is one JSON object: `spool_id`, `reason`, `buried_at_ms`, and,
//! when the record decodes, `topic_role`, `callback_command`,
//! `sdk_app_id`, `event_id`, `key` and `value` (as text); always
//! `data_b64`, the record's spool bytes in base64, so that even a record
//! that does not decode survives its acknowledgement.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;

use tokio::sync::mpsc;

use super::InFlight;
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::record::RecordRef;
use crate::spool::Spool;

enum Msg {
    Bury(InFlight, String),
    Stop,
}

/// Where dead letters go and what happens to them next.
pub struct DeadLetterConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    /// Copies for `kafka.dead_letter_topic`, when it is set.
    pub to_topic: Option<mpsc::UnboundedSender<InFlight>>,
}

/// The handle: `bury` never blocks.
pub struct DeadLetters {
    tx: std_mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    parked: Arc<AtomicUsize>,
}

/// How often parked dead letters are tried again.
const PARKED_RETRY: Duration = Duration::from_secs(1);

impl DeadLetters {
    pub fn start(config: DeadLetterConfig) -> io::Result<DeadLetters> {
        let size = match std::fs::metadata(&config.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        config.metrics.dead_letter_bytes.set(size as i64);
        config
            .metrics
            .dead_letter_max_bytes
            .set(config.max_bytes as i64);
        let (tx, rx) = std_mpsc::channel();
        let parked = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            config,
            file: None,
            dir_synced: true,
            size,
            full_logged: false,
            failing: false,
            parked: Vec::new(),
            parked_count: parked.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("timbridge-dead-letter".into())
            .spawn(move || writer.run(rx))?;
        Ok(DeadLetters {
            tx,
            thread: Mutex::new(Some(thread)),
            parked,
        })
    }

    /// Records waiting for room in the dead-letter file.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Hands `inflight` over to be written; it is acknowledged in the spool
    /// once its line is synced.
    pub fn bury(&self, inflight: InFlight, reason: String) {
        // After stop() the record simply stays in the spool.
        let _ = self.tx.send(Msg::Bury(inflight, reason));
    }

    /// Writes what was handed over so far, then ends the thread.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

struct Writer {
    config: DeadLetterConfig,
    file: Option<File>,
    /// False from the file's creation until its directory is synced: a
    /// failed directory sync is tried again with the next line.
    dir_synced: bool,
    size: u64,
    full_logged: bool,
    /// Writing failed last time (said once, until it works again).
    failing: bool,
    /// Refused or unwritten dead letters, in the spool still, tried again
    /// every [`PARKED_RETRY`] and with every new dead letter.
    parked: Vec<(InFlight, String)>,
    parked_count: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
        loop {
            let first = if self.parked.is_empty() {
                rx.recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(PARKED_RETRY)
            };
            let first = match first {
                Ok(msg) => Some(msg),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = std::mem::take(&mut self.parked);
            let mut stop = false;
            for msg in first.into_iter().chain(rx.try_iter()) {
                match msg {
                    Msg::Bury(inflight, reason) => batch.push((inflight, reason)),
                    Msg::Stop => stop = true,
                }
            }
            batch.sort_by_key(|(inflight, _)| inflight.spool_id);
            self.write_batch(batch);
            self.parked_count
                .store(self.parked.len(), Ordering::Relaxed);
            if stop {
                // What is parked stays in the spool for the next start.
                return;
            }
        }
    }

    /// Keeps a dead letter that cannot be written now, in the spool still.
    fn park(&mut self, mut inflight: InFlight, reason: String) {
        inflight.own_bytes();
        self.parked.push((inflight, reason));
    }

    /// One write and one sync for everything that arrived together.
    fn write_batch(&mut self, batch: Vec<(InFlight, String)>) {
        if batch.is_empty() {
            return;
        }
        self.notice_rotation();
        let mut buf = Vec::new();
        let mut taken = Vec::new();
        let mut refused = 0usize;
        for (inflight, reason) in batch {
            let line = line(&inflight, &reason);
            if self.size + (buf.len() + line.len()) as u64 > self.config.max_bytes {
                refused += 1;
                self.park(inflight, reason);
                continue;
            }
            buf.extend_from_slice(&line);
            taken.push((inflight, reason));
        }
        if refused > 0 && !self.full_logged {
            self.full_logged = true;
            tracing::error!(
                file = %self.config.path.display(),
                max_bytes = self.config.max_bytes,
                "the dead-letter file is at kafka.dead_letter_max_bytes: records Kafka refuses for good now stay in the spool; \
                 replay the file's lines and move it away (or raise the budget)"
            );
        }
        if taken.is_empty() {
            return;
        }
        if let Err(e) = self.append(&buf) {
            if !self.failing {
                self.failing = true;
                tracing::error!(error = %e, file = %self.config.path.display(),
                    "cannot write the dead-letter file; keeping the records in the spool and trying again: check the disk and the file's permissions");
            }
            for (inflight, reason) in taken {
                self.park(inflight, reason);
            }
            return;
        }
        self.failing = false;
        self.size += buf.len() as u64;
        self.config.metrics.dead_letter_bytes.set(self.size as i64);
        for (inflight, reason) in taken {
            // Only now that it is safe in the file does it leave the spool.
            self.config.spool.ack(inflight.spool_id);
            self.config.metrics.dead_letter.inc();
            tracing::error!(
                spool_id = inflight.spool_id,
                reason,
                file = %self.config.path.display(),
                "Kafka will never take this record; moved it to the dead-letter file"
            );
            if let Some(to_topic) = &self.config.to_topic {
                let _ = to_topic.send(InFlight {
                    dead_letter_copy: true,
                    alone: false,
                    role: None,
                    ..inflight
                });
            }
        }
    }

    /// An operator may have moved the file away (or truncated it) to make
    /// room: start a new one then.
    fn notice_rotation(&mut self) {
        let on_disk = std::fs::metadata(&self.config.path).map(|m| m.len()).ok();
        if on_disk != Some(self.size) {
            self.file = None;
            self.size = on_disk.unwrap_or(0);
            self.full_logged = false;
            self.config.metrics.dead_letter_bytes.set(self.size as i64);
        }
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let existed = self.config.path.exists();
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.config.path)?,
            );
            self.dir_synced &= existed;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("dead-letter file not open"))?;
        let mut written = file.write_all(buf).and_then(|()| file.sync_data());
        if written.is_ok() && !self.dir_synced {
            // The records leave the spool on the strength of this file:
            // its directory entry must survive a power cut too.
            written = match self.config.path.parent() {
                Some(dir) => File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            };
            self.dir_synced = written.is_ok();
        }
        if let Err(e) = written {
            // Cut a partial line (or lines not yet safe) so the next write
            // starts clean and holds them once.
            let _ = file.set_len(self.size);
            return Err(e);
        }
        Ok(())
    }
}

fn line(inflight: &InFlight, reason: &str) -> Vec<u8> {
    let record = RecordRef::decode(&inflight.data).ok();
    let line = serde_json::json!({
        "spool_id": inflight.spool_id,
        "reason": reason,
        "buried_at_ms": now_ms(),
        "topic_role": record.as_ref().map(|r| r.topic.label()),
        "callback_command": record.as_ref().map(|r| r.command),
        "sdk_app_id": record.as_ref().map(|r| r.sdk_app_id),
        "event_id": record.as_ref().and_then(|r| r.event_id.map(|e| e.as_str().to_owned())),
        "key": record.as_ref().map(|r| String::from_utf8_lossy(r.key).into_owned()),
        "value": record.as_ref().map(|r| String::from_utf8_lossy(r.value).into_owned()),
        "data_b64": base64::engine::general_purpose::STANDARD.encode(&inflight.data),
    });
    let mut text = serde_json::to_vec(&line).unwrap_or_default();
    text.push(b'\n');
    text
}
