//! The command line as users and scripts rely on it: check-config, send,
//! --version, and the shipped config.toml starting on the embedded Kafka.

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{BIN, GatewayProcess, SHIPPED_CONFIG, check_config, write_file as write};

#[test]
fn version_and_help() {
    let out = common::fork::output(Command::new(BIN).arg("--version")).unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = common::fork::output(Command::new(BIN).arg("--help")).unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "check-config", "send", "spool"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[[apps]]\nsdk_app_id = 1400000000\ntoken = \"hunter2\"\n[kafka.properties]\n\"sasl.password\" = \"pw\"\n",
    );
    let out = check_config(&cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("hunter2") && !text.contains("\"pw\""),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
    // Defaults are shown, so the output is the effective config.
    assert!(text.contains("callback_path = \"/callback\""), "{text}");
    assert!(text.contains("fsync = \"interval\""), "{text}");
}

#[test]
fn check_config_names_an_unknown_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[[apps]]\nsdk_app_id = 1\n[spool]\nmax_byte = 5\n",
    );
    let out = check_config(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_byte"), "{err}");
    // TIMBRIDGE_CONFIG stands in for --config.
    let out = common::fork::output(
        Command::new(BIN)
            .arg("check-config")
            .env("TIMBRIDGE_CONFIG", &cfg),
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_byte"));
    let out = check_config("/nonexistent/timbridge.toml".as_ref());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/timbridge.toml"));
}

#[test]
fn the_shipped_config_is_valid_and_uses_the_embedded_kafka() {
    let out = check_config(SHIPPED_CONFIG.as_ref());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("brokers = \"embedded\""));
}

#[test]
fn send_against_the_shipped_config_shows_a_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = GatewayProcess::start_shipped(dir.path());
    let bootstrap = served.embedded_bootstrap();
    assert!(bootstrap.starts_with("127.0.0.1:"), "{bootstrap}");
    let body = write(
        dir.path(),
        "receipt.json",
        r#"{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"@TGS#cli","Type":"Public","GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":1,"UnreadNum":0,"ReadReceiptMembers":[{"Member_Account":"u"}]}],"EventTime":"1670574414123"}"#,
    );
    let url = format!("http://{}/callback", served.addr);
    // The shipped app and token.
    let out = common::fork::output(
        Command::new(BIN)
            .args([
                "send",
                "--url",
                &url,
                "--sdkappid",
                "1400000000",
                "--token",
                "change-me",
            ])
            .arg(&body),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("200 OK"), "{text}");
    assert!(
        text.contains(r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#),
        "{text}"
    );
    let line = served.wait_for_log("delivered", Duration::from_secs(20));
    assert!(line.contains("tim.group.read_receipts"), "{line}");
    assert!(line.contains("partition="), "{line}");
    assert!(line.contains("offset="), "{line}");
    assert!(line.contains("@TGS#cli"), "{line}");

    // Without the token: 401, and send exits non-zero.
    let out = common::fork::output(
        Command::new(BIN)
            .args(["send", "--url", &url, "--sdkappid", "1400000000"])
            .arg(&body),
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("401"));
}

#[test]
fn the_shipped_config_shows_every_key() {
    // check-config prints the effective config, every key with its value;
    // each must appear in config.toml, set or commented, so that a newcomer
    // finds it there.
    let shipped = std::fs::read_to_string(SHIPPED_CONFIG).unwrap();
    let out = check_config(SHIPPED_CONFIG.as_ref());
    let effective = String::from_utf8(out.stdout).unwrap();
    let mut keys = 0;
    for line in effective.lines() {
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        if key.contains('.') {
            continue; // a [kafka.properties] entry, the user's own
        }
        keys += 1;
        assert!(
            shipped.contains(&format!("{key} =")),
            "config.toml does not show `{key}`"
        );
    }
    assert!(keys >= 20, "{effective}");
}
