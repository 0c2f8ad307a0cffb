//! With `[upstream]`, the gateway owns Tencent's one callback URL: commands
//! that are not read receipts are proxied to the app (same query string and
//! body bytes) and the app's answer goes back to Tencent as it is; read
//! receipts stay with the gateway; a bad Sign never reaches the app.

mod common;

use common::upstream::*;
use common::*;

const BEFORE_SEND: &str = r#"{"CallbackCommand":"C2C.CallbackBeforeSendMsg","From_Account":"jared","To_Account":"Jonh","MsgSeq":48374,"MsgRandom":2837546,"MsgTime":1557481126,"MsgKey":"48374_2837546_1557481126","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"red packet"}}],  "Extra": "\u00e9 kept"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_before_send_callback_gets_the_apps_answer_and_the_app_the_same_bytes() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let addr = gw.local_addr();
    let path = callback_path("C2C.CallbackBeforeSendMsg");
    let a = request(
        addr,
        "POST",
        &path,
        BEFORE_SEND.as_bytes().to_vec(),
        &[
            ("content-type", "application/json"),
            ("x-request-tag", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            // Claims a client could forge to an app that trusts them.
            ("x-forwarded-for", "10.9.9.9"),
            ("x-real-ip", "10.9.9.9"),
            ("forwarded", "for=10.9.9.9;proto=https"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], REWRITTEN_TYPE);
    assert_eq!(
        a.json,
        serde_json::from_str::<serde_json::Value>(REWRITTEN).unwrap(),
        "the app's answer, rewritten MsgBody included"
    );

    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let got = &seen[0];
    assert_eq!(got.path, "/im/callback");
    assert_eq!(
        format!("/callback?{}", got.query),
        path,
        "the same query string, Sign and RequestTime included"
    );
    assert_eq!(got.body, BEFORE_SEND.as_bytes(), "the same body bytes");
    assert_eq!(got.headers["x-request-tag"], "kept");
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1", "the peer only");
    assert_eq!(got.headers["x-forwarded-proto"], "http");
    for forged in ["x-real-ip", "forwarded", "x-forwarded-host"] {
        assert!(!got.headers.contains_key(forged), "{forged} forwarded");
    }
    assert!(
        !got.headers.contains_key("x-hop"),
        "hop-by-hop header forwarded"
    );

    // raw_topic is set in the test config: the body is copied there too.
    let raw = read_topic(
        &s.bootstrap,
        RAW_TOPIC,
        1,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].raw_value, BEFORE_SEND.as_bytes());

    let (_, metrics) = get_text(addr, "/metrics").await;
    for line in [
        "timbridge_callbacks_total{command=\"other\",outcome=\"proxied\"} 1",
        "timbridge_upstream_requests_total{outcome=\"answered\"} 1",
        "timbridge_upstream_requests_total{outcome=\"timeout\"} 0",
        "timbridge_upstream_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_status_and_content_type_go_back_as_they_are() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let a = post(
        gw.local_addr(),
        &callback_path("Teapot.Command"),
        br#"{"CallbackCommand":"Teapot.Command"}"#,
    )
    .await;
    assert_eq!(a.status, 418);
    assert_eq!(a.headers["content-type"], "text/plain");
    assert_eq!(a.json, serde_json::json!("short and stout"));
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_are_answered_by_the_gateway_and_not_proxied() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let started = std::time::Instant::now();
    let a = post(gw.local_addr(), &group_callback(), GROUP_BODY.as_bytes()).await;
    assert_ok(&a);
    assert!(
        started.elapsed() < READ_RECEIPT_DELAY,
        "answered by the gateway, not after the app"
    );
    let recs = read_topic(
        &s.bootstrap,
        GROUP_TOPIC,
        2,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(recs.len(), 2, "both receipts of the callback in Kafka");
    assert!(app.seen().is_empty(), "a read receipt reached the app");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sign_is_refused_and_nothing_is_forwarded() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let q = format!(
        "/callback?SdkAppid={APP}&CallbackCommand=C2C.CallbackBeforeSendMsg&RequestTime={}&Sign={}",
        now_s(),
        "0".repeat(64)
    );
    assert_fail(
        &post(gw.local_addr(), &q, BEFORE_SEND.as_bytes()).await,
        401,
    );
    // An app the gateway does not know is not the upstream's business either.
    let q = "/callback?SdkAppid=42&CallbackCommand=C2C.CallbackBeforeSendMsg";
    assert_fail(&post(gw.local_addr(), q, BEFORE_SEND.as_bytes()).await, 403);
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    assert_eq!(app.connections(), 0);
    gw.shutdown().await.unwrap();
}

/// The gateway reads a parameter's first value; many app frameworks read the
/// last (PHP, Rack, Django's `QueryDict.get`). A query that names the
/// token-less app first and the signed app after it, with a made-up Sign,
/// would pass here and reach the app as the signed app's callback: a
/// repeated Tencent parameter is refused before anything is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_repeating_a_tencent_parameter_is_refused_and_not_forwarded() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s.gateway_proxying_to(&app.url(), "").await;
    let cases = [
        (
            format!(
                "/callback?SdkAppid={OPEN_APP}&CallbackCommand=C2C.CallbackBeforeSendMsg&SdkAppid={APP}&Sign={}&RequestTime={}",
                "0".repeat(64),
                now_s()
            ),
            403,
            "SdkAppid",
        ),
        (
            format!(
                "{}&Sign={}",
                callback_path("C2C.CallbackBeforeSendMsg"),
                "0".repeat(64)
            ),
            401,
            "Sign",
        ),
        (
            format!(
                "/callback?SdkAppid={OPEN_APP}&CallbackCommand=C2C.CallbackBeforeSendMsg&CallbackCommand=Group.CallbackAfterReadReceipt"
            ),
            400,
            "CallbackCommand",
        ),
    ];
    for (q, status, name) in cases {
        let info = assert_fail(
            &post(gw.local_addr(), &q, BEFORE_SEND.as_bytes()).await,
            status,
        );
        assert!(
            info.contains(name) && info.contains("more than once"),
            "{q}: {info}"
        );
    }
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    // Once each, the same callback goes through.
    let q = format!("/callback?SdkAppid={OPEN_APP}&CallbackCommand=C2C.CallbackBeforeSendMsg");
    assert_eq!(
        post(gw.local_addr(), &q, BEFORE_SEND.as_bytes())
            .await
            .status,
        200
    );
    assert_eq!(app.seen().len(), 1);
    gw.shutdown().await.unwrap();
}
