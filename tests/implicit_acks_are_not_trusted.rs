//! A success report without an offset is not a delivery.
//!
//! librdkafka's idempotent producer sends up to five requests to a
//! partition at once. When the first request fails with a
//! retriable error and the next one succeeds, librdkafka takes the success
//! to mean the earlier records were written too, and reports them delivered
//! without an offset (an "implicit ack"). Kafka makes that true only once it
//! knows the producer: it takes a new producer id's first batch to a
//! partition at any sequence (and the mock cluster never checks them), so
//! the failed records are missing. The gateway sends them again.

mod common;

use std::time::Duration;

use common::faults::*;
use common::*;
use rdkafka::types::{RDKafkaApiKey as Api, RDKafkaRespErr as E};

/// Every answer from the brokers takes this long while the race is set up.
const RTT: Duration = Duration::from_millis(300);

/// The race depends on the first request leaving alone before the rest
/// arrive; a starved machine can merge them, so a round without it is
/// tried again (each on a new cluster and gateway, each checked for loss).
const ATTEMPTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_producers_failed_first_batch_is_sent_again() {
    for attempt in 1..=ATTEMPTS {
        if race_round().await > 0 {
            return;
        }
        eprintln!("attempt {attempt}: the race did not come up");
    }
    panic!(
        "no success report came without an offset in {ATTEMPTS} attempts: the race this test is about did not come up"
    );
}

/// One round: nothing lost; returns how many records were sent again
/// after a success report without an offset.
async fn race_round() -> u64 {
    let s = three_brokers();
    let gw = s.gateway(&[]).await;
    wait_kafka_up(&gw).await;
    // Metadata first: without it the producer holds every record until it
    // has asked for the topic, and then sends them in batches too large to
    // pipeline. (The mock keeps no producer state, so this record's
    // partition is as open to the race as the others.)
    let mut groups = post_groups(gw.local_addr(), "g-warm", 0..1).await;
    let spool = gw.spool().clone();
    wait_until(
        "the first record is delivered",
        Duration::from_secs(30),
        || spool.stats().pending_events == 0,
    )
    .await;
    for broker in 1..=3 {
        s.cluster.broker_round_trip_time(broker, RTT).unwrap();
    }
    inject(
        &s,
        Api::Produce,
        E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        1,
    );
    // The first request: one callback's record, small enough that more
    // requests to its partition follow it while it is out. The pause lets
    // it leave (linger is 5 ms) before the rest arrive, a third of which
    // share its partition; it shapes the race, the checks below wait for
    // outcomes.
    groups.extend(post_groups(gw.local_addr(), "g-first", 0..1).await);
    tokio::time::sleep(RTT / 6).await;
    groups.extend(post_groups(gw.local_addr(), "g-next", 0..20).await);
    for broker in 1..=3 {
        s.cluster
            .broker_round_trip_time(broker, Duration::ZERO)
            .unwrap();
    }
    assert_all_delivered_none_dead(&s, &gw, &groups).await;
    let unconfirmed = kafka_errors(&gw, "unconfirmed");
    gw.shutdown().await.unwrap();
    unconfirmed
}
