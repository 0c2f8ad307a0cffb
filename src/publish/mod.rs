//! From the spool to Kafka, and the delivery reports back to the spool.
//!
//! A reader task takes records from the spool in order; the pump hands them
//! to librdkafka's idempotent producer (acks=all, lz4, batching), and each
//! delivery report decides the record's fate, by one set of rules
//! ([`classify`]):
//!
//! - delivered: acknowledged in the spool, which may then delete its segment;
//! - failed, for a reason that passes or that an operator can fix (broker
//!   away, leader moving, `message.timeout.ms` expired, unknown topic, ACLs,
//!   SASL): sent again after a pause that grows while nothing gets through,
//!   with no time limit, so an outage of an hour loses nothing;
//! - failed because the producer itself is fatally failed (an idempotence
//!   error librdkafka cannot repair): a new producer is built and every
//!   record without a delivery report is sent again;
//! - failed for good, for this record alone (too large, invalid): written
//!   to the dead-letter file (and topic, when set), then acknowledged, so
//!   one bad record cannot block everything behind it.
//!
//! How many records are with librdkafka at once is bounded, so that a long
//! outage fills the spool on disk rather than memory.
//!
//! The files, by role: `config` (librdkafka properties, topic names),
//! `pump` (spool → producer, retries, rebuilding the producer), `headers`
//! (a record's Kafka headers), `delivery` (librdkafka's callbacks),
//! `classify` (the error rules) and `dead_letter` (the dead-letter file).

mod classify;
mod config;
mod dead_letter;
mod delivery;
mod headers;
mod pump;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use prometheus::IntCounter;
use rdkafka::producer::Producer;
use tokio::sync::{mpsc, watch};

pub use classify::{Action, classify};
pub use config::producer_config;
pub(crate) use delivery::OFFSET_INVALID;

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::record::TopicRole;
use crate::spool::{Spool, SpoolReader};
use dead_letter::{DeadLetterConfig, DeadLetters};
use pump::{Live, Pump};

/// Records handed to librdkafka and not yet reported on, at most. Enough
/// to keep a broker busy (the drain runs at over 100k records/s), few enough
/// that a backlog waits on disk rather than in memory: each in-flight
/// record also pins the spool read window it came from.
pub const MAX_IN_FLIGHT: usize = 2048;

/// A record on its way to Kafka: which spool record it is, and its bytes in
/// case it has to be sent again.
pub struct InFlight {
    spool_id: u64,
    appended_ms: u64,
    data: Bytes,
    /// A copy bound for the dead-letter topic; already acknowledged.
    dead_letter_copy: bool,
    /// Failed deliveries so far: a record's own pause before it is sent
    /// again grows with them, so one record that keeps failing waits
    /// longer without holding back the records behind it.
    attempts: u32,
    /// Kafka refused the request this record was in as too large or
    /// invalid: the broker judges a whole compressed batch, and fails
    /// every record in it. Such a record is sent once more in a request
    /// of its own (nothing else with librdkafka meanwhile) before it is
    /// dead-lettered.
    alone: bool,
    /// The topic this record was last handed to librdkafka for, so that
    /// its delivery report counts it without looking the topic up by name.
    role: Option<TopicRole>,
}

impl InFlight {
    /// librdkafka slots this record holds while it is with librdkafka: all
    /// of them when it must travel alone.
    fn permits(&self) -> usize {
        if self.alone { MAX_IN_FLIGHT } else { 1 }
    }
}

impl InFlight {
    /// Gives up the spool read buffer `data` is a slice of: a record that
    /// waits (for its next attempt, or for room in the dead-letter file)
    /// must not keep a whole read batch in memory.
    fn own_bytes(&mut self) {
        self.data = Bytes::copy_from_slice(&self.data);
    }
}

/// What every producer generation and the pump share.
struct Shared {
    spool: Spool,
    metrics: Arc<Metrics>,
    retry: mpsc::UnboundedSender<InFlight>,
    kafka_up: watch::Sender<bool>,
    dead_letters: DeadLetters,
    /// Positive delivery reports so far: backoffs start over when it moves.
    delivered: AtomicU64,
    /// librdkafka's log, summarized; shared so that an outage is one story
    /// across producer rebuilds.
    kafka_log: crate::kafka_log::KafkaLog,
    /// `timbridge_kafka_delivered_total` of each topic role's topic.
    delivered_by_role: [Option<IntCounter>; 3],
    /// One line a second about success reports without an offset, which
    /// come a batch at a time.
    unconfirmed_log: crate::throttle::LogThrottle,
}

impl Shared {
    fn delivered_counter(&self, role: TopicRole) -> Option<&IntCounter> {
        let i = match role {
            TopicRole::Group => 0,
            TopicRole::C2c => 1,
            TopicRole::Raw => 2,
        };
        self.delivered_by_role[i].as_ref()
    }
}

/// The running publisher.
pub struct Publisher {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Live>,
}

impl Publisher {
    /// Creates the producer and starts taking records from `reader`.
    pub fn start(
        kafka: &KafkaConfig,
        brokers: &str,
        spool: Spool,
        reader: SpoolReader,
        dead_letter_path: std::path::PathBuf,
        metrics: Arc<Metrics>,
        kafka_up: watch::Sender<bool>,
    ) -> anyhow::Result<Publisher> {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (copies_tx, copies_rx) = mpsc::unbounded_channel();
        let dead_letters = DeadLetters::start(DeadLetterConfig {
            path: dead_letter_path.clone(),
            max_bytes: kafka.dead_letter_max_bytes,
            spool: spool.clone(),
            metrics: metrics.clone(),
            to_topic: kafka.dead_letter_topic.is_some().then_some(copies_tx),
        })
        .with_context(|| {
            format!(
                "cannot open the dead-letter file {}: check the spool directory's permissions",
                dead_letter_path.display()
            )
        })?;
        // Resolved once: by name, per record, the lookup (UTF-8 check, hash,
        // lock) was about 1% of the CPU samples under load. Also makes each
        // series show from the start, at 0.
        let topics = config::Topics::new(kafka);
        let delivered_by_role = [TopicRole::Group, TopicRole::C2c, TopicRole::Raw].map(|role| {
            topics
                .name(role)
                .map(|t| metrics.kafka_delivered.with_label_values(&[t]))
        });
        let shared = Arc::new(Shared {
            delivered_by_role,
            spool,
            metrics,
            retry: retry_tx,
            kafka_up,
            dead_letters,
            delivered: AtomicU64::new(0),
            kafka_log: crate::kafka_log::KafkaLog::new(),
            unconfirmed_log: crate::throttle::LogThrottle::new(1),
        });
        let live = Live::build(kafka, brokers, &shared)?;
        let (stop, stop_rx) = watch::channel(false);
        let pump = Pump {
            kafka: kafka.clone(),
            brokers: brokers.to_owned(),
            shared: shared.clone(),
            topics,
            live,
            retry_rx,
            delayed: Default::default(),
            raw_missing_logged: false,
            copies_rx,
            stop: stop_rx,
        };
        let task = tokio::spawn(pump.run(reader));
        Ok(Publisher { shared, stop, task })
    }

    /// Stops taking new records, gives what librdkafka holds up to `timeout`
    /// to be delivered, and returns. What is undelivered stays in the spool.
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let Ok(live) = self.task.await else {
            tracing::warn!("the publisher task failed; what it held stays in the spool");
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || {
            let flushed = live.producer.flush(timeout);
            // Dropping the producer purges what it still holds; those
            // records are not acknowledged, so they stay in the spool.
            drop(live);
            flushed
        })
        .await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "producer not flushed in time; the rest stays in the spool for the next start")
            }
            Err(e) => tracing::warn!(error = %e, "flush task failed"),
        }
        // Dead letters handed over so far are written (and acknowledged).
        let shared = self.shared;
        let _ = tokio::task::spawn_blocking(move || shared.dead_letters.stop()).await;
    }
}
