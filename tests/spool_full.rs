//! Back-pressure: when the spool reaches `max_bytes` (Kafka away too long),
//! callbacks are answered 503 and /readyz turns 503; both recover by
//! themselves once Kafka drains the spool.

mod common;

use std::time::Duration;

use common::*;
use timbridge::Gateway;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_recovers_when_kafka_drains_it() {
    let cluster = cluster();
    let bootstrap = cluster.bootstrap_servers();
    cluster.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(config(
        &bootstrap,
        dir.path(),
        "max_bytes = 16384\nsegment_bytes = 4096",
    ))
    .await
    .unwrap();
    let addr = gw.local_addr();
    let q = || {
        format!(
            "/callback?{}",
            signed_query("Group.CallbackAfterReadReceipt")
        )
    };

    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        let group = format!("g-full-{i}");
        let a = post(addr, &q(), group_body(&group, i).as_bytes()).await;
        if a.status == 503 {
            refused = Some((group, a));
            break;
        }
        assert_ok(&a);
        accepted.push(group);
    }
    let (refused_group, answer) = refused.expect("the spool never filled");
    let info = assert_fail(&answer, 503);
    assert!(info.contains("spool is full"), "{info}");
    assert!(!accepted.is_empty());

    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["spool_has_room"], false);
    // Still serving: health and metrics answer.
    assert_eq!(get_text(addr, "/healthz").await.0, 200);
    let (_, metrics) = get_text(addr, "/metrics").await;
    assert!(
        metrics.contains("timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"overloaded\"} 1"),
        "{metrics}"
    );

    cluster.broker_up(1).unwrap();
    let spool = gw.spool().clone();
    wait_until("room in the spool", Duration::from_secs(60), || {
        !spool.is_full()
    })
    .await;
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    // The refused callback, sent again (as Tencent's retry or the caller
    // would), is now accepted: the failed attempt did not mark it a duplicate.
    let i = accepted.len() as u64;
    assert_ok(&post(addr, &q(), group_body(&refused_group, i).as_bytes()).await);
    accepted.push(refused_group);

    let recs = read_topic(
        &bootstrap,
        GROUP_TOPIC,
        accepted.len(),
        Duration::from_secs(60),
    );
    let keys: std::collections::HashSet<_> = recs.iter().map(|r| r.key.clone()).collect();
    for g in &accepted {
        assert!(keys.contains(g.as_bytes()), "{g} lost");
    }
    gw.shutdown().await.unwrap();
}
