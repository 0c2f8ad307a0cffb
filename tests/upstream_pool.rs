//! Under load the proxy keeps its connections to the app alive and reuses
//! them: 1,000 callbacks at concurrency 32 all get the app's answer over a
//! few dozen connections, not one each.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::upstream::*;
use common::*;

const CALLBACKS: usize = 1000;
const CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_proxied_callbacks_reuse_pooled_connections() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let addr = gw.local_addr();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= CALLBACKS {
                    return statuses;
                }
                let body = format!(
                    r#"{{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"g{i}","MsgSeq":{i}}}"#
                );
                let a = post(addr, &callback_path("Group.CallbackAfterSendMsg"), body.as_bytes()).await;
                statuses.push((a.status, a.json["MsgBody"].is_array()));
            }
        }));
    }
    let mut answered = 0;
    for w in workers {
        for (status, rewritten) in w.await.unwrap() {
            assert_eq!(status, 200);
            assert!(rewritten, "not the app's answer");
            answered += 1;
        }
    }
    assert_eq!(answered, CALLBACKS);
    assert_eq!(app.seen().len(), CALLBACKS);
    let connections = app.connections();
    // At most one per concurrent request plus a few opened in a race with a
    // connection coming back to the pool; a client without a pool needs 1,000.
    assert!(
        connections <= 2 * CONCURRENCY,
        "{connections} connections to the app for {CALLBACKS} callbacks"
    );
    println!(
        "{CALLBACKS} callbacks at concurrency {CONCURRENCY}: {connections} upstream connections"
    );
    gw.shutdown().await.unwrap();
}
