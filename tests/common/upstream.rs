//! A real app server for the `[upstream]` tests: hyper on 127.0.0.1, which
//! records every request it gets and counts the connections it accepts.
//!
//! What it answers depends on the `CallbackCommand` in the query string:
//! `Slow.Command` waits 3 s, `Teapot.Command` answers 418 in plain text,
//! `Huge.Command` answers 1 MiB, read receipts are answered after
//! `READ_RECEIPT_DELAY` (503 at once the first time when their body
//! mentions `flaky`), and everything else gets [`REWRITTEN`] at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::Setup;

/// The app's answer to a before-send callback: it rewrites the message.
pub const REWRITTEN: &str = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"rewritten by the app \u00e9"}}]}"#;
pub const REWRITTEN_TYPE: &str = "application/json; charset=utf-8";

/// How long the app takes to answer a read receipt.
pub const READ_RECEIPT_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        Self::start_with(None).await
    }

    /// The same app over HTTPS, with a certificate for 127.0.0.1 issued by
    /// a fresh self-signed CA; returns it and the CA's PEM.
    pub async fn start_tls() -> (TestUpstream, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Self::start_with(Some(acceptor)).await, ca_cert.pem())
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> TestUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let seen = seen.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let seen = seen.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| answer(req, seen.clone()));
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = match tls {
                            None => http.serve_connection(TokioIo::new(stream), service).await,
                            Some(tls) => {
                                let Ok(stream) = tls.accept(stream).await else {
                                    return;
                                };
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                        };
                    });
                }
            }
        });
        TestUpstream {
            addr,
            seen,
            connections,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/im/callback", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}/im/callback", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let headers = req.headers().clone();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let first_time = {
        let mut seen = seen.lock().unwrap();
        let first = !seen.iter().any(|s| s.body == body);
        seen.push(Seen {
            path,
            query: query.clone(),
            headers,
            body: body.clone(),
        });
        first
    };
    let reply = |status: u16, content_type: &str, body: Bytes| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(body))
            .unwrap())
    };
    if query.contains("CallbackCommand=Slow.Command") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    } else if query.contains("CallbackCommand=Teapot.Command") {
        return reply(418, "text/plain", Bytes::from_static(b"short and stout"));
    } else if query.contains("CallbackCommand=Huge.Command") {
        return reply(200, REWRITTEN_TYPE, Bytes::from(vec![b' '; 1 << 20]));
    } else if first_time && body.windows(5).any(|w| w == b"flaky") {
        return reply(503, "text/plain", Bytes::from_static(b"not now"));
    } else if query.contains("ReadReceipt") || query.contains("MsgReport") {
        tokio::time::sleep(READ_RECEIPT_DELAY).await;
    }
    reply(
        200,
        REWRITTEN_TYPE,
        Bytes::from_static(REWRITTEN.as_bytes()),
    )
}

/// A port nothing listens on: bound, then closed.
pub async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/im/callback")
}

impl Setup {
    /// An in-process gateway on the test config plus `extra`, with an
    /// `[upstream]` table of `upstream` lines.
    pub async fn gateway_with_upstream(
        &self,
        upstream: &str,
        extra: &[(&str, &str)],
    ) -> timbridge::Gateway {
        let text = format!("{}\n[upstream]\n{upstream}\n", self.config_text(extra));
        let config = timbridge::config::Config::parse(&text).expect("test config");
        timbridge::Gateway::start(config)
            .await
            .expect("gateway starts")
    }
}

impl Setup {
    /// A gateway proxying to `url` (an app's, or [`dead_url`]), with `more`
    /// lines in its `[upstream]` table.
    pub async fn gateway_proxying_to(&self, url: &str, more: &str) -> timbridge::Gateway {
        self.gateway_with_upstream(&format!("url = \"{url}\"\n{more}"), &[])
            .await
    }
}

/// A signed query for `command`, as Tencent sends it.
pub fn callback_path(command: &str) -> String {
    format!("/callback?{}", super::signed_query(command))
}
