//! The app behind the gateway (`[upstream]`): every callback that is not a
//! read receipt is proxied to it, and its answer goes back to Tencent.
//!
//! Tencent Cloud Chat has one callback URL per SdkAppid. With this, the
//! gateway can own that URL, keep read receipts for itself (fast, durable, to
//! Kafka) and pass every other command to the app unchanged: the same query
//! string and body bytes (so the app can still check `Sign` and
//! `RequestTime`), and the app's status, `Content-Type` and body back as they
//! are, since some callbacks (`*.CallbackBeforeSendMsg`) decide by their
//! answer whether and how a message is delivered.
//!
//! The proxy is never on the read-receipt path: a slow or dead app costs
//! other commands a 502/504 within `timeout`, and read receipts nothing.
//! Bounded everywhere: one pooled keep-alive client, a cap on requests in
//! flight (503 past it), request bodies as the server already limited them,
//! answers capped at `max_response_bytes`, and with `forward_read_receipts`
//! a queue bounded in bytes (`forward_queue_bytes`, body and headers of
//! every read receipt queued or being delivered) as well as in items, whose
//! overflow is counted, never waited for.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::config::UpstreamConfig;
use crate::labels::{UpstreamDrop, UpstreamOutcome};
use crate::metrics::Metrics;
use crate::tencent::answer::{RejectKind, Rejection};
use crate::throttle::LogThrottle;

/// Idle pooled connections are closed after this. Below the 5 s keep-alive
/// timeout of common app servers (Node.js), so the pool rarely hands out a
/// connection the app is closing at that very moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Read receipts being delivered to the upstream at once, with
/// `forward_read_receipts`; the rest wait in the queue.
pub(crate) const FORWARD_CONCURRENCY: usize = 8;

/// How long a forwarded read receipt is retried. The app checks `Sign` and
/// `RequestTime` within Tencent's 60-second window; after that a delivery
/// would be refused anyway.
const FORWARD_FOR: Duration = Duration::from_secs(55);

/// Where a callback came from, for the headers sent on to the upstream.
#[derive(Debug, Default, Clone)]
pub struct Origin {
    /// The client, sent as `X-Forwarded-For`: the TCP peer, or behind
    /// `server.trusted_proxies` the address they forwarded.
    pub client: Option<IpAddr>,
    /// Whether the request came over the TLS listener (`X-Forwarded-Proto`).
    pub https: bool,
    /// The request's headers as received (hop-by-hop ones are dropped when
    /// forwarding).
    pub headers: HeaderMap,
}

/// The upstream's answer, returned to Tencent as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl UpstreamAnswer {
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body));
        *resp.status_mut() = self.status;
        if let Some(ct) = self.content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        resp
    }
}

/// The proxy: shared by all connections.
pub struct Upstream {
    inner: Arc<Inner>,
    /// With `forward_read_receipts`: the queue to the delivery task.
    forward: Option<mpsc::Sender<Forward>>,
    /// With `forward_read_receipts`: one permit per byte of the read
    /// receipts queued or being delivered (`forward_queue_bytes`). Each
    /// holds its whole body outside the body-memory budget, so a count of
    /// items alone would let a stalled app pile up gigabytes.
    forward_bytes: Arc<Semaphore>,
    /// One permit per byte of the bodies of proxied callbacks waiting for
    /// the app (`max_proxied_body_bytes`): they leave the server's body
    /// budget to the read receipts.
    proxied_bytes: Arc<Semaphore>,
    max_proxied_body_bytes: usize,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The configured URL; the query string is appended to it.
    url: String,
    /// For log lines: scheme, host and port only.
    display: String,
    timeout: Duration,
    max_in_flight: usize,
    max_response_bytes: usize,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    state: AtomicU8,
    log: LogThrottle,
}

const STATE_UNKNOWN: u8 = 0;
const STATE_ANSWERING: u8 = 1;
const STATE_FAILING: u8 = 2;

/// A read receipt waiting to be delivered.
struct Forward {
    query: String,
    body: Bytes,
    origin: Origin,
    expires: Instant,
    /// Its bytes in `forward_bytes`, given back once it is delivered or
    /// dropped.
    _held: OwnedSemaphorePermit,
}

/// The only request headers a forwarded read receipt keeps: the app needs
/// the body's type, and the rest would only take queue memory.
const FORWARD_HEADERS: [HeaderName; 2] = [header::CONTENT_TYPE, header::USER_AGENT];

/// Why an exchange with the upstream failed.
/// The first pause before a forwarded read receipt is sent again.
const FORWARD_BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// The longest pause between two attempts at a forwarded read receipt.
const FORWARD_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Timeout,
    BadAnswer(String),
}

impl Failure {
    fn outcome(&self) -> UpstreamOutcome {
        match self {
            Failure::Unreachable(_) => UpstreamOutcome::Unreachable,
            Failure::Timeout => UpstreamOutcome::Timeout,
            Failure::BadAnswer(_) => UpstreamOutcome::BadAnswer,
        }
    }

    /// For the log: the root cause, which may name internal addresses.
    fn describe(&self, timeout: Duration) -> String {
        match self {
            Failure::Unreachable(why) => format!("upstream unreachable: {why}"),
            Failure::Timeout => format!("upstream did not answer within {timeout:?}"),
            Failure::BadAnswer(why) => format!("upstream answer unusable: {why}"),
        }
    }

    /// For Tencent's ErrorInfo: what happened, not the app's internals
    /// (addresses, resolver and TLS messages), which go to the log.
    fn info(&self, timeout: Duration) -> String {
        match self {
            Failure::Unreachable(_) => "upstream unreachable; retry later".to_owned(),
            Failure::Timeout => format!("upstream timed out (no answer within {timeout:?})"),
            // Our own words (the size limit it broke, or a broken stream).
            Failure::BadAnswer(_) => self.describe(timeout),
        }
    }
}

impl Upstream {
    /// Builds the client and, with `forward_read_receipts`, starts the
    /// delivery task. Must be called inside the runtime.
    pub fn new(
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        log_per_second: u32,
    ) -> anyhow::Result<Upstream> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        // The scheme is checked by the TLS layer on top.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(config.max_in_flight)
            .build(https);
        let uri: Uri = config.url.parse().context(
            "upstream.url is not a URL: write it like http://127.0.0.1:9000/im/callback",
        )?;
        let display = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map(|a| a.as_str()).unwrap_or("")
        );
        let inner = Arc::new(Inner {
            client,
            url: config.url.clone(),
            display,
            timeout: config.timeout,
            max_in_flight: config.max_in_flight,
            max_response_bytes: config.max_response_bytes,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            metrics,
            state: AtomicU8::new(STATE_UNKNOWN),
            log: LogThrottle::new(log_per_second),
        });
        let forward = config.forward_read_receipts.then(|| {
            let (tx, rx) = mpsc::channel(config.forward_queue);
            tokio::spawn(deliver_forwards(inner.clone(), rx));
            tx
        });
        let forward_bytes = Arc::new(Semaphore::new(config.forward_queue_bytes));
        Ok(Upstream {
            inner,
            forward,
            forward_bytes,
            proxied_bytes: Arc::new(Semaphore::new(config.max_proxied_body_bytes)),
            max_proxied_body_bytes: config.max_proxied_body_bytes,
        })
    }

    /// `log.rejections_per_second` changed by a reload.
    pub fn set_log_per_second(&self, per_second: u32) {
        self.inner.log.set_per_second(per_second);
    }

    /// Proxies one callback: its query string and body as received, the
    /// upstream's answer back. A failure is the FAIL answer to give Tencent.
    pub async fn proxy(
        &self,
        raw_query: &str,
        body: Bytes,
        origin: &Origin,
    ) -> Result<UpstreamAnswer, Rejection> {
        let Ok(_permit) = self.inner.in_flight.clone().try_acquire_owned() else {
            self.inner.metrics.upstream_request(UpstreamOutcome::Busy);
            return Err(Rejection::new(
                RejectKind::UpstreamBusy,
                format!(
                    "{} requests to the upstream are already in flight (upstream.max_in_flight); retry later",
                    self.inner.max_in_flight
                ),
            ));
        };
        self.inner.send(raw_query, body, origin).await.map_err(|f| {
            let kind = match f {
                Failure::Timeout => RejectKind::UpstreamTimeout,
                _ => RejectKind::UpstreamUnreachable,
            };
            Rejection::new(kind, f.info(self.inner.timeout))
        })
    }

    /// Room for a body of `len` bytes to be proxied, held until dropped;
    /// `None` when the bodies already waiting for the app fill
    /// `max_proxied_body_bytes`. Never waits: the app is the slow part.
    pub fn hold_proxied_body(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(len).ok()?;
        let held = self.proxied_bytes.clone().try_acquire_many_owned(n).ok();
        if held.is_none() {
            self.inner.metrics.upstream_request(UpstreamOutcome::Busy);
        }
        held
    }

    /// The answer when [`Upstream::hold_proxied_body`] found no room.
    pub fn proxied_bodies_full(&self) -> Rejection {
        Rejection::new(
            RejectKind::UpstreamBusy,
            format!(
                "{} bytes of callbacks are already waiting for the upstream (upstream.max_proxied_body_bytes); retry later",
                self.max_proxied_body_bytes
            ),
        )
    }

    /// Whether read receipts are also sent to the upstream.
    pub fn forwards_read_receipts(&self) -> bool {
        self.forward.is_some()
    }

    /// Queues a read receipt (already spooled and answered) for delivery to
    /// the upstream; never waits. A full queue (in items or in bytes) drops
    /// it, counted.
    pub fn forward_read_receipt(&self, raw_query: &str, body: Bytes, origin: Origin) {
        let Some(tx) = &self.forward else { return };
        let mut headers = HeaderMap::new();
        for name in FORWARD_HEADERS {
            if let Some(v) = origin.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let bytes = raw_query.len()
            + body.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>();
        let Ok(held) = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.forward_bytes.clone().try_acquire_many_owned(n).ok())
            .ok_or(())
        else {
            self.inner.dropped(UpstreamDrop::QueueFull);
            return;
        };
        let item = Forward {
            query: raw_query.to_owned(),
            body,
            origin: Origin { headers, ..origin },
            expires: Instant::now() + FORWARD_FOR,
            _held: held,
        };
        if tx.try_send(item).is_err() {
            self.inner.dropped(UpstreamDrop::QueueFull);
        }
    }

    /// Whether the upstream answered the last request sent to it: `None`
    /// before the first one.
    pub fn reachable(&self) -> Option<bool> {
        match self.inner.state.load(Ordering::Relaxed) {
            STATE_ANSWERING => Some(true),
            STATE_FAILING => Some(false),
            _ => None,
        }
    }
}

impl Inner {
    /// One exchange, bounded by `timeout` from connect to the last byte of
    /// the answer; counted and timed, failures logged (rate-limited).
    async fn send(
        &self,
        raw_query: &str,
        body: Bytes,
        origin: &Origin,
    ) -> Result<UpstreamAnswer, Failure> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(raw_query, body, origin))
            .await
            .unwrap_or(Err(Failure::Timeout));
        self.metrics
            .upstream_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.upstream_request(match &result {
            Ok(_) => UpstreamOutcome::Answered,
            Err(f) => f.outcome(),
        });
        let state = match &result {
            Ok(_) | Err(Failure::BadAnswer(_)) => STATE_ANSWERING,
            Err(_) => STATE_FAILING,
        };
        self.state.store(state, Ordering::Relaxed);
        if let Err(f) = &result {
            let left_out = &self.metrics.log_lines_suppressed;
            if let Some(suppressed) = self.log.admit_or_count(left_out) {
                tracing::warn!(
                    upstream = %self.display,
                    reason = %f.describe(self.timeout),
                    suppressed_before = suppressed,
                    "upstream request failed"
                );
            }
        }
        result
    }

    async fn exchange(
        &self,
        raw_query: &str,
        body: Bytes,
        origin: &Origin,
    ) -> Result<UpstreamAnswer, Failure> {
        let uri = if raw_query.is_empty() {
            self.url.clone()
        } else {
            format!("{}?{}", self.url, raw_query)
        };
        let mut req = Request::post(uri)
            .body(Full::new(body))
            .map_err(|e| Failure::Unreachable(format!("cannot build the request: {e}")))?;
        *req.headers_mut() = forwarded_headers(&origin.headers, origin.client, origin.https);
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| Failure::Unreachable(client_error(&e)))?;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let body = read_answer(resp.into_body(), declared, self.max_response_bytes).await?;
        Ok(UpstreamAnswer {
            status,
            content_type,
            body,
        })
    }

    fn dropped(&self, reason: UpstreamDrop) {
        self.metrics.upstream_forward_dropped.get(reason).inc();
        let left_out = &self.metrics.log_lines_suppressed;
        if let Some(suppressed) = self.log.admit_or_count(left_out) {
            tracing::warn!(
                upstream = %self.display,
                reason = reason.as_str(),
                suppressed_before = suppressed,
                "read receipt not forwarded to the upstream (it is in Kafka all the same)"
            );
        }
    }

    /// Delivers one read receipt, retrying failures and 5xx answers with
    /// backoff (from [`FORWARD_BACKOFF_FIRST`], doubling up to
    /// [`FORWARD_BACKOFF_MAX`]) until it expires.
    async fn deliver(&self, item: Forward) {
        let mut backoff = FORWARD_BACKOFF_FIRST;
        loop {
            // Also before the first send: one that waited in the queue past
            // its expiry carries a Sign the app would refuse as stale.
            if Instant::now() >= item.expires {
                self.dropped(UpstreamDrop::Expired);
                return;
            }
            match self
                .send(&item.query, item.body.clone(), &item.origin)
                .await
            {
                Ok(a) if !a.status.is_server_error() => return,
                _ => {}
            }
            if Instant::now() + backoff >= item.expires {
                self.dropped(UpstreamDrop::Expired);
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(FORWARD_BACKOFF_MAX);
        }
    }
}

/// Takes queued read receipts and delivers up to `FORWARD_CONCURRENCY` at
/// once; ends when the gateway drops its sender.
async fn deliver_forwards(inner: Arc<Inner>, mut rx: mpsc::Receiver<Forward>) {
    let slots = Arc::new(Semaphore::new(FORWARD_CONCURRENCY));
    while let Some(item) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            inner.deliver(item).await;
            drop(slot);
        });
    }
}

/// Headers that describe one connection, not the request (RFC 9110 7.6.1),
/// plus those the client sets itself for the new request, and
/// `Accept-Encoding`: only the app's Content-Type goes back to Tencent, so
/// the app must not compress its answer. And every header that claims who
/// sent the request or how ([`is_origin_claim`]).
fn is_not_forwarded(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
            | "accept-encoding"
    ) || is_origin_claim(name.as_str())
}

/// Who sent the request and how: set by the gateway (`X-Forwarded-For`,
/// `X-Forwarded-Proto`), never taken from the client, who could otherwise
/// claim any address, scheme, path prefix or certificate to an app that
/// trusts such headers. The gateway has no trusted-proxy setting for the
/// app, so a chain from in front of it is dropped too. Beyond the standard
/// names, the whole `X-Forwarded-` family (`-Ssl`, `-Scheme`, `-Prefix`,
/// `-Client-Cert`, ...), the client-address headers of common proxies and
/// CDNs, and any name with an underscore: CGI-style servers read
/// `X_Forwarded_For` as `X-Forwarded-For`. Tencent sends none of them.
fn is_origin_claim(name: &str) -> bool {
    name.starts_with("x-forwarded-")
        || name.contains('_')
        || matches!(
            name,
            "forwarded"
                | "x-real-ip"
                | "x-client-ip"
                | "x-cluster-client-ip"
                | "x-original-forwarded-for"
                | "true-client-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "x-appengine-user-ip"
                | "client-ip"
                | "x-original-url"
                | "x-rewrite-url"
                | "x-original-host"
                | "x-host"
        )
}

/// The request's headers minus hop-by-hop ones (also those named in
/// `Connection`) and the client's forwarding headers, with the client as
/// `X-Forwarded-For` and the callback listener's scheme as
/// `X-Forwarded-Proto`.
fn forwarded_headers(incoming: &HeaderMap, client: Option<IpAddr>, https: bool) -> HeaderMap {
    let named: Vec<HeaderName> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(incoming.len() + 1);
    for (name, value) in incoming {
        if !is_not_forwarded(name) && !named.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some(client) = client
        && let Some(v) = address_value(client.to_canonical())
    {
        out.insert("x-forwarded-for", v);
        // The scheme of the hop into the gateway; a proxy's own TLS in front
        // of a plain listener is not seen.
        let proto = if https { "https" } else { "http" };
        out.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    out
}

/// `ip` as a header value, written on the stack rather than into a String
/// first (an address is at most 45 characters).
fn address_value(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut out = std::io::Cursor::new(&mut buf[..]);
    write!(out, "{ip}").ok()?;
    let len = out.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// The app's answer, copied frame by frame into one buffer of at most
/// `max` bytes. Collected as hyper hands it over, each frame stayed a
/// buffer of its own that kept its share of the connection's read buffer
/// alive: an answer of 65,536 one-byte chunks, within a 64 KiB limit, held
/// 3.4 MB (a review measured 53 times the limit).
async fn read_answer(
    mut body: hyper::body::Incoming,
    declared: Option<usize>,
    max: usize,
) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::BadAnswer(format!(
            "body over {max} bytes (upstream.max_response_bytes)"
        ))
    };
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::BadAnswer(format!("body broke off: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// The client's error with its root cause ("cannot connect: Connection
/// refused"), never the URL.
fn client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if e.is_connect() {
        format!("cannot connect: {cause}")
    } else {
        format!("connection failed: {cause}")
    }
}

/// TLS for `https://` upstreams: rustls with ring, so this path needs no
/// OpenSSL; Mozilla's roots built in (the same in every image, whatever CA
/// bundle the base image has), or `ca_file`'s certificates for a private CA.
fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).with_context(|| {
                format!(
                    "cannot read upstream.ca_file {}: give a PEM file of CA certificates",
                    path.display()
                )
            })?;
            for cert in certs {
                let cert = cert.with_context(|| {
                    format!("upstream.ca_file {} is not valid PEM", path.display())
                })?;
                roots.add(cert).with_context(|| {
                    format!(
                        "upstream.ca_file {} holds a certificate rustls cannot use",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "upstream.ca_file {} holds no certificate: give a PEM file of CA certificates",
                    path.display()
                );
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // An explicit provider: the process-wide default would be ambiguous if
    // another dependency enabled a second one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no usable protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers beyond the standard forwarding ones that frameworks trust for
    /// the client's address, scheme, path or certificate.
    const ORIGIN_CLAIMS: [&str; 13] = [
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-forwarded-prefix",
        "x-forwarded-uri",
        "x-forwarded-server",
        "x-forwarded-client-cert",
        "x_forwarded_for",
        "x-original-forwarded-for",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        "x-original-url",
    ];

    #[test]
    fn hop_by_hop_and_client_forwarding_headers_are_dropped_and_the_peer_set() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("host", HeaderValue::from_static("gateway.example"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("user-agent", HeaderValue::from_static("tencent"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("accept-encoding", HeaderValue::from_static("gzip"));
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=1.2.3.4;proto=https"),
        );
        h.insert("x-real-ip", HeaderValue::from_static("1.2.3.4"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("admin.internal"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-port", HeaderValue::from_static("443"));
        for claim in ORIGIN_CLAIMS {
            h.insert(claim, HeaderValue::from_static("1"));
        }
        let out = forwarded_headers(&h, Some("10.0.0.7".parse().unwrap()), false);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        for gone in [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "transfer-encoding",
            "host",
            "accept-encoding",
            "forwarded",
            "x-real-ip",
            "x-forwarded-host",
            "x-forwarded-port",
        ]
        .into_iter()
        .chain(ORIGIN_CLAIMS)
        {
            assert!(!names.contains(&gone), "{gone} forwarded: {names:?}");
        }
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["user-agent"], "tencent");
        // The client's claim is replaced by the peer, not extended.
        assert_eq!(out["x-forwarded-for"], "10.0.0.7");
        assert_eq!(out["x-forwarded-proto"], "http");
        let out = forwarded_headers(&h, Some("10.0.0.7".parse().unwrap()), true);
        assert_eq!(out["x-forwarded-proto"], "https");
    }

    #[test]
    fn the_peer_alone_starts_x_forwarded_for() {
        let out = forwarded_headers(
            &HeaderMap::new(),
            Some("::ffff:10.1.2.3".parse().unwrap()),
            false,
        );
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
        assert!(forwarded_headers(&HeaderMap::new(), None, false).is_empty());
    }

    #[test]
    fn addresses_are_written_as_their_display() {
        for ip in [
            "192.0.2.7",
            "255.255.255.255",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:192.0.2.7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[tokio::test]
    async fn a_read_receipt_that_waited_past_its_expiry_is_never_sent() {
        let config: UpstreamConfig =
            toml::from_str("url = \"http://127.0.0.1:9/im\"\nforward_read_receipts = true")
                .unwrap();
        let metrics = Arc::new(Metrics::new());
        let up = Upstream::new(&config, metrics.clone(), 10).unwrap();
        let held = up.forward_bytes.clone().try_acquire_many_owned(1).unwrap();
        let stale = Forward {
            query: String::new(),
            body: Bytes::from_static(b"{}"),
            origin: Origin::default(),
            expires: Instant::now() - Duration::from_millis(1),
            _held: held,
        };
        up.inner.deliver(stale).await;
        let sent: u64 = UpstreamOutcome::ALL
            .iter()
            .filter(|o| **o != UpstreamOutcome::Busy)
            .map(|o| {
                metrics
                    .upstream_requests
                    .with_label_values(&[o.as_str()])
                    .get()
            })
            .sum();
        assert_eq!(sent, 0, "a stale Sign went to the app");
        let expired = metrics
            .upstream_forward_dropped
            .with_label_values(&[UpstreamDrop::Expired.as_str()]);
        assert_eq!(expired.get(), 1);
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = format!("{:#}", tls_config(Some(&path)).unwrap_err());
        assert!(err.contains("upstream.ca_file"), "{err}");
        assert!(tls_config(None).is_ok());
    }
}
