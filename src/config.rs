//! The configuration file (`config.toml`), its defaults and its validation.
//!
//! The file is the contract's section 2. Unknown keys are an error rather than
//! silently ignored: a misspelt `max_byte` that quietly falls back to a default
//! is how a spool fills a disk. Every error names the key and says what to do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the Kafka brokers are, or `embedded` for the in-process mock cluster.
pub const EMBEDDED_BROKERS: &str = "embedded";

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
    /// How much one callback may ask for; see `crate::limits`.
    #[serde(default)]
    pub limits: crate::limits::Limits,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The address callbacks, /metrics and /healthz share.
    pub listen: String,
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
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            callback_path: "/callback".into(),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 4096,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(10),
        }
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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_topic: String,
    pub c2c_topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_topic: Option<String>,
    /// Records Kafka will never take (too large, not authorized, no such
    /// topic) are written here as well as to the spool's dead-letter file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
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
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    pub fn is_embedded(&self) -> bool {
        self.brokers == EMBEDDED_BROKERS
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
    /// callback does not double the stream.
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
}

impl std::fmt::Debug for App {
    // Never print a token, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("sdk_app_id", &self.sdk_app_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
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

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
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
            if let Some(t) = &app.token
                && (t.is_empty() || t.len() > 128)
            {
                return invalid(format!(
                    "apps[{i}].token must be 1 to 128 characters (Tencent's limit); remove the key to switch authentication off"
                ));
            }
        }
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return invalid(format!(
                "server.listen = {:?} is not an address like 127.0.0.1:8080 or [::1]:8080",
                self.server.listen
            ));
        }
        if !self.server.callback_path.starts_with('/') {
            return invalid(format!(
                "server.callback_path = {:?} must start with '/'",
                self.server.callback_path
            ));
        }
        for reserved in ["/metrics", "/healthz", "/readyz"] {
            if self.server.callback_path == reserved {
                return invalid(format!(
                    "server.callback_path cannot be {reserved}: that route is taken"
                ));
            }
        }
        // A raw forward spools the whole body as one record.
        const MAX_BODY: usize = crate::spool::MAX_RECORD_LEN / 2;
        if self.server.max_body_bytes == 0 || self.server.max_body_bytes > MAX_BODY {
            return invalid(format!(
                "server.max_body_bytes must be 1 to {MAX_BODY} (Tencent's callbacks are at most a few tens of KB)"
            ));
        }
        if self.server.max_connections == 0 {
            return invalid("server.max_connections must be above 0".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return invalid(
                "kafka.brokers is empty: give host:port[,host:port] or \"embedded\"".into(),
            );
        }
        for (key, topic) in [
            ("kafka.group_topic", Some(&self.kafka.group_topic)),
            ("kafka.c2c_topic", Some(&self.kafka.c2c_topic)),
            ("kafka.raw_topic", self.kafka.raw_topic.as_ref()),
            (
                "kafka.dead_letter_topic",
                self.kafka.dead_letter_topic.as_ref(),
            ),
        ] {
            if let Some(t) = topic
                && !valid_topic(t)
            {
                return invalid(format!(
                    "{key} = {t:?} is not a valid Kafka topic name (1 to 249 of [a-zA-Z0-9._-])"
                ));
            }
        }
        if self.spool.max_bytes < self.spool.segment_bytes {
            return invalid(format!(
                "spool.max_bytes ({}) is below spool.segment_bytes ({}): raise max_bytes or lower segment_bytes",
                self.spool.max_bytes, self.spool.segment_bytes
            ));
        }
        if self.spool.segment_bytes < 4096 {
            return invalid("spool.segment_bytes must be at least 4096".into());
        }
        if self.spool.fsync_interval.is_zero() {
            return invalid("spool.fsync_interval must be above 0".into());
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// Resolves each app's token, reading `token_env` variables now so that a
    /// missing variable stops the start rather than the first callback.
    pub fn resolve_apps(&self) -> Result<Vec<App>, ConfigError> {
        self.apps
            .iter()
            .enumerate()
            .map(|(i, app)| {
                let token = match (&app.token, &app.token_env) {
                    (Some(t), _) => Some(t.clone()),
                    (None, Some(var)) => match std::env::var(var) {
                        Ok(t) if !t.is_empty() => Some(t),
                        _ => {
                            return Err(ConfigError::Invalid(format!(
                                "apps[{i}].token_env names {var}, which is not set or empty: export it, or use token"
                            )));
                        }
                    },
                    (None, None) => None,
                };
                Ok(App {
                    sdk_app_id: app.sdk_app_id,
                    token,
                })
            })
            .collect()
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
        }
        for (key, value) in copy.kafka.properties.iter_mut() {
            if is_secret_property(key) {
                *value = PropertyValue::String(REDACTED.into());
            }
        }
        toml::to_string(&copy).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

const REDACTED: &str = "<redacted>";

/// librdkafka properties that carry secrets (SASL passwords, TLS keys).
fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key.pem", "ssl.key", "token", "jaas"]
        .iter()
        .any(|s| k.contains(s))
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
                "{text:?} is not a duration ({e}); write it like \"5s\" or \"200ms\""
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
