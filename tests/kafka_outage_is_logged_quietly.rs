//! A Kafka outage in the log: one line when it starts, naming the reason,
//! one when it ends, with its length, and nothing in between, however often
//! librdkafka retries. (Before, 20 s of outage was about 170 lines.)

mod common;

use std::time::{Duration, Instant};

use common::process::GatewayProcess;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_second_outage_is_a_handful_of_lines() {
    let s = setup();
    let text = s.config_text(&[]);
    let mut gw = GatewayProcess::start_with(s.dir.path(), &text, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    gw.wait_for_log("connected to Kafka", Duration::from_secs(20));
    let before = gw.log.lock().unwrap().len();

    common::broker_down(&s.cluster, 1);
    // Traffic during the outage: the producer keeps trying to deliver it.
    let groups = post_groups(gw.addr, "g-quiet", 0..20).await;
    let down_at = Instant::now();
    gw.wait_for_log("Kafka is unreachable", Duration::from_secs(20));
    while down_at.elapsed() < Duration::from_secs(20) {
        post_groups(
            gw.addr,
            &format!("g-quiet-{}", down_at.elapsed().as_millis()),
            0..1,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.cluster.broker_up(1).unwrap();
    let back = gw.wait_for_log("Kafka is reachable again after", Duration::from_secs(30));
    // What was taken during the outage goes out now.
    let recs = read_topic(
        &s.bootstrap,
        GROUP_TOPIC,
        usize::MAX,
        Duration::from_secs(5),
    );
    for g in &groups {
        assert!(recs.iter().any(|r| r.key == g.as_bytes()), "{g} lost");
    }

    let lines: Vec<String> = gw.log.lock().unwrap()[before..].to_vec();
    let about_kafka: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("kafka") || l.contains("broker")
        })
        .collect();
    assert!(
        about_kafka.len() <= 5,
        "{} lines about Kafka over a 20 s outage:\n{}",
        about_kafka.len(),
        lines.join("\n")
    );
    let down: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("Kafka is unreachable"))
        .collect();
    assert_eq!(down.len(), 1, "{}", lines.join("\n"));
    // The reason is librdkafka's, without its "(after 0ms in state ...)" noise.
    assert!(!down[0].contains("brokers are down"), "{}", down[0]);
    assert!(!down[0].contains("in state"), "{}", down[0]);
    // The outage's length: at least the 20 s we kept the broker down.
    let length = back
        .split("again after ")
        .nth(1)
        .and_then(|r| r.split(" (").next())
        .unwrap_or_default();
    let length = humantime::parse_duration(length).unwrap_or_else(|e| panic!("{e}: {back}"));
    assert!(length >= Duration::from_secs(20), "{back}");
}
