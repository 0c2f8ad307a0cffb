//! `forward_read_receipts = true`: read receipts are spooled and answered by
//! the gateway as always, and also delivered to the app afterwards, never
//! waited for; what the bounded queue cannot hold is counted.

mod common;

use std::time::{Duration, Instant};

use common::upstream::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_reach_the_app_after_the_gateway_answered() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(&app.url(), "forward_read_receipts = true")
        .await;
    let path = group_callback();
    let started = Instant::now();
    assert_ok(&post(gw.local_addr(), &path, GROUP_BODY.as_bytes()).await);
    assert!(
        started.elapsed() < READ_RECEIPT_DELAY,
        "the answer waited for the app"
    );
    wait_until(
        "the app got the read receipt",
        Duration::from_secs(10),
        || !app.seen().is_empty(),
    )
    .await;
    let seen = app.seen();
    assert_eq!(format!("/callback?{}", seen[0].query), path);
    assert_eq!(seen[0].body, GROUP_BODY.as_bytes());
    let recs = read_topic(&s.bootstrap, GROUP_TOPIC, 2, Duration::from_secs(20));
    assert_eq!(recs.len(), 2, "in Kafka as well");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_the_queue_cannot_hold_are_counted_not_waited_for() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(
            &app.url(),
            "forward_read_receipts = true\nforward_queue = 1",
        )
        .await;
    let addr = gw.local_addr();
    // The app takes a second per read receipt: a few are being delivered,
    // one waits in the queue, the rest cannot be queued.
    let started = Instant::now();
    let groups = post_groups(addr, "fwd-full", 0..30).await;
    assert!(
        started.elapsed() < READ_RECEIPT_DELAY * 3,
        "answers waited for the app: {:?}",
        started.elapsed()
    );
    let (_, metrics) = get_text(addr, "/metrics").await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("timbridge_upstream_forward_dropped_total{reason=\"queue_full\"} ")
        })
        .expect("the drop counter")
        .parse()
        .unwrap();
    assert!(dropped >= 10, "{dropped} dropped of 30:\n{metrics}");
    assert_groups_arrive(&s.bootstrap, &groups);
    gw.shutdown().await.unwrap();
}

/// Each queued read receipt holds its whole body outside the body-memory
/// budget: the queue is bounded in bytes as well as items, so a stalled app
/// cannot make large read receipts pile up in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_past_the_queues_bytes_are_counted_not_held() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(
            &app.url(),
            "forward_read_receipts = true\nforward_queue_bytes = 32768",
        )
        .await;
    let addr = gw.local_addr();
    // About 9 kB each, and the app takes a second per read receipt: three
    // fit in 32 KiB (queued or being delivered), the rest are dropped even
    // though the queue has room for 10,000 items.
    let path = group_callback();
    for i in 0..20 {
        assert_ok(
            &post(
                addr,
                &path,
                huge_receipt(&format!("fwd-bytes-{i}")).as_bytes(),
            )
            .await,
        );
    }
    let (_, metrics) = get_text(addr, "/metrics").await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("timbridge_upstream_forward_dropped_total{reason=\"queue_full\"} ")
        })
        .expect("the drop counter")
        .parse()
        .unwrap();
    assert!(dropped >= 15, "{dropped} dropped of 20:\n{metrics}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_retried_until_the_app_takes_it() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(&app.url(), "forward_read_receipts = true")
        .await;
    // The app answers 503 to the first delivery of a "flaky" body.
    let body = group_body("flaky-1", 1);
    assert_ok(&post(gw.local_addr(), &group_callback(), body.as_bytes()).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered = "timbridge_upstream_requests_total{outcome=\"answered\"} 2";
    loop {
        let (_, metrics) = get_text(gw.local_addr(), "/metrics").await;
        if metrics.contains(answered) {
            assert!(
                metrics.contains("timbridge_upstream_forward_dropped_total{reason=\"expired\"} 0"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never answered twice:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The 503, then the delivery the app took, and nothing after it.
    let seen = app.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.body == body.as_bytes()));
    gw.shutdown().await.unwrap();
}
