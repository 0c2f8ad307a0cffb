//! A dead, slow, busy or babbling upstream gets Tencent a FAIL answer fast
//! (502, 504, 503), counted as `upstream_failed`, while read receipts and
//! /readyz carry on as if there were no upstream.

mod common;

use std::time::{Duration, Instant};

use common::upstream::*;
use common::*;

const SEND_MSG: &[u8] =
    br#"{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"@TGS#up","MsgSeq":1}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_and_read_receipts_carry_on() {
    let s = setup();
    let gw = s.gateway_proxying_to(&dead_url().await, "").await;
    let addr = gw.local_addr();
    let started = Instant::now();
    let a = post(addr, &callback_path("Group.CallbackAfterSendMsg"), SEND_MSG).await;
    let info = assert_fail(&a, 502);
    assert_eq!(a.json["ErrorCode"], 8);
    assert!(info.contains("unreachable"), "{info}");
    // Tencent (and whoever reads its logs) is not told the app's internals:
    // the root cause, which names the connection error, goes to our log.
    assert!(
        !info.to_lowercase().contains("refused") && !info.contains("connect"),
        "{info}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    post_groups(addr, "up-down", 0..3).await;
    let (status, readyz) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{readyz}");
    let readyz: serde_json::Value = serde_json::from_str(&readyz).unwrap();
    assert_eq!(readyz["upstream_configured"], true);
    assert_eq!(readyz["upstream_reachable"], false);

    assert_metrics_show(
        addr,
        &[
            "timbridge_callbacks_total{command=\"other\",outcome=\"upstream_failed\"} 1",
            "timbridge_upstream_requests_total{outcome=\"unreachable\"} 1",
        ],
    )
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_timeout_is_a_504_within_it() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(&app.url(), "timeout = \"500ms\"")
        .await;
    let addr = gw.local_addr();
    let started = Instant::now();
    let a = post(
        addr,
        &callback_path("Slow.Command"),
        br#"{"CallbackCommand":"Slow.Command"}"#,
    )
    .await;
    let took = started.elapsed();
    let info = assert_fail(&a, 504);
    assert_eq!(a.json["ErrorCode"], 9);
    assert!(info.contains("500ms"), "{info}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1000),
        "answered after {took:?}, want timeout + at most 0.5 s"
    );
    // While the app hangs, a read receipt does not wait for it.
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let slow = callback_path("Slow.Command");
        post(addr, &slow, br#"{"CallbackCommand":"Slow.Command"}"#).await
    });
    wait_until(
        "the slow request reached the app",
        Duration::from_secs(5),
        || app.seen().len() == 2,
    )
    .await;
    post_groups(addr, "up-slow", 0..1).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_fail(&slow.await.unwrap(), 504);

    assert_metrics_show(
        addr,
        &["timbridge_upstream_requests_total{outcome=\"timeout\"} 2"],
    )
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_callbacks_get_503_at_once() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(&app.url(), "timeout = \"2s\"\nmax_in_flight = 1")
        .await;
    let addr = gw.local_addr();
    let slow = tokio::spawn(async move {
        let slow = callback_path("Slow.Command");
        post(addr, &slow, br#"{"CallbackCommand":"Slow.Command"}"#).await
    });
    wait_until(
        "the slow request reached the app",
        Duration::from_secs(5),
        || app.seen().len() == 1,
    )
    .await;
    let started = Instant::now();
    let a = post(addr, &callback_path("Group.CallbackAfterSendMsg"), SEND_MSG).await;
    let info = assert_fail(&a, 503);
    assert_eq!(a.json["ErrorCode"], 10);
    assert!(info.contains("max_in_flight"), "{info}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(app.seen().len(), 1, "the refused callback reached the app");
    assert_fail(&slow.await.unwrap(), 504);

    assert_metrics_show(
        addr,
        &["timbridge_upstream_requests_total{outcome=\"busy\"} 1"],
    )
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_a_502() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_proxying_to(&app.url(), "max_response_bytes = 4096")
        .await;
    let a = post(
        gw.local_addr(),
        &callback_path("Huge.Command"),
        br#"{"CallbackCommand":"Huge.Command"}"#,
    )
    .await;
    let info = assert_fail(&a, 502);
    assert!(info.contains("max_response_bytes"), "{info}");
    assert_metrics_show(
        gw.local_addr(),
        &["timbridge_upstream_requests_total{outcome=\"bad_answer\"} 1"],
    )
    .await;
    gw.shutdown().await.unwrap();
}

/// An app that answers `chunks` chunks of one byte each, chunked, to every
/// request on a connection; returns its URL.
async fn tiny_chunk_app(chunks: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/app", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Read the head and body the gateway sends (small here),
                // then answer: no request of the test needs more than one.
                let mut buf = vec![0u8; 64 << 10];
                let _ = s.read(&mut buf).await;
                let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                   transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    .to_vec();
                for _ in 0..chunks {
                    answer.extend_from_slice(b"1\r\n \r\n");
                }
                answer.extend_from_slice(b"1\r\n{\r\n1\r\n}\r\n0\r\n\r\n");
                let _ = s.write_all(&answer).await;
            });
        }
    });
    url
}

/// The app's answer in thousands of one-byte chunks is taken whole, the
/// bytes in order, while it is within `max_response_bytes`, and refused
/// past it, with no Content-Length to refuse it by in advance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_tiny_chunks_is_taken_whole_within_the_limit() {
    let s = setup();
    let url = tiny_chunk_app(4000).await;
    // The app's answer is 4,002 bytes: 4,000 spaces, then `{}`.
    let ask = |limit: usize| {
        let (s, url) = (&s, &url);
        async move {
            let gw = s
                .gateway_proxying_to(url, &format!("max_response_bytes = {limit}"))
                .await;
            let a = post(
                gw.local_addr(),
                &callback_path("Tiny.Command"),
                br#"{"CallbackCommand":"Tiny.Command"}"#,
            )
            .await;
            gw.shutdown().await.unwrap();
            a
        }
    };
    let a = ask(4002).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(a.json, serde_json::json!({}));
    let info = assert_fail(&ask(4001).await, 502);
    assert!(info.contains("max_response_bytes"), "{info}");
}
