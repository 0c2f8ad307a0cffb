//! The configuration file (`config.toml`), its defaults and its validation.
//!
//! The file is the README's "Configuration reference". Unknown keys are an error rather than
//! silently ignored: a misspelt `max_byte` that quietly falls back to a default
//! is how a spool fills a disk. Every error names the key and says what to do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spool::{FsyncMode, SpoolConfig, SpoolError};

/// Where the Kafka brokers are, or `embedded` for the in-process mock cluster.
pub const EMBEDDED_BROKERS: &str = "embedded";

/// The smallest `spool.segment_bytes` taken (one page).
const MIN_SEGMENT_BYTES: u64 = 4096;

/// The most readers `read_state.max_readers` may keep per message.
const MAX_READERS: usize = 100_000;

/// The longest `upstream.timeout` (Tencent itself waits 2 s).
const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub spool: SpoolSettings,
    #[serde(default)]
    pub log: LogConfig,
    /// The app behind the gateway: when set, callbacks that are not read
    /// receipts are proxied to it and its answer goes back to Tencent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamConfig>,
    /// How much one callback may ask for; see `crate::limits`.
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// `timbridge materialize`: the read-state fold (the gateway ignores it).
    #[serde(default)]
    pub read_state: ReadStateConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The address callbacks are served on (and /metrics, /healthz and
    /// /readyz too, unless `admin_listen` is set).
    pub listen: String,
    /// When set, /metrics, /healthz and /readyz are served here instead, on
    /// their own connection budget, so that clients hogging the callback
    /// listener cannot make probes fail or hide the metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Tencent appends its query string to this path.
    pub callback_path: String,
    pub max_body_bytes: usize,
    /// How long a client may take to send the request head. Slow clients must
    /// not hold connections (and memory) forever.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send the body once the head is in.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one client address may hold open at once (0: no cap).
    /// Off by default: Tencent's callbacks come from few addresses, and
    /// behind a load balancer or NAT every client may share one.
    pub max_connections_per_ip: usize,
    /// How long an answer may wait for the client to take it once the
    /// socket's buffers are full; then the connection is closed. hyper has
    /// no write timeout: without this a client that never reads holds its
    /// connection forever.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Bytes of request bodies held in memory at once, over all connections;
    /// past it a callback is answered 503, so that `max_connections` times
    /// `max_body_bytes` cannot exhaust memory.
    pub max_body_memory_bytes: usize,
    /// On SIGTERM: how long /readyz reports 503 while callbacks are still
    /// taken, before the listener closes, so that a load balancer stops
    /// sending first. Tencent does not retry, so refusing early loses data.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// On SIGTERM, after the drain delay: how long in-flight requests and
    /// the Kafka producer get before the process exits (what is
    /// undelivered stays in the spool).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// With `tls_key_file`: the callback listener speaks HTTPS only, with
    /// this PEM certificate (its chain following it). Re-read on SIGHUP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Address ranges callbacks are taken from (CIDR); unset: any. See
    /// `crate::source`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<String>>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDR); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            admin_listen: None,
            callback_path: "/callback".into(),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_ip: 0,
            write_timeout: Duration::from_secs(5),
            max_body_memory_bytes: 4 * 1024 * 1024,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
            allow_from: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.parse::<SocketAddr>().is_err() {
            return invalid(format!(
                "server.listen = {:?} is not an address like 127.0.0.1:8080 or [::1]:8080",
                self.listen
            ));
        }
        if let Some(admin) = &self.admin_listen {
            let Ok(addr) = admin.parse::<SocketAddr>() else {
                return invalid(format!(
                    "server.admin_listen = {admin:?} is not an address like 127.0.0.1:9090 or [::]:9090"
                ));
            };
            if addr.port() != 0 && admin.parse::<SocketAddr>().ok() == self.listen.parse().ok() {
                return invalid(format!(
                    "server.admin_listen = {admin:?} is the same address as server.listen: give the admin listener its own port, or remove the key"
                ));
            }
        }
        if !self.callback_path.starts_with('/') {
            return invalid(format!(
                "server.callback_path = {:?} must start with '/'",
                self.callback_path
            ));
        }
        for reserved in ["/metrics", "/healthz", "/readyz"] {
            if self.callback_path == reserved {
                return invalid(format!(
                    "server.callback_path cannot be {reserved}: that route is taken"
                ));
            }
        }
        // A raw forward spools the whole body as one record.
        const MAX_BODY: usize = crate::spool::MAX_RECORD_LEN / 2;
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY {
            return invalid(format!(
                "server.max_body_bytes must be 1 to {MAX_BODY} (Tencent's callbacks are at most a few tens of KB)"
            ));
        }
        if self.max_connections == 0 {
            return invalid("server.max_connections must be above 0".into());
        }
        if self.write_timeout.is_zero() {
            return invalid("server.write_timeout must be above 0".into());
        }
        // Both size semaphores, which cannot exceed MAX_PERMITS (it would panic).
        const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_connections > MAX_PERMITS {
            return invalid(format!(
                "server.max_connections must be at most {MAX_PERMITS}; each connection needs a file descriptor, so a few thousand is plenty"
            ));
        }
        if self.max_body_memory_bytes > MAX_PERMITS {
            return invalid(format!(
                "server.max_body_memory_bytes must be at most {MAX_PERMITS}; size it to the memory request bodies may take (the default is 4 MiB)"
            ));
        }
        if self.max_body_memory_bytes < self.max_body_bytes {
            return invalid(format!(
                "server.max_body_memory_bytes ({}) is below server.max_body_bytes ({}): no body of the largest allowed size could ever be read; raise it or lower max_body_bytes",
                self.max_body_memory_bytes, self.max_body_bytes
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub sdk_app_id: u64,
    /// When set, `Sign` and `RequestTime` are required on every callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The name of an environment variable holding the token, so that the
    /// secret need not sit in a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// The token being rotated out: while set, a Sign made with either
    /// token is accepted, so changing the token in Tencent's console and
    /// here need not happen at the same instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<String>,
    /// `previous_token` from an environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_topic: String,
    pub c2c_topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_topic: Option<String>,
    /// Records Kafka will never take (too large, invalid) are written here
    /// as well as to the spool's dead-letter file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// At start, a configured topic missing from the cluster stops the
    /// start instead of only a warning (Kafka unreachable still only warns).
    pub require_topics: bool,
    /// Budget of the dead-letter file; beyond it dead letters stay in the
    /// spool (and are retried) until an operator moves the file away.
    pub dead_letter_max_bytes: u64,
    /// Passed to librdkafka as is (TLS, SASL, tuning); they win over ours.
    pub properties: BTreeMap<String, PropertyValue>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_topic: "tim.group.read_receipts".into(),
            c2c_topic: "tim.c2c.read_receipts".into(),
            raw_topic: None,
            dead_letter_topic: None,
            require_topics: false,
            dead_letter_max_bytes: 64 * 1024 * 1024,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.brokers.trim().is_empty() {
            return invalid(
                "kafka.brokers is empty: give host:port[,host:port] or \"embedded\"".into(),
            );
        }
        if self.dead_letter_max_bytes == 0 {
            return invalid("kafka.dead_letter_max_bytes must be above 0".into());
        }
        for (key, topic) in [
            ("kafka.group_topic", Some(&self.group_topic)),
            ("kafka.c2c_topic", Some(&self.c2c_topic)),
            ("kafka.raw_topic", self.raw_topic.as_ref()),
            ("kafka.dead_letter_topic", self.dead_letter_topic.as_ref()),
        ] {
            if let Some(t) = topic
                && !valid_topic(t)
            {
                return invalid(format!(
                    "{key} = {t:?} is not a valid Kafka topic name (1 to 249 of [a-zA-Z0-9._-])"
                ));
            }
        }
        self.check_properties()?;
        Ok(())
    }

    pub fn is_embedded(&self) -> bool {
        self.brokers == EMBEDDED_BROKERS
    }

    /// Asks librdkafka whether it knows each `[kafka.properties]` key and
    /// takes its value, so that `check-config` catches a misspelt property
    /// instead of `serve` failing on it (or, worse, printing its value:
    /// librdkafka's own message quotes the value, so it is never passed on
    /// for a property that may be secret).
    pub fn check_properties(&self) -> Result<(), ConfigError> {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaConfRes;
        for (key, value) in &self.properties {
            let mut one = rdkafka::ClientConfig::new();
            one.set(key, value.to_string());
            let Err(e) = one.create_native_config() else {
                continue;
            };
            let why = match &e {
                KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..) => {
                    "is not a librdkafka property: check its spelling against librdkafka's CONFIGURATION.md".to_owned()
                }
                KafkaError::ClientConfig(_, desc, ..) if !is_secret_property(key) => {
                    format!("has a value librdkafka refuses ({desc})")
                }
                _ => "has a value librdkafka refuses (value not shown: it may be a secret)"
                    .to_owned(),
            };
            return Err(ConfigError::Invalid(format!(
                "kafka.properties {key:?} {why}"
            )));
        }
        Ok(())
    }
}

/// librdkafka takes every property as a string; TOML users naturally write
/// numbers and booleans, so accept those too.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PropertyValue {
    String(String),
    Integer(i64),
    Bool(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::String(s) => f.write_str(s),
            PropertyValue::Integer(i) => write!(f, "{i}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Answer after an fdatasync covering the request (group commit).
    Always,
    /// Answer after write(); sync on a short timer.
    Interval,
    /// Leave syncing to the operating system.
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: how often written data is synced.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Segment files roll at this size; a segment is deleted once all of its
    /// records are in Kafka, so smaller segments free disk sooner.
    pub segment_bytes: u64,
    /// How long an accepted event_id is remembered, so that a retried
    /// callback does not double the stream. This key and the next are the
    /// intake's ([`crate::dedup::DedupSettings`]), kept under `[spool]`
    /// where they have always been documented.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// At most this many event_ids are remembered (bounds memory: ~25 bytes each).
    pub dedup_max_entries: usize,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: PathBuf::from("data/spool"),
            max_bytes: 1024 * 1024 * 1024,
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(200),
            segment_bytes: 16 * 1024 * 1024,
            dedup_window: Duration::from_secs(300),
            dedup_max_entries: 200_000,
        }
    }
}

impl SpoolSettings {
    /// The bounds of the `[spool]` keys, then the spool's own checks.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.max_bytes < self.segment_bytes {
            return invalid(format!(
                "spool.max_bytes ({}) is below spool.segment_bytes ({}): raise max_bytes or lower segment_bytes",
                self.max_bytes, self.segment_bytes
            ));
        }
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return invalid(format!(
                "spool.segment_bytes must be at least {MIN_SEGMENT_BYTES}"
            ));
        }
        // The spool's own invariants, checked where the spool checks them.
        SpoolConfig::from(self).validate().map_err(|e| match e {
            SpoolError::Config(message) => ConfigError::Invalid(message),
            other => ConfigError::Invalid(other.to_string()),
        })
    }
}

/// What the spool is opened with, from the `[spool]` keys.
impl From<&SpoolSettings> for SpoolConfig {
    fn from(s: &SpoolSettings) -> SpoolConfig {
        SpoolConfig {
            dir: s.dir.clone(),
            max_bytes: s.max_bytes,
            fsync: match s.fsync {
                FsyncPolicy::Always => FsyncMode::Always,
                FsyncPolicy::Interval => FsyncMode::Interval(s.fsync_interval),
                FsyncPolicy::Never => FsyncMode::Never,
            },
            segment_bytes: s.segment_bytes,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `timbridge=debug,rdkafka=warn`); `RUST_LOG` wins.
    pub level: String,
    /// Lines about rejected callbacks per second at most; the rest are
    /// counted and summarized, so a flood of bad requests cannot flood the log.
    pub rejections_per_second: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
            rejections_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Where other commands go (`http://` or `https://`); Tencent's query
    /// string is appended to it unchanged.
    pub url: String,
    /// The whole exchange with the upstream, connect to last byte. Tencent
    /// waits 2 s in all, so an answer later than that is worth nothing.
    #[serde(with = "humantime_serde", default = "UpstreamConfig::default_timeout")]
    pub timeout: Duration,
    /// Read receipts are also sent to the upstream, after they are spooled
    /// and answered, for apps that still want them.
    #[serde(default)]
    pub forward_read_receipts: bool,
    /// Proxied requests in flight at once; past it callbacks get 503, so a
    /// stuck app cannot pile up connections and memory here.
    #[serde(default = "UpstreamConfig::default_max_in_flight")]
    pub max_in_flight: usize,
    /// The largest answer body taken from the upstream; a larger one is a
    /// 502 (Tencent's answers are a few hundred bytes).
    #[serde(default = "UpstreamConfig::default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// With `forward_read_receipts`: read receipts waiting to be sent; when
    /// full, new ones are not forwarded (and counted).
    #[serde(default = "UpstreamConfig::default_forward_queue")]
    pub forward_queue: usize,
    /// With `forward_read_receipts`: the bytes (query, body and kept
    /// headers) of the read receipts queued or being delivered; past it,
    /// new ones are not forwarded (and counted). They are held outside the
    /// body-memory budget, so this is what bounds their memory.
    #[serde(default = "UpstreamConfig::default_forward_queue_bytes")]
    pub forward_queue_bytes: usize,
    /// The bytes of proxied callbacks' bodies waiting for the upstream at
    /// once; past it callbacks get 503. Held apart from
    /// `server.max_body_memory_bytes`, so a slow app cannot take the body
    /// memory read receipts need.
    #[serde(default = "UpstreamConfig::default_max_proxied_body_bytes")]
    pub max_proxied_body_bytes: usize,
    /// A PEM file of CA certificates to trust for an `https://` upstream
    /// instead of the built-in public roots (for a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl UpstreamConfig {
    fn default_timeout() -> Duration {
        Duration::from_millis(1500)
    }
    fn default_max_in_flight() -> usize {
        512
    }
    fn default_max_response_bytes() -> usize {
        64 * 1024
    }
    fn default_forward_queue() -> usize {
        10_000
    }
    fn default_forward_queue_bytes() -> usize {
        8 * 1024 * 1024
    }
    fn default_max_proxied_body_bytes() -> usize {
        4 * 1024 * 1024
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let uri: hyper::Uri = match self.url.parse() {
            Ok(u) => u,
            Err(e) => {
                return invalid(format!(
                    "upstream.url = {:?} is not a URL ({e}); write it like \"http://127.0.0.1:9000/im/callback\"",
                    self.url
                ));
            }
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return invalid(format!(
                "upstream.url = {:?} must start with http:// or https:// and name a host",
                self.url
            ));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return invalid(
                "upstream.url must not carry a user or password: they would end up in logs".into(),
            );
        }
        if uri.query().is_some() {
            return invalid(format!(
                "upstream.url = {:?} has a query string: remove it, Tencent's query string is appended as received",
                self.url
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_UPSTREAM_TIMEOUT {
            return invalid(
                "upstream.timeout must be above 0 and at most 60s (Tencent waits 2s)".into(),
            );
        }
        if self.max_in_flight == 0 {
            return invalid("upstream.max_in_flight must be above 0".into());
        }
        if self.max_response_bytes == 0 {
            return invalid("upstream.max_response_bytes must be above 0".into());
        }
        if self.forward_queue == 0 {
            return invalid("upstream.forward_queue must be above 0".into());
        }
        if self.max_proxied_body_bytes == 0
            || self.max_proxied_body_bytes > tokio::sync::Semaphore::MAX_PERMITS
        {
            return invalid(
                "upstream.max_proxied_body_bytes must be above 0 and fit a semaphore (the default is 4 MiB)"
                    .into(),
            );
        }
        if self.forward_queue_bytes == 0
            || self.forward_queue_bytes > tokio::sync::Semaphore::MAX_PERMITS
        {
            return invalid(
                "upstream.forward_queue_bytes must be above 0 and fit a semaphore (the default is 8 MiB)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `[read_state]`: where `timbridge materialize` writes the read state of
/// every message, and how its consumer group is named.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadStateConfig {
    /// The compacted state topic; created (compacted) if missing.
    pub topic: String,
    /// The consumer group all `materialize` processes of one fold share.
    pub group_id: String,
    /// Readers listed per message; beyond this `readers_truncated` is set,
    /// which bounds both a state record's size and its memory.
    pub max_readers: usize,
    /// `/metrics`, `/healthz` and `/readyz` of the materializer.
    pub listen: String,
    /// A message whose last read event is this much older (in event time)
    /// than the newest event of its partition is forgotten: its state
    /// leaves memory and a tombstone removes it from the state topic.
    #[serde(with = "humantime_serde")]
    pub evict_after: Duration,
    /// librdkafka properties for the materializer's consumer and producer,
    /// applied over `[kafka.properties]`.
    pub properties: BTreeMap<String, PropertyValue>,
}

impl Default for ReadStateConfig {
    fn default() -> Self {
        ReadStateConfig {
            topic: "tim.read_state".into(),
            group_id: "timbridge-read-state".into(),
            max_readers: 1000,
            listen: "127.0.0.1:9091".into(),
            evict_after: Duration::from_secs(30 * 24 * 3600),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source} (pass --config FILE or set TIMBRIDGE_CONFIG)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// An app with its token resolved (from the file or the environment).
#[derive(Clone)]
pub struct App {
    pub sdk_app_id: u64,
    pub token: Option<String>,
    /// The token being rotated out, also accepted while set.
    pub previous_token: Option<String>,
}

impl std::fmt::Debug for App {
    // Never print a token, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("sdk_app_id", &self.sdk_app_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "previous_token",
                &self.previous_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Config {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text. Errors name the key, line and
    /// column but never quote the file: the line may hold a token.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let parse_error = |message| ConfigError::Parse {
            path: PathBuf::new(),
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| parse_error(describe_toml_error(text, &e, None)))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            parse_error(describe_toml_error(text, e.inner(), Some(&key)))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_apps()?;
        self.server.validate()?;
        self.validate_tls_and_sources()?;
        self.kafka.validate()?;
        self.spool.validate()?;
        if let Some(upstream) = &self.upstream {
            upstream.validate()?;
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        self.validate_read_state()
    }

    fn validate_apps(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.apps.is_empty() {
            return invalid(
                "no [[apps]] configured: add one table per SdkAppid, e.g.\n[[apps]]\nsdk_app_id = 1400000000\ntoken = \"...\"".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            if !seen.insert(app.sdk_app_id) {
                return invalid(format!(
                    "apps[{i}].sdk_app_id {} appears twice: keep one table per SdkAppid",
                    app.sdk_app_id
                ));
            }
            if app.token.is_some() && app.token_env.is_some() {
                return invalid(format!(
                    "apps[{i}]: set either token or token_env, not both"
                ));
            }
            if app.previous_token.is_some() && app.previous_token_env.is_some() {
                return invalid(format!(
                    "apps[{i}]: set either previous_token or previous_token_env, not both"
                ));
            }
            for (key, value) in [
                ("token", &app.token),
                ("previous_token", &app.previous_token),
            ] {
                if let Some(t) = value
                    && (t.is_empty() || t.len() > MAX_TOKEN_LEN)
                {
                    return invalid(format!(
                        "apps[{i}].{key} must be 1 to 128 characters (Tencent's limit); remove the key to switch it off"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `server.tls_*` come as a pair, and the address ranges parse. The
    /// files themselves are read by `crate::tls` (check-config, start and
    /// each reload), not here: parsing text must not depend on the disk.
    fn validate_tls_and_sources(&self) -> Result<(), ConfigError> {
        match (&self.server.tls_cert_file, &self.server.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "server.tls_cert_file is set but server.tls_key_file is not: give both (PEM files), or neither for plain HTTP".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "server.tls_key_file is set but server.tls_cert_file is not: give both (PEM files), or neither for plain HTTP".into(),
                ));
            }
            _ => {}
        }
        crate::source::SourceRules::from_config(&self.server)
            .map(|_| ())
            .map_err(ConfigError::Invalid)
    }

    fn validate_read_state(&self) -> Result<(), ConfigError> {
        let rs = &self.read_state;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !valid_topic(&rs.topic) {
            return invalid(format!(
                "read_state.topic = {:?} is not a valid Kafka topic name (1 to 249 of [a-zA-Z0-9._-])",
                rs.topic
            ));
        }
        if rs.topic == self.kafka.group_topic || rs.topic == self.kafka.c2c_topic {
            return invalid(format!(
                "read_state.topic = {:?} is an input topic: give the state its own topic",
                rs.topic
            ));
        }
        if rs.group_id.trim().is_empty() {
            return invalid("read_state.group_id is empty: name the consumer group".into());
        }
        if rs.max_readers == 0 || rs.max_readers > MAX_READERS {
            return invalid(format!("read_state.max_readers must be 1 to {MAX_READERS}"));
        }
        if rs.listen.parse::<SocketAddr>().is_err() {
            return invalid(format!(
                "read_state.listen = {:?} is not an address like 127.0.0.1:9091",
                rs.listen
            ));
        }
        if rs.evict_after.is_zero() {
            return invalid("read_state.evict_after must be above 0, e.g. \"30days\"".into());
        }
        Ok(())
    }

    /// Resolves each app's token, reading `token_env` variables now so that a
    /// missing variable stops the start rather than the first callback.
    pub fn resolve_apps(&self) -> Result<Vec<App>, ConfigError> {
        self.apps
            .iter()
            .enumerate()
            .map(|(i, app)| {
                let token = resolve_token(i, "token", &app.token, &app.token_env)?;
                let previous_token = resolve_token(
                    i,
                    "previous_token",
                    &app.previous_token,
                    &app.previous_token_env,
                )?;
                if token.is_none() && previous_token.is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "apps[{i}] has a previous_token but no token: set the new token too, or remove previous_token"
                    )));
                }
                Ok(App {
                    sdk_app_id: app.sdk_app_id,
                    token,
                    previous_token,
                })
            })
            .collect()
    }

    /// The admin listener's address, when one is configured.
    pub fn admin_listen_addr(&self) -> Option<SocketAddr> {
        // validate() has checked it parses.
        self.server
            .admin_listen
            .as_deref()
            .and_then(|a| a.parse().ok())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // validate() has checked it parses.
        self.server
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The effective configuration as TOML with secrets replaced, for
    /// `check-config` and the startup log.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for app in &mut copy.apps {
            if app.token.is_some() {
                app.token = Some(REDACTED.into());
            }
            if app.previous_token.is_some() {
                app.previous_token = Some(REDACTED.into());
            }
        }
        for (key, value) in copy
            .kafka
            .properties
            .iter_mut()
            .chain(copy.read_state.properties.iter_mut())
        {
            if is_secret_property(key) {
                *value = PropertyValue::String(REDACTED.into());
            }
        }
        toml::to_string(&copy).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

const REDACTED: &str = "<redacted>";

/// Tencent's limit on a callback token's length.
const MAX_TOKEN_LEN: usize = 128;

/// A token from the file (`key`) or the environment (`{key}_env`). An
/// environment variable is read from the process's own environment, which
/// a reload cannot change: such a token changes with a restart only.
fn resolve_token(
    i: usize,
    key: &str,
    inline: &Option<String>,
    env: &Option<String>,
) -> Result<Option<String>, ConfigError> {
    if let Some(t) = inline {
        return Ok(Some(t.clone()));
    }
    let Some(var) = env else {
        return Ok(None);
    };
    match std::env::var(var) {
        // A token read from a secret file usually ends in a newline, which
        // would make every Sign mismatch.
        Ok(t) if !t.trim().is_empty() => {
            let t = t.trim();
            if t.len() > MAX_TOKEN_LEN {
                return Err(ConfigError::Invalid(format!(
                    "apps[{i}].{key}_env: the value of {var} is {} characters; a token is 1 to {MAX_TOKEN_LEN} (Tencent's limit): check the variable",
                    t.chars().count()
                )));
            }
            Ok(Some(t.to_owned()))
        }
        _ => Err(ConfigError::Invalid(format!(
            "apps[{i}].{key}_env names {var}, which is not set or empty: export it, or use {key}"
        ))),
    }
}

impl Config {
    /// Replaces every secret this config holds (tokens in the file, values
    /// of secret-looking Kafka properties) found in `text`, for errors that
    /// come from libraries which may quote them (librdkafka does).
    pub fn scrub_secrets(&self, text: &str) -> String {
        let secrets = self
            .apps
            .iter()
            .flat_map(|a| [a.token.clone(), a.previous_token.clone()])
            .flatten()
            .chain(
                self.kafka
                    .properties
                    .iter()
                    .filter(|(k, _)| is_secret_property(k))
                    .map(|(_, v)| v.to_string()),
            )
            .filter(|s| !s.is_empty());
        let mut out = text.to_owned();
        for s in secrets {
            out = out.replace(&s, REDACTED);
        }
        out
    }
}

/// librdkafka properties that carry secrets (SASL passwords and OAuth
/// configs, TLS keys and keystores, JAAS configs), matched loosely so that a
/// misspelt one (`sasl.pasword`) is treated as secret too.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "pass",
        "pasw",
        "pwd",
        "secret",
        "token",
        "jaas",
        "oauthbearer.config",
        "credential",
        "private",
        "key.pem",
        "ssl.key",
        "keystore",
    ]
    .iter()
    .any(|s| k.contains(s))
        && !matches!(k.as_str(), "ssl.key.location" | "ssl.keystore.location")
}

/// A TOML error as "key `apps[0].token` (line 3, column 9): invalid type:
/// integer, expected a string". toml's own Display quotes the source line
/// and serde's messages quote the offending value, either of which may be
/// a secret; this keeps only the key, the position and the message with
/// every quoted value taken out.
fn describe_toml_error(text: &str, e: &toml::de::Error, key: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(k) = key.filter(|k| !k.is_empty() && *k != ".") {
        out.push_str(&format!("key `{k}` "));
    }
    let span = e.span();
    if let Some(span) = &span {
        let (line, column) = line_column(text, span.start);
        out.push_str(&format!("(line {line}, column {column}): "));
    } else if !out.is_empty() {
        out.push_str(": ");
    }
    let value = span
        .and_then(|s| text.get(s))
        .map(|v| v.trim().trim_matches(['"', '\'']).trim())
        .filter(|v| !v.is_empty());
    out.push_str(&scrub_message(e.message(), value));
    out
}

/// 1-based line and column (in characters) of byte `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Takes the user's values out of a serde/toml message. What follows
/// ", expected" is ours (type and key names) and kept; before it, quoted
/// text is the user's, kept only where it is a key name ("unknown field
/// `tokn`"). Any remaining copy of the offending text goes too.
fn scrub_message(message: &str, offending: Option<&str>) -> String {
    let first_line = message.lines().next().unwrap_or("").trim();
    let (head, tail) = match first_line.find(", expected ") {
        Some(i) => first_line.split_at(i),
        None => (first_line, ""),
    };
    let names_a_key = [
        "unknown field",
        "missing field",
        "duplicate field",
        "duplicate key",
    ]
    .iter()
    .any(|p| head.starts_with(p));
    let mut scrubbed = String::with_capacity(first_line.len());
    let mut rest = head;
    let mut quoted_seen = 0;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('`');
        let Some(len) = rest[open + 1..].find(quote) else {
            // An unclosed quote: what follows may be the value.
            scrubbed.push_str(&rest[..open]);
            rest = " (value not shown)";
            break;
        };
        let close = open + 1 + len;
        scrubbed.push_str(&rest[..open]);
        if names_a_key && quoted_seen == 0 {
            scrubbed.push_str(&rest[open..=close]);
        } else {
            scrubbed.push_str("(value not shown)");
        }
        quoted_seen += 1;
        rest = &rest[close + 1..];
    }
    scrubbed.push_str(rest);
    // A copy of the value outside quotes (a custom message). Short values
    // are left alone: replacing "a" would shred the message, and the
    // quoted copies, where serde puts values, are gone already.
    if let Some(v) = offending.filter(|v| !names_a_key && v.len() >= 4) {
        scrubbed = scrubbed.replace(v, "(value not shown)");
    }
    scrubbed.push_str(tail);
    scrubbed
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Durations in the file read like `"5s"`, `"200ms"`, `"5m"`.
mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write it like 5s or 200ms, in quotes"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[apps]]\nsdk_app_id = 1400000000\n";

    #[test]
    fn defaults_apply_where_keys_are_missing() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.callback_path, "/callback");
        assert_eq!(c.server.max_body_bytes, 1048576);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.group_topic, "tim.group.read_receipts");
        assert_eq!(c.kafka.c2c_topic, "tim.c2c.read_receipts");
        assert_eq!(c.kafka.raw_topic, None);
        assert_eq!(c.spool.dir, PathBuf::from("data/spool"));
        assert_eq!(c.spool.max_bytes, 1073741824);
        assert_eq!(c.spool.fsync, FsyncPolicy::Interval);
    }

    #[test]
    fn unknown_keys_are_rejected_naming_the_key() {
        let err = Config::parse("[server]\nmax_body_byte = 5\n[[apps]]\nsdk_app_id = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_body_byte"), "{err}");
        let err = Config::parse("[[apps]]\nsdk_app_id = 1\ntokn = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokn"), "{err}");
        let err = Config::parse("[kafak]\n[[apps]]\nsdk_app_id = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafak"), "{err}");
    }

    #[test]
    fn wrong_values_name_the_key() {
        let err = Config::parse("[spool]\nfsync = \"sometimes\"\n[[apps]]\nsdk_app_id = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fsync") || err.contains("sometimes"), "{err}");
        let err = Config::parse("[server]\nlisten = \"nowhere\"\n[[apps]]\nsdk_app_id = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
        let err =
            Config::parse("[server]\nshutdown_timeout = \"soon\"\n[[apps]]\nsdk_app_id = 1\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("shutdown_timeout"), "{err}");
        let err = Config::parse("").unwrap_err().to_string();
        assert!(err.contains("[[apps]]"), "{err}");
    }

    #[test]
    fn token_env_is_read_and_a_missing_variable_is_an_error() {
        let text = "[[apps]]\nsdk_app_id = 1\ntoken_env = \"TIMBRIDGE_TEST_TOKEN_XYZ\"\n";
        let c = Config::parse(text).unwrap();
        let err = format!("{}", c.resolve_apps().unwrap_err());
        assert!(err.contains("TIMBRIDGE_TEST_TOKEN_XYZ"), "{err}");
        // SAFETY: no other test reads this variable.
        unsafe { std::env::set_var("TIMBRIDGE_TEST_TOKEN_XYZ", "s3cret") };
        let apps = c.resolve_apps().unwrap();
        assert_eq!(apps[0].token.as_deref(), Some("s3cret"));
        assert!(!format!("{apps:?}").contains("s3cret"));
    }

    #[test]
    fn token_env_values_are_trimmed_and_length_checked() {
        let text = "[[apps]]\nsdk_app_id = 1\ntoken_env = \"TIMBRIDGE_TEST_TOKEN_NL\"\n";
        let c = Config::parse(text).unwrap();
        // SAFETY: no other test reads this variable.
        unsafe { std::env::set_var("TIMBRIDGE_TEST_TOKEN_NL", "from-a-file\n") };
        assert_eq!(
            c.resolve_apps().unwrap()[0].token.as_deref(),
            Some("from-a-file")
        );
        unsafe { std::env::set_var("TIMBRIDGE_TEST_TOKEN_NL", "x".repeat(200)) };
        let err = c.resolve_apps().unwrap_err().to_string();
        assert!(err.contains("1 to 128"), "{err}");
        assert!(!err.contains("xxxx"), "{err}");
        unsafe { std::env::set_var("TIMBRIDGE_TEST_TOKEN_NL", " \n") };
        assert!(c.resolve_apps().is_err());
    }

    #[test]
    fn secret_properties_are_recognised_even_misspelt() {
        for k in [
            "sasl.password",
            "sasl.pasword",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.jaas.config",
        ] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["linger.ms", "sasl.username", "ssl.key.location", "acks"] {
            assert!(!is_secret_property(k), "{k}");
        }
    }

    #[test]
    fn parse_errors_name_key_line_and_column_but_no_value() {
        let err = Config::parse("[[apps]]\nsdk_app_id = 1\ntoken = 12345678\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("apps[0].token"), "{err}");
        assert!(err.contains("line 3, column 9"), "{err}");
        assert!(err.contains("expected a string"), "{err}");
        assert!(!err.contains("12345678"), "{err}");
        let err = Config::parse("[spool]\nfsync = \"hunter2\"\n[[apps]]\nsdk_app_id = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spool.fsync") && err.contains("`always`"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn unknown_kafka_properties_are_refused_by_name() {
        let err = Config::parse(
            "[[apps]]\nsdk_app_id = 1\n[kafka.properties]\n\"sasl.pasword\" = \"hunter2\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"sasl.pasword\" is not a librdkafka property"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn scrub_secrets_removes_tokens_and_secret_property_values() {
        let c = Config::parse(
            "[[apps]]\nsdk_app_id = 1\ntoken = \"tok-1\"\n[kafka.properties]\n\"sasl.password\" = \"pw-2\"\n",
        )
        .unwrap();
        let out = c.scrub_secrets("error: tok-1 and pw-2 and linger");
        assert_eq!(out, "error: <redacted> and <redacted> and linger");
    }

    #[test]
    fn upstream_defaults_apply_and_bad_urls_are_refused_naming_the_key() {
        let c = Config::parse(&format!(
            "{MINIMAL}[upstream]\nurl = \"https://app.internal:9443/im/callback\"\n"
        ))
        .unwrap();
        let up = c.upstream.unwrap();
        assert_eq!(up.timeout, Duration::from_millis(1500));
        assert!(!up.forward_read_receipts);
        assert_eq!(up.max_in_flight, 512);
        assert_eq!(up.max_response_bytes, 65536);
        assert!(Config::parse(MINIMAL).unwrap().upstream.is_none());
        for (url, says) in [
            ("127.0.0.1:9000/im", "http://"),
            ("ftp://app/im", "http://"),
            ("http://app/im?SdkAppid=1", "query string"),
            ("http://user:pw@app/im", "user or password"),
            ("not a url", "not a URL"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}[upstream]\nurl = \"{url}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("upstream.url") && err.contains(says),
                "{url}: {err}"
            );
        }
        let err = Config::parse(&format!(
            "{MINIMAL}[upstream]\nurl = \"http://app/im\"\ntimeout = \"0s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream.timeout"), "{err}");
        let err = Config::parse(&format!("{MINIMAL}[upstream]\ntimeout = \"1s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("url"), "{err}");
    }

    #[test]
    fn redacted_output_hides_tokens_and_secret_properties() {
        let text = "[[apps]]\nsdk_app_id = 1\ntoken = \"hunter2\"\n[kafka.properties]\n\"sasl.password\" = \"pw123\"\n\"linger.ms\" = 5\n";
        let c = Config::parse(text).unwrap();
        let out = c.redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("pw123"), "{out}");
        assert!(out.contains("linger.ms"), "{out}");
        // The output is itself a valid config.
        Config::parse(&out).unwrap();
    }
}
