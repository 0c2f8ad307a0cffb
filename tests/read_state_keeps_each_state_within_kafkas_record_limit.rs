//! `read_state.max_readers` may allow 100,000 readers, and their JSON can
//! pass Kafka's record limit (1,000,000 bytes by default). Kafka refuses
//! such a state; the materializer exited on it, and every restart folded the
//! same input into the same state and exited again. Now `max_readers` is
//! lowered to the count of accounts within `limits.account_bytes` that fit
//! in 768 KiB, readers beyond the limits are cut by bytes as a last resort,
//! `readers_truncated` says so, and the state is written.

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

/// Folds three such events (30,000 readers, about 1.4 MB of JSON) with
/// `max_readers = 100000` and `extra` in the config; returns the state with
/// all three, the materializer's metrics, and whether it is still running.
async fn fold_three(extra: &str) -> (serde_json::Value, String, bool) {
    let s = setup();
    s.cluster.create_topic(STATE_TOPIC, PARTITIONS, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .create()
        .unwrap();
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
        "{}\n[read_state]\ntopic = \"{STATE_TOPIC}\"\nlisten = \"127.0.0.1:0\"\nmax_readers = 100000\n{QUICK_REBALANCE}\n{extra}",
        s.config_text(&[])
    );
    let mut m = start_materializer(s.dir.path(), "m", &config);
    // One state per event that changed it; the last has every batch's count.
    let states = read_topic(&s.bootstrap, STATE_TOPIC, 3, Duration::from_secs(60));
    let last = states
        .iter()
        .find(|r| r.value["read_count"] == 30_000)
        .unwrap_or_else(|| panic!("no state with all three events:\n{}", m.log_text()))
        .value
        .clone();
    let (_, metrics) = get_text(m.addr, "/metrics").await;
    let running = m.child.try_wait().unwrap().is_none();
    (last, metrics, running)
}

fn assert_smallest_within_limit(state: &serde_json::Value) -> usize {
    let readers = state["readers"].as_array().unwrap();
    assert_eq!(state["readers_truncated"], true);
    // The smallest ones, in order: all of batch 0 first.
    assert_eq!(readers[0], "member-account-0-000000-xxxxxxxxxxxxxxxx");
    assert!(readers.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
    let json = serde_json::to_string(readers).unwrap();
    assert!(json.len() <= 768 * 1024, "{} bytes of readers", json.len());
    readers.len()
}

/// Accounts within `limits.account_bytes` (128): `max_readers` is lowered
/// to the count that fits (768 KiB / 131 bytes = 6,003), a count cap like
/// any other, and nothing needs cutting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_readers_is_lowered_to_what_fits_in_a_record() {
    let (state, metrics, running) = fold_three("").await;
    assert_eq!(assert_smallest_within_limit(&state), 768 * 1024 / 131);
    assert!(running);
    assert!(
        metrics.contains("timbridge_read_state_readers_cut_for_size_total 0"),
        "{metrics}"
    );
}

/// Accounts longer than the gateway's limit (written by another producer,
/// or under an older limit): the last resort cuts the readers by bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_beyond_the_limits_are_cut_to_fit() {
    let (state, metrics, running) = fold_three("[limits]\naccount_bytes = 16\n").await;
    let kept = assert_smallest_within_limit(&state);
    assert!(kept > 10_000 && kept < 30_000, "{kept} readers kept");
    assert!(running);
    assert!(
        metrics.contains("timbridge_read_state_readers_cut_for_size_total 2"),
        "{metrics}"
    );
}
