//! A reload of a file that is not valid changes nothing: the gateway goes on
//! with what it had, logs the key that is wrong, and
//! `timbridge_config_last_reload_successful` turns 0 until a good file is
//! loaded, so an alert can say so before the next restart fails on it.

mod common;

use common::process::GatewayProcess;
use common::reload::{REFUSED, RELOADED, reload};
use common::*;

const ADDED: u64 = 1400000555;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_running_config_and_flips_the_gauge() {
    let s = setup();
    let start = s.config_text(&[]);
    let mut p = GatewayProcess::start(s.dir.path(), &start);
    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("timbridge_config_last_reload_successful "))
            .map(str::to_owned)
    };
    assert_eq!(
        gauge(&get_text(p.addr, "/metrics").await.1).as_deref(),
        Some("1")
    );

    // A new app in the same file as a misspelt key and a bad range: none of it is taken.
    let bad = format!("{start}\n[[apps]]\nsdk_app_id = {ADDED}\n").replace(
        "max_body_bytes = 65536",
        "max_body_bytes = 65536\nallow_from = [\"10.0.0.0/33\"]",
    );
    let line = reload(&mut p, s.dir.path(), &bad, REFUSED);
    assert!(line.contains("server.allow_from[0]"), "{line}");
    let open_app = |app: u64, group: &str| {
        let q = format!("/callback?SdkAppid={app}&CallbackCommand=Group.CallbackAfterReadReceipt");
        (q, group_body(group, 1))
    };
    let (q, b) = open_app(ADDED, "bad-1");
    assert_fail(&post(p.addr, &q, b.as_bytes()).await, 403);
    // The running config is whole: the apps of the start, no allow-list.
    assert_ok(&post(p.addr, &group_callback(), group_body("bad-2", 1).as_bytes()).await);
    let (_, metrics) = get_text(p.addr, "/metrics").await;
    assert_eq!(gauge(&metrics).as_deref(), Some("0"), "{metrics}");
    assert!(
        metrics.contains("timbridge_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );

    // A file that does not parse at all names the line, never the text.
    let line = reload(
        &mut p,
        s.dir.path(),
        &format!("{start}\ntoken = \"leak-me\"\n[[apps"),
        REFUSED,
    );
    assert!(line.contains("line"), "{line}");
    assert!(!line.contains("leak-me"), "{line}");

    // Fixed: applied, and the gauge is back.
    let good = format!("{start}\n[[apps]]\nsdk_app_id = {ADDED}\n");
    reload(&mut p, s.dir.path(), &good, RELOADED);
    let (q, b) = open_app(ADDED, "good-1");
    assert_ok(&post(p.addr, &q, b.as_bytes()).await);
    assert_eq!(
        gauge(&get_text(p.addr, "/metrics").await.1).as_deref(),
        Some("1")
    );
}
