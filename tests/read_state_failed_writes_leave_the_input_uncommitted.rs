//! A state record Kafka refuses stops `timbridge materialize`, and the input
//! that produced it stays uncommitted: the restart folds it again and the
//! state arrives. (A fix after review: the exit path committed the input
//! offsets anyway, once the failure had been counted, and the state was
//! lost for good.)

mod common;

use std::time::Duration;

use common::process::{QUICK_REBALANCE, start_materializer};
use common::*;
use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::{RDKafkaApiKey as Api, RDKafkaRespErr as E};

const STATE_TOPIC: &str = "tim.read_state";
const GROUP_ID: &str = "timbridge-read-state";

/// The materializer's committed offsets on the group topic, summed.
fn committed(bootstrap: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", GROUP_ID)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(GROUP_TOPIC, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .filter_map(|e| e.offset().to_raw())
        .filter(|o| *o > 0)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_state_leaves_its_input_to_the_restart() {
    let s = setup();
    s.cluster.create_topic(STATE_TOPIC, PARTITIONS, 1).unwrap();
    let gateway = s.gateway(&[]).await;
    assert_ok(
        &post(
            gateway.local_addr(),
            &group_callback(),
            GROUP_BODY.as_bytes(),
        )
        .await,
    );
    // GROUP_BODY reads two messages: two events on the input.
    assert_eq!(
        read_topic(&s.bootstrap, GROUP_TOPIC, 2, Duration::from_secs(30)).len(),
        2
    );
    gateway.shutdown().await.unwrap();

    // Kafka refuses the states for good (librdkafka does not retry it).
    s.cluster.request_errors(
        Api::Produce,
        &[E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
    );
    // Short rebalances, for the second materializer's join.
    let config = format!(
        "{}\n[read_state]\ntopic = \"{STATE_TOPIC}\"\nlisten = \"127.0.0.1:0\"\n{QUICK_REBALANCE}",
        s.config_text(&[])
    );
    let mut m = start_materializer(s.dir.path(), "m1", &config);
    let status = m.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", m.log_text());
    assert!(
        m.log_text().contains("could not be written"),
        "{}",
        m.log_text()
    );
    assert_eq!(
        committed(&s.bootstrap),
        0,
        "input committed past a refused state"
    );

    s.cluster.clear_request_errors(Api::Produce);
    let mut m = start_materializer(s.dir.path(), "m2", &config);
    let states = read_topic(&s.bootstrap, STATE_TOPIC, 2, Duration::from_secs(60));
    assert_eq!(states.len(), 2, "{}", m.log_text());
    m.signal("TERM");
    assert!(
        m.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        m.log_text()
    );
}
