//! A copy of a callback that arrives while the original is still being
//! written waits for the original's outcome: it is never answered OK
//! ("duplicate") for an event that then fails to reach the spool. Tencent
//! does not retry an OK'd after-callback, so such an answer would lose it.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::*;

/// Posts `n` identical copies of `body` at once, each on its own
/// connection, and returns their statuses.
async fn post_copies(addr: std::net::SocketAddr, body: &str, n: usize) -> Vec<u16> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let copies: Vec<_> = (0..n)
        .map(|_| {
            let body = body.to_owned();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                post(addr, &group_callback(), body.as_bytes()).await.status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in copies {
        statuses.push(c.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_while_the_spool_is_full_are_all_refused() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    // The real binary, with its own threads, as Tencent's retries meet it.
    let text = s.config_text(&[("spool", "max_bytes = 16384\nsegment_bytes = 4096")]);
    let gw = GatewayProcess::start(s.dir.path(), &text);
    let addr = gw.addr;
    let (mut accepted, refusal) = post_groups_until_refused(addr, "g-fill", 1000).await;
    assert_fail(&refusal, 503);

    // Rounds of 50 identical copies of a new callback, at once.
    for round in 0..5 {
        let body = group_body(&format!("g-copies-{round}"), 7);
        let statuses = post_copies(addr, &body, 50).await;
        let ok = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            ok, 0,
            "round {round}: copies answered OK while nothing was spooled: {statuses:?}"
        );
        assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    }

    // Once Kafka drains the spool, the callback is accepted again, and
    // exactly one copy of it is delivered.
    s.cluster.broker_up(1).unwrap();
    let body = group_body("g-copies-0", 7);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a = post(addr, &group_callback(), body.as_bytes()).await;
        if a.status == 200 {
            assert_ok(&a);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", a.json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = post(addr, &group_callback(), body.as_bytes()).await;
    assert_ok(&again);
    let (_, metrics) = get_text(addr, "/metrics").await;
    assert!(
        metrics.contains("outcome=\"duplicate\"} 1"),
        "the second accepted copy is the only duplicate: {metrics}"
    );
    accepted.push("g-copies-0".to_owned());
    let recs = assert_groups_arrive(&s.bootstrap, &accepted);
    let copies = recs.iter().filter(|r| r.key == b"g-copies-0").count();
    assert_eq!(copies, 1, "one record per accepted event");
}
