//! Clients that hold a connection without cooperating (never reading their
//! answers, or never finishing a request head) are disconnected, and a full
//! listener answers new clients at once instead of leaving them hanging.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A client that pipelines `GET /metrics` many times over a tiny receive
/// buffer and never reads: the answers fill both sockets' buffers.
async fn stuck_reader(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    // The gateway stops reading once its answers back up; do not wait for
    // the whole pipeline to be taken.
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&requests)).await;
    stream
}

/// Reads until the gateway closes the connection (EOF or reset); false if
/// it is still open after `within`. What arrives is discarded.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn timed_out(gw: &timbridge::Gateway, stage: &str) -> u64 {
    gw.metrics()
        .connections_timed_out
        .with_label_values(&["callback", stage])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_are_disconnected() {
    let s = setup();
    let gw = s
        .gateway(&[(
            "server",
            "max_connections = 4\nwrite_timeout = \"1s\"\nheader_read_timeout = \"30s\"",
        )])
        .await;
    let addr = gw.local_addr();
    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(stuck_reader(addr).await);
    }
    // Every slot is held by a client that does not read. Each is cut once
    // its answers have waited write_timeout, which frees the slots.
    wait_until(
        "the four stuck readers are disconnected for not taking their answers",
        Duration::from_secs(15),
        || timed_out(&gw, "answer") >= 4,
    )
    .await;
    let started = Instant::now();
    let a = post(
        addr,
        &group_callback(),
        group_body("after-stuck", 1).as_bytes(),
    )
    .await;
    assert_ok(&a);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Reading now, the client finds the connection closed (after whatever
    // answers had been written into its buffers).
    for s in &mut stuck {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a stuck reader's connection is still open"
        );
    }
    assert_groups_arrive(&s.bootstrap, &["after-stuck".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_is_cut_at_the_header_deadline_however_it_drips() {
    let s = setup();
    let gw = s
        .gateway(&[("server", "header_read_timeout = \"1s\"")])
        .await;
    let mut slow = TcpStream::connect(gw.local_addr()).await.unwrap();
    slow.write_all(b"POST /callback HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One header line every 200 ms: progress must not extend the deadline.
    let drip = async {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow
                .write_all(format!("X-Drip-{i}: b\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drip).await;
    assert!(
        closed_within(&mut slow, Duration::from_secs(1)).await,
        "a dripping head kept its connection for over 5 s"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(timed_out(&gw, "head"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_answers_503_at_once_instead_of_leaving_clients_hanging() {
    let s = setup();
    let gw = s
        .gateway(&[(
            "server",
            "max_connections = 2\nheader_read_timeout = \"60s\"",
        )])
        .await;
    let addr = gw.local_addr();
    // Two clients that connect and say nothing hold both slots.
    let idle1 = TcpStream::connect(addr).await.unwrap();
    let _idle2 = TcpStream::connect(addr).await.unwrap();
    wait_open_connections(&gw, "callback", 2).await;

    let started = Instant::now();
    let a = tokio::time::timeout(
        Duration::from_secs(2),
        post(addr, &group_callback(), group_body("refused", 1).as_bytes()),
    )
    .await
    .expect("a client beyond max_connections gets an answer, not a hang");
    let info = assert_fail(&a, 503);
    assert!(info.contains("maximum of 2 connections"), "{info}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gw.metrics()
            .connections_refused
            .with_label_values(&["callback"])
            .get(),
        1
    );

    // A slot freed is a slot served.
    drop(idle1);
    post_until_accepted(addr, "served", "no slot came free", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_per_address_cap_one_address_cannot_take_every_slot() {
    let s = setup();
    let gw = s
        .gateway(&[(
            "server",
            "max_connections = 8\nmax_connections_per_ip = 2\nheader_read_timeout = \"60s\"",
        )])
        .await;
    let addr = gw.local_addr();
    let _held = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    wait_open_connections(&gw, "callback", 2).await;
    let a = post(addr, &group_callback(), group_body("third", 1).as_bytes()).await;
    let info = assert_fail(&a, 503);
    assert!(info.contains("max_connections_per_ip"), "{info}");

    // Another address still gets in.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(addr).await.unwrap();
    let body = group_body("other-address", 1);
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        group_callback(),
        body.len()
    );
    other.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
