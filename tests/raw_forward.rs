//! Commands other than the three read receipts: answered OK, counted, and
//! forwarded byte for byte to `raw_topic` when one is configured.

mod common;

use common::*;
use timbridge::Gateway;

const SEND_MSG: &str = r#"{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"@TGS#raw1","Type":"Public","From_Account":"a","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi \u00e9"}}]}"#;
const STATE: &str =
    r#"{"CallbackCommand":"State.StateChange","Info":{"Action":"Login","To_Account":"a"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_commands_are_forwarded_verbatim() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let q = format!("/callback?{}", signed_query("Group.CallbackAfterSendMsg"));
    assert_ok(&post(addr, &q, SEND_MSG.as_bytes()).await);
    let q = format!("/callback?{}", signed_query("State.StateChange"));
    assert_ok(&post(addr, &q, STATE.as_bytes()).await);
    // Not JSON is still 400, whatever the command.
    assert_fail(&post(addr, &q, b"<xml/>").await, 400);

    let recs = read_topic(
        &s.bootstrap,
        RAW_TOPIC,
        2,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(recs.len(), 2, "{recs:?}");
    let send = recs
        .iter()
        .find(|r| r.headers["tim-callback-command"] == "Group.CallbackAfterSendMsg")
        .unwrap();
    assert_eq!(
        send.raw_value,
        SEND_MSG.as_bytes(),
        "same bytes as received"
    );
    assert_eq!(send.key, b"@TGS#raw1", "keyed by GroupId");
    assert_eq!(send.headers["tim-sdkappid"], APP.to_string());
    assert_eq!(send.headers["content-type"], "application/json");
    assert!(
        !send.headers.contains_key("timbridge-schema"),
        "not a read_receipt.v1 event"
    );
    let state = recs
        .iter()
        .find(|r| r.headers["tim-callback-command"] == "State.StateChange")
        .unwrap();
    assert_eq!(
        state.key,
        APP.to_string().as_bytes(),
        "no GroupId: keyed by SdkAppid"
    );
    assert!(read_all(&s.bootstrap, GROUP_TOPIC).is_empty());

    assert_metrics_show(
        addr,
        &["timbridge_callbacks_total{command=\"other\",outcome=\"forwarded\"} 2"],
    )
    .await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_raw_topic_other_commands_are_ignored_and_counted() {
    let s = setup();
    let mut cfg = config(&s.bootstrap, s.dir.path(), "");
    cfg.kafka.raw_topic = None;
    let gw = Gateway::start(cfg).await.unwrap();
    let addr = gw.local_addr();
    let q = format!("/callback?{}", signed_query("Group.CallbackAfterSendMsg"));
    assert_ok(&post(addr, &q, SEND_MSG.as_bytes()).await);
    assert_metrics_show(
        addr,
        &["timbridge_callbacks_total{command=\"other\",outcome=\"ignored\"} 1"],
    )
    .await;
    assert!(read_all(&s.bootstrap, RAW_TOPIC).is_empty());
    gw.shutdown().await.unwrap();
}
