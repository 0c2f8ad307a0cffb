//! Back-pressure: when the spool reaches `max_bytes` (Kafka away too long),
//! callbacks are answered 503 and /readyz turns 503; both recover by
//! themselves once Kafka drains the spool.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_recovers_when_kafka_drains_it() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let gw = s
        .gateway(&[("spool", "max_bytes = 16384\nsegment_bytes = 4096")])
        .await;
    let addr = gw.local_addr();

    let (mut accepted, refusal) = post_groups_until_refused(addr, "g-full", 1000).await;
    let info = assert_fail(&refusal, 503);
    assert!(info.contains("spool is full"), "{info}");
    assert!(!accepted.is_empty());

    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["spool_has_room"], false);
    // Still serving: health and metrics answer.
    assert_eq!(get_text(addr, "/healthz").await.0, 200);
    assert_metrics_show(addr, &["timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"overloaded\"} 1"]).await;

    s.cluster.broker_up(1).unwrap();
    let spool = gw.spool().clone();
    wait_until("room in the spool", Duration::from_secs(60), || {
        !spool.is_full()
    })
    .await;
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    // The refused callback, sent again (as Tencent's retry or the caller
    // would), is now accepted: the failed attempt did not mark it a duplicate.
    let refused = accepted.len() as u64;
    accepted.extend(post_groups(addr, "g-full", refused..refused + 1).await);

    assert_groups_arrive(&s.bootstrap, &accepted);
    gw.shutdown().await.unwrap();
}
