//! An `https://` upstream works over rustls: with `ca_file` naming the
//! app's private CA the callback is proxied; without it the built-in public
//! roots do not trust that certificate, and the answer is a 502.

mod common;

use common::upstream::*;
use common::*;

const SEND_MSG: &[u8] =
    br#"{"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"@TGS#tls","MsgSeq":1}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_proxied_to() {
    let s = setup();
    let (app, ca_pem) = TestUpstream::start_tls().await;
    let ca = s.dir.path().join("app-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let gw = s
        .gateway_proxying_to(&app.https_url(), &format!("ca_file = \"{}\"", ca.display()))
        .await;
    let a = post(
        gw.local_addr(),
        &callback_path("Group.CallbackAfterSendMsg"),
        SEND_MSG,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(
        a.json,
        serde_json::from_str::<serde_json::Value>(REWRITTEN).unwrap()
    );
    assert_eq!(app.seen().len(), 1);
    assert_eq!(app.seen()[0].body, SEND_MSG);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_untrusted_certificate_is_a_502() {
    let s = setup();
    let (app, _) = TestUpstream::start_tls().await;
    let gw = s.gateway_proxying_to(&app.https_url(), "").await;
    let a = post(
        gw.local_addr(),
        &callback_path("Group.CallbackAfterSendMsg"),
        SEND_MSG,
    )
    .await;
    let info = assert_fail(&a, 502);
    // Generic for Tencent; the certificate error itself goes to our log.
    assert!(info.contains("upstream unreachable"), "{info}");
    assert!(app.seen().is_empty());
    gw.shutdown().await.unwrap();
}
