//! Kafka away: callbacks are still answered OK (the spool holds them), and
//! every one of them reaches Kafka once it is back, across a SIGKILL of the
//! gateway and across librdkafka's own message timeout.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn distinct_event_ids(recs: &[Received]) -> usize {
    recs.iter()
        .map(|r| r.value["event_id"].as_str().unwrap())
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_callbacks_survive_sigkill_during_an_outage() {
    let s = setup();
    let text = s.config_text(&[]);
    // SIGKILL: no flush, no sync, no goodbye.
    let groups = s.spool_then_kill(&text, "g-kill", 0..40).await;
    let mut gw = s.restart_with_kafka(&text);
    gw.wait_for_log("spool opened", Duration::from_secs(5));
    let recs = assert_groups_arrive(&s.bootstrap, &groups);
    eprintln!(
        "duplicates after SIGKILL and replay: {}",
        recs.len() - distinct_event_ids(&recs)
    );
    // Nothing more trickles in: the spool replayed each record once.
    let all = read_all(&s.bootstrap, GROUP_TOPIC);
    assert_eq!(distinct_event_ids(&all), groups.len());
    assert_eq!(
        all.len(),
        groups.len(),
        "the spool replayed records already delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_message_timeout_loses_nothing() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let gw = s
        .gateway(&[("kafka.properties", "\"message.timeout.ms\" = 1000")])
        .await;
    let groups = post_groups(gw.local_addr(), "g-timeout", 0..20).await;
    // librdkafka gives up on them (more than once) while the broker is away…
    let metrics = gw.metrics().clone();
    let n = groups.len() as u64;
    wait_until("message timeouts", Duration::from_secs(30), || {
        metrics.kafka_errors.with_label_values(&["timed_out"]).get() >= 2 * n
    })
    .await;
    assert!(gw.spool().stats().pending_events >= n);
    // …and the spool sends them again once it is back.
    s.cluster.broker_up(1).unwrap();
    let recs = assert_groups_arrive(&s.bootstrap, &groups);
    assert_eq!(distinct_event_ids(&recs), groups.len());
    let spool = gw.spool().clone();
    wait_until("the spool drains", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_away_does_not_make_the_gateway_unready() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let metrics = gw.metrics().clone();
    wait_until("kafka up", Duration::from_secs(20), || {
        metrics.kafka_up.get() == 1
    })
    .await;
    common::broker_down(&s.cluster, 1);
    wait_until("kafka down", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 0
    })
    .await;
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["kafka_reachable"], false, "{body}");
    s.cluster.broker_up(1).unwrap();
    wait_until("kafka up again", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 1
    })
    .await;
    let (_, body) = get_text(addr, "/readyz").await;
    assert!(body.contains("\"kafka_reachable\":true"), "{body}");
    gw.shutdown().await.unwrap();
}
