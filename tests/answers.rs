//! Every row of the contract's answer table, and that a rejected callback
//! writes nothing to Kafka while the gateway keeps serving.

mod common;

use std::time::Duration;

use common::*;
use timbridge::Gateway;

const GROUP_CMD: &str = "Group.CallbackAfterReadReceipt";

fn group_path(query: &str) -> String {
    format!("/callback?{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_get_their_status_and_write_nothing() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let body = group_body("g-rejected", 1);

    // 403: SdkAppid missing, or not configured.
    let info = assert_fail(
        &post(
            addr,
            &group_path(&format!("CallbackCommand={GROUP_CMD}")),
            body.as_bytes(),
        )
        .await,
        403,
    );
    assert!(info.contains("SdkAppid"), "{info}");
    let q = timbridge::send::tencent_query(1400000777, GROUP_CMD, Some(TOKEN), now_s());
    assert_fail(&post(addr, &group_path(&q), body.as_bytes()).await, 403);
    let q = format!("SdkAppid=not-a-number&CallbackCommand={GROUP_CMD}");
    assert_fail(&post(addr, &group_path(&q), body.as_bytes()).await, 403);

    // 401: Sign or RequestTime missing, wrong, or stale.
    let unsigned = timbridge::send::tencent_query(APP, GROUP_CMD, None, now_s());
    let info = assert_fail(
        &post(addr, &group_path(&unsigned), body.as_bytes()).await,
        401,
    );
    assert!(info.contains("Sign"), "{info}");
    let wrong = timbridge::send::tencent_query(APP, GROUP_CMD, Some("not-the-token"), now_s());
    let info = assert_fail(&post(addr, &group_path(&wrong), body.as_bytes()).await, 401);
    assert!(
        !info.contains(TOKEN),
        "ErrorInfo must not echo the token: {info}"
    );
    let stale = timbridge::send::tencent_query(APP, GROUP_CMD, Some(TOKEN), now_s() - 3600);
    let info = assert_fail(&post(addr, &group_path(&stale), body.as_bytes()).await, 401);
    assert!(info.contains("RequestTime"), "{info}");
    let future = timbridge::send::tencent_query(APP, GROUP_CMD, Some(TOKEN), now_s() + 120);
    assert_fail(
        &post(addr, &group_path(&future), body.as_bytes()).await,
        401,
    );
    let t = now_s().to_string();
    let no_time = format!(
        "SdkAppid={APP}&CallbackCommand={GROUP_CMD}&Sign={}",
        timbridge::tencent::auth::sign(TOKEN, &t)
    );
    assert_fail(
        &post(addr, &group_path(&no_time), body.as_bytes()).await,
        401,
    );

    // 400: not JSON, missing fields, wrong types; ErrorInfo names the field.
    let signed = signed_query(GROUP_CMD);
    let info = assert_fail(&post(addr, &group_path(&signed), b"{not json").await, 400);
    assert!(info.contains("not JSON"), "{info}");
    let published_sample = r#"{
"CallbackCommand": "Group.CallbackAfterReadReceipt", // Callback after read receipt
"GroupId": "@TGS#2TTV7VSII", // Group ID
"GroupMsgReceiptList": [ { "MsgSeq": 1, "ReadNum": 1, "UnreadNum": 6 "ReadReceiptMembers":[] } ],
"EventTime":"1670574414123"
}"#;
    assert_fail(
        &post(addr, &group_path(&signed), published_sample.as_bytes()).await,
        400,
    );
    let missing = body.replace("\"GroupId\":\"g-rejected\",", "");
    let info = assert_fail(
        &post(addr, &group_path(&signed), missing.as_bytes()).await,
        400,
    );
    assert!(info.contains("GroupId"), "{info}");
    let wrong_type = body.replace("\"MsgSeq\":1", "\"MsgSeq\":\"1\"");
    let info = assert_fail(
        &post(addr, &group_path(&signed), wrong_type.as_bytes()).await,
        400,
    );
    assert!(info.contains("GroupMsgReceiptList[0].MsgSeq"), "{info}");
    for (cmd, bad, field) in [
        (
            "C2C.CallbackAfterMsgReadReceipt",
            C2C_RECEIPT_BODY.replace("\"Operator_Account\": \"zed\",", ""),
            "Operator_Account",
        ),
        (
            "C2C.CallbackAfterMsgReadReceipt",
            C2C_RECEIPT_BODY.replace("\"MsgKey\": \"1_2_3\"", "\"MsgKey\": 123"),
            "C2CMsgInfo[0].MsgKey",
        ),
        (
            "C2C.CallbackAfterMsgReport",
            C2C_REPORT_BODY.replace("\"LastReadTime\": 1670574414,", ""),
            "LastReadTime",
        ),
        (
            "C2C.CallbackAfterMsgReport",
            C2C_REPORT_BODY.replace("\"Report_Account\": \"amy\"", "\"Report_Account\": [1]"),
            "Report_Account",
        ),
    ] {
        let q = signed_query(cmd);
        let info = assert_fail(&post(addr, &group_path(&q), bad.as_bytes()).await, 400);
        assert!(info.contains(field), "{cmd}: {info}");
    }
    let no_command = timbridge::send::tencent_query(APP, "", Some(TOKEN), now_s());
    let no_command = no_command.replace("CallbackCommand=&", "");
    let info = assert_fail(
        &post(addr, &group_path(&no_command), body.as_bytes()).await,
        400,
    );
    assert!(info.contains("CallbackCommand"), "{info}");

    // 413: over max_body_bytes (64 KiB in the test config), by declared
    // length and by a chunked body that only turns out too long.
    let huge = vec![b' '; 70_000];
    assert_fail(&post(addr, &group_path(&signed), &huge).await, 413);

    // After all of that, a good callback is still served, and it is the only
    // record written.
    assert_ok(
        &post(
            addr,
            &group_path(&signed_query(GROUP_CMD)),
            group_body("g-good", 1).as_bytes(),
        )
        .await,
    );
    let recs = read_all(&s.bootstrap, GROUP_TOPIC);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].key, b"g-good");
    assert!(read_all(&s.bootstrap, C2C_TOPIC).is_empty());
    assert!(read_all(&s.bootstrap, RAW_TOPIC).is_empty());

    let (_, metrics) = get_text(addr, "/metrics").await;
    for line in [
        "timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"unknown_app\"} 3",
        "timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"invalid\"} 4",
        "timbridge_callbacks_total{command=\"C2C.CallbackAfterMsgReadReceipt\",outcome=\"invalid\"} 2",
        "timbridge_callbacks_total{command=\"C2C.CallbackAfterMsgReport\",outcome=\"invalid\"} 2",
        "timbridge_callbacks_total{command=\"other\",outcome=\"invalid\"} 1",
        "timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"unauthorized\"} 5",
        "timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"too_large\"} 1",
        "timbridge_callbacks_total{command=\"Group.CallbackAfterReadReceipt\",outcome=\"accepted\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_refused_while_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = setup();
    let gw = s.gateway(&[]).await;
    let mut conn = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    // No Content-Length: the limit must hold while the body streams in.
    let head = format!(
        "POST /callback?{} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
        signed_query(GROUP_CMD)
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("2000\r\n{}\r\n", " ".repeat(0x2000));
    for _ in 0..20 {
        if conn.write_all(chunk.as_bytes()).await.is_err() {
            break; // the gateway answered and closed: that is the point
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(read_all(&s.bootstrap, GROUP_TOPIC).is_empty());
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off_and_others_are_still_served() {
    let s = setup();
    let mut cfg = config(&s.bootstrap, s.dir.path(), "");
    cfg.server.body_read_timeout = Duration::from_millis(300);
    let gw = Gateway::start(cfg).await.unwrap();
    let addr = gw.local_addr();

    // Declares 100 bytes, sends 10, then stalls.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /callback?{} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{\"GroupId\"",
        signed_query(GROUP_CMD)
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // Meanwhile another client is served.
    assert_ok(
        &post(
            addr,
            &format!("/callback?{}", signed_query(GROUP_CMD)),
            group_body("g-fast", 1).as_bytes(),
        )
        .await,
    );
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer))
        .await
        .expect("the slow client is answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"ActionStatus\":\"FAIL\""), "{text}");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_routes_and_methods() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    assert_eq!(get_text(addr, "/healthz").await.0, 200);
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["spool_has_room"], true);
    assert_eq!(ready["draining"], false);
    assert_eq!(get_text(addr, "/nope").await.0, 404);
    assert_eq!(
        request(addr, "GET", "/callback", vec![], &[]).await.status,
        405
    );
    gw.shutdown().await.unwrap();
}
