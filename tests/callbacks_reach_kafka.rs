//! The main path: each read-receipt command, posted as Tencent posts it,
//! becomes `read_receipt.v1` records on the right topic, with the right key,
//! headers and values, read back by an independent consumer.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_commands_become_schema_valid_records() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();

    for (command, body) in [
        ("Group.CallbackAfterReadReceipt", GROUP_BODY),
        ("C2C.CallbackAfterMsgReadReceipt", C2C_RECEIPT_BODY),
        ("C2C.CallbackAfterMsgReport", C2C_REPORT_BODY),
    ] {
        let a = post(
            addr,
            &format!("/callback?{}", signed_query(command)),
            body.as_bytes(),
        )
        .await;
        assert_ok(&a);
    }

    let schema = schema();
    let group = read_topic(&s.bootstrap, GROUP_TOPIC, 2, Duration::from_secs(20));
    assert_eq!(group.len(), 2, "{group:?}");
    let c2c = read_topic(&s.bootstrap, C2C_TOPIC, 3, Duration::from_secs(20));
    assert_eq!(c2c.len(), 3, "{c2c:?}");

    for r in group.iter().chain(&c2c) {
        assert_valid(&schema, &r.value);
        assert_eq!(r.headers["timbridge-event-id"], r.value["event_id"]);
        assert_eq!(r.headers["timbridge-schema"], "read_receipt.v1");
        assert_eq!(
            r.headers["tim-callback-command"],
            r.value["callback_command"]
        );
        assert_eq!(r.headers["tim-sdkappid"], APP.to_string());
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.value["sdk_app_id"], APP);
        assert_eq!(r.value["client_ip"], "127.0.0.1");
        assert_eq!(r.value["platform"], "iOS");
        assert_eq!(
            r.key,
            r.value["conversation_id"].as_str().unwrap().as_bytes()
        );
    }

    // Group: keyed by the exact GroupId, one event per receipt item.
    let mut group = group;
    group.sort_by_key(|r| r.value["msg_seq"].as_u64());
    for r in &group {
        assert_eq!(r.key, b"@TGS#2TTV7VSII");
        assert_eq!(r.value["kind"], "group_message");
        assert_eq!(r.value["group_type"], "Public");
        assert_eq!(r.value["event_time_ms"], 1670574414123u64);
    }
    assert_eq!(group[0].value["readers"], serde_json::json!(["user0"]));
    assert_eq!(
        group[1].value["readers"],
        serde_json::json!(["user0", "user1"])
    );
    assert_eq!(group[1].value["read_count"], 2);
    assert_eq!(group[1].value["unread_count"], 5);
    assert_eq!(group[0].partition, group[1].partition);

    // One-to-one: keyed c2c:<a>:<b> in byte order, whoever reads.
    for r in &c2c {
        assert_eq!(r.key, b"c2c:amy:zed");
        assert_eq!(
            r.partition, c2c[0].partition,
            "one conversation, one partition"
        );
    }
    let receipts: Vec<_> = c2c
        .iter()
        .filter(|r| r.value["kind"] == "c2c_message")
        .collect();
    assert_eq!(receipts.len(), 2);
    let mut keys: Vec<_> = receipts
        .iter()
        .map(|r| r.value["msg_key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["1_2_3", "4_5_6"]);
    for r in &receipts {
        assert_eq!(r.value["readers"], serde_json::json!(["zed"]));
        assert_eq!(r.value["peer"], "amy");
    }
    let report: Vec<_> = c2c
        .iter()
        .filter(|r| r.value["kind"] == "c2c_watermark")
        .collect();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].value["read_up_to_ms"], 1670574414000u64);
    assert_eq!(report[0].value["unread_total"], 3);
    assert_eq!(report[0].value["event_time_ms"], 1670574414999u64);
    assert_eq!(report[0].value["readers"], serde_json::json!(["amy"]));

    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_a_token_needs_no_signature() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let q = format!(
        "/callback?SdkAppid={OPEN_APP}&CallbackCommand=Group.CallbackAfterReadReceipt&contenttype=json"
    );
    assert_ok(&post(gw.local_addr(), &q, group_body("g-open", 7).as_bytes()).await);
    let recs = read_topic(&s.bootstrap, GROUP_TOPIC, 1, Duration::from_secs(20));
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].key, b"g-open");
    assert_eq!(recs[0].value["sdk_app_id"], OPEN_APP);
    // No ClientIP / OptPlatform in the query: null, not absent.
    assert!(recs[0].value["client_ip"].is_null());
    assert!(recs[0].value["platform"].is_null());
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_callback_is_written_once_with_the_same_event_id() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let q = format!("/callback?{}", signed_query("C2C.CallbackAfterMsgReport"));
    assert_ok(&post(gw.local_addr(), &q, C2C_REPORT_BODY.as_bytes()).await);
    // Tencent's retry-on-timeout sends the same content again.
    assert_ok(&post(gw.local_addr(), &q, C2C_REPORT_BODY.as_bytes()).await);
    assert_metrics_show(gw.local_addr(), &["timbridge_callbacks_total{command=\"C2C.CallbackAfterMsgReport\",outcome=\"duplicate\"} 1"]).await;
    let recs = read_all(&s.bootstrap, C2C_TOPIC);
    assert_eq!(recs.len(), 1, "{recs:?}");
    gw.shutdown().await.unwrap();
}
