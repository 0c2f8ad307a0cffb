//! timbridge: Tencent Cloud Chat read-receipt callbacks in, `read_receipt.v1`
//! events on Kafka out, and nothing acknowledged ever lost in between.
//!
//! # The data flow
//!
//! ```text
//! Tencent ──POST──▶ server      hyper: routes, body limit, timeouts, graceful shutdown
//!                     │
//!                     ▼
//!                  intake        one callback: tencent::query → tencent::auth →
//!                     │          tencent::payload → event (normalize) → dedup
//!                     │
//!                     ├────────▶ upstream    other commands, with [upstream]: proxied
//!                     │                      to the app, its answer back to Tencent
//!                     ▼
//!                  spool ──────▶ 200 OK   append (group commit); from here on the
//!                     │                   gateway holds the only copy
//!                     ▼
//!                  publish       rdkafka idempotent producer; a record leaves the
//!                     │          spool only after its positive delivery report
//!                     ▼
//!                   Kafka
//! ```
//!
//! Each stage hands the next a finished value and never calls back. Tencent
//! waits two seconds for an answer and does not retry "after" callbacks by
//! default, so the answer comes as soon as the records are in the spool, not
//! when Kafka has them: Kafka may be away for an hour and the spool rides it
//! out, replaying after a restart whatever has no delivery report yet.
//!
//! The upstream is never on the read-receipt path: a slow or dead app costs
//! other commands a 502/504 and read receipts nothing.
//!
//! An *event* is a normalized `read_receipt.v1` value ([`event`]); a
//! *record* is what carries one (or another command's raw body) through the
//! spool and onto Kafka ([`record`]).
//!
//! `metrics` is written by every stage and read by `/metrics`; every series
//! is declared once there, and every label value once in [`labels`]. The
//! wall clock is read through [`clock`] alone. `/readyz` asks the spool
//! (room left?) and the intake (draining?): [`server::Handles`] is what the
//! listeners are given, so the server never reaches through one stage to
//! another. Whether Kafka is reachable is reported but never makes the
//! gateway unready. With `server.admin_listen` those routes and `/healthz`
//! get a listener of their own, so that clients hogging the callback
//! listener cannot fail the probes.
//!
//! Who may post (`source`: `server.allow_from`) is checked before the app;
//! with `server.tls_cert_file` the callback listener speaks TLS only
//! (`tls`). On SIGHUP, `reload` swaps in the apps, tokens, source rules,
//! certificate and log settings of the file read again, without a restart.
//!
//! Each callback connection is served on one of the [`conn_threads`], a
//! single-threaded runtime per core; the accept loops, the admin listener's
//! connections, the publisher and the rest run on the multi-threaded runtime
//! `main.rs` starts.
//!
//! [`Gateway`] wires the stages together; `main.rs` is only the CLI.
//!
//! `timbridge materialize` ([`materialize`]) is a second process mode
//! downstream of Kafka: a consumer group that folds the events into each
//! message's read state, kept in a compacted topic.

pub mod clock;
pub mod config;
pub mod conn_threads;
pub mod dedup;
pub mod effective;
pub mod embedded;
pub mod event;
pub mod fdlimit;
#[doc(hidden)]
pub mod fuzzing;
pub mod intake;
pub mod kafka_log;
pub mod labels;
pub mod limits;
pub mod logging;
pub mod materialize;
pub mod metrics;
pub mod publish;
pub mod record;
pub mod reload;
pub mod request_line;
pub mod send;
pub mod server;
pub mod source;
pub mod spool;
pub mod tencent;
pub mod throttle;
pub mod tls;
pub mod topics;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::embedded::EmbeddedKafka;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::spool::{Spool, SpoolConfig};

/// The dead-letter file, inside the spool directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// How often shutdown looks whether Kafka has taken everything spooled.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);

/// The publisher gets at least this long to stop, even past the shutdown
/// deadline: enough to flush what librdkafka already holds.
const PUBLISHER_STOP_MIN: Duration = Duration::from_millis(100);

/// A running gateway: listener, spool and publisher.
pub struct Gateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    bootstrap: String,
    intake: Arc<Intake>,
    metrics: Arc<Metrics>,
    spool: Spool,
    publisher: Publisher,
    server: tokio::task::JoinHandle<()>,
    stop_server: watch::Sender<bool>,
    shutdown_timeout: Duration,
    drain_delay: Duration,
    /// Applies a reloaded configuration (SIGHUP) to the running gateway.
    reloader: Arc<reload::Reloader>,
    // Dropped last: the producer must be gone before its broker.
    embedded: Option<EmbeddedKafka>,
}

impl Gateway {
    /// Opens the spool (replaying what it holds), starts the producer and
    /// binds the listener. The config is taken as validated.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let apps = config.resolve_apps()?;
        let certs = tls::load(&config.server)
            .map_err(anyhow::Error::msg)?
            .map(tls::CertStore::new);
        // Before any file or socket is opened: EMFILE would fail the probes.
        fdlimit::raise_and_check(&config);
        let embedded = start_embedded(&config)?;
        let bootstrap = match &embedded {
            Some(k) => k.bootstrap().to_owned(),
            None => config.kafka.brokers.clone(),
        };
        if embedded.is_none() {
            check_topics(&config, &bootstrap).await?;
        }

        let (spool, reader, report) = Spool::open(SpoolConfig::from(&config.spool))
            .with_context(|| format!("cannot open the spool in {}", config.spool.dir.display()))?;
        log_recovery(&config.spool.dir, &report);

        let metrics = Arc::new(Metrics::new());
        metrics.register_spool(spool.clone(), config.spool.max_bytes);
        let (publisher, kafka_up) =
            start_publisher(&config, &bootstrap, spool.clone(), reader, &metrics)?;

        let intake = build_intake(&config, apps, &spool, &metrics)?;
        let tls = certs.as_ref().map(|c| c.acceptor()).transpose()?;
        let https = tls.is_some();
        let reloader = Arc::new(reload::Reloader::new(
            config.clone(),
            intake.clone(),
            certs,
            metrics.clone(),
        ));
        let handles = server::Handles {
            intake: intake.clone(),
            metrics: metrics.clone(),
            spool: spool.clone(),
            body_memory: server::BodyBudget::new(&config.server, &metrics),
            kafka_up,
        };
        let (stop_server, stop_rx) = watch::channel(false);
        let listening = Listening::start(&config, handles, tls, stop_rx).await?;
        tracing::info!(
            addr = %listening.addr,
            callback_path = %config.server.callback_path,
            https,
            brokers = %bootstrap,
            "timbridge listening"
        );
        Ok(Gateway {
            addr: listening.addr,
            admin_addr: listening.admin_addr,
            bootstrap,
            intake,
            metrics,
            spool,
            publisher,
            server: listening.server,
            stop_server,
            shutdown_timeout: config.server.shutdown_timeout,
            drain_delay: config.server.drain_delay,
            reloader,
            embedded,
        })
    }

    /// Where the listener is bound (the port is real when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) is bound,
    /// when `server.admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The brokers the producer talks to (the embedded one's address when
    /// `brokers = "embedded"`).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// What applies a reloaded configuration to this gateway: see [`reload`].
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        self.reloader.clone()
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The orderly stop: unready and 503 for new callbacks, in-flight
    /// requests finish, Kafka gets until `shutdown_timeout` to take what the
    /// spool holds, and whatever it has not taken stays for the next start.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!(
            drain_delay = %humantime::format_duration(self.drain_delay),
            "shutting down: /readyz is 503 now"
        );
        self.intake.start_draining();
        // Load balancers need a moment to see /readyz fail; meanwhile
        // callbacks are still taken, since Tencent would not retry them.
        tokio::time::sleep(self.drain_delay).await;
        let deadline = Instant::now() + self.shutdown_timeout;
        self.intake.start_refusing();
        let _ = self.stop_server.send(true);
        if tokio::time::timeout_at(deadline.into(), self.server)
            .await
            .is_err()
        {
            tracing::warn!("connections still open at the shutdown deadline; closing them");
        }
        // Give Kafka the rest of the time to take what is spooled.
        while self.spool.stats().pending_events > 0 && Instant::now() < deadline {
            tokio::time::sleep(SHUTDOWN_POLL).await;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.publisher.stop(left.max(PUBLISHER_STOP_MIN)).await;
        let pending = self.spool.stats().pending_events;
        self.spool.close().await.context("cannot close the spool")?;
        if pending > 0 {
            tracing::warn!(
                pending,
                "stopped with records not yet in Kafka; they are in the spool and will be sent at the next start"
            );
        } else {
            tracing::info!("stopped; the spool is empty");
        }
        drop(self.embedded);
        Ok(())
    }
}

/// The publisher, reading the spool from `reader`, and the Kafka status it
/// keeps (whether a broker is connected).
fn start_publisher(
    config: &Config,
    bootstrap: &str,
    spool: Spool,
    reader: spool::SpoolReader,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Publisher, server::KafkaStatus)> {
    let (kafka_up_tx, kafka_up) = watch::channel(false);
    let publisher = Publisher::start(
        &config.kafka,
        bootstrap,
        spool,
        reader,
        config.spool.dir.join(DEAD_LETTER_FILE),
        metrics.clone(),
        kafka_up_tx,
    )
    // librdkafka's errors may quote a property's value: never print one
    // raw, it may be a password.
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot create the Kafka producer: {}; check [kafka.properties]",
            config.scrub_secrets(&e.to_string())
        )
    })?;
    Ok((publisher, kafka_up))
}

/// The intake, with the upstream when configured.
fn build_intake(
    config: &Config,
    apps: Vec<config::App>,
    spool: &Spool,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<Intake>> {
    let mut intake = Intake::new(config, apps, spool.clone(), metrics.clone());
    if let Some(upstream) = &config.upstream {
        intake = intake.with_upstream(
            upstream::Upstream::new(upstream, metrics.clone(), config.log.rejections_per_second)
                .context("cannot set up [upstream]")?,
        );
    }
    Ok(Arc::new(intake))
}

/// With `brokers = "embedded"`: the in-process mock broker, its topics
/// created, and loud warnings that it is not for production.
fn start_embedded(config: &Config) -> anyhow::Result<Option<EmbeddedKafka>> {
    if !config.kafka.is_embedded() {
        return Ok(None);
    }
    let mut topics = vec![
        config.kafka.group_topic.clone(),
        config.kafka.c2c_topic.clone(),
    ];
    topics.extend(config.kafka.raw_topic.clone());
    topics.extend(config.kafka.dead_letter_topic.clone());
    let kafka = EmbeddedKafka::start(&topics)?;
    tracing::warn!(
        bootstrap = kafka.bootstrap(),
        "EMBEDDED KAFKA: an in-memory mock broker for trying timbridge out; \
         it forgets everything at exit. NOT FOR PRODUCTION: set kafka.brokers to your cluster."
    );
    // A line of its own that ends with the command, so that it can be
    // copied as it is (fields would follow the message).
    tracing::info!(
        "read the records with: kcat -b {} -C -t {} -o beginning -e",
        kafka.bootstrap(),
        config.kafka.group_topic
    );
    Ok(Some(kafka))
}

/// Missing topics are named now rather than found in the dead-letter file
/// later. Only a required check holds the start up.
async fn check_topics(config: &Config, bootstrap: &str) -> anyhow::Result<()> {
    if config.kafka.require_topics {
        topics::check(&config.kafka, bootstrap, true).await?;
    } else {
        let (kafka, brokers) = (config.kafka.clone(), bootstrap.to_owned());
        tokio::spawn(async move { topics::check(&kafka, &brokers, false).await });
    }
    Ok(())
}

/// The listeners, bound and served: the callback one, and the admin one
/// with `server.admin_listen`.
struct Listening {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// One handle for both listeners: shutdown waits for each to drain.
    server: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// `tls` is the callback listener's (the admin one stays plain HTTP).
    async fn start(
        config: &Config,
        handles: server::Handles,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Listening> {
        let listen = config.listen_addr();
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("cannot listen on {listen}: is another process using it? set server.listen or --listen")
        })?;
        let addr = listener.local_addr()?;
        let admin = match config.admin_listen_addr() {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
                format!(
                    "cannot listen on {a}: is another process using it? set server.admin_listen"
                )
            })?),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let callback_role = if admin.is_some() {
            server::Role::Callbacks
        } else {
            server::Role::Everything
        };
        // Started before the first connection, so that a failure to start
        // them is said at start.
        conn_threads::start();
        let serve = |listener, role, handles, tls, stop| {
            let server_config = config.server.clone();
            tokio::spawn(async move {
                server::serve(listener, role, &server_config, handles, tls, stop).await
            })
        };
        let callbacks = serve(listener, callback_role, handles.clone(), tls, stop.clone());
        let admin_server = admin.map(|l| serve(l, server::Role::Admin, handles, None, stop));
        let server = tokio::spawn(async move {
            let _ = callbacks.await;
            if let Some(admin) = admin_server {
                let _ = admin.await;
            }
        });
        if let Some(admin) = admin_addr {
            tracing::info!(%admin, "admin listener: /metrics, /healthz and /readyz");
        }
        Ok(Listening {
            addr,
            admin_addr,
            server,
        })
    }
}

/// Says what the spool found at start: how much it will replay, and every
/// place where it had to skip damaged data (a torn write at a crash).
fn log_recovery(dir: &std::path::Path, report: &spool::RecoveryReport) {
    for damaged in &report.damaged {
        tracing::warn!(spool = %dir.display(), "spool recovery skipped data: {damaged}");
    }
    let what = if report.records_pending > 0 {
        "spool opened; its pending records will be sent to Kafka"
    } else {
        "spool opened; nothing pending"
    };
    tracing::info!(
        spool = %dir.display(),
        segments = report.segments,
        records_pending = report.records_pending,
        bytes_skipped = report.bytes_skipped(),
        zeros_cut = report.zeros_cut,
        "{what}"
    );
}
