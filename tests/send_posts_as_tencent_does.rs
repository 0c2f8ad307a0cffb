//! `timbridge send` can reproduce a callback as Tencent sends it: ClientIP
//! and OptPlatform in the query, the token from the environment (never
//! visible in `ps`), https:// URLs; and it exits 0 (answer 200), 1 (another
//! answer) or 2 (no answer), as the README says.

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{BIN, output_text};
use common::*;

fn send(url: &str, body: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["send", "--url", url, "--sdkappid", &APP.to_string()])
        .args(args)
        .arg(body)
        .env_remove("TIMBRIDGE_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::fork::output(&mut cmd).unwrap();
    let text = output_text(&out);
    (out.status.code().unwrap(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_platform_and_the_token_from_the_environment_reach_the_event() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let url = format!("http://{}/callback", gw.local_addr());
    let body = s.dir.path().join("receipt.json");
    std::fs::write(&body, group_body("@TGS#send-env", 1)).unwrap();

    let (code, out) = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || {
            send(
                &url,
                &body,
                &["--client-ip", "203.0.113.7", "--platform", "android"],
                &[("TIMBRIDGE_TOKEN", TOKEN)],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("200 OK"), "{out}");
    let recs = read_topic(&s.bootstrap, GROUP_TOPIC, 1, Duration::from_secs(20));
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].value["client_ip"], "203.0.113.7");
    assert_eq!(recs[0].value["platform"], "Android");

    // --token-env VAR reads the token from VAR.
    std::fs::write(&body, group_body("@TGS#send-env", 2)).unwrap();
    let (code, out) = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || {
            send(
                &url,
                &body,
                &["--token-env", "MY_TIM_TOKEN"],
                &[("MY_TIM_TOKEN", TOKEN)],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let (code, out) = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || send(&url, &body, &["--token-env", "UNSET_TIM_TOKEN_VAR"], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("UNSET_TIM_TOKEN_VAR"), "{out}");

    // An answer other than 200 (no token: 401) exits 1.
    let (code, out) = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || send(&url, &body, &[], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("401"), "{out}");
    gw.shutdown().await.unwrap();
}

#[test]
fn no_answer_exits_2_and_https_urls_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("receipt.json");
    std::fs::write(&body, GROUP_BODY).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, out) = send(
        &format!("http://127.0.0.1:{port}/callback"),
        &body,
        &[],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is the gateway running?"), "{out}");

    // https:// is spoken: against a listener that is not TLS the handshake
    // fails (rather than the URL being refused).
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = plain.accept() {
            use std::io::Write;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let (code, out) = send(
        &format!("https://localhost:{}/callback", addr.port()),
        &body,
        &[],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("TLS handshake with localhost"), "{out}");
    let (code, out) = send("ftp://127.0.0.1/callback", &body, &[], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("http:// and https://"), "{out}");
}
