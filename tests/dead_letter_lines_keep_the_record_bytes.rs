//! A dead-letter line always carries the record's spool bytes
//! (`data_b64`): the record leaves the spool on the strength of that line,
//! so the line must hold everything it held, decodable or not.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_line_holds_the_spooled_bytes() {
    let s = setup();
    let gw = s
        .gateway(&[("kafka.properties", "\"message.max.bytes\" = 4096")])
        .await;
    let metrics = gw.metrics().clone();
    assert_ok(
        &post(
            gw.local_addr(),
            &group_callback(),
            huge_receipt("g-kept").as_bytes(),
        )
        .await,
    );
    wait_until("the dead letter", Duration::from_secs(30), || {
        metrics.dead_letter.get() == 1
    })
    .await;
    let file = s.dir.path().join("spool").join(timbridge::DEAD_LETTER_FILE);
    let text = std::fs::read_to_string(&file).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let data = base64::engine::general_purpose::STANDARD
        .decode(line["data_b64"].as_str().expect("data_b64 is a string"))
        .unwrap();
    let value = line["value"].as_str().unwrap();
    // The spooled record holds the event Kafka was to get, byte for byte.
    assert!(
        data.windows(value.len()).any(|w| w == value.as_bytes()),
        "data_b64 does not hold the record's value"
    );
    assert!(value.contains("g-kept"));
    gw.shutdown().await.unwrap();
}
