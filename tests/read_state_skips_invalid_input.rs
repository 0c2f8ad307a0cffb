//! A record on an input topic that is not a `read_receipt.v1` event (junk,
//! another schema, a c2c event on the group topic) is skipped, counted and
//! logged, and the materializer goes on folding what follows it.

mod common;

use std::time::{Duration, Instant};

use common::process::start_materializer;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_input_is_skipped_counted_and_folding_goes_on() {
    let s = setup();
    s.cluster
        .create_topic("tim.read_state", PARTITIONS, 1)
        .unwrap();
    // Junk first, on every partition, so it precedes the real event wherever that lands.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .create()
        .unwrap();
    let junk: [&[u8]; 3] = [
        b"not json",
        br#"{"schema":"read_receipt.v2","kind":"group_message"}"#,
        br#"{"schema":"read_receipt.v1","kind":"c2c_message","sdk_app_id":1,"conversation_id":"c2c:a:b","msg_key":"k","readers":["a"],"event_time_ms":1}"#,
    ];
    for p in 0..PARTITIONS {
        for j in junk {
            producer
                .send(
                    BaseRecord::<str, [u8]>::to(GROUP_TOPIC)
                        .partition(p)
                        .key("g")
                        .payload(j),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let gateway = s.gateway(&[]).await;
    assert_ok(
        &post(
            gateway.local_addr(),
            &group_callback(),
            GROUP_BODY.as_bytes(),
        )
        .await,
    );

    let config = format!(
        "{}\n[read_state]\ntopic = \"tim.read_state\"\nlisten = \"127.0.0.1:0\"\n",
        s.config_text(&[])
    );
    let mut m = start_materializer(s.dir.path(), "m", &config);
    // GROUP_BODY reads two messages: both states arrive despite the junk.
    let states = read_topic(&s.bootstrap, "tim.read_state", 2, Duration::from_secs(30));
    let keys: Vec<String> = states
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    assert!(
        keys.contains(&format!("{APP}/@TGS#2TTV7VSII/1"))
            && keys.contains(&format!("{APP}/@TGS#2TTV7VSII/2")),
        "{keys:?}\n{}",
        m.log_text()
    );
    let want = format!(
        "timbridge_read_state_events_invalid_total {}",
        3 * PARTITIONS
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get_text(m.addr, "/metrics").await;
        if metrics.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "no `{want}` in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = m.wait_for_log(
        "is not a read_receipt.v1 event; skipped",
        Duration::from_secs(5),
    );
    assert!(line.contains("offset="), "{line}");
    m.signal("TERM");
    assert!(
        m.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        m.log_text()
    );
    gateway.shutdown().await.unwrap();
}
