//! A request head larger than the gateway takes (16 KiB) is answered 431 and
//! its connection closed as soon as the limit is passed: hyper's default
//! would buffer about 400 KiB per connection, so a few hundred clients each
//! sending one long header line could hold the container's whole memory.
//! A first request line over 16 KiB is answered 414, however it arrives.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_kib_header_line_is_answered_431_not_buffered() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();

    let body = group_body("long-head", 1);
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nX-Pad: ",
        group_callback(),
        body.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    // Write the header line in pieces; the gateway answers and closes well
    // before 400 KiB, so later writes may fail.
    let pad = vec![b'a'; 16 * 1024];
    for _ in 0..25 {
        if c.write_all(&pad).await.is_err() {
            break;
        }
    }
    let _ = c.write_all(b"\r\n\r\n").await;
    let _ = c.write_all(body.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    // A 431, or (when the reset beat the answer) nothing at all: never served.
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    // The gateway keeps serving, and the long-headed callback was not taken.
    assert_ok(&post(addr, &group_callback(), group_body("after", 1).as_bytes()).await);
    assert_groups_arrive(&s.bootstrap, &["after".to_owned()]);
    assert_eq!(
        gw.metrics()
            .callbacks
            .with_label_values(&["Group.CallbackAfterReadReceipt", "accepted"])
            .get(),
        1
    );
}

/// A URL too long for the head limit (here a 64 KiB CallbackCommand) is
/// answered 414, "URI Too Long", which names what to shorten, rather than
/// 431; the gateway takes nothing from it and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_kib_callback_command_is_answered_414() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();

    let command = "C".repeat(64 * 1024);
    let body = group_body("long-url", 1);
    let mut c = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /callback?SdkAppid={APP}&CallbackCommand={command}&contenttype=json HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // The gateway answers once 16 KiB have passed, and reads the rest
    // before it closes: a client that sends its whole request, as HTTP
    // clients do, then reads the answer, gets it rather than a reset.
    c.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after the answer")
        .expect("no reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer:?}");

    assert_ok(&post(addr, &group_callback(), group_body("after", 1).as_bytes()).await);
    assert_groups_arrive(&s.bootstrap, &["after".to_owned()]);
    let handled: u64 = timbridge::labels::Outcome::ALL
        .iter()
        .map(|o| {
            gw.metrics()
                .callbacks
                .with_label_values(&["other", o.as_str()])
                .get()
        })
        .sum();
    assert_eq!(handled, 0, "the long-URL request reached the handler");
}

/// The first line of whatever the gateway answers to `request`, sent in one
/// write.
async fn first_line_of_answer(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("<nothing>")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_line_over_16_kib_is_414_however_it_arrives() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    // Its start-up talk with Kafka done, so the test ends without waiting on it.
    common::faults::wait_kafka_up(&gw).await;
    let addr = gw.local_addr();
    let line = |n: usize| {
        format!(
            "POST /callback?SdkAppid=1&CallbackCommand={} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "c".repeat(n)
        )
    };
    // Just over the limit in one write: the line's end comes in the same
    // read as bytes past the limit (it was answered 431 by hyper).
    let just_over = first_line_of_answer(addr, line(17 * 1024).as_bytes()).await;
    // After an empty line, which HTTP lets a server skip (it was taken for
    // the end of the request line).
    let mut after_empty = b"\r\n".to_vec();
    after_empty.extend_from_slice(line(64 * 1024).as_bytes());
    let after_empty = first_line_of_answer(addr, &after_empty).await;
    assert!(
        just_over.starts_with("HTTP/1.1 414"),
        "17 KiB line: {just_over}"
    );
    assert!(
        after_empty.starts_with("HTTP/1.1 414"),
        "CRLF, then a 64 KiB line: {after_empty}"
    );
    // A line under the limit after empty lines is still served.
    let mut fine = b"\r\n\r\n".to_vec();
    fine.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let fine = first_line_of_answer(addr, &fine).await;
    assert!(
        fine.starts_with("HTTP/1.1 200"),
        "empty lines, then /healthz: {fine}"
    );
}
