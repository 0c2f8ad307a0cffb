//! A copy of a callback that arrives while the original is still being
//! written waits for the original's outcome: it is never answered OK
//! ("duplicate") for an event that then fails to reach the spool. Tencent
//! does not retry an OK'd after-callback, so such an answer would lose it.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_while_the_spool_is_full_are_all_refused() {
    let s = setup();
    s.cluster.broker_down(1).unwrap();
    let gw = s
        .gateway(&[("spool", "max_bytes = 16384\nsegment_bytes = 4096")])
        .await;
    let addr = gw.local_addr();
    let (mut accepted, refusal) = post_groups_until_refused(addr, "g-fill", 1000).await;
    assert_fail(&refusal, 503);

    // 50 identical copies of a new callback, at once.
    let body = group_body("g-copies", 7);
    let copies = (0..50).map(|_| {
        let body = body.clone();
        tokio::spawn(async move { post(addr, &group_callback(), body.as_bytes()).await })
    });
    let mut statuses = Vec::new();
    for c in copies {
        statuses.push(c.await.unwrap().status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        ok, 0,
        "copies answered OK while nothing was spooled: {statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");

    // Once Kafka drains the spool, the callback is accepted again, and
    // exactly one copy of it is delivered.
    s.cluster.broker_up(1).unwrap();
    let spool = gw.spool().clone();
    wait_until("room in the spool", Duration::from_secs(60), || {
        !spool.is_full()
    })
    .await;
    assert_ok(&post(addr, &group_callback(), body.as_bytes()).await);
    let again = post(addr, &group_callback(), body.as_bytes()).await;
    assert_ok(&again);
    let (_, metrics) = get_text(addr, "/metrics").await;
    assert!(
        metrics.contains("outcome=\"duplicate\"} 1"),
        "the second accepted copy is the only duplicate: {metrics}"
    );
    accepted.push("g-copies".to_owned());
    let recs = assert_groups_arrive(&s.bootstrap, &accepted);
    let copies = recs.iter().filter(|r| r.key == b"g-copies").count();
    assert_eq!(copies, 1, "one record per accepted event");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_that_are_spooled_are_delivered_once() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let body = group_body("g-racing", 3);
    let copies: Vec<_> = (0..20)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move { post(addr, &group_callback(), body.as_bytes()).await })
        })
        .collect();
    for c in copies {
        assert_ok(&c.await.unwrap());
    }
    let recs = assert_groups_arrive(&s.bootstrap, &["g-racing".to_owned()]);
    // Give a second copy the time to show up if there were one.
    let more = read_topic(&s.bootstrap, GROUP_TOPIC, 2, Duration::from_secs(3));
    assert_eq!(more.len(), 1, "{recs:?}");
    gw.shutdown().await.unwrap();
}
