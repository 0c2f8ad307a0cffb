//! librdkafka's callbacks, on its polling thread: logs, statistics, errors,
//! and the delivery reports that decide each record's fate.
//!
//! Nothing here blocks on I/O: a delivered record is acknowledged in the
//! spool (in memory, ack files are buffered), a failed one goes back to the
//! pump's retry channel or to the dead-letter thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use tokio::sync::{Semaphore, watch};

use super::classify::{Action, classify};
use super::{InFlight, Shared};
use crate::clock::now_ms;
use crate::labels::KafkaErrorReason as Reason;

/// librdkafka's offset of a record the broker never reported on
/// (`RD_KAFKA_OFFSET_INVALID`): an implicitly acked one keeps it.
pub(crate) const OFFSET_INVALID: i64 = -1001;

/// One producer's life: a fatal error ends it, and the pump builds the
/// next one with a fresh `Generation`.
pub struct Generation {
    /// Records handed to this producer and not yet reported on, bounded.
    pub permits: Arc<Semaphore>,
    /// Turns true once this producer is fatally failed.
    pub fatal: watch::Sender<bool>,
    /// Delivery reports handled, positive or not: the polling thread
    /// writes acks out after every round that handled some.
    pub reports: AtomicU64,
    /// Tells the polling thread to end.
    pub stop_polling: AtomicBool,
}

impl Generation {
    pub fn new(permits: usize) -> Arc<Generation> {
        Arc::new(Generation {
            permits: Arc::new(Semaphore::new(permits)),
            fatal: watch::channel(false).0,
            reports: AtomicU64::new(0),
            stop_polling: AtomicBool::new(false),
        })
    }

    pub fn is_fatal(&self) -> bool {
        *self.fatal.borrow()
    }
}

/// Receives librdkafka's callbacks for one producer.
pub struct DeliveryContext {
    pub(super) shared: Arc<Shared>,
    pub(super) generation: Arc<Generation>,
    /// The producer is idempotent (`acks = all`): the broker reports an
    /// offset for every record it writes, and a success report without one
    /// is an implicit ack, not a confirmation.
    pub(super) watch_implicit_acks: bool,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.shared.kafka_log.log(level, fac, message);
    }

    fn stats(&self, stats: Statistics) {
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        self.set_kafka_up(up);
        let metrics = &self.shared.metrics;
        metrics
            .kafka_producer_queue_messages
            .set(stats.msg_cnt as i64);
        let worst_rtt_us = stats
            .brokers
            .values()
            .filter_map(|b| b.rtt.as_ref().map(|w| w.avg))
            .max()
            .unwrap_or(0);
        metrics
            .kafka_broker_rtt_seconds
            .set(worst_rtt_us as f64 / 1_000_000.0);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // The pump logs it once, with librdkafka's reason, as it
            // rebuilds the producer.
            Some(RDKafkaErrorCode::Fatal) => self.mark_fatal(),
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.set_kafka_up(false);
                self.shared.kafka_log.error(&error, reason);
            }
            _ => self.shared.kafka_log.error(&error, reason),
        }
    }
}

impl DeliveryContext {
    fn set_kafka_up(&self, up: bool) {
        // A failed producer's brokers are still connected, but nothing
        // gets through: it is down until the next producer says otherwise.
        let up = up && !self.generation.is_fatal();
        self.shared.metrics.kafka_up.set(up as i64);
        self.shared.kafka_log.kafka_up(up);
        self.shared
            .kafka_up
            .send_if_modified(|v| std::mem::replace(v, up) != up);
    }

    /// This producer refuses everything from now on: say Kafka is down and
    /// wake the pump, which rebuilds it.
    pub(super) fn mark_fatal(&self) {
        if !self.generation.fatal.send_replace(true) {
            self.set_kafka_up(false);
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, mut inflight: Box<InFlight>) {
        self.generation.permits.add_permits(inflight.permits());
        self.generation.reports.fetch_add(1, Ordering::Relaxed);
        let shared = &self.shared;
        match result {
            // librdkafka reports success without an offset when it did not
            // hear from the broker about this record but inferred the write
            // from a later batch's success (an "implicit ack"). The inference
            // fails for a producer's first batch to a partition: Kafka takes
            // a new producer id's first batch at any sequence, so a later
            // batch can be written where this one failed, and librdkafka then
            // reports records that are not in Kafka as delivered (seen under
            // injected UNKNOWN_TOPIC_OR_PART errors: 4 of 200 records). Send
            // them again: if they were written after all, that is a duplicate
            // with the same event_id, which consumers drop.
            Ok(msg) if self.watch_implicit_acks && msg.offset() == OFFSET_INVALID => {
                shared.metrics.kafka_error(Reason::Unconfirmed);
                if inflight.dead_letter_copy {
                    tracing::warn!(
                        topic = msg.topic(),
                        "a dead letter's copy in Kafka is not confirmed; it is in the dead-letter file"
                    );
                    return;
                }
                let suppressed = &shared.metrics.log_lines_suppressed;
                if let Some(left_out) = shared.unconfirmed_log.admit_or_count(suppressed) {
                    tracing::warn!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        spool_id = inflight.spool_id,
                        similar_lines_left_out = left_out,
                        "Kafka did not confirm a record librdkafka reported as delivered (no offset); sending it again, a duplicate if it was written"
                    );
                }
                let _ = shared.retry.send(*inflight);
            }
            Ok(msg) => {
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                if inflight.dead_letter_copy {
                    return;
                }
                shared.spool.ack(inflight.spool_id);
                self.set_kafka_up(true);
                match inflight.role.and_then(|r| shared.delivered_counter(r)) {
                    Some(counter) => counter.inc(),
                    None => shared
                        .metrics
                        .kafka_delivered
                        .with_label_values(&[msg.topic()])
                        .inc(),
                }
                let age_ms = now_ms().saturating_sub(inflight.appended_ms);
                shared
                    .metrics
                    .kafka_delivery_seconds
                    .observe(age_ms as f64 / 1000.0);
                tracing::debug!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    key = %crate::logging::Untrusted(&String::from_utf8_lossy(msg.key().unwrap_or_default())),
                    "delivered"
                );
            }
            Err((err, msg)) => {
                let action = classify(err);
                shared.metrics.kafka_error(action.reason());
                if action == Action::Rebuild {
                    self.mark_fatal();
                }
                if inflight.dead_letter_copy {
                    tracing::warn!(topic = msg.topic(), error = %err, "could not write a dead letter to Kafka; it is in the dead-letter file");
                    return;
                }
                match action {
                    // The broker may have refused the whole batch for its
                    // size: the record alone may well pass.
                    Action::DeadLetter(_) if !inflight.alone => {
                        tracing::debug!(error = %err, spool_id = inflight.spool_id, "request refused; sending the record again on its own");
                        inflight.alone = true;
                        let _ = shared.retry.send(*inflight);
                    }
                    Action::DeadLetter(_) => shared.dead_letters.bury(*inflight, err.to_string()),
                    Action::Retry(_) | Action::Wait | Action::Rebuild => {
                        tracing::debug!(error = %err, spool_id = inflight.spool_id, "delivery failed; will send again");
                        // The publisher may be gone at shutdown: the record
                        // is still in the spool and goes out after the restart.
                        let _ = shared.retry.send(*inflight);
                    }
                }
            }
        }
    }
}
