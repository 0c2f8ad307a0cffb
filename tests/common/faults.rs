//! For the Kafka fault tests: a gateway in front of a three-broker mock
//! cluster (so leaders can move) and the checks every fault ends with.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use timbridge::Gateway;

use super::*;

/// Three brokers, the gateway's topics replicated on all of them.
pub fn three_brokers() -> Setup {
    setup_with(cluster_of(3, PARTITIONS))
}

/// The next `count` requests of `api` fail with `err`.
pub fn inject(s: &Setup, api: RDKafkaApiKey, err: RDKafkaRespErr, count: usize) {
    s.cluster.request_errors(api, &vec![err; count]);
}

pub async fn wait_kafka_up(gw: &Gateway) {
    let metrics = gw.metrics().clone();
    wait_until("kafka up", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 1
    })
    .await;
}

pub fn kafka_errors(gw: &Gateway, reason: &str) -> u64 {
    gw.metrics().kafka_errors.with_label_values(&[reason]).get()
}

/// Every one of `groups` reaches Kafka, the spool drains, and nothing went
/// to the dead-letter file.
pub async fn assert_all_delivered_none_dead(s: &Setup, gw: &Gateway, groups: &[String]) {
    assert_groups_arrive(&s.bootstrap, groups);
    let spool = gw.spool().clone();
    wait_until("the spool drains", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;
    assert_eq!(gw.metrics().dead_letter.get(), 0, "dead letters counted");
    let file = s.dir.path().join("spool").join(timbridge::DEAD_LETTER_FILE);
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(text.is_empty(), "dead-letter file holds: {text}");
}
