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

/// A callback the gateway must refuse: the status it gets, and what its
/// ErrorInfo must name ("" for nothing in particular).
struct Refusal {
    name: &'static str,
    query: String,
    body: Vec<u8>,
    status: u16,
    names: &'static str,
}

/// Every row of the answer table that refuses, one case each.
fn refusals() -> Vec<Refusal> {
    let body = group_body("g-rejected", 1);
    let group = |query: String, b: &str| (query, b.as_bytes().to_vec());
    let query = |app, token, time| timbridge::send::tencent_query(app, GROUP_CMD, token, time);
    let signed = signed_query(GROUP_CMD);
    let c2c = |cmd: &str, b: String| (signed_query(cmd), b.into_bytes());
    let published_sample = r#"{
"CallbackCommand": "Group.CallbackAfterReadReceipt", // Callback after read receipt
"GroupId": "@TGS#2TTV7VSII", // Group ID
"GroupMsgReceiptList": [ { "MsgSeq": 1, "ReadNum": 1, "UnreadNum": 6 "ReadReceiptMembers":[] } ],
"EventTime":"1670574414123"
}"#;
    let no_command = timbridge::send::tencent_query(APP, "", Some(TOKEN), now_s())
        .replace("CallbackCommand=&", "");
    let no_time = format!(
        "SdkAppid={APP}&CallbackCommand={GROUP_CMD}&Sign={}",
        timbridge::tencent::auth::sign(TOKEN, &now_s().to_string())
    );
    let rows = [
        // 403: SdkAppid missing, or not configured.
        (
            "403 without SdkAppid",
            group(format!("CallbackCommand={GROUP_CMD}"), &body),
            403,
            "SdkAppid",
        ),
        (
            "403 for an app not configured",
            group(query(1400000777, Some(TOKEN), now_s()), &body),
            403,
            "",
        ),
        (
            "403 for an SdkAppid that is not a number",
            group(
                format!("SdkAppid=not-a-number&CallbackCommand={GROUP_CMD}"),
                &body,
            ),
            403,
            "",
        ),
        // 401: Sign or RequestTime missing, wrong, or stale.
        (
            "401 without Sign",
            group(query(APP, None, now_s()), &body),
            401,
            "Sign",
        ),
        (
            "401 for a Sign made with another token",
            group(query(APP, Some("not-the-token"), now_s()), &body),
            401,
            "",
        ),
        (
            "401 for a RequestTime an hour old",
            group(query(APP, Some(TOKEN), now_s() - 3600), &body),
            401,
            "RequestTime",
        ),
        (
            "401 for a RequestTime two minutes ahead",
            group(query(APP, Some(TOKEN), now_s() + 120), &body),
            401,
            "",
        ),
        ("401 without RequestTime", group(no_time, &body), 401, ""),
        // 400: not JSON, missing fields, wrong types; ErrorInfo names the field.
        (
            "400 for a body that is not JSON",
            group(signed.clone(), "{not json"),
            400,
            "not JSON",
        ),
        (
            "400 for Tencent's published sample, comments and all",
            group(signed.clone(), published_sample),
            400,
            "",
        ),
        (
            "400 for a group receipt without GroupId",
            group(
                signed.clone(),
                &body.replace("\"GroupId\":\"g-rejected\",", ""),
            ),
            400,
            "GroupId",
        ),
        (
            "400 for a MsgSeq that is a string",
            group(
                signed.clone(),
                &body.replace("\"MsgSeq\":1", "\"MsgSeq\":\"1\""),
            ),
            400,
            "GroupMsgReceiptList[0].MsgSeq",
        ),
        (
            "400 for a c2c receipt without Operator_Account",
            c2c(
                "C2C.CallbackAfterMsgReadReceipt",
                C2C_RECEIPT_BODY.replace("\"Operator_Account\": \"zed\",", ""),
            ),
            400,
            "Operator_Account",
        ),
        (
            "400 for a c2c MsgKey that is a number",
            c2c(
                "C2C.CallbackAfterMsgReadReceipt",
                C2C_RECEIPT_BODY.replace("\"MsgKey\": \"1_2_3\"", "\"MsgKey\": 123"),
            ),
            400,
            "C2CMsgInfo[0].MsgKey",
        ),
        (
            "400 for a c2c report without LastReadTime",
            c2c(
                "C2C.CallbackAfterMsgReport",
                C2C_REPORT_BODY.replace("\"LastReadTime\": 1670574414,", ""),
            ),
            400,
            "LastReadTime",
        ),
        (
            "400 for a c2c report whose Report_Account is a list",
            c2c(
                "C2C.CallbackAfterMsgReport",
                C2C_REPORT_BODY.replace("\"Report_Account\": \"amy\"", "\"Report_Account\": [1]"),
            ),
            400,
            "Report_Account",
        ),
        (
            "400 without CallbackCommand",
            group(no_command, &body),
            400,
            "CallbackCommand",
        ),
        // 413: over max_body_bytes (64 KiB in the test config).
        (
            "413 for a body over max_body_bytes",
            (signed, vec![b' '; 70_000]),
            413,
            "",
        ),
    ];
    rows.into_iter()
        .map(|(name, (query, body), status, names)| Refusal {
            name,
            query,
            body,
            status,
            names,
        })
        .collect()
}

/// The counts of `refusals()` and one good callback, per command and outcome.
const COUNTED: &[&str] = &[
    r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="unknown_app"} 3"#,
    r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="invalid"} 4"#,
    r#"timbridge_callbacks_total{command="C2C.CallbackAfterMsgReadReceipt",outcome="invalid"} 2"#,
    r#"timbridge_callbacks_total{command="C2C.CallbackAfterMsgReport",outcome="invalid"} 2"#,
    r#"timbridge_callbacks_total{command="other",outcome="invalid"} 1"#,
    r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="unauthorized"} 5"#,
    r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="too_large"} 1"#,
    r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="accepted"} 1"#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_get_their_status_and_write_nothing() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let mut cases = Cases::new();
    for r in refusals() {
        let a = post(addr, &group_path(&r.query), &r.body).await;
        let outcome = fail_info(&a, r.status).and_then(|info| {
            if !info.contains(r.names) {
                Err(format!("ErrorInfo {info:?} does not name {:?}", r.names))
            } else if info.contains(TOKEN) {
                Err(format!("ErrorInfo echoes the token: {info:?}"))
            } else {
                Ok(())
            }
        });
        cases.record(r.name, outcome);
    }

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
    let keys = |topic| -> Vec<String> {
        read_all(&s.bootstrap, topic)
            .iter()
            .map(|r| String::from_utf8_lossy(&r.key).into_owned())
            .collect()
    };
    cases.eq(
        "only the good callback's record",
        keys(GROUP_TOPIC),
        vec!["g-good".to_owned()],
    );
    cases.eq("nothing on the c2c topic", keys(C2C_TOPIC), vec![]);
    cases.eq("nothing on the raw topic", keys(RAW_TOPIC), vec![]);

    let (_, metrics) = get_text(addr, "/metrics").await;
    for line in COUNTED {
        cases.check(line, metrics.contains(line), || "missing".to_owned());
    }
    cases.finish_showing("/metrics", &metrics);
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
