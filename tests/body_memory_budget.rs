//! The bytes of request bodies held in memory at once are bounded by
//! `server.max_body_memory_bytes`: a body is reserved as it arrives (with a
//! Content-Length or chunked), and a callback that does not fit, after a
//! brief wait for room, is answered 503 while the gateway keeps serving.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// max_body_bytes is 65536 in the test config.
const BUDGET: (&str, &str) = ("server", "max_body_memory_bytes = 100000");

fn held(gw: &timbridge::Gateway) -> i64 {
    gw.metrics().body_memory_bytes.get()
}

/// A client that declares a 65536-byte body and sends only its first
/// 60000 bytes.
async fn slow_upload(addr: std::net::SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n",
        group_callback()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&[b' '; 60_000]).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_past_the_body_memory_budget_get_503_and_the_gateway_keeps_serving() {
    let s = setup();
    let gw = s
        .gateway(&[BUDGET, ("server", "body_read_timeout = \"30s\"")])
        .await;
    let addr = gw.local_addr();

    // One upload in progress holds what it has sent (and a little room to grow).
    let upload = slow_upload(addr).await;
    wait_until(
        "the bytes sent are reserved",
        Duration::from_secs(5),
        || held(&gw) >= 60_000,
    )
    .await;
    assert!(held(&gw) <= 65_536, "{}", held(&gw));

    // A second body that does not fit is refused once it has waited for room.
    let a = post(addr, &group_callback(), &vec![b' '; 50_000]).await;
    let info = assert_fail(&a, 503);
    assert!(info.contains("in memory"), "{info}");
    assert_eq!(a.headers.get("connection").unwrap(), "close");

    // A chunked body is counted as it grows: refused once it passes the room left.
    let answer = chunked_upload(addr, 20, 2000).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(gw.metrics().body_memory_exhausted.get(), 2);
    let overloaded = gw
        .metrics()
        .callbacks
        .with_label_values(&["Group.CallbackAfterReadReceipt", "overloaded"])
        .get();
    assert_eq!(overloaded, 2);

    // Small callbacks still fit beside the upload.
    assert_ok(&post(addr, &group_callback(), group_body("fits", 1).as_bytes()).await);
    let answer = chunked_upload(addr, 3, 1000).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The client going away gives its reservation back.
    drop(upload);
    wait_until(
        "the reservation is given back",
        Duration::from_secs(5),
        || held(&gw) == 0,
    )
    .await;
    assert_ok(&post(addr, &group_callback(), group_body("after", 1).as_bytes()).await);
    assert_groups_arrive(&s.bootstrap, &["fits".to_owned(), "after".to_owned()]);
}

/// Sends a chunked body of `chunks` chunks of `size` spaces (not a valid
/// callback: a 400 shows it was read to its end) and returns the answer's
/// first line.
async fn chunked_upload(addr: std::net::SocketAddr, chunks: usize, size: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        group_callback()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        let chunk = format!("{size:x}\r\n{}\r\n", " ".repeat(size));
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break; // answered and closed part-way
        }
    }
    let _ = c.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_budget_below_the_largest_body_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "127.0.0.1:9092",
        dir.path(),
        &[("server", "max_body_memory_bytes = 1000")],
    );
    let err = timbridge::config::Config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.max_body_memory_bytes"), "{err}");
}

#[test]
fn a_budget_too_large_to_be_a_semaphore_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "127.0.0.1:9092",
        dir.path(),
        &[("server", "max_body_memory_bytes = 9223372036854775807")],
    );
    let err = timbridge::config::Config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.max_body_memory_bytes must be at most"),
        "{err}"
    );
}
