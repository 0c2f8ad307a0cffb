//! An idempotent producer that librdkafka declares fatally failed refuses
//! every record from then on. The gateway notices, says Kafka is down,
//! builds a new producer and sends again everything without a delivery
//! report: no restart of the process, no record lost, none dead-lettered.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::faults::*;
use common::*;
use rdkafka::types::{RDKafkaApiKey as Api, RDKafkaRespErr as E};
use timbridge::Gateway;

/// Notes whether `timbridge_kafka_up` read 0 once a restart had begun.
fn watch_down_after_restart(gw: &Gateway) -> Arc<AtomicBool> {
    let seen = Arc::new(AtomicBool::new(false));
    let (metrics, flag) = (gw.metrics().clone(), seen.clone());
    tokio::spawn(async move {
        while !flag.load(Ordering::Relaxed) {
            if metrics.kafka_producer_restarts.get() > 0 && metrics.kafka_up.get() == 0 {
                flag.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_sequence_numbers_rebuild_the_producer() {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    let down = watch_down_after_restart(&gw);
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        3,
    );
    let groups = post_groups(gw.local_addr(), "g-oos", 0..100).await;
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    let m = gw.metrics();
    assert!(m.kafka_producer_restarts.get() >= 1);
    assert!(kafka_errors(&gw, "fatal") >= 1);
    assert!(down.load(Ordering::Relaxed), "kafka_up never read 0");
    wait_kafka_up(&gw).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_producer_id_at_start_is_asked_for_again() {
    let s = three_brokers();
    // A missing IdempotentWrite ACL, fixed a moment later.
    inject(
        &s,
        Api::InitProducerId,
        E::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED,
        2,
    );
    let gw = s.gateway(&[]).await;
    let down = watch_down_after_restart(&gw);
    let groups = post_groups(gw.local_addr(), "g-init-pid", 0..100).await;
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    assert!(gw.metrics().kafka_producer_restarts.get() >= 1);
    assert!(down.load(Ordering::Relaxed), "kafka_up never read 0");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_producer_id_costs_nothing() {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID,
        3,
    );
    let groups = post_groups(gw.local_addr(), "g-unknown-pid", 0..100).await;
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    gw.shutdown().await.unwrap();
}
