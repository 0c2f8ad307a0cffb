//! A client on the TLS port that sends nothing, half a ClientHello or plain
//! HTTP holds its connection slot no longer than `server.header_read_timeout`,
//! gets no HTTP answer, and is counted in
//! `timbridge_tls_handshakes_failed_total`, so a certificate clients refuse
//! or a load balancer speaking plain HTTP shows up on a dashboard.

mod common;

use std::time::{Duration, Instant};

use common::reload::TestCa;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends before it closes, within `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was still open after {within:?}"),
        }
    }
}

async fn failures(admin: std::net::SocketAddr, reason: &str) -> u64 {
    let (_, text) = get_text(admin, "/metrics").await;
    let prefix = format!("timbridge_tls_handshakes_failed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_and_plain_clients_are_closed_unanswered_and_counted() {
    let s = setup();
    TestCa::new().issue_into(s.dir.path());
    let dir = s.dir.path().display();
    let gw = s
        .gateway(&[(
            "server",
            &format!(
                "admin_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\ntls_cert_file = \"{dir}/server.crt\"\ntls_key_file = \"{dir}/server.key\""
            ),
        )])
        .await;
    let (addr, admin) = (gw.local_addr(), gw.admin_addr().unwrap());
    assert_eq!(failures(admin, "timeout").await, 0);
    assert_eq!(failures(admin, "error").await, 0);

    // Silence, then a record header announcing a ClientHello that never comes.
    let partial: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01];
    for (n, sent) in [(1, &[][..]), (2, partial)] {
        let started = Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(sent).await.unwrap();
        wait_open_connections(&gw, "callback", 1).await;
        let got = read_until_closed(&mut c, Duration::from_secs(4)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(!got.starts_with(b"HTTP/"), "{got:?}");
        wait_open_connections(&gw, "callback", 0).await;
        assert_eq!(failures(admin, "timeout").await, n);
    }

    // Plain HTTP: no HTTP answer at all, the connection is closed.
    let mut c = TcpStream::connect(addr).await.unwrap();
    let body = group_body("plain", 1);
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        group_callback(),
        body.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let _ = c.write_all(body.as_bytes()).await;
    let got = read_until_closed(&mut c, Duration::from_secs(4)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/"),
        "plain HTTP got an HTTP answer on the TLS port: {got:?}"
    );
    wait_open_connections(&gw, "callback", 0).await;
    assert_eq!(failures(admin, "error").await, 1);
    gw.shutdown().await.unwrap();
}

/// Over `max_connections` a plain listener answers 503 once it has read a
/// request head; a TLS client never sends one in plain text and could not
/// read the answer, so the connection is closed at once instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_a_tls_connection_is_closed_at_once() {
    let s = setup();
    let ca = TestCa::new();
    ca.issue_into(s.dir.path());
    let dir = s.dir.path().display();
    let gw = s
        .gateway(&[(
            "server",
            &format!(
                "max_connections = 1\ntls_cert_file = \"{dir}/server.crt\"\ntls_key_file = \"{dir}/server.key\""
            ),
        )])
        .await;
    let addr = gw.local_addr();
    let _held = common::reload::https_connect(&ca, addr)
        .await
        .expect("the first connection is served");
    wait_open_connections(&gw, "callback", 1).await;

    let started = Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let got = read_until_closed(&mut c, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "closed only after {:?}",
        started.elapsed()
    );
    let refused = common::reload::https_connect(&ca, addr).await;
    assert!(refused.is_err(), "a TLS client over the limit was served");
    gw.shutdown().await.unwrap();
}
