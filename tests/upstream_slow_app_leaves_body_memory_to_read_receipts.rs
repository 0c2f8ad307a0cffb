//! A slow app must not starve read receipts of body memory: a proxied
//! callback may wait up to `upstream.timeout` for the app, so once its body
//! is read it leaves the server's body budget for the upstream's own
//! (`upstream.max_proxied_body_bytes`), and read receipts keep getting 200
//! at once while the app sleeps.

mod common;

use std::time::{Duration, Instant};

use common::upstream::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_are_answered_while_proxied_bodies_wait_for_a_sleeping_app() {
    let s = setup();
    let app = TestUpstream::start().await;
    // Room for two 60 KB bodies in the server's budget, and for three in
    // the proxy's.
    let gw = s
        .gateway_with_upstream(
            &format!(
                "url = \"{}\"\ntimeout = \"5s\"\nmax_proxied_body_bytes = 196608",
                app.url()
            ),
            &[("server", "max_body_memory_bytes = 131072")],
        )
        .await;
    let addr = gw.local_addr();
    // `Slow.Command` makes the app sleep 3 s before answering.
    let body = format!(
        r#"{{"CallbackCommand":"Slow.Command","Pad":"{}"}}"#,
        "x".repeat(60_000)
    );
    let path = callback_path("Slow.Command");
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (path, body) = (path.clone(), body.clone());
            tokio::spawn(async move { post(addr, &path, body.as_bytes()).await })
        })
        .collect();
    wait_until(
        "the app holds proxied callbacks",
        Duration::from_secs(5),
        || app.seen().len() >= 2,
    )
    .await;

    let started = Instant::now();
    assert_ok(&post(addr, &group_callback(), GROUP_BODY.as_bytes()).await);
    assert!(
        // Below the 500 ms a body waits for room in the body budget.
        started.elapsed() < Duration::from_millis(490),
        "the read receipt waited for body memory: {:?}",
        started.elapsed()
    );

    // The proxy's budget holds three: past it, 503 at once rather than a
    // wait for the app. (Which ones got in depends on scheduling.)
    let mut statuses = Vec::new();
    for t in slow {
        statuses.push(t.await.unwrap().status);
    }
    let answered = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (2..=3).contains(&answered) && statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    gw.shutdown().await.unwrap();
}
