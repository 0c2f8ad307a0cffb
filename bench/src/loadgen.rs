//! The load generator of the harness in `bench/` (see `bench/README.md`).
//!
//! Why not an off-the-shelf tool: Debian's `wrk` is closed-loop only (its
//! latencies suffer from coordinated omission), `wrk2` is not packaged, and
//! `oha -q` sends the same body on every request, which timbridge's dedup
//! window would drop after the first: the gateway would skip the spool and
//! Kafka and look faster than it is. This one sends a distinct callback
//! every time (its own GroupId, MsgSeqs, accounts and MsgKeys), signed or
//! not, and counts the Kafka records the accepted ones must produce.
//!
//! ```text
//! loadgen closed --url URL [--connections 32] [--duration 10s] [--requests N] ...
//! loadgen open   --url URL --rate 2000 [--duration 10s] ...
//! loadgen jitter [--duration 2s] [--period 500us]
//! loadgen watermarks --brokers HOST:PORT TOPIC...
//! ```
//!
//! - `closed`: every connection sends its next request as soon as the
//!   previous answer is in: the maximum throughput. Its latencies are
//!   reported but are closed-loop latencies (coordinated omission applies).
//! - `open`: requests are due at a fixed rate, `i / rate` seconds after the
//!   start, whatever the server does; a pacing thread releases each one at
//!   its due time into a queue that idle connections take from, and its
//!   latency is measured from that *intended* time to the end of the
//!   answer. A server that stalls therefore pays for every request that
//!   waited, not only for the one it was serving (no coordinated omission).
//! - `jitter`: how late a sleeping thread wakes on this machine, with no
//!   load of ours: the noise floor under every latency figure.
//! - `watermarks`: the sum of the high watermarks of each topic's
//!   partitions, as JSON; the harness compares them before and after a run
//!   with the records the accepted callbacks must have produced.
//!
//! A load run prints one JSON object on stdout: throughput over the measured
//! window (after `--warmup`), HDR latency percentiles, answers by status,
//! the records expected in Kafka from every 200 (warm-up included), and for
//! every `--watch NAME=PID` the process's CPU seconds (utime + stime from
//! `/proc/PID/stat`) over the measured window and its peak RSS (VmHWM).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

const OK_BODY: &[u8] = br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;
/// Latencies are recorded in microseconds, up to this.
const MAX_LATENCY_US: u64 = 120_000_000;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "timbridge's load generator (see bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed loop: every connection sends again as soon as it has an answer.
    Closed {
        #[command(flatten)]
        load: LoadArgs,
        /// Stop after this many requests (warm-up included), if sooner.
        #[arg(long)]
        requests: Option<u64>,
    },
    /// Open loop: a fixed arrival rate, latency from each intended send time.
    Open {
        #[command(flatten)]
        load: LoadArgs,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// After the last request is due, how long to wait for answers
        /// before counting the missing ones as failed.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
    /// The machine's own scheduling noise: how late a thread wakes from
    /// sleeps of `--period`, with nothing else of ours running.
    Jitter {
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "500us", value_parser = humantime::parse_duration)]
        period: Duration,
    },
    /// Sum of the high watermarks of each topic's partitions, as JSON.
    Watermarks {
        #[arg(long)]
        brokers: String,
        #[arg(required = true)]
        topics: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// The callback URL, e.g. http://127.0.0.1:8080/callback (plain HTTP).
    #[arg(long)]
    url: String,
    /// Persistent HTTP/1.1 connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// The measured window, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before the measured window (sent and checked, not measured).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Which callbacks to send; `mixed` rotates the three read receipts.
    #[arg(long, value_enum, default_value_t = Mix::Mixed)]
    mix: Mix,
    /// Items per group receipt (GroupMsgReceiptList) and per one-to-one
    /// receipt (C2CMsgInfo); each becomes one Kafka record.
    #[arg(long, default_value_t = 2)]
    items: u32,
    /// `mixed` alternates signed and unsigned requests.
    #[arg(long, value_enum, default_value_t = Auth::Mixed)]
    auth: Auth,
    /// The SdkAppid configured with `--token`.
    #[arg(long, default_value_t = 1_400_000_001)]
    signed_app: u64,
    #[arg(long, default_value = "bench-token")]
    token: String,
    /// The SdkAppid configured without a token.
    #[arg(long, default_value_t = 1_400_000_002)]
    unsigned_app: u64,
    /// Goes into every GroupId and account, so that no two runs send the
    /// same event; defaults to the clock.
    #[arg(long)]
    run_id: Option<String>,
    /// Measure a process over the window: NAME=PID (repeatable).
    #[arg(long = "watch", value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
    /// Runtime threads of the load generator itself (1: current-thread).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mix {
    Mixed,
    Group,
    C2c,
    Report,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Auth {
    Mixed,
    Signed,
    Unsigned,
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("want NAME=PID")?;
    let pid = pid.parse().map_err(|_| format!("not a pid: {pid:?}"))?;
    Ok((name.to_owned(), pid))
}

// ---------------------------------------------------------------------------
// Callbacks: a distinct one per request index
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Group,
    C2c,
    Report,
}

/// Builds request `i`. Everything that goes into an event_id (conversation,
/// message reference, readers, event time) depends on `i` and the run id,
/// so no two requests of any run make the same event.
#[derive(Clone)]
struct Generator {
    path: String,
    host: HeaderValue,
    run: String,
    mix: Mix,
    items: u32,
    auth: Auth,
    signed_app: u64,
    token: String,
    unsigned_app: u64,
    /// The Sign of the current second, computed once per second.
    sign_cache: (u64, String),
    body: String,
    query: String,
}

impl Generator {
    fn new(args: &LoadArgs, target: &Target) -> anyhow::Result<Generator> {
        let run = match &args.run_id {
            Some(r) if r.chars().all(|c| c.is_ascii_alphanumeric()) => r.clone(),
            Some(r) => bail!("--run-id must be ASCII letters and digits, got {r:?}"),
            None => format!("{:x}", unix_ms()),
        };
        Ok(Generator {
            path: target.path.clone(),
            host: HeaderValue::from_str(&target.addr.to_string())?,
            run,
            mix: args.mix,
            items: args.items.max(1),
            auth: args.auth,
            signed_app: args.signed_app,
            token: args.token.clone(),
            unsigned_app: args.unsigned_app,
            sign_cache: (0, String::new()),
            body: String::with_capacity(1024),
            query: String::with_capacity(256),
        })
    }

    fn kind(&self, i: u64) -> Kind {
        match self.mix {
            Mix::Group => Kind::Group,
            Mix::C2c => Kind::C2c,
            Mix::Report => Kind::Report,
            Mix::Mixed => match i % 3 {
                0 => Kind::Group,
                1 => Kind::C2c,
                _ => Kind::Report,
            },
        }
    }

    /// The request and the records (group topic, c2c topic) it must produce.
    fn request(&mut self, i: u64) -> (Request<Full<Bytes>>, Records) {
        let now_ms = unix_ms();
        let secs = now_ms / 1000;
        let run = &self.run;
        let n = self.items as u64;
        let kind = self.kind(i);
        self.body.clear();
        let b = &mut self.body;
        let (command, records) = match kind {
            Kind::Group => {
                let _ = write!(
                    b,
                    r#"{{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"@TGS#{run}x{i}","Type":"Public","GroupMsgReceiptList":["#
                );
                for k in 0..n {
                    if k > 0 {
                        b.push(',');
                    }
                    let _ = write!(
                        b,
                        r#"{{"MsgSeq":{},"ReadNum":{},"UnreadNum":{},"ReadReceiptMembers":[{{"Member_Account":"user{}"}}]}}"#,
                        i * n + k + 1,
                        k + 1,
                        40 - k % 40,
                        (i + k) % 1000
                    );
                }
                let _ = write!(b, r#"],"EventTime":"{now_ms}"}}"#);
                (
                    "Group.CallbackAfterReadReceipt",
                    Records { group: n, c2c: 0 },
                )
            }
            Kind::C2c => {
                let _ = write!(
                    b,
                    r#"{{"CallbackCommand":"C2C.CallbackAfterMsgReadReceipt","Operator_Account":"op{run}x{i}","Peer_Account":"peer{p}","C2CMsgInfo":["#,
                    p = i % 1000
                );
                for k in 0..n {
                    if k > 0 {
                        b.push(',');
                    }
                    let _ = write!(
                        b,
                        r#"{{"From_Account":"peer{p}","To_Account":"op{run}x{i}","MsgKey":"{seq}_{i}_{secs}","MsgId":"144115233406643804-{secs}-{i}-{k}"}}"#,
                        p = i % 1000,
                        seq = i * n + k + 1
                    );
                }
                let _ = write!(b, r#"],"EventTime":{now_ms}}}"#);
                (
                    "C2C.CallbackAfterMsgReadReceipt",
                    Records { group: 0, c2c: n },
                )
            }
            Kind::Report => {
                let _ = write!(
                    b,
                    r#"{{"CallbackCommand":"C2C.CallbackAfterMsgReport","Report_Account":"rep{run}x{i}","Peer_Account":"peer{p}","LastReadTime":{secs},"UnreadMsgNum":0,"EventTime":{now_ms}}}"#,
                    p = i % 1000
                );
                ("C2C.CallbackAfterMsgReport", Records { group: 0, c2c: 1 })
            }
        };
        let signed = match self.auth {
            Auth::Signed => true,
            Auth::Unsigned => false,
            Auth::Mixed => (i / 3).is_multiple_of(2),
        };
        self.query.clear();
        let q = &mut self.query;
        let app = if signed {
            self.signed_app
        } else {
            self.unsigned_app
        };
        let _ = write!(
            q,
            "{}?SdkAppid={app}&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=iOS",
            self.path
        );
        if signed {
            if self.sign_cache.0 != secs {
                let mut h = Sha256::new();
                h.update(self.token.as_bytes());
                h.update(secs.to_string().as_bytes());
                self.sign_cache = (secs, hex::encode(h.finalize()));
            }
            let _ = write!(q, "&RequestTime={secs}&Sign={}", self.sign_cache.1);
        }
        let mut req = Request::new(Full::new(Bytes::copy_from_slice(self.body.as_bytes())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.query.parse().expect("a valid request target");
        req.headers_mut().insert(HOST, self.host.clone());
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        (req, records)
    }
}

/// Kafka records a callback makes, by topic.
#[derive(Clone, Copy, Default)]
struct Records {
    group: u64,
    c2c: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Connections and per-connection results
// ---------------------------------------------------------------------------

struct Target {
    addr: SocketAddr,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("--url wants an IP:port, got {authority:?}"))?;
    if !addr.ip().is_loopback() {
        bail!("the harness only loads loopback addresses, not {addr}");
    }
    Ok(Target {
        addr,
        path: path.to_owned(),
    })
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one connection saw.
struct Tally {
    latency_us: Histogram<u64>,
    /// Open loop: from the moment the request was handed to its connection
    /// (the due time plus any wait for a free connection or a late pacer)
    /// to the end of the answer; to tell server time from client queueing.
    service_us: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    bad_answers: u64,
    /// Records the 200-answered requests must produce, warm-up included.
    expected: Records,
    accepted: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
            service_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
            statuses: BTreeMap::new(),
            transport_errors: 0,
            bad_answers: 0,
            expected: Records::default(),
            accepted: 0,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latency_us.add(&other.latency_us).expect("same bounds");
        self.service_us.add(&other.service_us).expect("same bounds");
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.bad_answers += other.bad_answers;
        self.expected.group += other.expected.group;
        self.expected.c2c += other.expected.c2c;
        self.accepted += other.accepted;
    }
}

/// Counters the main task reads while the connections run.
#[derive(Default)]
struct Progress {
    completed: AtomicU64,
    events: AtomicU64,
    measuring: AtomicBool,
}

/// A connection that reconnects after a transport error.
struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// Sends one request and reads its answer; true when it was accepted.
    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
        records: Records,
        tally: &mut Tally,
    ) -> bool {
        match self.exchange(req).await {
            Ok((status, body)) => {
                *tally.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    if body.as_ref() != OK_BODY {
                        tally.bad_answers += 1;
                        return false;
                    }
                    tally.accepted += 1;
                    tally.expected.group += records.group;
                    tally.expected.c2c += records.c2c;
                    return true;
                }
                false
            }
            Err(_) => {
                tally.transport_errors += 1;
                self.sender = None;
                false
            }
        }
    }

    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        if self.sender.is_none() {
            self.sender = Some(connect(self.addr).await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

// ---------------------------------------------------------------------------
// Watched processes
// ---------------------------------------------------------------------------

/// utime + stime of a process, all threads, in seconds (USER_HZ = 100).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn vm_hwm_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The watched processes plus the load generator itself.
fn watched(args: &LoadArgs) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = args
        .watch
        .iter()
        .map(|(n, p)| (n.clone(), p.to_string()))
        .collect();
    all.push(("loadgen".into(), "self".into()));
    all
}

/// Busy and stolen CPU seconds of the whole machine, from `/proc/stat`.
fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user)
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    let steal = *v.get(7)?;
    Some((busy as f64 / 100.0, steal as f64 / 100.0))
}

/// CPU seconds of each watched process, then the machine's busy and stolen.
fn cpu_snapshot(procs: &[(String, String)]) -> Vec<Option<f64>> {
    let mut v: Vec<Option<f64>> = procs.iter().map(|(_, pid)| cpu_seconds(pid)).collect();
    let m = machine_cpu();
    v.push(m.map(|m| m.0));
    v.push(m.map(|m| m.1));
    v
}

fn process_report(
    procs: &[(String, String)],
    before: &[Option<f64>],
    after: &[Option<f64>],
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (k, (name, pid)) in procs.iter().enumerate() {
        let cpu = match (before[k], after[k]) {
            (Some(a), Some(b)) => json!(b - a),
            _ => serde_json::Value::Null,
        };
        out.insert(
            name.clone(),
            json!({ "cpu_s": cpu, "vm_hwm_kib": vm_hwm_kib(pid) }),
        );
    }
    // What the rest of the machine did meanwhile: other processes (a
    // shared machine is noisy) and time stolen by the hypervisor.
    let n = procs.len();
    let delta = |k: usize| match (before[k], after[k]) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let ours: Option<f64> = (0..n).map(delta).sum();
    let busy = delta(n);
    out.insert(
        "machine".into(),
        json!({
            "busy_s": busy,
            "others_s": busy.zip(ours).map(|(b, o)| (b - o).max(0.0)),
            "steal_s": delta(n + 1),
        }),
    );
    serde_json::Value::Object(out)
}

// ---------------------------------------------------------------------------
// The two loops
// ---------------------------------------------------------------------------

async fn closed_loop(
    args: LoadArgs,
    max_requests: Option<u64>,
) -> anyhow::Result<serde_json::Value> {
    let target = parse_url(&args.url)?;
    let generator = Generator::new(&args, &target)?;
    let procs = watched(&args);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let running = Arc::new(AtomicUsize::new(args.connections));
    let limit = max_requests.unwrap_or(u64::MAX);

    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut client = Client {
            addr: target.addr,
            sender: Some(connect(target.addr).await.context("cannot connect")?),
        };
        let mut generator = generator.clone();
        let (next, stop, progress, running) = (
            next.clone(),
            stop.clone(),
            progress.clone(),
            running.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let (req, records) = generator.request(i);
                let started = Instant::now();
                let ok = client.send(req, records, &mut tally).await;
                if progress.measuring.load(Ordering::Relaxed) {
                    tally
                        .latency_us
                        .saturating_record(started.elapsed().as_micros() as u64);
                }
                if ok {
                    progress.completed.fetch_add(1, Ordering::Relaxed);
                    progress
                        .events
                        .fetch_add(records.group + records.c2c, Ordering::Relaxed);
                }
            }
            running.fetch_sub(1, Ordering::Relaxed);
            tally
        }));
    }

    let all_done = || running.load(Ordering::Relaxed) == 0;
    let start = Instant::now();
    while start.elapsed() < args.warmup && !all_done() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu0 = cpu_snapshot(&procs);
    let t0 = Instant::now();
    let (done0, events0) = (
        progress.completed.load(Ordering::Relaxed),
        progress.events.load(Ordering::Relaxed),
    );
    progress.measuring.store(true, Ordering::Relaxed);
    while t0.elapsed() < args.duration && !all_done() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (done1, events1) = (
        progress.completed.load(Ordering::Relaxed),
        progress.events.load(Ordering::Relaxed),
    );
    let cpu1 = cpu_snapshot(&procs);
    progress.measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);

    let mut tally = Tally::new();
    for t in tasks {
        tally.merge(t.await?);
    }
    let measured = done1 - done0;
    Ok(report(
        "closed",
        &args,
        json!({
            "seconds": elapsed,
            "requests": measured,
            "requests_per_s": measured as f64 / elapsed,
            "events_per_s": (events1 - events0) as f64 / elapsed,
        }),
        &tally,
        0,
        process_report(&procs, &cpu0, &cpu1),
    ))
}

struct Job {
    i: u64,
    due: Instant,
    measured: bool,
}

async fn open_loop(
    args: LoadArgs,
    rate: f64,
    grace: Duration,
) -> anyhow::Result<serde_json::Value> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let target = parse_url(&args.url)?;
    let generator = Generator::new(&args, &target)?;
    let procs = watched(&args);
    let period = Duration::from_secs_f64(1.0 / rate);
    let warm_jobs = (args.warmup.as_secs_f64() * rate).round() as u64;
    let total = warm_jobs + (args.duration.as_secs_f64() * rate).round() as u64;
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let completed = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut client = Client {
            addr: target.addr,
            sender: Some(connect(target.addr).await.context("cannot connect")?),
        };
        let mut generator = generator.clone();
        let (rx, completed) = (rx.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut events = 0u64;
            loop {
                // The lock is held only while this connection waits for the
                // next due request; the others queue for the lock.
                let job = rx.lock().await.recv().await;
                let Some(job) = job else { break };
                let (req, records) = generator.request(job.i);
                let sent = Instant::now();
                let ok = client.send(req, records, &mut tally).await;
                if job.measured {
                    tally
                        .service_us
                        .saturating_record(sent.elapsed().as_micros() as u64);
                    // From the time the request was due, not when it was sent.
                    tally
                        .latency_us
                        .saturating_record(job.due.elapsed().as_micros() as u64);
                    if ok {
                        events += records.group + records.c2c;
                    }
                }
                completed.fetch_add(1, Ordering::Relaxed);
            }
            (tally, events)
        }));
    }

    // Pacing on an OS thread: tokio's timer has a 1 ms granularity, too
    // coarse for 500 µs between requests. Any lateness of this thread is
    // counted against the server (latency starts at the due time).
    let start = Instant::now() + Duration::from_millis(20);
    let pacer = std::thread::spawn(move || {
        let mut max_lag = Duration::ZERO;
        for i in 0..total {
            let due = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                max_lag = max_lag.max(now - due);
            }
            let job = Job {
                i,
                due,
                measured: i >= warm_jobs,
            };
            if tx.send(job).is_err() {
                break;
            }
        }
        max_lag
    });

    let t0 = start + period.mul_f64(warm_jobs as f64);
    let t_end = start + period.mul_f64(total as f64);
    tokio::time::sleep_until(t0.into()).await;
    let cpu0 = cpu_snapshot(&procs);
    tokio::time::sleep_until(t_end.into()).await;
    let cpu1 = cpu_snapshot(&procs);
    let max_lag = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;

    let deadline = tokio::time::Instant::from(t_end + grace);
    let mut tally = Tally::new();
    let mut events = 0u64;
    let mut unfinished_tasks = 0;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(deadline, t).await {
            Ok(joined) => {
                let (t, e) = joined?;
                tally.merge(t);
                events += e;
            }
            Err(_) => {
                abort.abort();
                unfinished_tasks += 1;
            }
        }
    }
    let finished = completed.load(Ordering::Relaxed);
    let unanswered = total.saturating_sub(finished);
    if unfinished_tasks > 0 {
        eprintln!(
            "loadgen: {unanswered} requests unanswered {grace:?} after the last was due; counted as failed"
        );
    }
    let seconds = args.duration.as_secs_f64();
    let measured = tally.latency_us.len();
    Ok(report(
        "open",
        &args,
        json!({
            "rate": rate,
            "seconds": seconds,
            "requests": measured,
            "requests_per_s": measured as f64 / seconds,
            "events_per_s": events as f64 / seconds,
            "pacer_max_lag_ms": max_lag.as_secs_f64() * 1000.0,
        }),
        &tally,
        unanswered,
        process_report(&procs, &cpu0, &cpu1),
    ))
}

fn report(
    mode: &str,
    args: &LoadArgs,
    window: serde_json::Value,
    tally: &Tally,
    unanswered: u64,
    processes: serde_json::Value,
) -> serde_json::Value {
    let h = &tally.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let s = &tally.service_us;
    let service_ms = |q: f64| s.value_at_quantile(q) as f64 / 1000.0;
    let non_ok: u64 = tally
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum();
    json!({
        "mode": mode,
        "connections": args.connections,
        "window": window,
        "latency_ms": {
            "samples": h.len(),
            "p50": ms(0.50),
            "p90": ms(0.90),
            "p99": ms(0.99),
            "p999": ms(0.999),
            "max": h.max() as f64 / 1000.0,
            "mean": h.mean() / 1000.0,
        },
        "service_ms": {
            "samples": s.len(),
            "p50": service_ms(0.50),
            "p99": service_ms(0.99),
            "p999": service_ms(0.999),
        },
        "statuses": tally.statuses,
        "failures": non_ok + tally.transport_errors + tally.bad_answers + unanswered,
        "transport_errors": tally.transport_errors,
        "bad_answers": tally.bad_answers,
        "unanswered": unanswered,
        "accepted": tally.accepted,
        "expected_records": { "group": tally.expected.group, "c2c": tally.expected.c2c },
        "processes": processes,
    })
}

fn watermarks(brokers: &str, topics: &[String]) -> anyhow::Result<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "timbridge-bench-watermarks")
        .set("log_level", "3")
        .create()
        .context("cannot create a Kafka client")?;
    let timeout = Duration::from_secs(10);
    let mut out = serde_json::Map::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("no metadata for {topic}"))?;
        let mut sum = 0i64;
        for t in md.topics() {
            if t.partitions().is_empty() {
                bail!("topic {topic} has no partitions");
            }
            for p in t.partitions() {
                let (_low, high) = consumer
                    .fetch_watermarks(topic, p.id(), timeout)
                    .with_context(|| format!("no watermarks for {topic}/{}", p.id()))?;
                sum += high;
            }
        }
        out.insert(topic.clone(), json!(sum));
    }
    Ok(serde_json::Value::Object(out))
}

fn jitter(duration: Duration, period: Duration) -> serde_json::Value {
    let mut h = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        std::thread::sleep(period);
        let late = t.elapsed().saturating_sub(period);
        h.saturating_record(late.as_micros() as u64);
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "period_ms": period.as_secs_f64() * 1000.0,
        "samples": h.len(),
        "late_ms": { "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0 },
    })
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Closed { load, requests } => {
            runtime(load.threads)?.block_on(closed_loop(load, requests))?
        }
        Command::Open { load, rate, grace } => {
            runtime(load.threads)?.block_on(open_loop(load, rate, grace))?
        }
        Command::Jitter { duration, period } => jitter(duration, period),
        Command::Watermarks { brokers, topics } => watermarks(&brokers, &topics)?,
    };
    println!("{result}");
    Ok(())
}
