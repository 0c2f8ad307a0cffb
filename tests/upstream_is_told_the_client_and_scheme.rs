//! What the app behind `[upstream]` is told of a proxied callback's origin:
//! `X-Forwarded-Proto: https` when it came over the HTTPS listener, and as
//! `X-Forwarded-For` the client the source rules resolved: behind a trusted
//! proxy the address it forwarded, not the proxy's.

mod common;

use std::net::IpAddr;

use common::reload::{TestCa, https_connect, request_from, send};
use common::upstream::*;
use common::*;

const BEFORE_SEND: &str = r#"{"CallbackCommand":"C2C.CallbackBeforeSendMsg","From_Account":"a","To_Account":"b","MsgSeq":1,"MsgRandom":2,"MsgTime":1557481126,"MsgKey":"1_2_1557481126","MsgBody":[]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_app_is_told_https() {
    let s = setup();
    let ca = TestCa::new();
    ca.issue_into(s.dir.path());
    let app = TestUpstream::start().await;
    let dir = s.dir.path().display();
    let tls = format!("tls_cert_file = \"{dir}/server.crt\"\ntls_key_file = \"{dir}/server.key\"");
    let gw = s
        .gateway_with_upstream(&format!("url = \"{}\"", app.url()), &[("server", &tls)])
        .await;
    let addr = gw.local_addr();
    let mut c = https_connect(&ca, addr).await.expect("TLS");
    let path = callback_path("C2C.CallbackBeforeSendMsg");
    let a = send(
        &mut c,
        addr,
        &path,
        BEFORE_SEND.as_bytes(),
        &[
            ("content-type", "application/json"),
            ("x-forwarded-proto", "http"),
        ],
    )
    .await
    .expect("an answer");
    assert_eq!(a.status, 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.1");
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_app_is_told_the_forwarded_client() {
    let s = setup();
    let app = TestUpstream::start().await;
    let gw = s
        .gateway_with_upstream(
            &format!("url = \"{}\"", app.url()),
            &[("server", "trusted_proxies = [\"127.0.0.1\"]")],
        )
        .await;
    let addr = gw.local_addr();
    let path = callback_path("C2C.CallbackBeforeSendMsg");
    let xff = ("x-forwarded-for", "198.51.100.1, 203.0.113.9");
    // Through the proxy (127.0.0.1): the right-most entry that is not a
    // proxy. Not through a proxy (127.0.0.2): the peer, whatever it claims.
    for peer in ["127.0.0.1", "127.0.0.2"] {
        let a = request_from(
            peer.parse::<IpAddr>().unwrap(),
            addr,
            &path,
            BEFORE_SEND.as_bytes(),
            &[("content-type", "application/json"), xff],
        )
        .await;
        assert_eq!(a.status, 200, "from {peer}");
    }
    let seen = app.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].headers["x-forwarded-for"], "203.0.113.9");
    assert_eq!(seen[1].headers["x-forwarded-for"], "127.0.0.2");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    gw.shutdown().await.unwrap();
}
