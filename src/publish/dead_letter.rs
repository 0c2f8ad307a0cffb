//! The dead-letter file: one JSON line per record Kafka will never take.
//!
//! A record leaves the spool on the strength of its line here, so the line
//! is synced (and the directory too, when the file is new) before the
//! record is acknowledged. That I/O runs on a thread of its own: on
//! librdkafka's delivery-report thread one slow disk would stall every
//! delivery report behind it. The file has a budget
//! (`kafka.dead_letter_max_bytes`): once it is spent, dead letters stay in
//! the spool and are tried again, so a flood of bad records fills the
//! spool (bounded, alerted on, pushing back on callers) rather than the
//! disk under it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::InFlight;
use crate::intake::now_ms;
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
    /// Refused (budget spent) or unwritable records go back here.
    pub retry: mpsc::UnboundedSender<InFlight>,
    /// Copies for `kafka.dead_letter_topic`, when it is set.
    pub to_topic: Option<mpsc::UnboundedSender<InFlight>>,
}

/// The handle: `bury` never blocks.
pub struct DeadLetters {
    tx: std_mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

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
        let writer = Writer {
            config,
            file: None,
            size,
            full_logged: false,
        };
        let thread = std::thread::Builder::new()
            .name("timbridge-dead-letter".into())
            .spawn(move || writer.run(rx))?;
        Ok(DeadLetters {
            tx,
            thread: Mutex::new(Some(thread)),
        })
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
    size: u64,
    full_logged: bool,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            let mut stop = false;
            for msg in std::iter::once(first).chain(rx.try_iter()) {
                match msg {
                    Msg::Bury(inflight, reason) => batch.push((inflight, reason)),
                    Msg::Stop => stop = true,
                }
            }
            self.write_batch(batch);
            if stop {
                return;
            }
        }
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
                let _ = self.config.retry.send(inflight);
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
            tracing::error!(error = %e, file = %self.config.path.display(),
                "cannot write the dead-letter file; keeping the records in the spool and trying again");
            for (inflight, _) in taken {
                let _ = self.config.retry.send(inflight);
            }
            return;
        }
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
        let created = if self.file.is_none() {
            let existed = self.config.path.exists();
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.config.path)?,
            );
            !existed
        } else {
            false
        };
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("dead-letter file not open"))?;
        if let Err(e) = file.write_all(buf).and_then(|()| file.sync_data()) {
            // Cut a partial line so the next one starts clean.
            let _ = file.set_len(self.size);
            return Err(e);
        }
        if created {
            // The records leave the spool on the strength of this file:
            // its directory entry must survive a power cut too.
            if let Some(dir) = self.config.path.parent() {
                File::open(dir)?.sync_all()?;
            }
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
    });
    let mut text = serde_json::to_vec(&line).unwrap_or_default();
    text.push(b'\n');
    text
}
