//! SIGTERM: requests in flight are finished and answered, new callbacks are
//! refused, Kafka gets `shutdown_timeout` to take what is spooled, and what
//! it did not take is still there at the next start. A second signal exits
//! at once, still losing nothing acknowledged.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{BIN, GatewayProcess};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spool_stat(config: &std::path::Path) -> String {
    let out = common::fork::output(
        Command::new(BIN)
            .args(["spool", "stat", "--config"])
            .arg(config),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_keeps_the_undelivered() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let text = s.config_text(&[("server", "shutdown_timeout = \"2s\"")]);
    let mut gw = GatewayProcess::start(s.dir.path(), &text);
    let mut groups = post_groups(gw.addr, "g-term", 0..10).await;

    // A request in flight when the signal comes: head and half the body sent.
    let body = group_body("g-term-inflight", 0);
    let (first, rest) = body.split_at(body.len() / 2);
    let mut inflight = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        group_callback(),
        body.len()
    );
    inflight.write_all(head.as_bytes()).await.unwrap();
    inflight.write_all(first.as_bytes()).await.unwrap();
    // Wait until the gateway is reading it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get_text(gw.addr, "/metrics")
        .await
        .1
        .contains("timbridge_callbacks_in_flight 1")
    {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    gw.signal("TERM");
    gw.wait_for_log("shutting down", Duration::from_secs(5));
    // Past the drain delay (0 here) the listener is closed, and the request
    // under way is still finished.
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    inflight.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    inflight.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""ActionStatus":"OK""#), "{answer}");
    groups.push("g-term-inflight".into());

    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}\n{}", gw.log_text());
    assert!(
        gw.log_text().contains("will be sent at the next start"),
        "{}",
        gw.log_text()
    );

    // Everything answered OK is in the spool of the stopped gateway.
    let stat = spool_stat(&s.dir.path().join("config.toml"));
    assert!(
        stat.contains(&format!("pending events: {}", groups.len())),
        "{stat}"
    );

    s.cluster.broker_up(1).unwrap();
    let _gw = GatewayProcess::start(s.dir.path(), &text);
    assert_groups_arrive(&s.bootstrap, &groups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_readyz_is_503_and_callbacks_are_still_taken() {
    let s = setup();
    let text = s.config_text(&[("server", "drain_delay = \"3s\"")]);
    let mut gw = GatewayProcess::start(s.dir.path(), &text);
    assert_eq!(get_text(gw.addr, "/readyz").await.0, 200);
    gw.signal("TERM");
    gw.wait_for_log("/readyz is 503", Duration::from_secs(5));
    let (status, body) = get_text(gw.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["draining"], true, "{body}");
    assert_eq!(ready["reason"], "shutting down", "{body}");
    // A load balancer may still send for a moment: those are not lost.
    let groups = post_groups(gw.addr, "g-during-drain", 0..1).await;
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", gw.log_text());
    assert_groups_arrive(&s.bootstrap, &groups);
    // After the delay the listener is closed.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_loses_nothing() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let text = s.config_text(&[("server", "shutdown_timeout = \"60s\"")]);
    let mut gw = GatewayProcess::start(s.dir.path(), &text);
    let groups = post_groups(gw.addr, "g-twice", 0..5).await;
    gw.signal("TERM");
    gw.wait_for_log("shutting down", Duration::from_secs(5));
    gw.signal("TERM");
    // Well before the 60 s the first signal would have waited for Kafka.
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(!status.success());

    s.cluster.broker_up(1).unwrap();
    let _gw = GatewayProcess::start(s.dir.path(), &text);
    assert_groups_arrive(&s.bootstrap, &groups);
}

/// With Kafka unreachable, the start's check of the topics waits up to 10 s
/// for an answer. A gateway stopped meanwhile exits as soon as it has
/// stopped: it used to sit out the rest of the check first, after logging
/// that it had stopped, which a supervisor sees as a hung stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_the_start_does_not_wait_for_an_unreachable_kafka() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let mut gw = GatewayProcess::start(s.dir.path(), &s.config_text(&[]));
    gw.signal("TERM");
    gw.wait_for_log("stopped;", Duration::from_secs(10));
    let stopped = Instant::now();
    let status = gw.wait_exit(Duration::from_secs(15));
    let waited = stopped.elapsed();
    assert!(status.success(), "{status}\n{}", gw.log_text());
    // The check was still waiting when the gateway stopped, so this test
    // measures the exit with a check under way.
    assert!(
        !gw.log_text()
            .contains("could not check that the Kafka topics exist"),
        "the topic check ended before the stop:\n{}",
        gw.log_text()
    );
    assert!(
        waited < Duration::from_secs(3),
        "exited {waited:?} after logging that it had stopped:\n{}",
        gw.log_text()
    );
}
