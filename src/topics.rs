//! At start, asks Kafka whether the topics timbridge writes to exist.
//!
//! A real cluster usually has automatic topic creation off, and timbridge
//! does not create topics (partitions, replication and retention are the
//! cluster owner's decisions). Without this check, a missing topic showed
//! only later and indirectly: librdkafka refuses the records, and they end
//! up in the dead-letter file. Now the start names each missing topic and
//! the command that creates it; with `kafka.require_topics` (or
//! `serve --require-topics`) a missing topic stops the start instead.
//!
//! Kafka being unreachable is not a reason to refuse to start (the spool
//! exists to ride that out), so then the check only warns that it could
//! not be made.

use std::time::Duration;

use anyhow::Context;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::types::RDKafkaRespErr;

use crate::config::KafkaConfig;

/// How long the check waits for Kafka's answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Partitions and replication suggested in the create command: enough
/// partitions to spread consumers, and the usual durable replication.
const SUGGESTED_PARTITIONS: u32 = 12;
const SUGGESTED_REPLICATION: u32 = 3;

/// What the cluster said about one configured topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Exists {
        partitions: usize,
    },
    Missing,
    /// The broker answered with another error (not authorized, ...).
    Error(String),
}

/// The topics timbridge writes to, with the config key naming each.
pub fn configured_topics(kafka: &KafkaConfig) -> Vec<(&'static str, &str)> {
    let mut topics = vec![
        ("kafka.group_topic", kafka.group_topic.as_str()),
        ("kafka.c2c_topic", kafka.c2c_topic.as_str()),
    ];
    if let Some(t) = &kafka.raw_topic {
        topics.push(("kafka.raw_topic", t));
    }
    if let Some(t) = &kafka.dead_letter_topic {
        topics.push(("kafka.dead_letter_topic", t));
    }
    topics
}

/// The command that creates `topic` with settings fit for production.
pub fn create_command(brokers: &str, topic: &str) -> String {
    format!(
        "kafka-topics.sh --bootstrap-server {brokers} --create --topic {topic} \
         --partitions {SUGGESTED_PARTITIONS} --replication-factor {SUGGESTED_REPLICATION} \
         --config min.insync.replicas=2"
    )
}

/// Asks the cluster about every configured topic. Err when it does not
/// answer within `timeout`.
pub fn fetch(
    kafka: &KafkaConfig,
    brokers: &str,
    timeout: Duration,
) -> Result<Vec<(String, TopicState)>, KafkaError> {
    // The producer's own settings, so that TLS and SASL apply here too.
    let client: BaseProducer<QuietContext> =
        crate::publish::producer_config(kafka, brokers).create_with_context(QuietContext)?;
    // All topics rather than each by name: asking for one by name may make
    // a broker with auto-creation on create it, with its defaults.
    let metadata = client.client().fetch_metadata(None, timeout)?;
    Ok(configured_topics(kafka)
        .into_iter()
        .map(|(_, name)| {
            let state = match metadata.topics().iter().find(|t| t.name() == name) {
                None => TopicState::Missing,
                Some(t) => match t.error() {
                    None if !t.partitions().is_empty() => TopicState::Exists {
                        partitions: t.partitions().len(),
                    },
                    None => TopicState::Missing,
                    Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                        TopicState::Missing
                    }
                    Some(e) => {
                        TopicState::Error(rdkafka::error::RDKafkaErrorCode::from(e).to_string())
                    }
                },
            };
            (name.to_owned(), state)
        })
        .collect())
}

/// The check as `Gateway::start` runs it: logs what it found, and with
/// `require` returns an error naming the topics that are missing.
pub async fn check(kafka: &KafkaConfig, brokers: &str, require: bool) -> anyhow::Result<()> {
    let (k, b) = (kafka.clone(), brokers.to_owned());
    // A thread of its own rather than the runtime's blocking pool: the
    // runtime waits for its blocking tasks when it is dropped, so a gateway
    // stopped within `CHECK_TIMEOUT` of its start, with Kafka unreachable,
    // sat for the rest of it after logging that it had stopped. This thread
    // ends with the process.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("topic-check".into())
        .spawn(move || {
            let _ = tx.send(fetch(&k, &b, CHECK_TIMEOUT));
        })
        .context("cannot start the thread that checks the Kafka topics")?;
    let found = rx
        .await
        .context("the Kafka topic check stopped without an answer")?;
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "could not check that the Kafka topics exist: no answer within {}s; starting anyway",
                CHECK_TIMEOUT.as_secs()
            );
            return Ok(());
        }
    };
    let mut missing = Vec::new();
    for (topic, state) in &found {
        match state {
            TopicState::Exists { partitions } => {
                tracing::debug!(topic, partitions, "Kafka topic exists")
            }
            TopicState::Missing => {
                missing.push(topic.clone());
                tracing::warn!(
                    topic,
                    "Kafka topic {topic} does not exist; records for it will be refused and moved to the dead-letter file. Create it: {}",
                    create_command(brokers, topic)
                );
            }
            TopicState::Error(e) => {
                missing.push(topic.clone());
                tracing::warn!(
                    topic,
                    "Kafka topic {topic} cannot be used: {e}; check the ACLs for timbridge's principal"
                );
            }
        }
    }
    if require && !missing.is_empty() {
        anyhow::bail!(
            "kafka.require_topics is on and these topics are missing or unusable: {}. Create them (e.g. {}), \
             or set kafka.require_topics = false to start anyway",
            missing.join(", "),
            create_command(brokers, &missing[0])
        );
    }
    Ok(())
}

/// The checking client's own librdkafka messages: the producer reports the
/// same connection trouble already, so these stay at debug level.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility = fac, "topic check: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", error = %error, "topic check: {reason}");
    }
}

impl ProducerContext for QuietContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}
