//! From the spool to Kafka, and the delivery reports back to the spool.
//!
//! A reader task takes records from the spool in order; the publisher hands
//! them to librdkafka's idempotent producer (acks=all, lz4, batching), and
//! each delivery report decides the record's fate:
//!
//! - delivered: acknowledged in the spool, which may then delete its segment;
//! - failed and worth retrying (broker away, request timed out, the
//!   producer's own `message.timeout.ms` expired): sent again after a short
//!   pause, with no time limit, so an outage of an hour loses nothing;
//! - failed for good (too large, not authorized, no such topic): written to
//!   the dead-letter file (and topic, when set), then acknowledged, so one
//!   bad record cannot block everything behind it.
//!
//! How many records are with librdkafka at once is bounded, so that a long
//! outage fills the spool on disk rather than memory.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::KafkaConfig;
use crate::event::SCHEMA;
use crate::intake::now_ms;
use crate::metrics::Metrics;
use crate::record::{RecordRef, TopicRole};
use crate::spool::{Spool, SpoolReader};

/// Records handed to librdkafka and not yet reported on, at most. Enough
/// to keep a broker busy (the drain runs at over 100k records/s), few enough
/// that a backlog waits on disk rather than in memory: each in-flight
/// record also pins the spool read window it came from.
pub const MAX_IN_FLIGHT: usize = 4096;

/// How long a failed record waits before it is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The properties timbridge sets; `[kafka.properties]` overrides any of them.
pub fn producer_config(kafka: &KafkaConfig, brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        // Retries inside librdkafka must not reorder or duplicate.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set(
            "queue.buffering.max.messages",
            (MAX_IN_FLIGHT * 2).to_string(),
        )
        // Come back quickly once a broker is reachable again.
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("statistics.interval.ms", "1000")
        .set(
            "client.id",
            concat!("timbridge/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &kafka.properties {
        c.set(k, v.to_string());
    }
    c
}

/// A record with librdkafka: which spool record it is, and its bytes in
/// case it has to be sent again.
pub struct InFlight {
    spool_id: u64,
    appended_ms: u64,
    data: Bytes,
    /// A copy bound for the dead-letter topic; already acknowledged.
    dead_letter_copy: bool,
}

struct Topics {
    group: String,
    c2c: String,
    raw: Option<String>,
    dead_letter: Option<String>,
}

impl Topics {
    fn name(&self, role: TopicRole) -> Option<&str> {
        match role {
            TopicRole::Group => Some(&self.group),
            TopicRole::C2c => Some(&self.c2c),
            TopicRole::Raw => self.raw.as_deref(),
        }
    }
}

/// Receives librdkafka's callbacks on its polling thread.
pub struct DeliveryContext {
    spool: Spool,
    metrics: Arc<Metrics>,
    retry: mpsc::UnboundedSender<InFlight>,
    permits: Arc<Semaphore>,
    kafka_up: watch::Sender<bool>,
    dead_letters: DeadLetters,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        self.set_kafka_up(up);
        self.metrics.kafka_queue_messages.set(stats.msg_cnt as i64);
        let worst_rtt_us = stats
            .brokers
            .values()
            .filter_map(|b| b.rtt.as_ref().map(|w| w.avg))
            .max()
            .unwrap_or(0);
        self.metrics
            .kafka_broker_rtt
            .set(worst_rtt_us as f64 / 1_000_000.0);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set_kafka_up(false);
        }
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl DeliveryContext {
    fn set_kafka_up(&self, up: bool) {
        self.metrics.kafka_up.set(up as i64);
        self.kafka_up
            .send_if_modified(|v| std::mem::replace(v, up) != up);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, inflight: Box<InFlight>) {
        self.permits.add_permits(1);
        match result {
            Ok(msg) => {
                if inflight.dead_letter_copy {
                    return;
                }
                self.spool.ack(inflight.spool_id);
                self.set_kafka_up(true);
                self.metrics
                    .kafka_delivered
                    .with_label_values(&[msg.topic()])
                    .inc();
                let age_ms = now_ms().saturating_sub(inflight.appended_ms);
                self.metrics
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
                let reason = error_reason(err);
                self.metrics.kafka_errors.with_label_values(&[reason]).inc();
                if inflight.dead_letter_copy {
                    tracing::warn!(topic = msg.topic(), error = %err, "could not write a dead letter to Kafka; it is in the dead-letter file");
                    return;
                }
                if is_permanent(err) {
                    self.dead_letters
                        .bury(&self.spool, &self.metrics, *inflight, &err.to_string());
                } else {
                    tracing::debug!(error = %err, spool_id = inflight.spool_id, "delivery failed; will send again");
                    // The publisher may be gone at shutdown: the record is
                    // still in the spool and goes out after the restart.
                    let _ = self.retry.send(*inflight);
                }
            }
        }
    }
}

/// A stable, bounded label for a delivery error.
fn error_reason(err: &KafkaError) -> &'static str {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
        | Some(RDKafkaErrorCode::MessageBatchTooLarge) => "too_large",
        Some(RDKafkaErrorCode::TopicAuthorizationFailed)
        | Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => "not_authorized",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition)
        | Some(RDKafkaErrorCode::UnknownTopic)
        | Some(RDKafkaErrorCode::UnknownPartition) => "unknown_topic",
        Some(RDKafkaErrorCode::QueueFull) => "queue_full",
        Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::Resolve)
        | Some(RDKafkaErrorCode::NetworkException) => "transport",
        _ => "other",
    }
}

/// Errors that no retry can mend: the record must leave the queue.
fn is_permanent(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

/// The dead-letter file: one JSON line per record Kafka will never take.
struct DeadLetters {
    path: PathBuf,
    file: Mutex<Option<File>>,
    retry: mpsc::UnboundedSender<InFlight>,
    topic: Option<String>,
    to_topic: mpsc::UnboundedSender<InFlight>,
}

impl DeadLetters {
    fn bury(&self, spool: &Spool, metrics: &Metrics, inflight: InFlight, reason: &str) {
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
        match self.append_line(&line) {
            Ok(()) => {
                // Only once it is safe in the file does it leave the spool.
                spool.ack(inflight.spool_id);
                metrics.dead_letter.inc();
                tracing::error!(
                    spool_id = inflight.spool_id,
                    reason,
                    file = %self.path.display(),
                    "Kafka will never take this record; moved it to the dead-letter file"
                );
                if self.topic.is_some() {
                    let _ = self.to_topic.send(InFlight {
                        dead_letter_copy: true,
                        ..inflight
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, file = %self.path.display(), "cannot write the dead-letter file; keeping the record in the spool and trying again");
                let _ = self.retry.send(inflight);
            }
        }
    }

    fn append_line(&self, line: &serde_json::Value) -> std::io::Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let file = guard
            .as_mut()
            .ok_or_else(|| std::io::Error::other("dead-letter file"))?;
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        file.write_all(&text)?;
        // Rare, and the record leaves the spool on the strength of it.
        file.sync_data()
    }
}

/// The running publisher.
pub struct Publisher {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Creates the producer and starts taking records from `reader`.
    pub fn start(
        kafka: &KafkaConfig,
        brokers: &str,
        spool: Spool,
        reader: SpoolReader,
        dead_letter_path: PathBuf,
        metrics: Arc<Metrics>,
        kafka_up: watch::Sender<bool>,
    ) -> Result<Publisher, KafkaError> {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (dl_tx, dl_rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let context = DeliveryContext {
            spool: spool.clone(),
            metrics: metrics.clone(),
            retry: retry_tx.clone(),
            permits: permits.clone(),
            kafka_up,
            dead_letters: DeadLetters {
                path: dead_letter_path,
                file: Mutex::new(None),
                retry: retry_tx,
                topic: kafka.dead_letter_topic.clone(),
                to_topic: dl_tx,
            },
        };
        for topic in [
            Some(&kafka.group_topic),
            Some(&kafka.c2c_topic),
            kafka.raw_topic.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            metrics.kafka_delivered.with_label_values(&[topic]);
        }
        let producer: ThreadedProducer<DeliveryContext> =
            producer_config(kafka, brokers).create_with_context(context)?;
        let producer = Arc::new(producer);
        let topics = Arc::new(Topics {
            group: kafka.group_topic.clone(),
            c2c: kafka.c2c_topic.clone(),
            raw: kafka.raw_topic.clone(),
            dead_letter: kafka.dead_letter_topic.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(pump(
            producer.clone(),
            topics,
            spool,
            reader,
            retry_rx,
            dl_rx,
            permits,
            metrics,
            stop_rx,
        ));
        Ok(Publisher {
            producer,
            stop,
            task,
        })
    }

    /// Stops taking new records, gives what librdkafka holds up to `timeout`
    /// to be delivered, and returns. What is undelivered stays in the spool.
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "producer not flushed in time; the rest stays in the spool for the next start")
            }
            Err(e) => tracing::warn!(error = %e, "flush task failed"),
        }
        // Dropping the producer purges what it still holds; those records
        // are not acknowledged, so they stay in the spool.
    }
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    topics: Arc<Topics>,
    spool: Spool,
    mut reader: SpoolReader,
    mut retry_rx: mpsc::UnboundedReceiver<InFlight>,
    mut dl_rx: mpsc::UnboundedReceiver<InFlight>,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // The spool reader runs in a task of its own feeding a small channel:
    // receiving from a channel is cancel-safe inside select!, so no record
    // can be dropped between the spool and the producer.
    let (fresh_tx, mut fresh_rx) = mpsc::channel::<InFlight>(1024);
    // Small batches: a batch's records share one read buffer, which stays in
    // memory until the last of them is delivered.
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
    let sender = Sender {
        producer,
        topics,
        spool,
        metrics,
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let item = tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(first) = retry_rx.recv() => {
                // Wait a moment (the broker is likely away), then send the
                // whole failed group again in spool order.
                let mut group = BTreeMap::new();
                group.insert(first.spool_id, first);
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = stop.changed() => break,
                }
                while let Ok(more) = retry_rx.try_recv() {
                    group.insert(more.spool_id, more);
                }
                for (_, item) in group {
                    if !sender.send(item, &permits, &mut stop).await {
                        break;
                    }
                }
                continue;
            }
            Some(dl) = dl_rx.recv() => dl,
            Some(fresh) = fresh_rx.recv() => fresh,
            else => break,
        };
        if !sender.send(item, &permits, &mut stop).await {
            break;
        }
    }
    reader_task.abort();
}

struct Sender {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    topics: Arc<Topics>,
    spool: Spool,
    metrics: Arc<Metrics>,
}

impl Sender {
    /// Hands one record to librdkafka; false when told to stop meanwhile.
    async fn send(
        &self,
        item: InFlight,
        permits: &Arc<Semaphore>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let data = item.data.clone();
        let record = match RecordRef::decode(&data) {
            Ok(r) => r,
            Err(e) => {
                let reason = e.to_string();
                self.producer.context().dead_letters.bury(
                    &self.spool,
                    &self.metrics,
                    item,
                    &reason,
                );
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
            self.producer.context().dead_letters.bury(
                &self.spool,
                &self.metrics,
                item,
                "kafka.raw_topic is no longer configured",
            );
            return true;
        };
        // Bound what librdkafka holds; the permit returns with the report.
        tokio::select! {
            p = permits.acquire() => match p {
                Ok(p) => p.forget(),
                Err(_) => return false,
            },
            _ = stop.changed() => return false,
        }
        let mut headers = OwnedHeaders::new_with_capacity(5);
        let sdk_app_id = record.sdk_app_id.to_string();
        if let Some(id) = &record.event_id {
            headers = headers
                .insert(Header {
                    key: "timbridge-event-id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "timbridge-schema",
                    value: Some(SCHEMA),
                });
        }
        headers = headers
            .insert(Header {
                key: "tim-callback-command",
                value: Some(record.command),
            })
            .insert(Header {
                key: "tim-sdkappid",
                value: Some(sdk_app_id.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let mut base = BaseRecord::with_opaque_to(topic, Box::new(item))
            .key(record.key)
            .payload(record.value)
            .headers(headers);
        loop {
            match self.producer.send(base) {
                Ok(()) => return true,
                Err((e, back)) => {
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                        // librdkafka's own queue is full (it bounds bytes
                        // too): give its thread a moment to drain.
                        base = back;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(5)) => continue,
                            _ = stop.changed() => {
                                permits.add_permits(1);
                                return false;
                            }
                        }
                    }
                    permits.add_permits(1);
                    let item = *back.delivery_opaque;
                    self.metrics
                        .kafka_errors
                        .with_label_values(&[error_reason(&e)])
                        .inc();
                    if item.dead_letter_copy {
                        tracing::warn!(error = %e, "could not write a dead letter to Kafka; it is in the dead-letter file");
                    } else if is_permanent(&e) {
                        self.producer.context().dead_letters.bury(
                            &self.spool,
                            &self.metrics,
                            item,
                            &e.to_string(),
                        );
                    } else {
                        let _ = self.producer.context().retry.send(item);
                    }
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PropertyValue;
    use rdkafka::producer::BaseProducer;

    /// Real clusters want TLS and SASL (SCRAM, PLAIN): the build must carry
    /// OpenSSL, or librdkafka refuses the properties at start.
    #[test]
    fn tls_and_sasl_scram_properties_are_accepted() {
        let mut kafka = KafkaConfig::default();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "timbridge"),
            ("sasl.password", "secret"),
        ] {
            kafka
                .properties
                .insert(k.into(), PropertyValue::String(v.into()));
        }
        let producer: Result<BaseProducer, _> = producer_config(&kafka, "127.0.0.1:9").create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn user_properties_override_ours() {
        let mut kafka = KafkaConfig::default();
        kafka
            .properties
            .insert("linger.ms".into(), PropertyValue::Integer(50));
        let c = producer_config(&kafka, "127.0.0.1:9");
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn every_error_reason_has_a_label_value() {
        use rdkafka::error::KafkaError;
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::Fail,
        ] {
            let reason = error_reason(&KafkaError::MessageProduction(code));
            assert!(
                crate::metrics::KAFKA_ERROR_LABELS.contains(&reason),
                "{reason}"
            );
        }
    }
}
