//! No command prints a secret from the config file, however the file is
//! wrong: TOML errors used to quote the offending line (`tokn = "..."`),
//! serde's messages quote the offending value (`token = 12345678`), and
//! librdkafka's configuration errors quote a property's value, which
//! `serve` printed for a misspelt `sasl.password`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{BIN, output_text, write_file as write};

/// Runs `timbridge <args>` to its end (at most 20 s); returns exit success
/// and everything it printed.
fn run(args: &[&str], path: &std::path::Path) -> (bool, String) {
    let mut child = common::fork::spawn(
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = output_text(&out);
    (out.status.success(), text)
}

#[test]
fn a_misspelt_or_mistyped_token_is_named_by_key_and_position_not_shown() {
    let dir = tempfile::tempdir().unwrap();
    for (line, key) in [
        ("tokn = \"s3cret-x9\"", "apps[0].tokn"),
        ("token = 12345678", "apps[0].token"),
        ("token = s3cret-x9", ""),
        ("token = \"s3cret-x9", ""),
    ] {
        let cfg = write(
            dir.path(),
            "bad.toml",
            &format!(
                "[[apps]]\nsdk_app_id = 1400000000\n{line}\n[kafka]\nbrokers = \"embedded\"\n"
            ),
        );
        for cmd in [
            &["check-config"][..],
            &["serve"][..],
            &["spool", "stat"][..],
        ] {
            let (ok, out) = run(cmd, &cfg);
            assert!(!ok, "{cmd:?} accepted `{line}`: {out}");
            assert!(
                !out.contains("s3cret") && !out.contains("12345678"),
                "{cmd:?} on `{line}` printed the secret: {out}"
            );
            assert!(out.contains("line 3"), "{cmd:?} on `{line}`: {out}");
            assert!(
                out.contains(key),
                "{cmd:?} on `{line}` must name {key}: {out}"
            );
        }
    }
}

#[test]
fn a_misspelt_kafka_property_is_refused_and_its_value_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let cfg = write(
        dir.path(),
        "prop.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[apps]]\nsdk_app_id = 1400000000\n[kafka]\nbrokers = \"127.0.0.1:9\"\n[kafka.properties]\n\"sasl.pasword\" = \"pw-secret-x7\"\n[spool]\ndir = {:?}\n",
            spool.display().to_string()
        ),
    );
    for cmd in [&["check-config"][..], &["serve"][..]] {
        let (ok, out) = run(cmd, &cfg);
        assert!(
            !ok,
            "{cmd:?} accepted an unknown librdkafka property: {out}"
        );
        assert!(!out.contains("pw-secret-x7"), "{cmd:?} printed it: {out}");
        assert!(
            out.contains("sasl.pasword"),
            "{cmd:?} must name the key: {out}"
        );
    }
}
