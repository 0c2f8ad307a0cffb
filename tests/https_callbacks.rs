//! HTTPS on the callback listener: callbacks over TLS with a certificate
//! from the test's own CA, checked with curl and with a rustls client; a
//! certificate swapped by SIGHUP is what new handshakes get while an open
//! keep-alive connection goes on; plain HTTP on the TLS port gets no
//! answer and holds nothing.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::GatewayProcess;
use common::reload::{RELOADED, TestCa, https_connect, hup, send, tls_config};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_over_https_and_a_certificate_swapped_on_sighup() {
    let s = setup();
    let first = TestCa::new();
    first.issue_into(s.dir.path());
    let mut p = GatewayProcess::start(s.dir.path(), &tls_config(&s));
    let addr = p.addr;
    let admin = p.admin_addr();

    // curl, trusting the test CA only.
    std::fs::write(s.dir.path().join("ca1.pem"), &first.pem).unwrap();
    let url = format!("https://127.0.0.1:{}{}", addr.port(), group_callback());
    let out = common::fork::output(
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(s.dir.path().join("ca1.pem"))
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(group_body("curl", 1))
            .arg(&url),
    )
    .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text,
        r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#
    );

    // Our own client, on a keep-alive connection kept open across the swap.
    let mut open = https_connect(&first, addr)
        .await
        .expect("TLS to the first CA");
    let a = callback_on(&mut open, addr, "rustls", 1).await;
    assert_ok(&a.expect("an answer"));

    // The certificate is renewed by another CA, then SIGHUP.
    let second = TestCa::new();
    second.issue_into(s.dir.path());
    hup(&mut p, RELOADED);
    let Err(err) = https_connect(&first, addr).await else {
        panic!("a new handshake still got the old certificate");
    };
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let mut fresh = https_connect(&second, addr)
        .await
        .expect("new handshakes get the new certificate");
    assert_ok(&callback_on(&mut fresh, addr, "new-cert", 1).await.unwrap());
    open.ready()
        .await
        .expect("the open connection is still there");
    let a = callback_on(&mut open, addr, "rustls", 2).await;
    assert_ok(&a.expect("the open connection still answers"));

    // Plain HTTP on the TLS port: no answer, and quickly (no slot held).
    let started = Instant::now();
    let plain = tokio::time::timeout(
        Duration::from_secs(10),
        try_post(addr, &group_callback(), group_body("plain", 1).as_bytes()),
    )
    .await
    .expect("plain HTTP is not left hanging");
    assert!(
        plain.is_none(),
        "plain HTTP got an HTTP answer on the TLS port: {:?}",
        plain.map(|a| a.status)
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The admin listener stays plain HTTP, and counted all three callbacks.
    let (status, metrics) = get_text(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("timbridge_config_last_reload_successful 1"),
        "{metrics}"
    );
}

/// A renewal that went wrong (a key that is not the new certificate's) is
/// refused whole: new handshakes still get the old certificate, and the
/// reload gauge says the file is not in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_pair_on_sighup_keeps_the_old_certificate() {
    let s = setup();
    let first = TestCa::new();
    let (_, key) = first.issue_into(s.dir.path());
    let mut p = GatewayProcess::start(s.dir.path(), &tls_config(&s));
    let addr = p.addr;
    let admin = p.admin_addr();
    let old_key = std::fs::read(&key).unwrap();

    // A new certificate from another CA, with the old key left in place.
    let second = TestCa::new();
    second.issue_into(s.dir.path());
    std::fs::write(&key, old_key).unwrap();
    let refused = hup(&mut p, common::reload::REFUSED);
    assert!(refused.contains("server.tls_key_file"), "{refused}");

    let mut c = https_connect(&first, addr)
        .await
        .expect("new handshakes still get the old certificate");
    assert_ok(
        &callback_on(&mut c, addr, "old-cert", 1)
            .await
            .expect("an answer"),
    );
    assert!(https_connect(&second, addr).await.is_err());
    let (_, metrics) = get_text(admin, "/metrics").await;
    assert!(
        metrics.contains("timbridge_config_last_reload_successful 0"),
        "{metrics}"
    );
}

/// A group callback on `sender`'s open connection.
async fn callback_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: std::net::SocketAddr,
    group: &str,
    seq: u64,
) -> Option<Answer> {
    send(
        sender,
        addr,
        &group_callback(),
        group_body(group, seq).as_bytes(),
        &[],
    )
    .await
}
