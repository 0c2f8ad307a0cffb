//! `check-config` shows what `serve` would run with: the file with flags and
//! environment applied (secrets still redacted), and says where each
//! overridden value came from. It used to print the file alone, so
//! `brokers = "embedded"` while serve used TIMBRIDGE_BROKERS.

mod common;

use std::process::Command;

use common::process::{BIN, output_text};

const FILE: &str = "[[apps]]\nsdk_app_id = 1400000000\ntoken = \"hunter2\"\n[kafka]\nbrokers = \"embedded\"\n[kafka.properties]\n\"sasl.password\" = \"pw-secret\"\n";

fn check_config(dir: &std::path::Path, tweak: impl FnOnce(&mut Command)) -> (bool, String) {
    let path = dir.join("c.toml");
    std::fs::write(&path, FILE).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", "--config"])
        .arg(&path)
        .env_remove("TIMBRIDGE_BROKERS")
        .env_remove("TIMBRIDGE_LISTEN")
        .env_remove("TIMBRIDGE_REQUIRE_TOPICS");
    tweak(&mut cmd);
    let out = common::fork::output(&mut cmd).unwrap();
    let text = output_text(&out);
    (out.status.success(), text)
}

#[test]
fn the_environment_and_flags_are_applied_and_their_source_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = check_config(dir.path(), |cmd| {
        cmd.env("TIMBRIDGE_BROKERS", "kafka-from-env:9092").args([
            "--listen",
            "0.0.0.0:9000",
            "--require-topics",
        ]);
    });
    assert!(ok, "{text}");
    assert!(
        text.contains(r#"brokers = "kafka-from-env:9092"  # from the environment (TIMBRIDGE_BROKERS); the file says "embedded""#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"listen = "0.0.0.0:9000"  # from the --listen flag; the file says "127.0.0.1:8080""#
        ),
        "{text}"
    );
    assert!(
        text.contains("require_topics = true  # from the --require-topics flag"),
        "{text}"
    );
    // Secrets stay hidden; the output is still a config serve accepts.
    assert!(
        !text.contains("hunter2") && !text.contains("pw-secret"),
        "{text}"
    );
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &text).unwrap();
    timbridge::config::Config::load(&again).expect("the output parses as a config");
}

#[test]
fn without_overrides_it_says_so_and_a_bad_override_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = check_config(dir.path(), |_| {});
    assert!(ok, "{text}");
    assert!(text.contains("brokers = \"embedded\"\n"), "{text}");
    assert!(text.contains("No value is overridden"), "{text}");

    let (ok, text) = check_config(dir.path(), |cmd| {
        cmd.env("TIMBRIDGE_LISTEN", "nowhere");
    });
    assert!(!ok, "{text}");
    assert!(
        text.contains("server.listen") && text.contains("TIMBRIDGE_LISTEN"),
        "{text}"
    );
}
