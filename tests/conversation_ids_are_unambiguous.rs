//! Two different one-to-one conversations never share a conversation id, a
//! key or an event_id, whatever the accounts contain: joined as they were,
//! (a:b:a, a:b) and (a:b:a, b:a) both gave `c2c:a:b:a:b:a`, and the second
//! read was dropped as a duplicate of the first.

mod common;

use std::time::Duration;

use common::*;

const CMD: &str = "C2C.CallbackAfterMsgReadReceipt";

fn receipt(operator: &str, peer: &str) -> String {
    serde_json::json!({
        "Operator_Account": operator,
        "Peer_Account": peer,
        "C2CMsgInfo": [{"From_Account": peer, "To_Account": operator, "MsgKey": "k1"}],
        "EventTime": 1700000000000u64
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_with_colons_make_two_conversations_with_two_events() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let path = format!("/callback?{}", signed_query(CMD));
    for peer in ["a:b", "b:a"] {
        let a = post(gw.local_addr(), &path, receipt("a:b:a", peer).as_bytes()).await;
        assert_ok(&a);
    }
    assert_eq!(gw.metrics().duplicate_events.get(), 0);
    let recs = read_topic(&s.bootstrap, C2C_TOPIC, 2, Duration::from_secs(20));
    assert_eq!(recs.len(), 2);
    let schema = schema();
    let mut keys: Vec<String> = recs
        .iter()
        .map(|r| {
            assert_valid(&schema, &r.value);
            assert_eq!(
                r.value["conversation_id"].as_str().unwrap().as_bytes(),
                r.key
            );
            String::from_utf8(r.key.clone()).unwrap()
        })
        .collect();
    keys.sort();
    // ':' inside an account is written %3A; the separators stay ':'.
    assert_eq!(keys, ["c2c:a%3Ab%3Aa:b%3Aa", "c2c:a%3Ab:a%3Ab%3Aa"]);
    assert_ne!(recs[0].value["event_id"], recs[1].value["event_id"]);
    // Accounts as Tencent allows them keep the documented form.
    let a = post(gw.local_addr(), &path, receipt("zed", "amy").as_bytes()).await;
    assert_ok(&a);
    let recs = read_topic(&s.bootstrap, C2C_TOPIC, 3, Duration::from_secs(20));
    assert!(recs.iter().any(|r| r.key == b"c2c:amy:zed"));
    gw.shutdown().await.unwrap();
}
