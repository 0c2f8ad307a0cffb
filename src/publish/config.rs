//! What the producer is built from: librdkafka's properties and the topic
//! names a record's role maps to.

use rdkafka::config::ClientConfig;

use super::MAX_IN_FLIGHT;
use crate::config::KafkaConfig;
use crate::record::TopicRole;

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
        // Java's partitioner (murmur2 of the key), so that these topics are
        // co-partitioned with topics keyed the same way by Java, Kafka
        // Streams, ksqlDB or Flink producers; librdkafka's default
        // (consistent_random, CRC32) puts the same key elsewhere.
        .set("partitioner", "murmur2_random")
        .set(
            "client.id",
            concat!("timbridge/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &kafka.properties {
        c.set(k, v.to_string());
    }
    // Two names of one setting would reach librdkafka in no set order:
    // the user's alias wins over our default.
    if kafka.properties.contains_key("request.required.acks")
        && !kafka.properties.contains_key("acks")
    {
        c.remove("acks");
    }
    c
}

/// Whether librdkafka may report records delivered that it never heard the
/// broker confirm (an "implicit ack", see `delivery.rs`): only the
/// idempotent producer does, and it always runs with `acks = all`, so every
/// record the broker confirms gets an offset. Read back from librdkafka's
/// own parse of the properties, not from our spelling of them.
pub fn implicit_acks_possible(config: &ClientConfig) -> bool {
    config
        .create_native_config()
        .and_then(|c| c.get("enable.idempotence"))
        .is_ok_and(|v| v == "true")
}

/// The configured topic names.
pub struct Topics {
    pub group: String,
    pub c2c: String,
    pub raw: Option<String>,
    pub dead_letter: Option<String>,
}

impl Topics {
    pub fn new(kafka: &KafkaConfig) -> Topics {
        Topics {
            group: kafka.group_topic.clone(),
            c2c: kafka.c2c_topic.clone(),
            raw: kafka.raw_topic.clone(),
            dead_letter: kafka.dead_letter_topic.clone(),
        }
    }

    /// The topic a record of `role` goes to; None for raw records once
    /// `kafka.raw_topic` is no longer set.
    pub fn name(&self, role: TopicRole) -> Option<&str> {
        match role {
            TopicRole::Group => Some(&self.group),
            TopicRole::C2c => Some(&self.c2c),
            TopicRole::Raw => self.raw.as_deref(),
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
    fn implicit_acks_are_watched_for_while_idempotence_is_on() {
        let mut kafka = KafkaConfig::default();
        assert!(implicit_acks_possible(&producer_config(
            &kafka,
            "127.0.0.1:9"
        )));
        kafka.properties.insert(
            "enable.idempotence".into(),
            PropertyValue::String("false".into()),
        );
        kafka
            .properties
            .insert("acks".into(), PropertyValue::String("00".into()));
        assert!(!implicit_acks_possible(&producer_config(
            &kafka,
            "127.0.0.1:9"
        )));
    }

    #[test]
    fn the_users_acks_alias_replaces_our_acks() {
        let mut kafka = KafkaConfig::default();
        kafka.properties.insert(
            "request.required.acks".into(),
            PropertyValue::String("1".into()),
        );
        let c = producer_config(&kafka, "127.0.0.1:9");
        assert_eq!(c.get("acks"), None);
        assert_eq!(c.get("request.required.acks"), Some("1"));
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
}
