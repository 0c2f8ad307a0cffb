//! `server.admin_listen`: probes and metrics on their own address and
//! connection budget, so that clients hogging the callback listener cannot
//! fail the probes; the callback listener then serves only callbacks (and
//! the static `/healthz`, which load balancers may check on the traffic port).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const ADMIN: (&str, &str) = ("server", "admin_listen = \"127.0.0.1:0\"");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_serves_only_its_own_routes() {
    let s = setup();
    let gw = s.gateway(&[ADMIN]).await;
    let callbacks = gw.local_addr();
    let admin = gw.admin_addr().expect("an admin listener");
    assert_ne!(callbacks, admin);

    let (status, text) = get_text(admin, "/healthz").await;
    assert_eq!((status, text.as_str()), (200, "ok\n"));
    let (status, text) = get_text(admin, "/readyz").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"ready\":true"), "{text}");
    let (status, text) = get_text(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("timbridge_connections_open{listener=\"admin\"}"),
        "{text}"
    );

    // The callback listener no longer serves readiness and metrics ...
    for path in ["/readyz", "/metrics"] {
        assert_eq!(get_text(callbacks, path).await.0, 404, "{path}");
    }
    // ... but keeps the static /healthz, for load balancers that
    // health-check the traffic port ...
    let (status, text) = get_text(callbacks, "/healthz").await;
    assert_eq!((status, text.as_str()), (200, "ok\n"));
    // ... and the admin listener serves no callbacks.
    let a = post(
        admin,
        &group_callback(),
        group_body("via-admin", 1).as_bytes(),
    )
    .await;
    assert_eq!(a.status, 404);

    assert_ok(
        &post(
            callbacks,
            &group_callback(),
            group_body("via-callbacks", 1).as_bytes(),
        )
        .await,
    );
    assert_groups_arrive(&s.bootstrap, &["via-callbacks".to_owned()]);
    assert_metrics_show(admin, &["timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"accepted\"} 1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_slow_clients_fill_the_callback_listener() {
    let s = setup();
    let gw = s
        .gateway(&[
            ADMIN,
            (
                "server",
                "max_connections = 4\nheader_read_timeout = \"30s\"",
            ),
        ])
        .await;
    // Slow-header clients take every callback slot and keep dripping.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(gw.local_addr()).await.unwrap();
        c.write_all(b"POST /callback HTTP/1.1\r\nHost: x\r\nX-a: b\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    wait_open_connections(&gw, "callback", 4).await;
    let admin = gw.admin_addr().unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let started = Instant::now();
        let (status, _) = tokio::time::timeout(Duration::from_secs(1), get_text(admin, path))
            .await
            .unwrap_or_else(|_| panic!("{path} took over 1 s"));
        assert_eq!(status, 200, "{path}");
        assert!(started.elapsed() < Duration::from_secs(1), "{path}");
    }
    for c in &mut slow {
        c.write_all(b"X-b: c\r\n").await.unwrap();
    }
}

#[test]
fn an_admin_address_that_is_not_one_or_is_the_callback_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = |server: &str| config_text("127.0.0.1:9092", dir.path(), &[("server", server)]);
    let err = timbridge::config::Config::parse(&text("admin_listen = \"nowhere\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.admin_listen"), "{err}");
    // config_text sets listen = 127.0.0.1:0; a fixed port can clash.
    let same = text("admin_listen = \"127.0.0.1:8080\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:8080\"");
    let err = timbridge::config::Config::parse(&same)
        .unwrap_err()
        .to_string();
    assert!(err.contains("same address as server.listen"), "{err}");
}
