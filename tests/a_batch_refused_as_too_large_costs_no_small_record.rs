//! The broker judges a topic's `max.message.bytes` against a whole
//! compressed batch and fails every record in it with MSG_SIZE_TOO_LARGE.
//! Small records caught in such a batch are sent again on their own, and
//! delivered: none goes to the dead-letter file.

mod common;

use common::*;
use rdkafka::types::{RDKafkaApiKey as Api, RDKafkaRespErr as E};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_records_in_a_refused_batch_are_delivered() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    s.cluster
        .request_errors(Api::Produce, &[E::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    // Posted concurrently, so that the refused request holds several.
    let addr = gw.local_addr();
    let posts = (0..20).map(|i| {
        tokio::spawn(async move {
            let group = format!("g-batched-{i}");
            assert_ok(&post(addr, &group_callback(), group_body(&group, i).as_bytes()).await);
            group
        })
    });
    let mut groups = Vec::new();
    for p in posts {
        groups.push(p.await.unwrap());
    }
    assert_groups_arrive(&s.bootstrap, &groups);
    let m = gw.metrics().clone();
    assert!(
        m.kafka_errors.with_label_values(&["too_large"]).get() >= 1,
        "the injected error was not seen"
    );
    let spool = gw.spool().clone();
    wait_until(
        "the spool drains",
        std::time::Duration::from_secs(30),
        || spool.stats().pending_events == 0,
    )
    .await;
    assert_eq!(m.dead_letter.get(), 0, "small records dead-lettered");
    gw.shutdown().await.unwrap();
}
