//! The command line as users and scripts rely on it: check-config, send,
//! --version, and the shipped config.toml starting on the embedded Kafka.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{BIN, field, strip_ansi};

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `timbridge check-config --config PATH`.
fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
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
    let out = Command::new(BIN)
        .arg("check-config")
        .env("TIMBRIDGE_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_byte"));
    let out = check_config("/nonexistent/timbridge.toml".as_ref());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/timbridge.toml"));
}

#[test]
fn the_shipped_config_is_valid_and_uses_the_embedded_kafka() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = check_config(shipped.as_ref());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("brokers = \"embedded\""));
}

/// A gateway process started from the shipped config.toml, on a free port.
struct Served {
    child: std::process::Child,
    addr: String,
    bootstrap: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_shipped_config() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    // The spool goes to a temp dir; everything else is as shipped.
    let cfg = shipped.replace(
        "dir = \"data/spool\"",
        &format!("dir = \"{}\"", dir.path().join("spool").display()),
    );
    let cfg = write(dir.path(), "config.toml", &cfg);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("TIMBRIDGE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,timbridge::publish=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addr = None;
    let mut bootstrap = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while addr.is_none() || bootstrap.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the gateway logs its bootstrap address and listening address");
        let plain = strip_ansi(&line);
        if plain.contains("EMBEDDED KAFKA") && plain.contains("NOT FOR PRODUCTION") {
            bootstrap = Some(field(&plain, "bootstrap="));
        }
        if plain.contains("timbridge listening") {
            addr = Some(field(&plain, "addr="));
        }
    }
    // Keep draining so the child never blocks on a full pipe; hand the
    // delivery lines to the test.
    Served {
        child,
        addr: addr.unwrap(),
        bootstrap: bootstrap.unwrap(),
        _dir: dir,
    }
    .with_log(rx)
}

impl Served {
    fn with_log(self, rx: std::sync::mpsc::Receiver<String>) -> Served {
        LOG.with(|l| *l.borrow_mut() = Some(rx));
        self
    }
}

thread_local! {
    static LOG: std::cell::RefCell<Option<std::sync::mpsc::Receiver<String>>> = const { std::cell::RefCell::new(None) };
}

fn wait_for_log(pred: impl Fn(&str) -> bool, within: Duration) -> String {
    let deadline = Instant::now() + within;
    LOG.with(|l| {
        let l = l.borrow();
        let rx = l.as_ref().unwrap();
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("expected log line");
            let plain = strip_ansi(&line);
            if pred(&plain) {
                return plain;
            }
        }
    })
}

#[test]
fn send_against_the_shipped_config_shows_a_delivery() {
    let served = serve_shipped_config();
    assert!(
        served.bootstrap.starts_with("127.0.0.1:"),
        "{}",
        served.bootstrap
    );
    let dir = tempfile::tempdir().unwrap();
    let body = write(
        dir.path(),
        "receipt.json",
        r#"{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"@TGS#cli","Type":"Public","GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":1,"UnreadNum":0,"ReadReceiptMembers":[{"Member_Account":"u"}]}],"EventTime":"1670574414123"}"#,
    );
    let url = format!("http://{}/callback", served.addr);
    // The shipped app and token.
    let out = Command::new(BIN)
        .args([
            "send",
            "--url",
            &url,
            "--sdkappid",
            "1400000000",
            "--token",
            "change-me",
        ])
        .arg(&body)
        .output()
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
    let line = wait_for_log(|l| l.contains("delivered"), Duration::from_secs(20));
    assert!(line.contains("tim.group.read_receipts"), "{line}");
    assert!(line.contains("partition="), "{line}");
    assert!(line.contains("offset="), "{line}");
    assert!(line.contains("@TGS#cli"), "{line}");

    // Without the token: 401, and send exits non-zero.
    let out = Command::new(BIN)
        .args(["send", "--url", &url, "--sdkappid", "1400000000"])
        .arg(&body)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("401"));
}

#[test]
fn the_shipped_config_shows_every_key() {
    // check-config prints the effective config, every key with its value;
    // each must appear in config.toml, set or commented, so that a newcomer
    // finds it there.
    let shipped_path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let shipped = std::fs::read_to_string(shipped_path).unwrap();
    let out = check_config(shipped_path.as_ref());
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
