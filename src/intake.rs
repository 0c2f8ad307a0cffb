//! One callback, from query string to answer: who sent it, is it signed, what
//! does it say, which records does it make, and are they safely in the spool.
//!
//! The order of the checks is the README's ("HTTP"): the app first (403), then its
//! signature (401), then the body (400). Nothing is written anywhere until
//! every check has passed, so a rejected callback produces no Kafka record.
//! The answer is OK only once the records are in the spool: from then on
//! the gateway holds the only copy and the publisher takes it to Kafka.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;

use crate::clock;
use crate::config::{App, Config};
use crate::dedup::{Admission, Dedup, DedupSettings};
use crate::event::{self, Envelope};
use crate::labels::{Command, HandshakeFailure, Outcome, RecordKind};
use crate::limits::{Limit, Limits, clip};
use crate::logging::Untrusted;
use crate::metrics::Metrics;
use crate::record::{Record, TopicRole};
use crate::reload::{Live, Swap};
use crate::spool::{Spool, SpoolError};
use crate::tencent::answer::{RejectKind, Rejection};
use crate::tencent::auth;
use crate::tencent::payload;
use crate::tencent::query::CallbackQuery;
use crate::throttle::LogThrottle;
use crate::upstream::{Origin, Upstream, UpstreamAnswer};

/// What became of an accepted callback, for the `outcome` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Read-receipt events written to the spool (or none: an empty list).
    Events,
    /// Every event in it was accepted moments ago already.
    Duplicate,
    /// Another command, forwarded to the raw topic.
    Forwarded,
    /// Another command, no raw topic configured.
    Ignored,
    /// Another command, proxied to [upstream]: its answer goes back.
    Proxied(UpstreamAnswer),
}

impl Accepted {
    pub fn outcome(&self) -> Outcome {
        match self {
            Accepted::Events => Outcome::Accepted,
            Accepted::Duplicate => Outcome::Duplicate,
            Accepted::Forwarded => Outcome::Forwarded,
            Accepted::Ignored => Outcome::Ignored,
            Accepted::Proxied(_) => Outcome::Proxied,
        }
    }
}

/// One callback whose body has been read, as the server hands it to
/// [`Intake::handle_from`].
pub struct Callback<'a> {
    /// The query string as received: the upstream gets it as it is.
    pub raw_query: &'a str,
    /// The same, parsed once for everyone who reads it.
    pub query: &'a CallbackQuery<'a>,
    pub body: Bytes,
    /// When the request started: its answer is timed from here.
    pub started: Instant,
    /// Whether the gateway was already refusing when the request started.
    pub refuse: bool,
    /// Its client and headers, for a proxied or forwarded callback.
    pub origin: Origin,
    /// The app, when the server checked it (and the Sign) from the query
    /// before reading the body; `None` has the intake check them.
    pub app: Option<u64>,
}

/// Everything a callback needs, shared by all connections.
pub struct Intake {
    /// The apps and source rules, replaced whole by a reload (SIGHUP):
    /// a callback takes one snapshot when it arrives, for all of its
    /// checks, never half of a reload.
    live: Swap<Live>,
    raw_enabled: bool,
    limits: Limits,
    spool: Spool,
    dedup: Dedup,
    metrics: Arc<Metrics>,
    /// Shutting down: /readyz says so, so load balancers stop sending.
    draining: AtomicBool,
    /// Shutting down and past the drain delay: new callbacks get 503.
    refusing: AtomicBool,
    rejection_log: LogThrottle,
    /// The spool's own write errors: at most one line a second, since while
    /// a disk fails every callback meets one, and the log may be on it.
    spool_error_log: LogThrottle,
    /// The app behind the gateway, when `[upstream]` is set.
    upstream: Option<Upstream>,
}

impl Intake {
    pub fn new(config: &Config, apps: Vec<App>, spool: Spool, metrics: Arc<Metrics>) -> Intake {
        let mut live = Live::new(config, apps);
        live.declare_token_series(&metrics.auth_token_matches);
        Intake {
            live: Swap::new(live),
            raw_enabled: config.kafka.raw_topic.is_some(),
            limits: config.limits,
            spool,
            dedup: Dedup::new(DedupSettings::from(&config.spool)),
            rejection_log: LogThrottle::new(config.log.rejections_per_second),
            spool_error_log: LogThrottle::new(1),
            metrics,
            draining: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            upstream: None,
        }
    }

    /// Counts a failed TLS handshake and logs it within
    /// `log.rejections_per_second`: a certificate clients refuse, or a
    /// client speaking plain HTTP, is otherwise invisible.
    pub fn tls_handshake_failed(&self, e: &std::io::Error, peer: std::net::SocketAddr) {
        let failure = if e.kind() == std::io::ErrorKind::TimedOut {
            HandshakeFailure::Timeout
        } else {
            HandshakeFailure::Error
        };
        self.metrics.tls_handshakes_failed.get(failure).inc();
        let reason = failure.as_str();
        if let Some(suppressed) = self.rejection_log.admit() {
            tracing::warn!(
                reason,
                error = %Untrusted(&e.to_string()),
                %peer,
                suppressed_before = suppressed,
                "TLS handshake failed"
            );
        }
    }

    /// Other commands go to `upstream` from now on (see [`crate::upstream`]).
    pub fn with_upstream(mut self, upstream: Upstream) -> Intake {
        self.upstream = Some(upstream);
        self
    }

    /// The apps and source rules requests see now. A callback takes this
    /// once, when it starts, for all of its checks.
    pub fn live(&self) -> Arc<Live> {
        self.live.load()
    }

    /// Callbacks arriving from now on see `live`; one already in flight
    /// finishes with the snapshot it took.
    pub fn replace_live(&self, mut live: Live) {
        live.declare_token_series(&self.metrics.auth_token_matches);
        live.retire_token_series(&self.live.load(), &self.metrics.auth_token_matches);
        self.live.store(live);
    }

    /// Lets `per_second` rejection lines a second through from now on.
    pub fn set_rejection_log_rate(&self, per_second: u32) {
        self.rejection_log.set_per_second(per_second);
        if let Some(u) = &self.upstream {
            u.set_log_per_second(per_second);
        }
    }

    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Shutting down: /readyz turns 503 so that load balancers stop
    /// sending, but callbacks are still taken (Tencent would not retry them).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// From now on callbacks that start are answered 503; those already
    /// being read are finished.
    pub fn start_refusing(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.refusing.store(true, Ordering::SeqCst);
    }

    /// Whether a callback starting now must be refused.
    pub fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::SeqCst)
    }

    /// Handles one callback whose body has been read. `refuse` is whether
    /// the gateway was already refusing when the request started. Records
    /// the outcome in the metrics and logs rejections (rate-limited, without
    /// secrets).
    pub async fn handle(
        &self,
        raw_query: &str,
        body: Bytes,
        started: Instant,
        refuse: bool,
    ) -> Result<Accepted, Rejection> {
        let live = self.live();
        let query = CallbackQuery::parse(raw_query);
        let callback = Callback {
            raw_query,
            query: &query,
            body,
            started,
            refuse,
            origin: Origin::default(),
            app: None,
        };
        self.handle_from(&live, callback).await
    }

    /// [`Intake::handle`] for a request the server has taken apart: its
    /// query parsed, its peer and headers known (they go on to the upstream
    /// with a proxied or forwarded callback). `live` is the snapshot the
    /// request took when it started (see [`Intake::live`]), so that all its
    /// checks see the same apps.
    pub async fn handle_from(
        &self,
        live: &Live,
        callback: Callback<'_>,
    ) -> Result<Accepted, Rejection> {
        let Callback {
            raw_query,
            query,
            body,
            started,
            refuse,
            origin,
            app,
        } = callback;
        // Kept only when the read receipt may be forwarded after spooling.
        let forward = self
            .upstream
            .as_ref()
            .filter(|u| u.forwards_read_receipts())
            .map(|u| (u, body.clone()));
        let result = if refuse {
            Err(Rejection::new(
                RejectKind::Overloaded,
                "gateway is shutting down; retry against another replica",
            ))
        } else {
            match app.map_or_else(|| self.authenticate(live, query), Ok) {
                Ok(sdk_app_id) => {
                    self.check_and_spool(sdk_app_id, raw_query, query, body, &origin, started)
                        .await
                }
                Err(r) => Err(r),
            }
        };
        if let (Ok(Accepted::Events), Some((upstream, body))) = (&result, forward) {
            upstream.forward_read_receipt(raw_query, body, origin);
        }
        let outcome = match &result {
            Ok(a) => a.outcome(),
            Err(r) => r.kind.outcome(),
        };
        self.account(query, result.as_ref().err(), outcome, started);
        result
    }

    /// Counts and logs a callback rejected before its body was read (too
    /// large, too slow), which `handle` never saw.
    pub fn reject_unread(
        &self,
        query: &CallbackQuery<'_>,
        rejection: &Rejection,
        started: Instant,
    ) {
        self.account(query, Some(rejection), rejection.kind.outcome(), started);
    }

    /// Every answered callback, once: its outcome and time in the metrics,
    /// and a (rate-limited) log line when it was rejected.
    fn account(
        &self,
        query: &CallbackQuery<'_>,
        rejection: Option<&Rejection>,
        outcome: Outcome,
        started: Instant,
    ) {
        if let Some(r) = rejection {
            self.log_rejection(query, r);
        }
        let command = Command::of(query.callback_command.as_deref().unwrap_or(""));
        self.metrics
            .callback_answered(command, outcome, started.elapsed().as_secs_f64());
    }

    /// The checks after the app's (`sdk_app_id` has passed them): the
    /// command, the query's limits and the body; then the spool, or the
    /// upstream for a command that is not a read receipt.
    async fn check_and_spool(
        &self,
        sdk_app_id: u64,
        raw_query: &str,
        query: &CallbackQuery<'_>,
        body: Bytes,
        origin: &Origin,
        started: Instant,
    ) -> Result<Accepted, Rejection> {
        let request_bytes = raw_query.len() + body.len();
        let command = match query.callback_command.as_deref() {
            Some(c) if !c.is_empty() => c,
            _ => {
                return Err(Rejection::new(
                    RejectKind::Invalid,
                    "CallbackCommand is missing from the query string",
                ));
            }
        };
        self.check_query_limits(query)?;
        let received_at_ms = clock::now_ms();
        let mut records = Vec::new();
        match payload::parse_within(command, &body, &self.limits) {
            Some(Ok(callback)) => {
                let env = Envelope {
                    sdk_app_id,
                    received_at_ms,
                    client_ip: query.client_ip.as_deref(),
                    platform: query.platform.as_deref(),
                };
                let budget = event::budget_for(request_bytes);
                if event::normalize_within(&callback, &env, budget, &mut records).is_err() {
                    return Err(self.over_limit(
                        Limit::OutputBytes,
                        format!(
                            "the records of this callback would take more than {budget} bytes of spool, {} times its {request_bytes} request bytes; send fewer or shorter items per callback",
                            event::OUTPUT_BYTES_PER_REQUEST_BYTE
                        ),
                    ));
                }
            }
            Some(Err(why)) => return Err(self.invalid_body(why)),
            None => {
                let other = payload::parse_other_within(&body, &self.limits)
                    .map_err(|why| self.invalid_body(why))?;
                if !self.raw_enabled && self.upstream.is_none() {
                    return Ok(Accepted::Ignored);
                }
                let key = match &other.group_id {
                    Some(g) => g.as_bytes().to_vec(),
                    None => sdk_app_id.to_string().into_bytes(),
                };
                if self.raw_enabled {
                    records.push(Record {
                        topic: TopicRole::Raw,
                        key,
                        value: body.to_vec(),
                        event_id: None,
                        command: command.to_owned().into(),
                        sdk_app_id,
                    });
                }
                if let Some(upstream) = &self.upstream {
                    return self
                        .proxy(upstream, raw_query, body, origin, &records)
                        .await;
                }
                self.spool_records(&records).await?;
                self.metrics.spooled(RecordKind::Raw, 1);
                return Ok(Accepted::Forwarded);
            }
        }
        if records.is_empty() {
            return Ok(Accepted::Events);
        }
        self.spool_events(command, records, started).await
    }

    /// Spools a request's read-receipt records, except those accepted
    /// moments ago. Never answers OK for an event that is not in the spool:
    /// a record whose id another request is writing right now waits for
    /// that write, and is then dropped (it went in) or written by this
    /// request (it did not). See `dedup.rs`.
    async fn spool_events(
        &self,
        command: &str,
        mut records: Vec<Record>,
        started: Instant,
    ) -> Result<Accepted, Rejection> {
        // Every read-receipt command has its kind; `raw` is never reached.
        let kind = event::Kind::of_command(command).map_or(RecordKind::Raw, RecordKind::from);
        let mut spooled = 0usize;
        let mut dropped = 0usize;
        loop {
            let ids: Vec<_> = records.iter().filter_map(|r| r.event_id).collect();
            // The request's start serves to expire old ids at admission:
            // an older time only keeps them a little longer, and a clock
            // read is not free on every host (about 2.8% of the CPU under
            // load on one with ten of them per callback). The commit reads
            // the clock: ids must be stamped no earlier than they were
            // accepted.
            let (admissions, claim) = if ids.len() == records.len() {
                self.dedup.admit(&ids, started)
            } else {
                // Not reachable (every read-receipt record has an id); spool
                // them all rather than guess which admission is whose.
                self.dedup.admit(&[], started)
            };
            let mut own = Vec::new();
            let mut waiting = Vec::new();
            let mut waits = Vec::new();
            if admissions.iter().all(|a| matches!(a, Admission::New)) {
                // The usual case (and that of no admissions at all): every
                // record is this request's to write, as they are, without
                // moving them one by one into a list of their own.
                own = records;
            } else {
                own.reserve(records.len());
                for (record, admission) in records.into_iter().zip(admissions) {
                    match admission {
                        Admission::New => own.push(record),
                        Admission::Seen => dropped += 1,
                        Admission::Pending(p) => {
                            waiting.push(record);
                            waits.push(p);
                        }
                    }
                }
            }
            if !own.is_empty() {
                // On error the claim is dropped, which releases the ids.
                self.spool_records(&own).await?;
                claim.commit(Instant::now());
                spooled += own.len();
                self.metrics.spooled(kind, own.len() as u64);
            } else {
                drop(claim);
            }
            if waiting.is_empty() {
                break;
            }
            for p in waits {
                p.released().await;
            }
            records = waiting;
        }
        self.metrics.duplicate_events.inc_by(dropped as u64);
        Ok(if spooled == 0 {
            Accepted::Duplicate
        } else {
            Accepted::Events
        })
    }

    /// Proxies another command to the upstream, copying it to the raw topic
    /// at the same time when one is configured. The app's answer decides
    /// (a before-send callback must not fail because Kafka is away), so a
    /// copy the spool cannot take is logged, not answered.
    async fn proxy(
        &self,
        upstream: &Upstream,
        raw_query: &str,
        body: Bytes,
        origin: &Origin,
        raw: &[Record],
    ) -> Result<Accepted, Rejection> {
        let copy = async {
            if raw.is_empty() {
                return;
            }
            match self.spool_records(raw).await {
                Ok(()) => self.metrics.spooled(RecordKind::Raw, 1),
                Err(r) => {
                    let suppressed = &self.metrics.log_lines_suppressed;
                    if self.rejection_log.admit_or_count(suppressed).is_some() {
                        tracing::warn!(reason = %r.info, "proxied callback not copied to the raw topic");
                    }
                }
            }
        };
        let ((), answer) = tokio::join!(copy, upstream.proxy(raw_query, body, origin));
        answer.map(Accepted::Proxied)
    }

    /// The query fields copied into records, and the command stored with
    /// them, are bounded like the body's (`[limits]`).
    fn check_query_limits(&self, query: &CallbackQuery<'_>) -> Result<(), Rejection> {
        for (name, value, limit) in [
            (
                "CallbackCommand",
                query.callback_command.as_deref(),
                Limit::CommandBytes,
            ),
            ("ClientIP", query.client_ip.as_deref(), Limit::ClientIpBytes),
            (
                "OptPlatform",
                query.platform.as_deref(),
                Limit::PlatformBytes,
            ),
        ] {
            let max = self.limits.get(limit);
            if let Some(v) = value
                && v.len() > max
            {
                return Err(self.over_limit(
                    limit,
                    format!(
                        "{name} in the query string: {} bytes, over the limit of {max} (limits.{} in the gateway's configuration)",
                        v.len(),
                        limit.key()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A 400 for a body the parser refused, counted under its limit when it
    /// broke one.
    fn invalid_body(&self, why: payload::BodyError) -> Rejection {
        match why.limit {
            Some(limit) => self.over_limit(limit, why.message),
            None => Rejection::new(RejectKind::Invalid, why.message),
        }
    }

    fn over_limit(&self, limit: Limit, info: String) -> Rejection {
        self.metrics.callbacks_over_limit.get(limit).inc();
        Rejection::new(RejectKind::Invalid, info)
    }

    /// The app's SdkAppid once the app is known and, when it has a token,
    /// the Sign matches the current (or, during a rotation, the previous) one.
    /// It reads the query only, so the server runs it before reading the
    /// body: a client that is not the app holds no body memory and gets its
    /// 403 or 401 at once.
    pub fn authenticate(&self, live: &Live, query: &CallbackQuery<'_>) -> Result<u64, Rejection> {
        if let Some(name) = query.repeated {
            // The kind of the parameter's own check: 403 for the app, 401
            // for the signature, 400 for the rest.
            let kind = match name {
                "SdkAppid" => RejectKind::UnknownApp,
                "Sign" | "RequestTime" => RejectKind::Unauthorized,
                _ => RejectKind::Invalid,
            };
            return Err(Rejection::new(
                kind,
                format!("{name} appears more than once in the query string; Tencent sends it once"),
            ));
        }
        let id = query.sdk_app_id.as_deref().ok_or_else(|| {
            Rejection::new(
                RejectKind::UnknownApp,
                "SdkAppid is missing from the query string",
            )
        })?;
        let app = id
            .parse::<u64>()
            .ok()
            .and_then(|n| live.apps.get(&n))
            .ok_or_else(|| {
                Rejection::new(
                    RejectKind::UnknownApp,
                    "SdkAppid is not configured on this gateway",
                )
            })?;
        if let Some(token) = &app.token {
            let now = clock::now_s() as i64;
            let matched = auth::verify_rotating(
                token,
                app.previous_token.as_deref(),
                query.sign.as_deref(),
                query.request_time.as_deref(),
                now,
            )
            .map_err(|e| Rejection::new(RejectKind::Unauthorized, e.to_string()))?;
            live.count_match(app.sdk_app_id, matched);
        }
        Ok(app.sdk_app_id)
    }

    async fn spool_records(&self, records: &[Record]) -> Result<(), Rejection> {
        self.spool
            .append(Record::encode_all(records))
            .await
            .map_err(|e| match e {
                SpoolError::Full => Rejection::new(
                    RejectKind::Overloaded,
                    "spool is full: Kafka is not keeping up; retry later",
                ),
                // While a disk stalls, many callbacks in a row get this:
                // the rejection log (rate-limited) says so, not one error
                // line each.
                SpoolError::Behind { .. } => Rejection::new(
                    RejectKind::Overloaded,
                    "spool disk is not keeping up; retry later",
                ),
                // Retrying cannot help: the answer is 413, and the spool's
                // room and readiness are untouched.
                SpoolError::RecordTooLarge { .. } | SpoolError::RequestTooLarge { .. } => {
                    Rejection::new(
                        RejectKind::TooLarge,
                        "the records this callback makes are larger than the spool can hold",
                    )
                }
                other => {
                    let left_out = &self.metrics.log_lines_suppressed;
                    if let Some(suppressed) = self.spool_error_log.admit_or_count(left_out) {
                        tracing::error!(error = %other, suppressed_before = suppressed, "cannot write to the spool");
                    }
                    Rejection::new(
                        RejectKind::Overloaded,
                        "spool cannot be written (disk full or failing); retry later",
                    )
                }
            })
    }

    fn log_rejection(&self, query: &CallbackQuery<'_>, r: &Rejection) {
        let left_out = &self.metrics.log_lines_suppressed;
        if let Some(suppressed) = self.rejection_log.admit_or_count(left_out) {
            // The sender chose these (the reason may quote the body): escaped,
            // no field can forge a line or reach a terminal; the query fields
            // are clipped, their length is the sender's too.
            tracing::warn!(
                status = r.kind.status().as_u16(),
                reason = %Untrusted(&r.info),
                client = r.client.as_deref().map(|c| tracing::field::display(Untrusted(c))),
                command = %Untrusted(clip(query.callback_command.as_deref().unwrap_or("-"), 128)),
                sdk_app_id = %Untrusted(clip(query.sdk_app_id.as_deref().unwrap_or("-"), 32)),
                suppressed_before = suppressed,
                "callback rejected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{FsyncMode, SpoolConfig};

    fn intake(dir: &std::path::Path) -> (Intake, crate::spool::SpoolReader) {
        let config = Config::parse("[[apps]]\nsdk_app_id = 7\n").unwrap();
        let apps = config.resolve_apps().unwrap();
        let (spool, reader, _) = Spool::open(SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            fsync: FsyncMode::Never,
            segment_bytes: 1 << 16,
        })
        .unwrap();
        (
            Intake::new(&config, apps, spool, Arc::new(Metrics::new())),
            reader,
        )
    }

    const QUERY: &str = "SdkAppid=7&CallbackCommand=C2C.CallbackAfterMsgReport";
    const BODY: &[u8] = br#"{"Report_Account":"a","Peer_Account":"b","LastReadTime":1670574414}"#;

    #[tokio::test]
    async fn once_refusing_new_callbacks_get_503_and_nothing_is_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _reader) = intake(dir.path());
        intake.start_refusing();
        assert!(intake.is_draining());
        let r = intake
            .handle(
                QUERY,
                Bytes::from_static(BODY),
                Instant::now(),
                intake.is_refusing(),
            )
            .await
            .unwrap_err();
        assert_eq!(r.kind, RejectKind::Overloaded);
        assert_eq!(r.kind.status(), hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.info.contains("shutting down"), "{}", r.info);
        assert_eq!(intake.spool().stats().pending_events, 0);
    }

    #[tokio::test]
    async fn a_request_that_started_before_the_refusal_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _reader) = intake(dir.path());
        let refuse = intake.is_refusing();
        intake.start_refusing();
        let ok = intake
            .handle(QUERY, Bytes::from_static(BODY), Instant::now(), refuse)
            .await;
        assert_eq!(ok, Ok(Accepted::Events));
        assert_eq!(intake.spool().stats().pending_events, 1);
    }
}
