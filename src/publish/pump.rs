//! The pump: records from the spool, the retry channel and the dead-letter
//! copies into the producer, and a new producer when the old one fails for
//! good.
//!
//! Every record without a positive delivery report is in exactly one of
//! three places: with librdkafka, in the retry channel, or with the
//! dead-letter thread. A fatally failed producer hands everything it holds
//! back through its delivery reports when it is dropped (librdkafka purges
//! its queues), so rebuilding it needs no bookkeeping of its own: the
//! records come back through the retry channel and are sent again in spool
//! order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::sync::{mpsc, watch};

use super::classify::{Action, classify};
use super::config::{Topics, producer_config};
use super::delivery::{DeliveryContext, Generation};
use super::headers::headers;
use super::{InFlight, MAX_IN_FLIGHT, Shared};
use crate::config::KafkaConfig;
use crate::record::RecordRef;
use crate::spool::{Spool, SpoolReader};

/// The first pause before failed records are sent again; it doubles, up to
/// [`MAX_RETRY_PAUSE`], while nothing at all gets delivered.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// The same for building a new producer after a fatal error: a cause that
/// persists (a missing IdempotentWrite ACL) must not spin.
const REBUILD_PAUSE: Duration = Duration::from_millis(500);
const MAX_REBUILD_PAUSE: Duration = Duration::from_secs(30);

/// How long one poll of librdkafka's events lasts while delivery reports
/// flow: their acks are written out after each, so a SIGKILL replays at
/// most about this much already-delivered traffic (as duplicates).
const BUSY_POLL: Duration = Duration::from_millis(1);
/// The same while nothing is reported, to stay quiet when idle.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// A producer, the thread that polls its events (delivery reports, errors,
/// statistics), and the bookkeeping of its life.
pub struct Live {
    pub producer: Arc<BaseProducer<DeliveryContext>>,
    pub generation: Arc<Generation>,
    poller: Option<JoinHandle<()>>,
}

impl Live {
    pub fn build(
        kafka: &KafkaConfig,
        brokers: &str,
        shared: &Arc<Shared>,
    ) -> Result<Live, KafkaError> {
        let generation = Generation::new(MAX_IN_FLIGHT);
        let context = DeliveryContext {
            shared: shared.clone(),
            generation: generation.clone(),
        };
        let producer: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(producer_config(kafka, brokers).create_with_context(context)?);
        let poller = std::thread::Builder::new()
            .name("timbridge-kafka".into())
            .spawn({
                let (producer, generation) = (producer.clone(), generation.clone());
                let spool = shared.spool.clone();
                move || poll(&producer, &generation, &spool)
            })
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the Kafka polling thread");
                KafkaError::ClientCreation(e.to_string())
            })?;
        Ok(Live {
            producer,
            generation,
            poller: Some(poller),
        })
    }
}

/// rdkafka's `ThreadedProducer` polls in much the same way, but offers no
/// moment between two rounds of delivery reports. That is when acks the
/// spool buffered (it does so only while a backlog drains fast, see
/// `Spool::flush_acks`) are written out, so that they survive a crash of the
/// process without a system call per ack.
fn poll(producer: &BaseProducer<DeliveryContext>, generation: &Generation, spool: &Spool) {
    // Short polls from the first report until a quiet spell of IDLE_POLL.
    let mut quiet = IDLE_POLL;
    while !generation.stop_polling.load(Ordering::Relaxed) {
        let before = generation.reports.load(Ordering::Relaxed);
        let round = if quiet < IDLE_POLL {
            BUSY_POLL
        } else {
            IDLE_POLL
        };
        producer.poll(round);
        if generation.reports.load(Ordering::Relaxed) != before {
            spool.flush_acks();
            quiet = Duration::ZERO;
        } else {
            quiet += round;
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.generation.stop_polling.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        // The producer goes with the last reference: librdkafka purges its
        // queues and the records come back as failed delivery reports.
    }
}

/// A pause that doubles while no record is delivered, and starts over once
/// one is.
struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
    delivered: u64,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            next: base,
            delivered: 0,
        }
    }

    fn next(&mut self, delivered: u64) -> Duration {
        if delivered != self.delivered {
            self.delivered = delivered;
            self.next = self.base;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

enum Next {
    Send(InFlight),
    Retry(InFlight),
    Rebuild,
}

pub struct Pump {
    pub kafka: KafkaConfig,
    pub brokers: String,
    pub shared: Arc<Shared>,
    pub topics: Topics,
    pub live: Live,
    pub retry_rx: mpsc::UnboundedReceiver<InFlight>,
    /// Copies of dead letters bound for `kafka.dead_letter_topic`.
    pub copies_rx: mpsc::UnboundedReceiver<InFlight>,
    pub stop: watch::Receiver<bool>,
}

impl Pump {
    /// Runs until told to stop; returns the producer of the moment, for a
    /// last flush.
    pub async fn run(mut self, mut reader: SpoolReader) -> Live {
        // The spool reader runs in a task of its own feeding a small
        // channel: receiving from a channel is cancel-safe inside select!,
        // so no record can be dropped between the spool and the producer.
        let (fresh_tx, mut fresh_rx) = mpsc::channel::<InFlight>(1024);
        // Small batches: a batch's records share one read buffer, which
        // stays in memory until the last of them is delivered.
        let reader_task = tokio::spawn(async move {
            while let Some(batch) = reader.next_batch(256, 128 << 10).await {
                for r in batch {
                    let item = InFlight {
                        spool_id: r.id,
                        appended_ms: r.append_time_ms,
                        data: r.payload,
                        dead_letter_copy: false,
                    };
                    if fresh_tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut retry_pause = Backoff::new(RETRY_PAUSE, MAX_RETRY_PAUSE);
        let mut rebuild_pause = Backoff::new(REBUILD_PAUSE, MAX_REBUILD_PAUSE);
        loop {
            if *self.stop.borrow() {
                break;
            }
            let mut fatal = self.live.generation.fatal.subscribe();
            let next = tokio::select! {
                biased;
                _ = self.stop.changed() => break,
                _ = fatal.wait_for(|f| *f) => Next::Rebuild,
                Some(first) = self.retry_rx.recv() => Next::Retry(first),
                Some(copy) = self.copies_rx.recv() => Next::Send(copy),
                Some(fresh) = fresh_rx.recv() => Next::Send(fresh),
                else => break,
            };
            let carry_on = match next {
                Next::Send(item) => self.send(item).await,
                Next::Retry(first) => {
                    let pause = retry_pause.next(self.delivered());
                    self.retry_round(first, pause).await
                }
                Next::Rebuild => {
                    let pause = &mut rebuild_pause;
                    self.rebuild(pause).await
                }
            };
            if !carry_on {
                break;
            }
        }
        reader_task.abort();
        self.live
    }

    fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Relaxed)
    }

    /// Waits `pause` (the broker is likely away), then sends the whole
    /// failed group again in spool order. False when told to stop.
    async fn retry_round(&mut self, first: InFlight, pause: Duration) -> bool {
        let mut group = BTreeMap::new();
        group.insert(first.spool_id, first);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = self.stop.changed() => return false,
        }
        while let Ok(more) = self.retry_rx.try_recv() {
            group.insert(more.spool_id, more);
        }
        for item in group.into_values() {
            if !self.send(item).await {
                return false;
            }
        }
        true
    }

    /// Replaces a fatally failed producer, pausing with backoff before each
    /// attempt. False when told to stop meanwhile.
    async fn rebuild(&mut self, pause: &mut Backoff) -> bool {
        let (code, reason) = self
            .live
            .producer
            .client()
            .fatal_error()
            .unwrap_or((RDKafkaErrorCode::Fatal, "no reason given".into()));
        self.shared.metrics.kafka_producer_restarts.inc();
        tracing::error!(
            error = %code,
            reason,
            "the Kafka producer failed for good; building a new one, which sends again every record without a delivery report"
        );
        loop {
            let wait = pause.next(self.delivered());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.changed() => return false,
            }
            match Live::build(&self.kafka, &self.brokers, &self.shared) {
                Ok(new) => {
                    let old = std::mem::replace(&mut self.live, new);
                    // Dropping it joins its thread and purges its queues:
                    // the records it held come back as failed deliveries.
                    let _ = tokio::task::spawn_blocking(move || drop(old)).await;
                    tracing::info!("a new Kafka producer is running");
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?pause.next, "cannot build a new Kafka producer; trying again")
                }
            }
        }
    }

    /// Hands one record to librdkafka; false when told to stop meanwhile.
    async fn send(&mut self, item: InFlight) -> bool {
        let data = item.data.clone();
        let record = match RecordRef::decode(&data) {
            Ok(r) => r,
            Err(e) if item.dead_letter_copy => {
                // Already in the dead-letter file, and it cannot be sent.
                tracing::warn!(error = %e, "cannot copy an unreadable record to the dead-letter topic; it is in the dead-letter file");
                return true;
            }
            Err(e) => {
                self.shared.dead_letters.bury(item, e.to_string());
                return true;
            }
        };
        let topic = if item.dead_letter_copy {
            self.topics.dead_letter.as_deref()
        } else {
            self.topics.name(record.topic)
        };
        let Some(topic) = topic else {
            // A raw record spooled while raw_topic was set, replayed after
            // it was removed from the config.
            self.shared
                .dead_letters
                .bury(item, "kafka.raw_topic is no longer configured".into());
            return true;
        };
        // Bound what librdkafka holds; the permit returns with the report.
        let generation = self.live.generation.clone();
        let mut fatal = generation.fatal.subscribe();
        tokio::select! {
            p = generation.permits.acquire() => match p {
                Ok(p) => p.forget(),
                Err(_) => return false,
            },
            // Its reports may never come: leave the record to the next one.
            _ = fatal.wait_for(|f| *f) => {
                let _ = self.shared.retry.send(item);
                return true;
            }
            _ = self.stop.changed() => return false,
        }
        let mut base = BaseRecord::with_opaque_to(topic, Box::new(item))
            .key(record.key)
            .payload(record.value)
            .headers(headers(&record));
        loop {
            let (e, back) = match self.live.producer.send(base) {
                Ok(()) => return true,
                Err(failed) => failed,
            };
            let action = classify(&e);
            if action == Action::Wait {
                // librdkafka's own queue is full (it bounds bytes too):
                // give its thread a moment to drain.
                base = back;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => continue,
                    _ = self.stop.changed() => {
                        generation.permits.add_permits(1);
                        return false;
                    }
                }
            }
            generation.permits.add_permits(1);
            let item = *back.delivery_opaque;
            self.shared
                .metrics
                .kafka_errors
                .with_label_values(&[action.reason()])
                .inc();
            if action == Action::Rebuild {
                self.live.producer.context().mark_fatal();
            }
            if item.dead_letter_copy {
                tracing::warn!(error = %e, "could not write a dead letter to Kafka; it is in the dead-letter file");
            } else if let Action::DeadLetter(_) = action {
                self.shared.dead_letters.bury(item, e.to_string());
            } else {
                let _ = self.shared.retry.send(item);
            }
            return true;
        }
    }
}
