//! Logs as operators rely on them: JSON lines when asked, one line per
//! rejected callback naming the reason, command and SdkAppid but never the
//! token or the Sign, and a flood of bad requests cannot flood the log.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_logged_as_json_without_secrets_and_rate_limited() {
    let s = setup();
    let mut text = config_text(&s.bootstrap, s.dir.path(), &[]);
    text.push_str("\n[log]\nformat = \"json\"\nlevel = \"info\"\nrejections_per_second = 5\n");
    let mut gw = GatewayProcess::start_with(s.dir.path(), &text, |cmd| {
        cmd.env_remove("RUST_LOG");
    });
    let bad_sign = timbridge::send::tencent_query(
        APP,
        "Group.CallbackAfterReadReceipt",
        Some("wrong-token"),
        now_s(),
    );
    let sign = bad_sign
        .split('&')
        .find_map(|kv| kv.strip_prefix("Sign="))
        .unwrap()
        .to_owned();
    assert_fail(
        &post(
            gw.addr,
            &format!("/callback?{bad_sign}"),
            GROUP_BODY.as_bytes(),
        )
        .await,
        401,
    );
    let line = gw.wait_for_log("callback rejected", Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["level"], "WARN", "{line}");
    assert_eq!(v["status"], 401, "{line}");
    assert_eq!(v["command"], "Group.CallbackAfterReadReceipt", "{line}");
    assert_eq!(v["sdk_app_id"], APP.to_string(), "{line}");
    assert!(v["reason"].as_str().unwrap().contains("Sign"), "{line}");
    assert!(!line.contains(&sign), "the Sign must not be logged: {line}");
    assert!(
        !line.contains(TOKEN) && !line.contains("wrong-token"),
        "{line}"
    );

    // A flood: 200 bad requests as fast as they come.
    let flood_started = std::time::Instant::now();
    for _ in 0..200 {
        assert_fail(
            &post(gw.addr, "/callback?SdkAppid=42&CallbackCommand=x", b"{}").await,
            403,
        );
    }
    let elapsed = flood_started.elapsed().as_secs() + 2;
    let (_, metrics) = get_text(gw.addr, "/metrics").await;
    let suppressed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("timbridge_log_lines_suppressed_total "))
        .unwrap()
        .parse()
        .unwrap();
    let logged = gw
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("callback rejected"))
        .count() as u64;
    assert!(logged <= 5 * (elapsed + 1), "{logged} lines in {elapsed} s");
    assert!(
        suppressed >= (201 - logged) as f64 - 1.0,
        "suppressed {suppressed}, logged {logged}"
    );
    // Every line is JSON.
    for l in gw.log.lock().unwrap().iter() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_logs_through_the_same_logger() {
    // A port nobody listens on: librdkafka complains about the connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let brokers = closed.local_addr().unwrap().to_string();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let mut text = config_text(&brokers, dir.path(), &[]);
    text.push_str("\n[log]\nformat = \"json\"\nlevel = \"info\"\n");
    let mut gw = GatewayProcess::start_with(dir.path(), &text, |cmd| {
        cmd.env_remove("RUST_LOG");
    });
    let line = gw.wait_for_log("\"target\":\"librdkafka\"", Duration::from_secs(20));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["level"] == "WARN" || v["level"] == "ERROR", "{line}");
    // Kafka away is not a reason to stop serving.
    assert_eq!(get_text(gw.addr, "/healthz").await.0, 200);
}
