//! One callback cannot ask for unbounded work: every string and list copied
//! into the records is bounded (`[limits]`), bodies and items are JSON
//! objects, and the records may take at most 16 spool bytes per request
//! byte. Over a limit the answer is 400 naming the field and the limit,
//! nothing reaches the spool, the limit's counter moves, and the gateway
//! keeps serving genuine callbacks.

mod common;

use common::*;
use timbridge::Gateway;
use timbridge::config::Config;

const GROUP_CMD: &str = "Group.CallbackAfterReadReceipt";

fn group_with_items(group: &str, items: usize) -> String {
    let items: Vec<String> = (0..items)
        .map(|i| format!(r#"{{"MsgSeq":{i},"ReadNum":0,"UnreadNum":0}}"#))
        .collect();
    format!(
        r#"{{"GroupId":"{group}","Type":"Public","EventTime":1,"GroupMsgReceiptList":[{}]}}"#,
        items.join(",")
    )
}

fn over_limit_count(gw: &Gateway, limit: &str) -> u64 {
    gw.metrics()
        .callbacks_over_limit
        .with_label_values(&[limit])
        .get()
}

/// Posts `body` as a signed group receipt and asserts a 400 whose ErrorInfo
/// names `field` and the `[limits]` key, with nothing spooled.
async fn assert_refused(gw: &Gateway, query: &str, body: &str, field: &str, key: &str) {
    let before = over_limit_count(gw, key);
    let a = post(
        gw.local_addr(),
        &format!("/callback?{query}"),
        body.as_bytes(),
    )
    .await;
    let info = assert_fail(&a, 400);
    assert!(info.contains(field), "{info}");
    assert!(info.contains(&format!("limits.{key}")), "{info}");
    assert_eq!(gw.spool().stats().pending_events, 0, "{info}");
    assert_eq!(over_limit_count(gw, key), before + 1, "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_and_lists_are_refused_before_anything_is_built() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let signed = signed_query(GROUP_CMD);

    // The amplification shape: a long GroupId that every item would copy.
    // Refused at the GroupId, before the 1,000 items are looked at.
    let body = group_with_items(&"G".repeat(20_000), 1000);
    assert_refused(
        &gw,
        &signed,
        &body,
        "GroupId: 20000 bytes",
        "group_id_bytes",
    )
    .await;
    let body = group_with_items("g", 1001);
    assert_refused(&gw, &signed, &body, "GroupMsgReceiptList", "receipt_items").await;
    let body = group_body("g", 1).replace(
        r#""Member_Account":"u""#,
        &format!(r#""Member_Account":"{}""#, "u".repeat(129)),
    );
    assert_refused(
        &gw,
        &signed,
        &body,
        "GroupMsgReceiptList[0].ReadReceiptMembers[0].Member_Account",
        "account_bytes",
    )
    .await;
    let c2c = C2C_RECEIPT_BODY.replace("1_2_3", &"1".repeat(129));
    assert_refused(
        &gw,
        &signed_query("C2C.CallbackAfterMsgReadReceipt"),
        &c2c,
        "C2CMsgInfo[0].MsgKey",
        "msg_key_bytes",
    )
    .await;

    // Query fields copied into every record: 60 KB of ClientIP × 1,000
    // items was 60 MB of spool. (A 60 KB query no longer gets this far: the
    // request head is capped at 16 KiB and answered 431, so 10 KB here.)
    let query = format!("{signed}&ClientIP={}", "9".repeat(10_000));
    let query = query.replacen("&ClientIP=127.0.0.1", "", 1);
    let body = group_with_items("gip", 1000);
    assert_refused(&gw, &query, &body, "ClientIP", "client_ip_bytes").await;
    // The contract's order holds: the app and its signature are checked
    // before any limit, so an unsigned oversized callback is a 401.
    let unsigned = timbridge::send::tencent_query(APP, GROUP_CMD, None, now_s());
    let query = format!("/callback?{unsigned}&ClientIP={}", "9".repeat(10_000));
    assert_fail(&post(gw.local_addr(), &query, body.as_bytes()).await, 401);
    let query = signed.replacen(
        "OptPlatform=iOS",
        &format!("OptPlatform={}", "p".repeat(33)),
        1,
    );
    assert_refused(&gw, &query, GROUP_BODY, "OptPlatform", "platform_bytes").await;

    // A command longer than the record format could store was accepted and
    // then dead-lettered; now any command over the limit is a 400.
    let long = "X".repeat(257);
    let query = format!("SdkAppid={OPEN_APP}&CallbackCommand={long}");
    assert_refused(
        &gw,
        &query,
        r#"{"GroupId":"raw"}"#,
        "CallbackCommand",
        "command_bytes",
    )
    .await;

    // Every field within its limit, but 1,000 items under a 128-byte
    // GroupId ask for ~23 spool bytes per request byte.
    let body = group_with_items(&"g".repeat(128), 1000);
    let before = over_limit_count(&gw, "output_bytes");
    let a = post(
        gw.local_addr(),
        &format!("/callback?{signed}"),
        body.as_bytes(),
    )
    .await;
    let info = assert_fail(&a, 400);
    assert!(info.contains("16 times"), "{info}");
    assert_eq!(over_limit_count(&gw, "output_bytes"), before + 1);
    assert_eq!(gw.spool().stats().pending_events, 0);

    // Still serving, and genuine callbacks are untouched by all this.
    assert_ok(&post(gw.local_addr(), &group_callback(), GROUP_BODY.as_bytes()).await);
    let body = group_with_items(&"g".repeat(48), 50);
    assert_ok(&post(gw.local_addr(), &group_callback(), body.as_bytes()).await);
    gw.shutdown().await.unwrap();
}

/// A small c2c callback whose accounts are all `:` (escaped to `%3A`, three
/// bytes for one, in both the key and the conversation id of every record)
/// and whose items are tiny used to fit under a 64 KiB floor at ~70 spool
/// bytes per request byte; the budget is 16 per byte plus 8 KiB now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_c2c_callbacks_with_escaped_accounts_cannot_amplify() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let colons = ":".repeat(128);
    let items: Vec<String> = (0..40).map(|i| format!(r#"{{"MsgKey":"{i}"}}"#)).collect();
    let body = format!(
        r#"{{"Operator_Account":"{colons}","Peer_Account":"{colons}","C2CMsgInfo":[{}],"EventTime":1}}"#,
        items.join(",")
    );
    let query = signed_query("C2C.CallbackAfterMsgReadReceipt");
    let before = over_limit_count(&gw, "output_bytes");
    let a = post(
        gw.local_addr(),
        &format!("/callback?{query}"),
        body.as_bytes(),
    )
    .await;
    let info = assert_fail(&a, 400);
    assert!(info.contains("16 times"), "{info}");
    assert_eq!(over_limit_count(&gw, "output_bytes"), before + 1);
    assert_eq!(gw.spool().stats().pending_events, 0);
    // The genuine c2c receipt still passes.
    assert_ok(
        &post(
            gw.local_addr(),
            &format!("/callback?{query}"),
            C2C_RECEIPT_BODY.as_bytes(),
        )
        .await,
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_items_must_be_json_objects() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    for body in [
        // 8 bytes an item used to become a whole record.
        r#"{"GroupId":"g","EventTime":1,"GroupMsgReceiptList":[[1,0,0],[2,0,0]]}"#,
        r#"["g",null,[[1,0,0]],1]"#,
        r#"{"GroupId":"g","EventTime":1,"GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":1,"UnreadNum":0,"ReadReceiptMembers":[["u"]]}]}"#,
    ] {
        let info = assert_fail(
            &post(gw.local_addr(), &group_callback(), body.as_bytes()).await,
            400,
        );
        assert!(info.contains("expected a JSON object"), "{body}: {info}");
    }
    // Raw-forwarded commands too: Tencent's bodies are always objects.
    let query = format!("/callback?SdkAppid={OPEN_APP}&CallbackCommand=Group.CallbackAfterSendMsg");
    let info = assert_fail(&post(gw.local_addr(), &query, b"[1]").await, 400);
    assert!(info.contains("expected a JSON object"), "{info}");
    assert_eq!(gw.spool().stats().pending_events, 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_ids_and_signed_or_spaced_event_times_are_refused() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let info = assert_fail(
        &post(addr, &group_callback(), group_body("", 1).as_bytes()).await,
        400,
    );
    assert!(info.starts_with("GroupId: invalid length 0"), "{info}");
    let c2c = format!("/callback?{}", signed_query("C2C.CallbackAfterMsgReport"));
    let info = assert_fail(
        &post(
            addr,
            &c2c,
            C2C_REPORT_BODY.replace("\"amy\"", "\"\"").as_bytes(),
        )
        .await,
        400,
    );
    assert!(
        info.starts_with("Report_Account: invalid length 0"),
        "{info}"
    );
    for time in ["+1670574414123", " 1 "] {
        let body = GROUP_BODY.replace("\"1670574414123\"", &format!("\"{time}\""));
        let info = assert_fail(&post(addr, &group_callback(), body.as_bytes()).await, 400);
        assert!(
            info.starts_with("EventTime: invalid value"),
            "{time:?}: {info}"
        );
    }
    assert_eq!(gw.spool().stats().pending_events, 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_configurable_and_checked_at_start() {
    let s = setup();
    let text = s.config_text(&[]) + "\n[limits]\nreceipt_items = 2\n";
    let gw = Gateway::start(Config::parse(&text).unwrap()).await.unwrap();
    assert_ok(
        &post(
            gw.local_addr(),
            &group_callback(),
            group_with_items("g2", 2).as_bytes(),
        )
        .await,
    );
    let info = assert_fail(
        &post(
            gw.local_addr(),
            &group_callback(),
            group_with_items("g3", 3).as_bytes(),
        )
        .await,
        400,
    );
    assert!(
        info.contains("over the limit of 2 (limits.receipt_items"),
        "{info}"
    );
    gw.shutdown().await.unwrap();

    let err = Config::parse(&(s.config_text(&[]) + "\n[limits]\ncommand_bytes = 70000\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.command_bytes"), "{err}");
    let err = Config::parse(&(s.config_text(&[]) + "\n[limits]\ngroup_id_byte = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("group_id_byte"), "{err}");
}
