//! A callback from whoever is not the app (an `SdkAppid` not configured, or
//! a wrong `Sign`) is answered from its query alone, before a byte of its
//! body is read. So uploads from clients without the token hold none of the
//! body memory (`server.max_body_memory_bytes`) that genuine callbacks
//! need, and get the documented 403 or 401 at once, whatever their body's
//! size or speed: the order of the checks is the source, the app, its
//! signature, then the body.

mod common;

use std::time::{Duration, Instant};

use common::faults::wait_kafka_up;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UNKNOWN_APP: &str = "/callback?SdkAppid=1&CallbackCommand=Group.CallbackAfterReadReceipt";

/// A group callback for the configured app with a wrong Sign: what a client
/// without the token can send.
fn forged_query() -> String {
    format!(
        "/callback?SdkAppid={APP}&CallbackCommand=Group.CallbackAfterReadReceipt&Sign={}&RequestTime={}",
        "0".repeat(64),
        now_s()
    )
}

/// Declares a 64 KiB body, sends all of it but the last byte, and stalls.
async fn stalled_upload(addr: std::net::SocketAddr, query: &str) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let head = format!("POST {query} HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n");
    c.write_all(head.as_bytes()).await.expect("head");
    c.write_all(&[b' '; 65_535]).await.expect("body");
    c
}

/// Waits until `/metrics` counts `n` group callbacks answered with `outcome`.
async fn wait_answered(addr: std::net::SocketAddr, outcome: &str, n: u64) {
    let line = format!(
        r#"timbridge_callbacks_total{{command="Group.CallbackAfterReadReceipt",outcome="{outcome}"}} {n}"#
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = get_text(addr, "/metrics").await;
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not answered in 5 s (the body timeout is 30 s): {line}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_without_the_token_hold_no_body_memory() {
    let s = setup();
    // Room for two 64 KiB bodies: before the fix, the two uploads below
    // held all of it until the body timeout, and a genuine callback got 503.
    let gw = s
        .gateway(&[(
            "server",
            "max_body_memory_bytes = 131072\nbody_read_timeout = \"30s\"",
        )])
        .await;
    // Its start-up talk with Kafka done, so the test ends without waiting on it.
    wait_kafka_up(&gw).await;
    let addr = gw.local_addr();
    let _forged = stalled_upload(addr, &forged_query()).await;
    let _unknown = stalled_upload(addr, UNKNOWN_APP).await;
    wait_answered(addr, "unauthorized", 1).await;
    wait_answered(addr, "unknown_app", 1).await;
    assert_eq!(
        gw.metrics().body_memory_bytes.get(),
        0,
        "bodies of refused callbacks are held"
    );
    let a = post(addr, &group_callback(), group_body("genuine", 1).as_bytes()).await;
    assert_ok(&a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_app_is_403_whatever_its_body() {
    let s = setup();
    let gw = s
        .gateway(&[("server", "body_read_timeout = \"30s\"")])
        .await;
    wait_kafka_up(&gw).await;
    let addr = gw.local_addr();
    // Over max_body_bytes (64 KiB here): the app comes first, so 403, not 413.
    let a = post(addr, UNKNOWN_APP, &vec![b' '; 70_000]).await;
    assert_fail(&a, 403);
    // A body that never comes: 403 at once, not 408 after the body timeout.
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let head = format!("POST {UNKNOWN_APP} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    c.write_all(head.as_bytes()).await.expect("head");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("no answer before the body came")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // Counted as what it is, not as a body that timed out.
    wait_answered(addr, "unknown_app", 2).await;
}
