//! A topic the cluster lacks is named at start, with the command that
//! creates it, instead of showing up later as dead letters; with
//! `kafka.require_topics` the gateway refuses to start instead.

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{BIN, GatewayProcess};
use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;

/// A cluster with the group topic; the c2c topic never created, and the
/// raw topic answering "unknown topic" as a deleted one does.
fn cluster_missing_topics() -> Cluster {
    let c = MockCluster::new(1).expect("mock cluster");
    c.create_topic(GROUP_TOPIC, PARTITIONS, 1).unwrap();
    c.create_topic(RAW_TOPIC, PARTITIONS, 1).unwrap();
    c.topic_error(
        RAW_TOPIC,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )
    .unwrap();
    c
}

#[test]
fn a_missing_topic_is_a_warning_naming_it_and_how_to_create_it() {
    let cluster = cluster_missing_topics();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = GatewayProcess::start(dir.path(), &config_text(&bootstrap, dir.path(), &[]));
    for topic in [C2C_TOPIC, RAW_TOPIC] {
        let line = gw.wait_for_log(
            &format!("Kafka topic {topic} does not exist"),
            Duration::from_secs(20),
        );
        assert!(
            line.contains(&format!(
                "kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {topic} --partitions"
            )),
            "{line}"
        );
        assert!(line.contains("WARN"), "{line}");
    }
    // The group topic exists: not named.
    assert!(
        !gw.log_text()
            .contains(&format!("topic {GROUP_TOPIC} does not exist")),
        "{}",
        gw.log_text()
    );
}

#[test]
fn with_require_topics_a_missing_topic_stops_the_start() {
    let cluster = cluster_missing_topics();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        config_text(
            &bootstrap,
            dir.path(),
            &[("kafka", "require_topics = true")],
        ),
    )
    .unwrap();
    let out = common::fork::output(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .env("NO_COLOR", "1"),
    )
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("require_topics"), "{err}");
    assert!(err.contains(C2C_TOPIC) && err.contains(RAW_TOPIC), "{err}");
    assert!(!err.contains("timbridge listening"), "{err}");

    // The flag does the same for a config without the key.
    let cfg = dir.path().join("plain.toml");
    std::fs::write(&cfg, config_text(&bootstrap, &dir.path().join("b"), &[])).unwrap();
    let out = common::fork::output(
        Command::new(BIN)
            .args([
                "serve",
                "--require-topics",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg),
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(C2C_TOPIC));

    // With every topic there, the start goes ahead.
    let full = common::cluster();
    let text = config_text(&full.bootstrap_servers(), &dir.path().join("c"), &[]);
    let mut gw = GatewayProcess::start_with(dir.path(), &text, |cmd| {
        cmd.arg("--require-topics");
    });
    gw.wait_for_log("connected to Kafka", Duration::from_secs(20));
    assert!(
        !gw.log_text().contains("does not exist"),
        "{}",
        gw.log_text()
    );
}
