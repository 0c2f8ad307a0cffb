//! `read_state.max_readers` may allow 100,000 readers, and their JSON can
//! pass Kafka's record limit (1,000,000 bytes by default). Kafka refuses
//! such a state; the materializer exited on it, and every restart folded the
//! same input into the same state and exited again. Now the readers are cut
//! to the smallest that fit in 768 KiB, `readers_truncated` says so, and the
//! state is written.

mod common;

use std::time::Duration;

use common::process::{QUICK_REBALANCE, start_materializer};
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const STATE_TOPIC: &str = "tim.read_state";

/// A group event listing 10,000 readers of about 45 bytes each (430 KB).
fn event(batch: usize) -> String {
    let readers: Vec<String> = (0..10_000)
        .map(|i| format!("\"member-account-{batch}-{i:06}-xxxxxxxxxxxxxxxx\""))
        .collect();
    format!(
        r#"{{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":{APP},"conversation_id":"@TGS#big","group_id":"@TGS#big","msg_seq":1,"read_count":{},"unread_count":0,"readers":[{}],"event_time_ms":1700000000000}}"#,
        10_000 * (batch + 1),
        readers.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_over_kafkas_record_limit_is_cut_and_written() {
    let s = setup();
    s.cluster.create_topic(STATE_TOPIC, PARTITIONS, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .create()
        .unwrap();
    // 30,000 readers in all: about 1.4 MB of JSON.
    for b in 0..3 {
        producer
            .send(
                BaseRecord::to(GROUP_TOPIC)
                    .partition(0)
                    .key("@TGS#big")
                    .payload(&event(b)),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let config = format!(
        "{}\n[read_state]\ntopic = \"{STATE_TOPIC}\"\nlisten = \"127.0.0.1:0\"\nmax_readers = 100000\n{QUICK_REBALANCE}",
        s.config_text(&[])
    );
    let mut m = start_materializer(s.dir.path(), "m", &config);
    // One state per event that changed it; the last has every batch's count.
    let states = read_topic(&s.bootstrap, STATE_TOPIC, 3, Duration::from_secs(60));
    let last = states
        .iter()
        .find(|r| r.value["read_count"] == 30_000)
        .unwrap_or_else(|| panic!("no state with all three events:\n{}", m.log_text()));
    let readers = last.value["readers"].as_array().unwrap();
    assert_eq!(last.value["readers_truncated"], true);
    assert!(
        readers.len() > 10_000 && readers.len() < 30_000,
        "{} readers kept",
        readers.len()
    );
    // The smallest ones, in order: all of batch 0, then the start of batch 1.
    assert_eq!(readers[0], "member-account-0-000000-xxxxxxxxxxxxxxxx");
    assert!(readers.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
    let json = serde_json::to_string(readers).unwrap();
    assert!(json.len() <= 768 * 1024, "{} bytes of readers", json.len());
    // Still running, and it says what it did.
    assert!(m.child.try_wait().unwrap().is_none(), "{}", m.log_text());
    let (_, metrics) = get_text(m.addr, "/metrics").await;
    assert!(
        metrics.contains("timbridge_read_state_readers_cut_for_size_total 2"),
        "{metrics}"
    );
}
