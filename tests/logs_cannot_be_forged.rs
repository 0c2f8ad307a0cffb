//! Text a sender chose (a GroupId, a command) cannot forge a log line, a
//! field on it, or reach an operator's terminal: newlines, escape sequences
//! and bidi controls are written as escapes, values with spaces or `=` are
//! quoted, in the shipped `pretty` format with the publisher's
//! per-delivery debug line on, as `config.toml` ships it.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::*;

const FORGED: &str = "FORGED-LINE ERROR admin logged in";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_id_with_a_newline_and_an_escape_sequence_stays_on_its_line() {
    let s = setup();
    let mut text = config_text(&s.bootstrap, s.dir.path(), &[]);
    text.push_str("\n[log]\nformat = \"pretty\"\nlevel = \"info,timbridge::publish=debug\"\n");
    let mut gw = GatewayProcess::start_with(s.dir.path(), &text, |cmd| {
        cmd.env_remove("RUST_LOG");
    });
    // As JSON escapes in the body: the GroupId itself holds a newline and ESC.
    let body = group_body(&format!("x\\n{FORGED}\\u001b[31m"), 1);
    assert_ok(&post(gw.addr, &group_callback(), body.as_bytes()).await);
    // Delivered, with the key in the debug line.
    let line = gw.wait_for_log("delivered", Duration::from_secs(20));
    assert!(line.contains(&format!("x\\n{FORGED}")), "{line}");
    // The capture strips raw escape sequences; the escaped one survives.
    assert!(line.contains("\\u{1b}[31m"), "{line}");

    // A rejected callback whose command carries a forged line.
    let query = format!(
        "/callback?SdkAppid=42&CallbackCommand=x%0A{}",
        FORGED.replace(' ', "%20")
    );
    assert_fail(&post(gw.addr, &query, b"{}").await, 403);
    gw.wait_for_log("callback rejected", Duration::from_secs(5));

    // A command that would forge a field (` status=200`) on its line, and
    // one that would reverse the text after it on an operator's screen.
    for command in ["x%20status%3D200", "y%E2%80%AEstatus"] {
        let query = format!("/callback?SdkAppid=42&CallbackCommand={command}");
        assert_fail(&post(gw.addr, &query, b"{}").await, 403);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (forging, reversing) = loop {
        let log = gw.log_text();
        let find = |needle: &str| log.lines().find(|l| l.contains(needle)).map(str::to_owned);
        if let (Some(a), Some(b)) = (find("x status=200"), find("y\\u{202e}status")) {
            break (a, b);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rejections not logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        forging.contains("command=\"x status=200\""),
        "a field was forged: {forging}"
    );
    assert!(!reversing.contains('\u{202e}'), "{reversing}");

    let log = gw.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED-LINE")),
        "a forged line reached the log:\n{log}"
    );
    assert!(!log.contains('\u{202e}'), "a bidi override reached the log");
}
