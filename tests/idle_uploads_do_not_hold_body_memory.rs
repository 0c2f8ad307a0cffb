//! Clients that declare large bodies and then send (almost) nothing hold no
//! body-memory budget: only bytes that have arrived are reserved, so idle
//! uploads, however many, cannot make genuine callbacks 503.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_uploads_declaring_the_largest_body_do_not_starve_small_callbacks() {
    let s = setup();
    // Room for two of the largest bodies (max_body_bytes is 65536 in the
    // test config): on declared lengths, two idle clients would fill it.
    let gw = s
        .gateway(&[(
            "server",
            "max_body_memory_bytes = 131072\nbody_read_timeout = \"30s\"",
        )])
        .await;
    let addr = gw.local_addr();
    let mut idle = Vec::new();
    for _ in 0..6 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n{{",
            group_callback()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        idle.push(c);
    }
    let in_flight = || gw.metrics().callbacks_in_flight.get();
    let refused = || gw.metrics().body_memory_exhausted.get() as i64;
    wait_until(
        "the idle uploads are being read (or refused)",
        Duration::from_secs(5),
        || in_flight() + refused() == 6,
    )
    .await;
    assert_eq!(refused(), 0, "idle uploads were refused: they held budget");
    assert_eq!(in_flight(), 6);
    // One byte each has arrived: that is all they hold.
    assert!(gw.metrics().body_memory_bytes.get() <= 6, "{}", {
        gw.metrics().body_memory_bytes.get()
    });

    for i in 0..5 {
        let group = format!("small-{i}");
        assert_ok(&post(addr, &group_callback(), group_body(&group, 1).as_bytes()).await);
    }
    assert_eq!(gw.metrics().body_memory_exhausted.get(), 0);
    let groups: Vec<String> = (0..5).map(|i| format!("small-{i}")).collect();
    assert_groups_arrive(&s.bootstrap, &groups);
    drop(idle);
}
