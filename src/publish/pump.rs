//! The pump: records from the spool, the retry channel and the dead-letter
//! copies into the producer, and a new producer when the old one fails for
//! good.
//!
//! Every record without a positive delivery report is in exactly one of
//! four places: with librdkafka, in the retry channel, waiting in the
//! pump's delay queue for its next attempt, or with the dead-letter thread.
//! A fatally failed producer hands everything it holds back through its
//! delivery reports when it is dropped (it is purged, and polled until the
//! reports are all handled), so rebuilding it needs no bookkeeping of its
//! own: the records come back through the retry channel and are sent
//! again.
//!
//! Each failed record waits on its own clock: a few records that keep
//! failing do not delay fresh records. While the delay queue (or the
//! dead-letter thread's parked records) holds [`MAX_IN_FLIGHT`] records, no
//! fresh ones are read: during an outage the backlog waits on disk, not in
//! memory. That hold, like the permits for records with librdkafka, is
//! shared by every topic: a fault that fails every record of one topic (an
//! ACL missing on it alone) fills it within seconds and stops the others
//! too until it is fixed. Nothing is lost; the README says what shows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, PurgeConfig};
use tokio::sync::{TryAcquireError, mpsc, watch};
use tokio::time::Instant;

use super::classify::{Action, classify};
use super::config::{Topics, implicit_acks_possible, producer_config};
use super::delivery::{DeliveryContext, Generation};
use super::headers::headers;
use super::{InFlight, MAX_IN_FLIGHT, Shared};
use crate::config::KafkaConfig;
use crate::record::RecordRef;
use crate::spool::{Spool, SpoolReader};

/// The first pause before a failed record is sent again; it doubles with
/// each of its failed attempts, up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(500);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// The same for building a new producer after a fatal error: a cause that
/// persists (a missing IdempotentWrite ACL) must not spin.
const REBUILD_PAUSE: Duration = Duration::from_millis(500);
const MAX_REBUILD_PAUSE: Duration = Duration::from_secs(30);

/// Fresh records travel from the spool reader to the pump in batches of at
/// most this many, and at most this many batches wait between them.
const FRESH_BATCH: usize = 256;
const FRESH_BATCHES: usize = 4;
/// Once the spool reader has caught up, it lets fresh records gather this
/// long before it hands them over. Without it, each append at full load
/// woke the reader and the pump (and often the other runtime thread) for a
/// record or two; with it they wake about once per millisecond, and under
/// wrk the gateway answered 9% more callbacks with 11% less CPU per
/// callback. Records wait 1-2 ms more on their way to Kafka (tokio's timer
/// rounds up to its next millisecond), beside librdkafka's own 5 ms
/// linger; answers do not wait at all.
const GATHER: Duration = Duration::from_millis(1);

/// How long one call to librdkafka's poll lasts. rdkafka's
/// `BaseProducer::poll` keeps polling until its deadline and waits on the
/// queue for the time left in whole milliseconds, so the last millisecond of
/// every call is a busy spin: a 1 ms poll (tried, to write acks sooner) spun
/// a whole core under load and doubled the CPU per callback. 100 ms, as
/// rdkafka's own `ThreadedProducer`, spins about 1 % of the time. Acks do
/// not wait for it: below 20,000/s they are written as they come, above it
/// within half a millisecond (see `Spool::flush_acks`).
const POLL: Duration = Duration::from_millis(100);
/// How long a retired producer is polled for the reports of the records it
/// purged. librdkafka's own drop polls only 500 ms, and a report it drops
/// leaves its record neither sent again nor acknowledged until a restart.
const RETIRE_REPORTS: Duration = Duration::from_secs(10);

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
        let config = producer_config(kafka, brokers);
        let context = DeliveryContext {
            shared: shared.clone(),
            generation: generation.clone(),
            watch_implicit_acks: implicit_acks_possible(&config),
        };
        let producer: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(config.create_with_context(context)?);
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
    while !generation.stop_polling.load(Ordering::Relaxed) {
        let before = generation.reports.load(Ordering::Relaxed);
        producer.poll(POLL);
        if generation.reports.load(Ordering::Relaxed) != before {
            spool.flush_acks();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.generation.stop_polling.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        // Every record this producer holds comes back as a failed delivery
        // report, handled here (and sent again by the pump, or left in the
        // spool at shutdown) before the producer goes.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let deadline = std::time::Instant::now() + RETIRE_REPORTS;
        while self.producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(50));
        }
        let left = self.producer.in_flight_count();
        if left > 0 {
            tracing::warn!(
                left,
                "a retired Kafka producer still holds records after {RETIRE_REPORTS:?}; they stay in the spool and go out after the next restart"
            );
        }
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
    /// Fresh records from the spool, in order.
    SendFresh(Vec<InFlight>),
    Failed(InFlight),
    Due,
    /// Nothing to do but look again whether fresh records may be read.
    Look,
    Rebuild,
}

/// Failed records, each waiting for its own next attempt; ordered by when
/// that is, then by spool id.
pub type Delayed = BTreeMap<(Instant, u64), InFlight>;

/// The pause before a record's next attempt, after `attempts` failed ones.
fn retry_pause(attempts: u32) -> Duration {
    RETRY_PAUSE
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(MAX_RETRY_PAUSE)
}

pub struct Pump {
    pub kafka: KafkaConfig,
    pub brokers: String,
    pub shared: Arc<Shared>,
    pub topics: Topics,
    pub live: Live,
    pub retry_rx: mpsc::UnboundedReceiver<InFlight>,
    pub delayed: Delayed,
    /// Said once: raw records wait because `kafka.raw_topic` is gone.
    pub raw_missing_logged: bool,
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
        // It carries whole read batches: one wake-up and one pass through
        // the select below per batch, not per record.
        let (fresh_tx, mut fresh_rx) = mpsc::channel::<Vec<InFlight>>(FRESH_BATCHES);
        reader.gather_after_waiting(GATHER);
        // Small batches: a batch's records share one read buffer, which
        // stays in memory until the last of them is delivered.
        let reader_task = tokio::spawn(async move {
            while let Some(batch) = reader.next_batch(FRESH_BATCH, 128 << 10).await {
                let items = batch
                    .into_iter()
                    .map(|r| InFlight {
                        spool_id: r.id,
                        appended_ms: r.append_time_ms,
                        data: r.payload,
                        dead_letter_copy: false,
                        attempts: 0,
                        alone: false,
                        role: None,
                    })
                    .collect();
                if fresh_tx.send(items).await.is_err() {
                    return;
                }
            }
        });
        let mut rebuild_pause = Backoff::new(REBUILD_PAUSE, MAX_REBUILD_PAUSE);
        loop {
            if *self.stop.borrow() {
                break;
            }
            let mut fatal = self.live.generation.fatal.subscribe();
            let due = self.delayed.first_key_value().map(|((at, _), _)| *at);
            // Waiting records are held in memory: past this many (plus at
            // most one batch read before the count got there), the rest of
            // the backlog waits in the spool.
            let hold_fresh =
                self.delayed.len() + self.shared.dead_letters.parked() >= MAX_IN_FLIGHT;
            let next = tokio::select! {
                biased;
                _ = self.stop.changed() => break,
                _ = fatal.wait_for(|f| *f) => Next::Rebuild,
                Some(failed) = self.retry_rx.recv() => Next::Failed(failed),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Next::Due,
                Some(copy) = self.copies_rx.recv() => Next::Send(copy),
                Some(fresh) = fresh_rx.recv(), if !hold_fresh => Next::SendFresh(fresh),
                // Parked dead letters leave without telling the pump.
                _ = tokio::time::sleep(Duration::from_millis(100)), if hold_fresh => Next::Look,
                else => break,
            };
            let carry_on = match next {
                Next::Send(item) => self.send(item).await,
                Next::SendFresh(items) => self.send_all(items).await,
                Next::Failed(item) => {
                    self.delay(item);
                    true
                }
                Next::Due => self.send_due().await,
                Next::Look => true,
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

    /// Puts a failed record in the delay queue, on its own clock.
    fn delay(&mut self, mut item: InFlight) {
        if item.attempts == 0 {
            item.own_bytes();
        }
        item.attempts = item.attempts.saturating_add(1);
        let at = Instant::now() + retry_pause(item.attempts);
        self.delayed.insert((at, item.spool_id), item);
    }

    /// Sends `items` in order; false when told to stop meanwhile (the rest
    /// is still in the spool).
    async fn send_all(&mut self, items: Vec<InFlight>) -> bool {
        for item in items {
            // A batch takes its slots without waiting, so stop is looked
            // at here (the rest stays in the spool).
            if *self.stop.borrow() || !self.send(item).await {
                return false;
            }
        }
        true
    }

    /// Sends every record whose next attempt is due, in spool order. False
    /// when told to stop.
    async fn send_due(&mut self) -> bool {
        // Everything at or before now stays; the rest is split off.
        let later = self.delayed.split_off(&(Instant::now(), u64::MAX));
        let due = std::mem::replace(&mut self.delayed, later);
        let mut due: Vec<InFlight> = due.into_values().collect();
        due.sort_by_key(|item| item.spool_id);
        // Told to stop: the rest is still in the spool, nothing to hand back.
        self.send_all(due).await
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
                    // What the old producer held is in the retry channel now.
                    // Left to the main loop it would be delayed like any
                    // failed delivery, and fresh records of the same keys
                    // would go first: send it, with everything delayed, in
                    // spool order before any fresh record, so that a key
                    // keeps its order across a rebuild.
                    let mut again: Vec<InFlight> =
                        std::mem::take(&mut self.delayed).into_values().collect();
                    while let Ok(item) = self.retry_rx.try_recv() {
                        again.push(item);
                    }
                    again.sort_by_key(|item| item.spool_id);
                    return self.send_all(again).await;
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
            // it was removed from the config: an operator can fix that, so
            // it waits (in the spool) rather than being dead-lettered.
            if !self.raw_missing_logged {
                self.raw_missing_logged = true;
                tracing::error!(
                    spool_id = item.spool_id,
                    "the spool holds raw records but kafka.raw_topic is no longer set; they wait in the spool: set it again and restart, and they go out"
                );
            }
            self.delay(item);
            return true;
        };
        // Bound what librdkafka holds; the permit returns with the report.
        // While there is room (nearly always) no waiting is set up at all.
        let generation = &self.live.generation;
        if generation.is_fatal() {
            // Refused anyway: leave the record to the next producer rather
            // than count a fatal error for each record of a batch.
            let _ = self.shared.retry.send(item);
            return true;
        }
        let wanted = item.permits() as u32;
        match generation.permits.try_acquire_many(wanted) {
            Ok(p) => p.forget(),
            Err(TryAcquireError::Closed) => return false,
            Err(TryAcquireError::NoPermits) => {
                let mut fatal = generation.fatal.subscribe();
                tokio::select! {
                    // A record that travels alone waits until every other
                    // record is reported on, and holds every slot until its
                    // own report.
                    p = generation.permits.acquire_many(wanted) => match p {
                        Ok(p) => p.forget(),
                        Err(_) => return false,
                    },
                    // Its reports may never come: leave the record to the
                    // next producer.
                    _ = fatal.wait_for(|f| *f) => {
                        let _ = self.shared.retry.send(item);
                        return true;
                    }
                    _ = self.stop.changed() => return false,
                }
            }
        }
        let mut item = item;
        item.role = (!item.dead_letter_copy).then_some(record.topic);
        let base = BaseRecord::with_opaque_to(topic, Box::new(item))
            .key(record.key)
            .payload(record.value)
            .headers(headers(&record));
        produce(
            &self.live.producer,
            generation,
            &self.shared,
            &mut self.stop,
            base,
        )
        .await
    }
}

/// How long to wait for librdkafka's thread to drain its full queue before
/// handing a record over again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// Hands `base` to librdkafka, waiting while its own queue is full. A record
/// it refuses is counted and then retried, dead-lettered or (a dead-letter
/// copy) left in the dead-letter file. False when told to stop meanwhile.
async fn produce(
    producer: &BaseProducer<DeliveryContext>,
    generation: &Generation,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    mut base: BaseRecord<'_, [u8], [u8], Box<InFlight>>,
) -> bool {
    loop {
        let (e, back) = match producer.send(base) {
            Ok(()) => return true,
            Err(failed) => failed,
        };
        let action = classify(&e);
        if action == Action::Wait {
            // librdkafka's own queue is full (it bounds bytes too): give
            // its thread a moment to drain.
            let held = back.delivery_opaque.permits();
            base = back;
            tokio::select! {
                _ = tokio::time::sleep(QUEUE_FULL_PAUSE) => continue,
                _ = stop.changed() => {
                    generation.permits.add_permits(held);
                    return false;
                }
            }
        }
        let item = *back.delivery_opaque;
        generation.permits.add_permits(item.permits());
        shared.metrics.kafka_error(action.reason());
        if action == Action::Rebuild {
            producer.context().mark_fatal();
        }
        if item.dead_letter_copy {
            tracing::warn!(error = %e, "could not write a dead letter to Kafka; it is in the dead-letter file");
        } else if let Action::DeadLetter(_) = action {
            shared.dead_letters.bury(item, e.to_string());
        } else {
            let _ = shared.retry.send(item);
        }
        return true;
    }
}
