//! The HTTP front end: listener, connections, routes, limits, shutdown.
//!
//! HTTP/1.1 only (Tencent posts HTTP/1.1 with keep-alive). Slow or hostile
//! clients are bounded three ways: a timeout on the request head (hyper's,
//! which needs a timer), a timeout on the body (ours: hyper has none), and a
//! body limit checked on `Content-Length` before reading and enforced while
//! reading. A semaphore bounds the connections served at once; the rest
//! wait in the kernel's accept queue instead of eating memory.
//!
//! Shutdown: stop accepting, let in-flight requests finish (keep-alive
//! connections are told to close after their current request), up to a
//! deadline.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ServerConfig;
use crate::intake::Intake;
use crate::tencent::answer::{OK_BODY, RejectKind, Rejection, fail_body};
use crate::upstream::Origin;

/// The connection's peer, put into each request's extensions for the
/// upstream's `X-Forwarded-For`.
#[derive(Clone, Copy)]
struct Peer(std::net::SocketAddr);

/// Whether Kafka is reachable, as the publisher last saw it; reported by
/// `/readyz` (never a reason to be unready: the spool absorbs outages).
pub type KafkaStatus = watch::Receiver<bool>;

struct Routes {
    intake: Arc<Intake>,
    callback_path: String,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    kafka_up: KafkaStatus,
}

type Answer = Response<Full<Bytes>>;

/// Serves until `shutdown` fires, then drains connections for at most
/// `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    config: &ServerConfig,
    intake: Arc<Intake>,
    kafka_up: KafkaStatus,
    mut shutdown: watch::Receiver<bool>,
) {
    let routes = Arc::new(Routes {
        intake,
        callback_path: config.callback_path.clone(),
        max_body_bytes: config.max_body_bytes,
        body_read_timeout: config.body_read_timeout,
        kafka_up,
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(routes.route(req).await) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are clients going away or timing out mid-request.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = graceful.shutdown().await;
}

impl Routes {
    async fn route(&self, req: Request<Incoming>) -> Answer {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::POST, p) if p == self.callback_path => {
                let _counted = InFlight::enter(&self.intake.metrics().callbacks_in_flight);
                self.callback(req).await
            }
            (&Method::GET, "/metrics") => {
                let body = self.intake.metrics().render();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                )
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            (&Method::GET, "/readyz") => self.readyz(),
            (_, p) if p == self.callback_path => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"callbacks are POSTed\n".to_vec(),
            ),
            _ => text(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }

    async fn callback(&self, req: Request<Incoming>) -> Answer {
        let started = Instant::now();
        // A request that began before shutdown is finished, even if its body
        // arrives after the signal.
        let refuse = self.intake.is_refusing();
        let (mut head, body) = req.into_parts();
        let query = head.uri.query().unwrap_or("");
        let too_large = || {
            Rejection::new(
                RejectKind::TooLarge,
                format!("body is over {} bytes", self.max_body_bytes),
            )
        };
        // Refuse on the declared length before reading a byte of it.
        let declared = head
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            let r = too_large();
            self.intake.reject_unread(query, &r, started);
            return rejected(&r, true);
        }
        let limited = Limited::new(body, self.max_body_bytes);
        let body = match tokio::time::timeout(self.body_read_timeout, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                let r = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    too_large()
                } else {
                    Rejection::new(RejectKind::Invalid, "body could not be read")
                };
                self.intake.reject_unread(query, &r, started);
                return rejected(&r, true);
            }
            Err(_) => {
                let r = Rejection::new(
                    RejectKind::Timeout,
                    format!("body not received within {:?}", self.body_read_timeout),
                );
                self.intake.reject_unread(query, &r, started);
                return rejected(&r, true);
            }
        };
        let origin = match self.intake.upstream() {
            Some(_) => Origin {
                peer: head.extensions.get::<Peer>().map(|p| p.0),
                headers: std::mem::take(&mut head.headers),
            },
            None => Origin::default(),
        };
        match self
            .intake
            .handle_from(query, body, started, refuse, origin)
            .await
        {
            Ok(crate::intake::Accepted::Proxied(answer)) => answer.into_response(),
            Ok(_) => {
                let mut resp = Response::new(Full::new(Bytes::from_static(OK_BODY)));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            Err(r) => rejected(&r, false),
        }
    }

    fn readyz(&self) -> Answer {
        let spool_full = self.intake.spool().is_full();
        let draining = self.intake.is_draining();
        let kafka_up = *self.kafka_up.borrow();
        let ready = !spool_full && !draining;
        let reason = if draining {
            "shutting down"
        } else if spool_full {
            "spool is full or cannot be written"
        } else {
            ""
        };
        let body = serde_json::to_vec(&serde_json::json!({
            "ready": ready,
            "reason": reason,
            "spool_has_room": !spool_full,
            "draining": draining,
            "kafka_reachable": kafka_up,
            // Never a reason to be unready: read receipts work without it.
            "upstream_configured": self.intake.upstream().is_some(),
            "upstream_reachable": self.intake.upstream().and_then(|u| u.reachable()),
        }))
        .unwrap_or_default();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, "application/json", body)
    }
}

/// Counts a request in flight until dropped, also when the client goes away
/// and hyper drops the request's future.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn text(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A FAIL answer. `close` when the body was not read to its end: the
/// connection cannot carry another request after it.
fn rejected(r: &Rejection, close: bool) -> Answer {
    let mut resp = text(r.kind.status(), "application/json", fail_body(r));
    if close {
        resp.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
