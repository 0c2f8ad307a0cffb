//! `timbridge materialize` checks the state topic before it folds anything:
//! a state topic with fewer partitions than the input (input partition p
//! writes to state partition p) or one it cannot create stops it with a
//! message that says what to run; an embedded broker is refused.

mod common;

use std::process::{Command, Output};

use common::process::BIN;
use common::*;

fn materialize(dir: &std::path::Path, config: &str) -> Output {
    let path = dir.join("materialize.toml");
    std::fs::write(&path, config).unwrap();
    common::fork::output(
        Command::new(BIN)
            .args(["materialize", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1"),
    )
    .unwrap()
}

fn config(bootstrap: &str, dir: &std::path::Path) -> String {
    format!(
        "{}\n[read_state]\ntopic = \"tim.read_state\"\nlisten = \"127.0.0.1:0\"\n",
        config_text(bootstrap, dir, &[])
    )
}

#[test]
fn a_state_topic_with_fewer_partitions_than_the_input_is_refused() {
    let s = setup();
    s.cluster.create_topic("tim.read_state", 1, 1).unwrap();
    let out = materialize(s.dir.path(), &config(&s.bootstrap, s.dir.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tim.read_state has 1 partitions but the input topics have 3")
            && err.contains("--partitions 3"),
        "{err}"
    );
}

#[test]
fn a_missing_state_topic_that_cannot_be_created_names_the_command_to_create_it() {
    // The mock cluster does not implement CreateTopics, as a cluster that
    // denies it would not.
    let s = setup();
    let out = materialize(s.dir.path(), &config(&s.bootstrap, s.dir.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("kafka-topics --create --topic tim.read_state --partitions 3 --config cleanup.policy=compact"),
        "{err}"
    );
}

#[test]
fn the_embedded_broker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = materialize(dir.path(), &config("embedded", dir.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("set kafka.brokers to your cluster"), "{err}");
}
