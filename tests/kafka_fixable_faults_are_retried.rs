//! What an operator can fix, or what passes by itself, never costs a record
//! its place in the spool: a missing topic, a missing ACL, leaders moving,
//! brokers away. Each fault is injected into librdkafka's mock cluster
//! while callbacks flow; every acknowledged event ends up in Kafka and
//! nothing is dead-lettered.

mod common;

use std::time::Duration;

use common::faults::*;
use common::*;
use rdkafka::types::{RDKafkaApiKey as Api, RDKafkaRespErr as E};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_waited_for_until_it_exists() {
    let s = three_brokers();
    // librdkafka gives up on records for a topic missing this long; the
    // gateway then keeps them and tries again.
    let gw = s
        .gateway(&[(
            "kafka.properties",
            "\"topic.metadata.propagation.max.ms\" = 300",
        )])
        .await;
    wait_kafka_up(&gw).await;
    s.cluster
        .topic_error(GROUP_TOPIC, E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        .unwrap();
    let groups = post_groups(gw.local_addr(), "g-no-topic", 0..30).await;
    let g = &gw;
    wait_until("unknown_topic errors", Duration::from_secs(30), || {
        kafka_errors(g, "unknown_topic") >= 30
    })
    .await;
    assert_eq!(gw.metrics().dead_letter.get(), 0);
    assert_eq!(gw.spool().stats().pending_events, 30);
    // The topic is created.
    s.cluster
        .topic_error(GROUP_TOPIC, E::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_authorization_glitch_is_retried_until_the_acl_is_back() {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        40,
    );
    let groups = post_groups(gw.local_addr(), "g-acl", 0..50).await;
    let g = &gw;
    wait_until("not_authorized errors", Duration::from_secs(30), || {
        kafka_errors(g, "not_authorized") >= 1
    })
    .await;
    assert_eq!(gw.metrics().dead_letter.get(), 0);
    assert!(gw.spool().stats().pending_events > 0);
    // The ACL is granted again.
    s.cluster.clear_request_errors(Api::Produce);
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_partitions_and_moving_leaders_cost_nothing() {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        40,
    );
    let mut groups = post_groups(gw.local_addr(), "g-unknown-part", 0..50).await;
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        40,
    );
    for (partition, broker) in [(0, 2), (1, 3), (2, 1)] {
        s.cluster
            .partition_leader(GROUP_TOPIC, partition, Some(broker))
            .unwrap();
    }
    groups.extend(post_groups(gw.local_addr(), "g-leaders", 0..50).await);
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_going_away_and_coming_back_cost_nothing() {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    for b in 1..=3 {
        common::broker_down(&s.cluster, b);
    }
    let groups = post_groups(gw.local_addr(), "g-away", 0..50).await;
    let metrics = gw.metrics().clone();
    wait_until("kafka down", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 0
    })
    .await;
    assert_eq!(gw.spool().stats().pending_events, 50);
    for b in 1..=3 {
        s.cluster.broker_up(b).unwrap();
    }
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    wait_kafka_up(&gw).await;
    gw.shutdown().await.unwrap();
}
