//! A record Kafka will never take must not block the records behind it: it
//! goes to the dead-letter file (and topic), is counted, and the rest flows.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_kafka_is_dead_lettered_and_the_rest_delivered() {
    let s = setup();
    let gw = s
        .gateway(&[("kafka.properties", "\"message.max.bytes\" = 4096")])
        .await;
    let addr = gw.local_addr();
    let q = || {
        format!(
            "/callback?{}",
            signed_query("Group.CallbackAfterReadReceipt")
        )
    };
    assert_ok(&post(addr, &q(), group_body("g-before", 1).as_bytes()).await);
    assert_ok(&post(addr, &q(), huge_receipt("g-huge").as_bytes()).await);
    assert_ok(&post(addr, &q(), group_body("g-after", 1).as_bytes()).await);

    let recs = read_topic(&s.bootstrap, GROUP_TOPIC, 2, Duration::from_secs(30));
    let keys: Vec<_> = recs.iter().map(|r| r.key.clone()).collect();
    assert!(
        keys.contains(&b"g-before".to_vec()) && keys.contains(&b"g-after".to_vec()),
        "{keys:?}"
    );
    let metrics = gw.metrics().clone();
    wait_until("a dead letter", Duration::from_secs(30), || {
        metrics.dead_letter.get() == 1
    })
    .await;
    let spool = gw.spool().clone();
    wait_until("the spool drains", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;

    let file =
        std::fs::read_to_string(s.dir.path().join("spool").join(timbridge::DEAD_LETTER_FILE))
            .unwrap();
    let lines: Vec<serde_json::Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{file}");
    let dl = &lines[0];
    assert_eq!(dl["key"], "g-huge");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("too large"),
        "{dl}"
    );
    let event: serde_json::Value = serde_json::from_str(dl["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        event["readers"].as_array().unwrap().len(),
        200,
        "the whole event is kept"
    );
    assert!(
        read_all(&s.bootstrap, GROUP_TOPIC)
            .iter()
            .all(|r| r.key != b"g-huge")
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kafka_refuses_for_good_also_goes_to_the_dead_letter_topic() {
    let s = setup();
    s.cluster
        .create_topic("tim.dead_letters", PARTITIONS, 1)
        .unwrap();
    let gw = s
        .gateway(&[("kafka", "dead_letter_topic = \"tim.dead_letters\"")])
        .await;
    let metrics = gw.metrics().clone();
    wait_until("kafka up", Duration::from_secs(20), || {
        metrics.kafka_up.get() == 1
    })
    .await;
    // The broker finds the next batch invalid, and the record again when
    // it is sent on its own: that record can never be taken, unlike a
    // missing ACL or topic (see kafka_fixable_faults).
    s.cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 2],
    );
    let addr = gw.local_addr();
    let q = format!("/callback?{}", signed_query("Group.CallbackAfterSendMsg"));
    let raw = r#"{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"g-raw-invalid"}"#;
    assert_ok(&post(addr, &q, raw.as_bytes()).await);
    wait_until("a dead letter", Duration::from_secs(30), || {
        metrics.dead_letter.get() == 1
    })
    .await;
    assert_eq!(
        metrics
            .kafka_errors
            .with_label_values(&["invalid_record"])
            .get(),
        2
    );
    assert_ok(&post(addr, &group_callback(), group_body("g-fine", 1).as_bytes()).await);

    let dl = read_topic(&s.bootstrap, "tim.dead_letters", 1, Duration::from_secs(30));
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].key, b"g-raw-invalid");
    assert_eq!(dl[0].raw_value, raw.as_bytes());
    assert_eq!(
        read_topic(&s.bootstrap, GROUP_TOPIC, 1, Duration::from_secs(30)).len(),
        1
    );
    let file =
        std::fs::read_to_string(s.dir.path().join("spool").join(timbridge::DEAD_LETTER_FILE))
            .unwrap();
    assert_eq!(file.lines().count(), 1, "{file}");
    assert!(file.contains("g-raw-invalid"), "{file}");
    gw.shutdown().await.unwrap();
}
