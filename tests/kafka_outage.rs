//! Kafka away: callbacks are still answered OK (the spool holds them), and
//! every one of them reaches Kafka once it is back, across a SIGKILL of the
//! gateway and across librdkafka's own message timeout.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::process::GatewayProcess;
use common::*;
use timbridge::Gateway;

fn event_ids(recs: &[Received]) -> (usize, HashSet<String>) {
    let ids: HashSet<String> = recs
        .iter()
        .map(|r| r.value["event_id"].as_str().unwrap().to_owned())
        .collect();
    (recs.len(), ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_callbacks_survive_sigkill_during_an_outage() {
    let cluster = cluster();
    let bootstrap = cluster.bootstrap_servers();
    cluster.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&bootstrap, dir.path(), &[]);

    let gw = GatewayProcess::start(dir.path(), &text);
    const N: u64 = 40;
    for i in 0..N {
        let q = format!(
            "/callback?{}",
            signed_query("Group.CallbackAfterReadReceipt")
        );
        assert_ok(
            &post(
                gw.addr,
                &q,
                group_body(&format!("g-kill-{i}"), i).as_bytes(),
            )
            .await,
        );
    }
    // No flush, no sync, no goodbye.
    gw.kill9();

    cluster.broker_up(1).unwrap();
    let mut gw = GatewayProcess::start(dir.path(), &text);
    gw.wait_for_log("spool opened", Duration::from_secs(5));
    let recs = read_topic(&bootstrap, GROUP_TOPIC, N as usize, Duration::from_secs(60));
    let (total, ids) = event_ids(&recs);
    let keys: HashSet<Vec<u8>> = recs.iter().map(|r| r.key.clone()).collect();
    for i in 0..N {
        assert!(
            keys.contains(format!("g-kill-{i}").as_bytes()),
            "g-kill-{i} lost"
        );
    }
    assert_eq!(ids.len(), N as usize);
    eprintln!("duplicates after SIGKILL and replay: {}", total - ids.len());
    // Nothing more trickles in: the spool replayed each record once.
    let all = read_all(&bootstrap, GROUP_TOPIC);
    let (total, ids) = event_ids(&all);
    assert_eq!(ids.len(), N as usize);
    assert_eq!(
        total, N as usize,
        "the spool replayed records already delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_message_timeout_loses_nothing() {
    let cluster = cluster();
    let bootstrap = cluster.bootstrap_servers();
    cluster.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &bootstrap,
        dir.path(),
        &[("kafka.properties", "\"message.timeout.ms\" = 1000")],
    );
    let gw = Gateway::start(timbridge::config::Config::parse(&text).unwrap())
        .await
        .unwrap();
    const N: u64 = 20;
    for i in 0..N {
        let q = format!(
            "/callback?{}",
            signed_query("Group.CallbackAfterReadReceipt")
        );
        assert_ok(
            &post(
                gw.local_addr(),
                &q,
                group_body(&format!("g-timeout-{i}"), i).as_bytes(),
            )
            .await,
        );
    }
    // librdkafka gives up on them (more than once) while the broker is away…
    let metrics = gw.metrics().clone();
    wait_until("message timeouts", Duration::from_secs(30), || {
        metrics.kafka_errors.with_label_values(&["timed_out"]).get() >= 2 * N
    })
    .await;
    assert!(gw.spool().stats().pending_events >= N);
    // …and the spool sends them again once it is back.
    cluster.broker_up(1).unwrap();
    let recs = read_topic(&bootstrap, GROUP_TOPIC, N as usize, Duration::from_secs(60));
    let (_, ids) = event_ids(&recs);
    assert_eq!(ids.len(), N as usize);
    let spool = gw.spool().clone();
    wait_until("the spool drains", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_away_does_not_make_the_gateway_unready() {
    let cluster = cluster();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(config(&bootstrap, dir.path(), ""))
        .await
        .unwrap();
    let addr = gw.local_addr();
    let metrics = gw.metrics().clone();
    wait_until("kafka up", Duration::from_secs(20), || {
        metrics.kafka_up.get() == 1
    })
    .await;
    cluster.broker_down(1).unwrap();
    wait_until("kafka down", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 0
    })
    .await;
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["kafka_reachable"], false, "{body}");
    cluster.broker_up(1).unwrap();
    wait_until("kafka up again", Duration::from_secs(30), || {
        metrics.kafka_up.get() == 1
    })
    .await;
    let (_, body) = get_text(addr, "/readyz").await;
    assert!(body.contains("\"kafka_reachable\":true"), "{body}");
    gw.shutdown().await.unwrap();
}
