//! The HTTP front end: listener, connections, routes, limits, shutdown.
//!
//! HTTP/1.1 only (Tencent posts HTTP/1.1 with keep-alive). The port faces
//! whoever can reach it, so every way a client can hold resources is bounded:
//!
//! - time: a deadline on the request head (hyper's, which needs a timer; it
//!   also ends idle keep-alive), on the body (ours: hyper has none), and on
//!   answers the client does not take (`AnswerDeadline`: hyper has no write
//!   timeout, and a client that pipelines and never reads would otherwise
//!   hold its connection forever);
//! - connections: a budget per listener, optionally per client address. The
//!   accept loop never waits for a slot: a connection over the budget is
//!   answered 503 at once, so stuck clients cannot stop it from accepting;
//! - memory: hyper's buffers per connection and the request head are
//!   capped ([`MAX_CONNECTION_BUFFER_BYTES`], [`MAX_HEAD_BYTES`]); a body
//!   limit is checked on `Content-Length` before reading and enforced while
//!   reading, and a budget for all bodies held at once ([`BodyBudget`]),
//!   reserved as bytes arrive, so `max_connections` × `max_body_bytes`
//!   cannot exhaust memory.
//!
//! With `admin_listen`, `/metrics`, `/healthz` and `/readyz` get a listener
//! and budget of their own ([`Role`]), so probes keep answering while the
//! callback listener is under attack.
//!
//! Shutdown: stop accepting, let in-flight requests finish (keep-alive
//! connections are told to close after their current request), up to a
//! deadline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::ServerConfig;
use crate::intake::{Callback, Intake};
use crate::labels::{Listener, TimeoutStage};
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::request_line::FirstLineLimit;
use crate::source::Client;
use crate::spool::Spool;
use crate::tencent::answer::{OK_BODY, RejectKind, Rejection, fail_body};
use crate::tencent::payload;
use crate::tencent::query::CallbackQuery;
use crate::upstream::Origin;

/// Every `X-Forwarded-For` header of a request, in order. A header that is
/// not text matches no address: it ends the walk.
fn forwarded_for(headers: &HeaderMap) -> impl DoubleEndedIterator<Item = &str> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
}

/// Whether Kafka is reachable, as the publisher last saw it; reported by
/// `/readyz` (never a reason to be unready: the spool absorbs outages).
pub type KafkaStatus = watch::Receiver<bool>;

/// Connections the admin listener serves at once. Probes and scrapes are a
/// handful at a time; a small fixed budget of its own is what keeps them
/// answering while the callback listener is full.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The largest request head (request line and headers) taken; a larger one
/// is answered 431 and the connection closed. Tencent's heads are well under
/// 2 KiB (a short path, a query of a few fields, a handful of headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The most hyper buffers per connection, for reading and again for
/// writing (its default is about 408 KiB each, so a few hundred clients
/// sending one endless header line would hold over 100 MiB). Bodies are
/// read through it in pieces of at most this size.
pub const MAX_CONNECTION_BUFFER_BYTES: usize = 32 * 1024;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Callbacks and the operator routes on one address (no `admin_listen`).
    Everything,
    /// The callback path and the static `/healthz` (`admin_listen` is set);
    /// 404 for the rest.
    Callbacks,
    /// `/metrics`, `/healthz` and `/readyz` only.
    Admin,
}

impl Role {
    /// The `listener` label of the connection metrics.
    fn listener(self) -> Listener {
        match self {
            Role::Everything | Role::Callbacks => Listener::Callback,
            Role::Admin => Listener::Admin,
        }
    }
}

struct Routes {
    role: Role,
    callback_path: String,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    /// Whether callbacks come over TLS, for the upstream's `X-Forwarded-Proto`.
    https: bool,
    handles: Handles,
}

type Answer = Response<Full<Bytes>>;

/// The bytes of request bodies held in memory at once, over all
/// connections: one semaphore permit per byte. Bytes are reserved as they
/// arrive, never on a declared length alone: a client holds only budget it
/// has paid for in bandwidth, so idle uploads declaring large bodies cannot
/// starve real callbacks. A callback that finds no room waits for it a
/// little ([`BUDGET_WAIT`]), then is answered 503.
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    held: prometheus::IntGauge,
}

/// How long a body may wait in all for room in the [`BodyBudget`] before its
/// callback is answered 503: bodies in memory are read and handled within
/// milliseconds, so room usually comes quickly, and Tencent gives up after
/// two seconds anyway.
const BUDGET_WAIT: Duration = Duration::from_millis(500);

/// A body's buffer grows by at most this much past what has arrived (and at
/// most doubles), so a reservation is never much larger than the bytes the
/// client has sent, yet a 1 MiB body is copied only a few times over.
const BODY_GROWTH_STEP: usize = 64 * 1024;

impl BodyBudget {
    pub fn new(config: &ServerConfig, metrics: &Metrics) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            bytes: Arc::new(Semaphore::new(config.max_body_memory_bytes)),
            held: metrics.body_memory_bytes.clone(),
        })
    }
}

/// Bytes reserved in the [`BodyBudget`], given back when dropped. The gauge
/// moves by each change, so it is exact whatever threads interleave.
struct Reservation<'a> {
    budget: &'a BodyBudget,
    permit: Option<OwnedSemaphorePermit>,
    /// When room ran out first; the wait for room is bounded from then on.
    waiting_since: Option<Instant>,
}

impl<'a> Reservation<'a> {
    fn new(budget: &'a BodyBudget) -> Reservation<'a> {
        Reservation {
            budget,
            permit: None,
            waiting_since: None,
        }
    }

    fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Reserves `more` bytes, waiting for room for at most [`BUDGET_WAIT`]
    /// over the whole body.
    async fn grow(&mut self, more: usize) -> Result<(), BodyError> {
        if more == 0 {
            return Ok(());
        }
        let n = u32::try_from(more).map_err(|_| BodyError::OverBudget)?;
        let got = match self.budget.bytes.clone().try_acquire_many_owned(n) {
            Ok(got) => got,
            Err(_) => {
                let since = *self.waiting_since.get_or_insert_with(Instant::now);
                let left = BUDGET_WAIT.saturating_sub(since.elapsed());
                let wait = self.budget.bytes.clone().acquire_many_owned(n);
                match tokio::time::timeout(left, wait).await {
                    Ok(Ok(got)) => got,
                    _ => return Err(BodyError::OverBudget),
                }
            }
        };
        self.budget.held.add(more as i64);
        match &mut self.permit {
            Some(p) => p.merge(got),
            None => self.permit = Some(got),
        }
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.budget.held.sub(p.num_permits() as i64);
        }
    }
}

/// What a listener is handed by `Gateway::start`: the intake for callbacks,
/// and for the operator routes the metrics and what `/readyz` asks (the
/// spool: room left? the intake: draining?).
#[derive(Clone)]
pub struct Handles {
    pub intake: Arc<Intake>,
    pub metrics: Arc<Metrics>,
    pub spool: Spool,
    pub body_memory: Arc<BodyBudget>,
    pub kafka_up: KafkaStatus,
}

/// Serves until `shutdown` fires, then drains connections for at most
/// `drain_timeout`. With `tls` (`server.tls_cert_file`), connections are
/// taken over TLS only; the certificate itself is swapped by a reload (see
/// `crate::tls`).
pub async fn serve(
    listener: TcpListener,
    role: Role,
    config: &ServerConfig,
    handles: Handles,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Callbacks only: the admin listener stays plain HTTP for probes.
    let tls = match role {
        Role::Admin => None,
        Role::Everything | Role::Callbacks => tls,
    };
    let gate = Gate::new(role, config, &handles.metrics, tls.is_some());
    let connections = Connections {
        routes: Arc::new(Routes {
            role,
            callback_path: config.callback_path.clone(),
            max_body_bytes: config.max_body_bytes,
            body_read_timeout: config.body_read_timeout,
            https: tls.is_some(),
            handles,
        }),
        builder: http_builder(config),
        tls,
        write_timeout: config.write_timeout,
        handshake_within: config.header_read_timeout,
        listener: gate.listener,
    };
    let graceful = GracefulShutdown::new();
    loop {
        // Accept first and look for a slot after: with the slot taken first,
        // `max_connections` clients that never finish would stop the accept
        // loop, and every new client would hang in the kernel's queue with
        // no answer at all.
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Some((stream, held)) = gate.admit(stream, peer) {
            // Watched from here on: shutdown waits for a handshake under way too.
            connections.spawn(stream, peer, held, graceful.watcher());
        }
    }
    drop(listener);
    let _ = graceful.shutdown().await;
}

/// hyper's HTTP/1 settings: the head's deadline and size caps.
fn http_builder(config: &ServerConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_CONNECTION_BUFFER_BYTES)
        .keep_alive(true);
    builder
}

/// What every connection of one listener is served with.
struct Connections {
    routes: Arc<Routes>,
    builder: http1::Builder,
    tls: Option<tokio_rustls::TlsAcceptor>,
    write_timeout: Duration,
    /// The TLS handshake's deadline: the head's.
    handshake_within: Duration,
    listener: Listener,
}

impl Connections {
    /// Serves one admitted connection on a task of its own, which gives its
    /// slots back (`held`) when it ends.
    fn spawn(&self, stream: TcpStream, peer: SocketAddr, held: Held, watcher: Watcher) {
        let _ = stream.set_nodelay(true);
        let timed_out = Arc::new(AtomicBool::new(false));
        let long_url = Arc::new(AtomicBool::new(false));
        let write_timeout = self.write_timeout;
        let routes = self.routes.clone();
        // The peer goes to the route as an argument: in the request's
        // extensions it would cost an allocation per request.
        let service = service_fn(move |req: Request<Incoming>| {
            let routes = routes.clone();
            async move { Ok::<_, Infallible>(routes.route(req, peer).await) }
        });
        let (builder, tls) = (self.builder.clone(), self.tls.clone());
        let (intake, metrics) = (
            self.routes.handles.intake.clone(),
            self.routes.handles.metrics.clone(),
        );
        let (listener, handshake_within) = (self.listener, self.handshake_within);
        let label = listener.as_str();
        let serve = move |stream| async move {
            let io = AnswerDeadline::new(stream, write_timeout, timed_out.clone());
            // The TLS handshake holds the connection's slot and counts as
            // its head: plain HTTP or silence on a TLS port ends it quickly.
            let io = match crate::tls::accept(tls.as_ref(), io, handshake_within).await {
                Ok(io) => io,
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        metrics
                            .connections_timed_out
                            .get(listener, TimeoutStage::Head)
                            .inc();
                    }
                    intake.tls_handshake_failed(&e, peer);
                    drop(held);
                    return;
                }
            };
            // Inside TLS, so that it measures the request, not the records.
            let io = FirstLineLimit::new(io, MAX_HEAD_BYTES, long_url.clone());
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
            // Errors here are clients going away or timing out mid-request.
            if let Err(e) = conn.await {
                count_timeout(&metrics, listener, &e, timed_out.load(Ordering::Relaxed));
                tracing::debug!(error = %e, %peer, listener = label, "connection ended with an error");
            }
            if long_url.load(Ordering::Relaxed) {
                tracing::debug!(%peer, listener = label, limit = MAX_HEAD_BYTES, "answered 414: the request line passed the head limit");
            }
            drop(held);
        };
        // Callbacks on the connection threads (see `conn_threads`); the
        // admin listener's probes on the main runtime, so that a connection
        // thread held up by the disk cannot fail them.
        match listener {
            Listener::Admin => drop(tokio::spawn(serve(stream))),
            Listener::Callback => crate::conn_threads::spawn(stream, serve),
        }
    }
}

/// How long the accept loop pauses after a failed accept (EMFILE and the
/// like), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A connection that ended in a timeout, counted by the stage it was in:
/// the client did not take its answer, or did not send its request head.
fn count_timeout(metrics: &Metrics, listener: Listener, e: &hyper::Error, answer_timed_out: bool) {
    let stage = if answer_timed_out {
        TimeoutStage::Answer
    } else if e.is_timeout() {
        TimeoutStage::Head
    } else {
        return;
    };
    metrics.connections_timed_out.get(listener, stage).inc();
}

/// Who gets a connection slot: the listener's budget of connections, and
/// per client address when `server.max_connections_per_ip` is set.
struct Gate {
    listener: Listener,
    budget: usize,
    connections: Arc<Semaphore>,
    /// Refusals are answered off the accept loop; this bounds how many at
    /// once, so that a connection flood cannot turn them into a task flood.
    refusals: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    open: prometheus::IntGauge,
    metrics: Arc<Metrics>,
    /// A TLS client sends no plain head and could not read a plain 503:
    /// refused, it is closed at once, and retries or fails fast.
    tls: bool,
}

impl Gate {
    fn new(role: Role, config: &ServerConfig, metrics: &Arc<Metrics>, tls: bool) -> Gate {
        let budget = match role {
            Role::Admin => ADMIN_MAX_CONNECTIONS,
            Role::Everything | Role::Callbacks => config.max_connections,
        };
        let listener = role.listener();
        Gate {
            listener,
            budget,
            connections: Arc::new(Semaphore::new(budget)),
            refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            // The admin listener's few clients are the operator's own: no
            // per-address cap.
            per_ip: Arc::new(PerIp {
                max: match role {
                    Role::Admin => 0,
                    Role::Everything | Role::Callbacks => config.max_connections_per_ip,
                },
                open: Mutex::new(HashMap::new()),
            }),
            open: metrics.connections_open.get(listener).clone(),
            metrics: metrics.clone(),
            tls,
        }
    }

    /// The connection with its slots, or `None` when it was refused (a 503
    /// is sent to it off the accept loop, when there is room for that).
    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, Held)> {
        let admitted = match self.connections.clone().try_acquire_owned() {
            Err(_) => Err(format!(
                "the gateway is serving its maximum of {} connections; retry shortly",
                self.budget
            )),
            Ok(permit) => match self.per_ip.enter(peer.ip()) {
                Some(ip_slot) => Ok((permit, ip_slot)),
                None => Err(format!(
                    "this address (an IPv6 one: its /64) already has {} connections open (server.max_connections_per_ip); retry shortly",
                    self.per_ip.max
                )),
            },
        };
        match admitted {
            // Everything the connection holds is given back by drop, so a
            // panicking connection task cannot leak its slot or the gauge.
            Ok((permit, ip_slot)) => Some((
                stream,
                Held {
                    _open: OpenGauge::enter(self.open.clone()),
                    _ip_slot: ip_slot,
                    _permit: permit,
                },
            )),
            Err(why) => {
                self.metrics.connections_refused.get(self.listener).inc();
                if self.tls {
                    return None;
                }
                if let Ok(slot) = self.refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, why).await;
                        drop(slot);
                    });
                }
                None
            }
        }
    }
}

/// What one connection holds, released when its task ends (or unwinds).
struct Held {
    _open: OpenGauge,
    _ip_slot: IpSlot,
    _permit: OwnedSemaphorePermit,
}

/// One connection counted in `timbridge_connections_open` until dropped.
struct OpenGauge(prometheus::IntGauge);

impl OpenGauge {
    fn enter(gauge: prometheus::IntGauge) -> OpenGauge {
        gauge.inc();
        OpenGauge(gauge)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Connections open per client address, when `server.max_connections_per_ip`
/// caps them (0: no cap, nothing is tracked).
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// A slot for one more connection from `ip`, or `None` at the cap.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot(None));
        }
        let ip = client_of(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((self.clone(), ip))))
    }
}

/// The address a client is counted by: an IPv4 address (also when mapped
/// into IPv6), or an IPv6 address's /64, which one host or subscriber
/// usually holds whole (counting single IPv6 addresses, it could open its
/// cap's worth from each of 2^64 of them).
fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !(u128::MAX >> 64),
        )),
    }
}

/// One connection counted against its address; uncounted when dropped.
struct IpSlot(Option<(Arc<PerIp>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((per_ip, ip)) = self.0.take() {
            let mut open = per_ip.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    // Forget the address: the map holds only addresses with
                    // connections open, so it is bounded by max_connections.
                    open.remove(&ip);
                }
            }
        }
    }
}

/// Connections being refused at once (past that, they are closed unanswered).
pub const REFUSALS_AT_ONCE: usize = 256;

/// Answers a connection over the budget with 503 and closes it. The answer
/// waits for the request head (briefly), since HTTP clients take an answer
/// that comes before their request as a broken connection; and the rest
/// of the request is drained after it, since closing a socket with unread
/// data sends a reset, which can destroy the answer before it is read.
async fn refuse(mut stream: TcpStream, why: String) {
    let body = fail_body(&Rejection::new(RejectKind::Overloaded, why));
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        // Look for the head's end keeping only the last 3 bytes between
        // reads: hundreds of refusals at once must not each hold a head.
        let mut chunk = [0u8; 4096];
        let mut tail: Vec<u8> = Vec::with_capacity(chunk.len() + 3);
        let mut seen = 0;
        while seen < 64 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            seen += n;
            tail.extend_from_slice(&chunk[..n]);
            if tail.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            tail.drain(..tail.len().saturating_sub(3));
        }
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut chunk).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// A connection's socket with a deadline on answers: once a write finds the
/// socket's buffers full, the client has `limit` to take everything hyper
/// has buffered (hyper then flushes, which ends the wait); otherwise writes
/// fail with `TimedOut` and hyper closes the connection. hyper itself has no
/// write timeout, and a client that pipelines requests and never reads would
/// otherwise hold its connection, and its slot, forever.
struct AnswerDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl<S> AnswerDeadline<S> {
    fn new(inner: S, limit: Duration, timed_out: Arc<AtomicBool>) -> AnswerDeadline<S> {
        AnswerDeadline {
            inner,
            limit,
            stalled: None,
            timed_out,
        }
    }

    /// Called when a write would block: starts the clock on the first
    /// blocked write, and fails once it has run out. Polling the timer
    /// registers the task's waker, so hyper is woken to see the failure even
    /// if the socket never becomes writable again.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not take its answer in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnswerDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnswerDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only once its own buffer is written out:
        // the client has taken the answer (into its kernel buffers at least).
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.stalled = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.blocked(cx),
            err => err,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => self.blocked(cx),
            done => done,
        }
    }
}

impl Routes {
    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Answer {
        let path = req.uri().path();
        let callbacks = self.role != Role::Admin;
        let admin = self.role != Role::Callbacks;
        match (req.method(), path) {
            (&Method::POST, p) if callbacks && p == self.callback_path => {
                let _counted = InFlight::enter(&self.handles.metrics.callbacks_in_flight);
                self.callback(req, peer.ip()).await
            }
            (&Method::GET, "/metrics") if admin => {
                let body = self.handles.metrics.render();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                )
            }
            // On every listener: load balancers that health-check the
            // traffic port keep working when `admin_listen` is set. Static,
            // so it reveals nothing and costs nothing.
            (&Method::GET, "/healthz") => {
                text(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            (&Method::GET, "/readyz") if admin => self.readyz(),
            (_, p) if callbacks && p == self.callback_path => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"callbacks are POSTed\n"),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        }
    }

    async fn callback(&self, req: Request<Incoming>, peer: IpAddr) -> Answer {
        let started = Instant::now();
        // A request that began before shutdown is finished, even if its body
        // arrives after the signal.
        let refuse = self.handles.intake.is_refusing();
        let (mut head, body) = req.into_parts();
        let raw_query = head.uri.query().unwrap_or("");
        // Parsed once: whether the body goes to the upstream, the intake's
        // checks and the accounting of an early rejection all read it.
        let query = CallbackQuery::parse(raw_query);
        // One snapshot of the apps and source rules for every check of this
        // callback (a reload meanwhile is seen by the next one), and the
        // client resolved from it once, for the source check and the
        // upstream alike.
        let live = self.handles.intake.live();
        let client = self.client(&live, peer, &head.headers);
        // Who may post at all comes before which app it claims to be, and
        // that before a byte of the body is read: otherwise anyone without
        // the token could fill the body budget with uploads that stall (four
        // of 1 MiB starve every genuine callback at the defaults).
        if let Err(r) = check_source(&live, client.as_ref()) {
            return self.reject_unread(&query, r, started, true);
        }
        let app = match self.handles.intake.authenticate(&live, &query) {
            Ok(app) => app,
            Err(r) => return self.reject_unread(&query, r, started, true),
        };
        // Refuse on the declared length before reading a byte of it.
        let declared = declared_length(&head.headers);
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return self.reject_unread(&query, self.too_large(), started, true);
        }
        // Room in the body-memory budget is reserved as the body arrives
        // (not on the declared length: idle clients would hold it for free)
        // and held until the intake is done with the body.
        let mut reserved = Reservation::new(&self.handles.body_memory);
        let body = match self.read(body, declared, &mut reserved).await {
            Ok(body) => body,
            Err(r) => return self.reject_unread(&query, r, started, true),
        };
        // A body on its way to the app may wait up to `upstream.timeout` for
        // it: it moves to the proxy's own byte budget, so a slow app cannot
        // hold the body memory read receipts need. Past that budget, 503.
        let proxied = match self.hold_for_upstream(&query, body.len()) {
            Ok(Some(held)) => {
                reserved = Reservation::new(&self.handles.body_memory);
                Some(held)
            }
            Ok(None) => None,
            Err(r) => return self.reject_unread(&query, r, started, false),
        };
        let origin = match self.handles.intake.upstream() {
            Some(_) => self.origin(peer, client.as_ref(), &mut head.headers),
            None => Origin::default(),
        };
        let answer = match self
            .handles
            .intake
            .handle_from(
                &live,
                Callback {
                    raw_query,
                    query: &query,
                    body,
                    started,
                    refuse,
                    origin,
                    app: Some(app),
                },
            )
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
        };
        drop(reserved);
        drop(proxied);
        answer
    }

    /// The client as the source rules resolve it (the peer, or behind
    /// trusted proxies the address they forwarded), when something needs
    /// it: the source check (`server.allow_from`) or the upstream's
    /// `X-Forwarded-For`. `None` otherwise, and `X-Forwarded-For` is not
    /// walked at all.
    fn client(&self, live: &Live, peer: IpAddr, headers: &HeaderMap) -> Option<Client> {
        let needed = !live.sources.allows_any() || self.handles.intake.upstream().is_some();
        needed.then(|| live.sources.client(peer, forwarded_for(headers)))
    }

    /// What the upstream is told of the request's origin: the client (the
    /// peer when the forwarded entry is no address), and whether it came
    /// over TLS. Takes the headers.
    fn origin(&self, peer: IpAddr, client: Option<&Client>, headers: &mut HeaderMap) -> Origin {
        let client = match client {
            Some(Client::Ip(ip)) => *ip,
            Some(Client::Unparsable(_)) | None => peer,
        };
        Origin {
            client: Some(client),
            https: self.https,
            headers: std::mem::take(headers),
        }
    }

    fn too_large(&self) -> Rejection {
        Rejection::new(
            RejectKind::TooLarge,
            format!("body is over {} bytes", self.max_body_bytes),
        )
    }

    /// Reads the body within `body_read_timeout`, reserving its bytes as
    /// they arrive.
    async fn read(
        &self,
        body: Incoming,
        declared: Option<u64>,
        reserved: &mut Reservation<'_>,
    ) -> Result<Bytes, Rejection> {
        let read = read_body(
            body,
            declared.map_or(self.max_body_bytes, |n| n as usize),
            self.max_body_bytes,
            reserved,
        );
        match tokio::time::timeout(self.body_read_timeout, read).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(BodyError::TooLarge)) => Err(self.too_large()),
            // 503: the bodies being read already fill the budget.
            Ok(Err(BodyError::OverBudget)) => {
                self.handles.metrics.body_memory_exhausted.inc();
                Err(Rejection::new(
                    RejectKind::Overloaded,
                    "too many request bodies in memory at once; retry shortly",
                ))
            }
            Ok(Err(BodyError::Read)) => Err(Rejection::new(
                RejectKind::Invalid,
                "body could not be read",
            )),
            Err(_) => Err(Rejection::new(
                RejectKind::Timeout,
                format!("body not received within {:?}", self.body_read_timeout),
            )),
        }
    }

    /// Room in the upstream's own budget for a body that goes to the app
    /// (`None`: it does not, read receipts stay in the body-memory budget).
    fn hold_for_upstream(
        &self,
        query: &CallbackQuery<'_>,
        len: usize,
    ) -> Result<Option<OwnedSemaphorePermit>, Rejection> {
        let Some(upstream) = self.handles.intake.upstream() else {
            return Ok(None);
        };
        let command = query.callback_command.as_deref();
        if command.is_some_and(payload::is_read_receipt) {
            return Ok(None);
        }
        match upstream.hold_proxied_body(len) {
            Some(held) => Ok(Some(held)),
            None => Err(upstream.proxied_bodies_full()),
        }
    }

    /// A callback answered before the intake saw its body: counted and
    /// logged as the intake would, `close` asks the client to go away.
    fn reject_unread(
        &self,
        query: &CallbackQuery<'_>,
        r: Rejection,
        started: Instant,
        close: bool,
    ) -> Answer {
        self.handles.intake.reject_unread(query, &r, started);
        rejected(&r, close)
    }

    fn readyz(&self) -> Answer {
        let spool_full = self.handles.spool.is_full();
        let draining = self.handles.intake.is_draining();
        let kafka_up = *self.handles.kafka_up.borrow();
        let ready = !spool_full && !draining;
        let reason = if draining {
            "shutting down"
        } else if spool_full && self.handles.spool.writer_stopped() {
            "spool writer stopped; restart timbridge"
        } else if spool_full && self.handles.spool.is_behind() {
            "spool disk is not keeping up"
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
            "upstream_configured": self.handles.intake.upstream().is_some(),
            "upstream_reachable": self.handles.intake.upstream().and_then(|u| u.reachable()),
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

/// The body length a request declares, when it declares a readable one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// 403 when the client (`None`: not resolved, since `server.allow_from`
/// is unset) is outside `server.allow_from`.
fn check_source(live: &Live, client: Option<&Client>) -> Result<(), Rejection> {
    match client {
        Some(client) if !live.sources.allows(client) => Err(Rejection::new(
            RejectKind::ForbiddenSource,
            "the source address is not in server.allow_from",
        )
        .with_client(client)),
        _ => Ok(()),
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

/// An answer of `body`; the fixed ones are `Bytes::from_static`, sent
/// without an allocation or a copy.
fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut resp = Response::new(Full::new(body.into()));
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

enum BodyError {
    TooLarge,
    OverBudget,
    Read,
}

/// Reads a body of at most `max` bytes (`declared` when the client gave a
/// Content-Length) into one buffer, keeping `reserved` at least the
/// buffer's capacity: the buffer grows only as bytes arrive, by at most
/// [`BODY_GROWTH_STEP`] past them, and each growth is reserved first.
async fn read_body(
    mut body: Incoming,
    declared: usize,
    max: usize,
    reserved: &mut Reservation<'_>,
) -> Result<Bytes, BodyError> {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let len = buf.len() + data.len();
        if len > max {
            return Err(BodyError::TooLarge);
        }
        if len > buf.capacity() {
            let capacity = next_capacity(buf.capacity(), len, declared.min(max));
            reserved
                .grow(capacity.saturating_sub(reserved.bytes()))
                .await?;
            buf.reserve_exact(capacity - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// The capacity a body buffer of `capacity` grows to when `len` bytes must
/// fit: room for what has arrived plus a step (doubling, at most
/// [`BODY_GROWTH_STEP`]), never past `cap` (the declared length or the
/// limit). A body that arrives in one piece, as Tencent's few-KB callbacks
/// do, is allocated exactly once at its own size.
fn next_capacity(capacity: usize, len: usize, cap: usize) -> usize {
    let step = capacity.min(BODY_GROWTH_STEP);
    len.max(capacity + step).min(cap).max(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: usize) -> BodyBudget {
        BodyBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
            held: prometheus::IntGauge::new("held", "test").unwrap(),
        }
    }

    #[tokio::test]
    async fn a_body_waits_briefly_for_room_then_gives_up() {
        let budget = budget(1000);
        let mut first = Reservation::new(&budget);
        first.grow(900).await.ok().unwrap();
        assert_eq!(budget.held.get(), 900);

        // Room that comes back within the wait is taken.
        let mut second = Reservation::new(&budget);
        let release = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(first);
        };
        let (grown, ()) = tokio::join!(second.grow(500), release);
        assert!(grown.is_ok());
        assert_eq!(budget.held.get(), 500);

        // Room that does not come back within 500 ms in all: 503.
        let started = Instant::now();
        let mut third = Reservation::new(&budget);
        assert!(matches!(third.grow(600).await, Err(BodyError::OverBudget)));
        let waited = started.elapsed();
        assert!(waited >= BUDGET_WAIT, "{waited:?}");
        assert!(waited < BUDGET_WAIT * 2, "{waited:?}");
        // The wait is per body, not per growth: the next attempt fails at once.
        assert!(matches!(third.grow(600).await, Err(BodyError::OverBudget)));
        assert!(started.elapsed() - waited < Duration::from_millis(100));
        drop(second);
        drop(third);
        assert_eq!(budget.held.get(), 0);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_of(ip("2001:db8:1:2:aaaa::1")),
            client_of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_eq!(client_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_ne!(
            client_of(ip("2001:db8:1:2::1")),
            client_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_of(ip("192.0.2.7")), ip("192.0.2.7"));

        let per_ip = Arc::new(PerIp {
            max: 1,
            open: Mutex::new(HashMap::new()),
        });
        let first = per_ip.enter(ip("2001:db8::1")).expect("a slot");
        assert!(per_ip.enter(ip("2001:db8::2")).is_none(), "same /64");
        drop(first);
        assert!(per_ip.enter(ip("2001:db8::2")).is_some());
        assert!(per_ip.open.lock().unwrap().is_empty());
    }

    #[test]
    fn body_buffers_grow_with_what_has_arrived() {
        // A body in one piece: exactly its size.
        assert_eq!(next_capacity(0, 3000, 1 << 20), 3000);
        // Doubling while small, then steps of 64 KiB.
        assert_eq!(next_capacity(3000, 3001, 1 << 20), 6000);
        assert_eq!(next_capacity(200_000, 200_001, 1 << 20), 200_000 + 65_536);
        // Never past the declared length or the limit.
        assert_eq!(next_capacity(1000, 1100, 1200), 1200);
        assert_eq!(
            next_capacity(1 << 19, (1 << 19) + 1, 1 << 20),
            (1 << 19) + 65_536
        );
    }
}
