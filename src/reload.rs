//! SIGHUP: the config file read again and applied without a restart.
//!
//! Operators rotate tokens, add apps and renew certificates while callbacks
//! keep coming; during a restart every callback is lost (Tencent does not
//! retry). What a callback consults on every request (the apps and their
//! tokens, the source rules, the certificate, the log level and rate) is
//! held as a snapshot behind an `Arc` and replaced whole: a callback takes
//! it once when its request arrives and finishes with it, the next one sees
//! the new one, no connection is closed, and nothing waits on a lock longer
//! than a pointer copy. The rest (listeners, spool,
//! brokers, topics, limits, upstream) is built into running tasks: a change
//! there is named in a "needs a restart" line and left as it is.
//!
//! A reload applies all of its live changes or none: everything that can
//! fail (the file, the tokens from the environment, the certificate, the
//! log filter) is prepared first, and only then swapped in.
//! `timbridge_config_last_reload_successful` says whether the last attempt
//! worked, as Prometheus's own does, so an alert catches a bad file before
//! the next restart trips over it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use prometheus::{IntCounter, IntCounterVec};
use rustls::sign::CertifiedKey;

use crate::config::{App, Config, ConfigError};
use crate::intake::Intake;
use crate::labels::ReloadResult;
use crate::metrics::Metrics;
use crate::source::SourceRules;
use crate::tencent::auth::TokenMatch;
use crate::tls::CertStore;

/// A value read on every request and replaced whole: readers clone the
/// `Arc` under a read lock held for that instant only. (A lock-free
/// `ArcSwap` would save those few nanoseconds; not worth a dependency.)
pub struct Swap<T> {
    inner: RwLock<Arc<T>>,
}

impl<T> Swap<T> {
    pub fn new(value: T) -> Swap<T> {
        Swap {
            inner: RwLock::new(Arc::new(value)),
        }
    }

    /// The current value; it stays valid for the holder whatever is stored later.
    pub fn load(&self) -> Arc<T> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, value: T) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// What a callback looks up on every request, swapped whole by a reload.
#[derive(Debug)]
pub struct Live {
    pub apps: HashMap<u64, App>,
    pub sources: SourceRules,
    /// Each app's `timbridge_auth_token_matches_total` series, looked up
    /// once per reload rather than by label strings on every request.
    token_matches: HashMap<u64, [Option<IntCounter>; 2]>,
}

impl Live {
    /// `config` is taken as validated; source rules that do not parse
    /// (which validation rules out) refuse everyone rather than no one.
    pub fn new(config: &Config, apps: Vec<App>) -> Live {
        Live {
            apps: apps.into_iter().map(|a| (a.sdk_app_id, a)).collect(),
            sources: SourceRules::from_config(&config.server)
                .unwrap_or_else(|_| SourceRules::deny_all()),
            token_matches: HashMap::new(),
        }
    }

    /// Counts a Sign that matched `app`'s `token` (its series were declared).
    pub fn count_match(&self, app: u64, token: TokenMatch) {
        let slot = match token {
            TokenMatch::Current => 0,
            TokenMatch::Previous => 1,
        };
        if let Some(Some(c)) = self.token_matches.get(&app).map(|s| &s[slot]) {
            c.inc();
        }
    }

    /// Every series of `timbridge_auth_token_matches_total` these apps can
    /// produce exists from now on, at zero, so that `rate()` sees the first
    /// match. One or two per app with a token: bounded by the config.
    pub fn declare_token_series(&mut self, counter: &IntCounterVec) {
        for app in self.apps.values().filter(|a| a.token.is_some()) {
            let id = app.sdk_app_id.to_string();
            let series = |t: TokenMatch| counter.with_label_values(&[&id, t.label()]);
            let previous = app
                .previous_token
                .as_ref()
                .map(|_| series(TokenMatch::Previous));
            self.token_matches.insert(
                app.sdk_app_id,
                [Some(series(TokenMatch::Current)), previous],
            );
        }
    }

    /// Removes the series `old` declared that these apps no longer have
    /// (an app, its token or its previous token gone), so the series stay
    /// bounded by the config in force, not by every config since the start.
    pub fn retire_token_series(&self, old: &Live, counter: &IntCounterVec) {
        let now = self.token_series();
        for (id, token) in old.token_series() {
            if !now.contains(&(id.clone(), token)) {
                let _ = counter.remove_label_values(&[&id, token]);
            }
        }
    }

    /// The `{sdk_app_id, token}` pairs these apps can match.
    fn token_series(&self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        for app in self.apps.values().filter(|a| a.token.is_some()) {
            let id = app.sdk_app_id.to_string();
            if app.previous_token.is_some() {
                out.push((id.clone(), TokenMatch::Previous.label()));
            }
            out.push((id, TokenMatch::Current.label()));
        }
        out
    }
}

fn warn_on_validity(config: &Config, cert: &CertifiedKey) {
    let now = std::time::SystemTime::now();
    if let Some(w) = crate::tls::validity_warning(&config.server, cert, now) {
        tracing::warn!("{w}");
    }
}

/// Applies reloaded configurations to a running gateway.
pub struct Reloader {
    intake: Arc<Intake>,
    certs: Option<Arc<CertStore>>,
    /// The configuration in force, to compare the restart-only settings with.
    current: Mutex<Config>,
    metrics: Arc<Metrics>,
}

/// What a reload would swap in, everything that can fail done already.
struct Prepared {
    live: Live,
    cert: Option<CertifiedKey>,
}

impl Reloader {
    /// For the gateway started on `config`, with `certs` when it serves TLS.
    pub fn new(
        config: Config,
        intake: Arc<Intake>,
        certs: Option<Arc<CertStore>>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        metrics.config_last_reload_successful.set(1);
        // The start's rules and certificate get the same scrutiny as a reload's.
        for w in intake.live().sources.warnings() {
            tracing::warn!("doubtful source rule: {w}");
        }
        if let Some(store) = &certs {
            warn_on_validity(&config, &store.current());
        }
        Reloader {
            intake,
            certs,
            current: Mutex::new(config),
            metrics,
        }
    }

    fn count(&self, result: ReloadResult) {
        self.metrics.config_reloads.get(result).inc();
        self.metrics
            .config_last_reload_successful
            .set(i64::from(result == ReloadResult::Success));
    }

    /// Applies `loaded` (the file read again, with the flags and environment
    /// of the start applied the same way), or on error changes nothing.
    /// Logs the result and counts it; returns the settings that changed but
    /// need a restart.
    pub fn apply(&self, loaded: Result<Config, ConfigError>) -> Result<Vec<String>, String> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = loaded
            .map_err(|e| e.to_string())
            .and_then(|new| self.prepare(&current, &new).map(|p| (new, p)));
        let (new, prepared) = match outcome {
            Ok(ready) => ready,
            Err(e) => {
                self.count(ReloadResult::Error);
                tracing::error!(
                    "configuration reload refused, the running configuration is unchanged: {e}"
                );
                return Err(e);
            }
        };
        let restart = restart_only_changes(&current, &new);
        for w in prepared.live.sources.warnings() {
            tracing::warn!("configuration reloaded with a doubtful source rule: {w}");
        }
        if let Some(cert) = &prepared.cert {
            warn_on_validity(&new, cert);
        }
        self.swap_in(&current, &new, prepared);
        self.count(ReloadResult::Success);
        let apps = new.apps.len();
        if restart.is_empty() {
            tracing::info!(apps, "configuration reloaded");
        } else {
            tracing::warn!(
                apps,
                "configuration reloaded; changed settings that need a restart were left as they were: {}",
                restart.join(", ")
            );
        }
        // The restart-only settings stay those of the start.
        let mut kept = current.clone();
        kept.apps = new.apps;
        kept.log.level = new.log.level;
        kept.log.rejections_per_second = new.log.rejections_per_second;
        let server = &mut kept.server;
        server.allow_from = new.server.allow_from;
        server.trusted_proxies = new.server.trusted_proxies;
        if server.tls_cert_file.is_some() == new.server.tls_cert_file.is_some() {
            server.tls_cert_file = new.server.tls_cert_file;
            server.tls_key_file = new.server.tls_key_file;
        }
        *current = kept;
        Ok(restart)
    }

    /// Everything that can fail, before anything is changed.
    fn prepare(&self, current: &Config, new: &Config) -> Result<Prepared, String> {
        let apps = new.resolve_apps().map_err(|e| e.to_string())?;
        crate::logging::check_level(&new.log.level)?;
        // Checked even when TLS is being switched on, which needs a restart
        // (the listener is built either way): a broken pair is named now, not
        // at that restart. Only a new pair for a TLS listener is taken now.
        let cert = crate::tls::load(&new.server)?
            .filter(|_| self.certs.is_some() && current.server.tls_cert_file.is_some());
        Ok(Prepared {
            live: Live::new(new, apps),
            cert,
        })
    }

    /// Swaps the prepared values in; nothing here fails.
    fn swap_in(&self, current: &Config, new: &Config, prepared: Prepared) {
        self.intake.replace_live(prepared.live);
        if let (Some(store), Some(cert)) = (&self.certs, prepared.cert) {
            store.replace(cert);
        }
        if new.log.rejections_per_second != current.log.rejections_per_second {
            self.intake
                .set_rejection_log_rate(new.log.rejections_per_second);
        }
        if new.log.level != current.log.level && !crate::logging::set_level(&new.log.level) {
            tracing::warn!(
                "log.level changed but RUST_LOG is set and wins: unset RUST_LOG to use log.level"
            );
        }
    }
}

/// The dotted keys whose values differ between `old` and `new` among the
/// settings a reload does not apply. Values are never shown: some are secrets.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let (Some(old), Some(new)) = (restart_only(old), restart_only(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    diff("", &old, &new, &mut out);
    out
}

/// `config` as TOML with the live settings blanked out.
fn restart_only(config: &Config) -> Option<toml::Value> {
    let mut c = config.clone();
    c.apps.clear();
    c.log.level.clear();
    c.log.rejections_per_second = 0;
    c.server.allow_from = None;
    c.server.trusted_proxies.clear();
    // Which files is live; whether there are any (TLS on or off) is not.
    let tls = c.server.tls_cert_file.is_some();
    c.server.tls_cert_file = tls.then(|| "on".into());
    c.server.tls_key_file = tls.then(|| "on".into());
    // The gateway does not use it (`timbridge materialize` does).
    c.read_state = Default::default();
    let text = toml::to_string(&c).ok()?;
    text.parse::<toml::Table>().ok().map(toml::Value::Table)
}

fn diff(prefix: &str, old: &toml::Value, new: &toml::Value, out: &mut Vec<String>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (old, new) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&key(k), x, y, out),
                    _ => out.push(key(k)),
                }
            }
        }
        (a, b) if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// The SIGHUP stream, registered before the gateway says it listens: the
/// default action of SIGHUP is to exit, so one sent in between would stop it.
#[cfg(unix)]
pub fn hangup_signal() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Reloads on every SIGHUP with `load` (the file read again with the
/// start's flags and environment), for as long as the gateway runs.
#[cfg(unix)]
pub async fn on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    load: impl Fn() -> Result<Config, ConfigError> + Send + 'static,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        // A few small files: read in place, briefly.
        let _ = reloader.apply(load());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[[apps]]\nsdk_app_id = 1\ntoken = \"a\"\n[kafka]\nbrokers = \"k:9092\"\n";

    #[test]
    fn only_restart_only_keys_are_named_and_never_their_values() {
        let old = Config::parse(BASE).unwrap();
        let live = Config::parse(&format!(
            "{BASE}[[apps]]\nsdk_app_id = 2\n[log]\nlevel = \"debug\"\nrejections_per_second = 3\n"
        ))
        .unwrap();
        assert!(restart_only_changes(&old, &live).is_empty());
        let text = BASE.replace("k:9092", "other:9092")
            + "[server]\nlisten = \"0.0.0.0:1\"\nallow_from = [\"10.0.0.0/8\"]\n[kafka.properties]\n\"sasl.password\" = \"pw-secret\"\n";
        let changed = restart_only_changes(&old, &Config::parse(&text).unwrap());
        assert_eq!(
            changed,
            [
                "kafka.brokers",
                "kafka.properties.sasl.password",
                "server.listen"
            ],
            "{changed:?}"
        );
        assert!(!changed.concat().contains("pw-secret"));
    }

    #[test]
    fn tls_on_or_off_needs_a_restart_but_other_files_do_not() {
        let tls = |c: &str, k: &str| {
            Config::parse(&format!(
                "[server]\ntls_cert_file = \"{c}\"\ntls_key_file = \"{k}\"\n{BASE}"
            ))
            .unwrap()
        };
        let plain = Config::parse(BASE).unwrap();
        assert!(restart_only_changes(&tls("a.crt", "a.key"), &tls("b.crt", "b.key")).is_empty());
        assert_eq!(
            restart_only_changes(&plain, &tls("a.crt", "a.key")),
            ["server.tls_cert_file", "server.tls_key_file"]
        );
    }

    #[test]
    fn series_of_removed_apps_and_tokens_go_away_on_reload() {
        let counter =
            IntCounterVec::new(prometheus::Opts::new("t", "t"), &["sdk_app_id", "token"]).unwrap();
        let live = |text: &str| {
            let c = Config::parse(text).unwrap();
            let apps = c.resolve_apps().unwrap();
            Live::new(&c, apps)
        };
        let mut old = live(&format!(
            "{BASE}[[apps]]\nsdk_app_id = 2\ntoken = \"b\"\nprevious_token = \"p\"\n"
        ));
        old.declare_token_series(&counter);
        counter.with_label_values(&["1", "current"]).inc();
        let series = |c: &IntCounterVec| {
            let mut s: Vec<String> = prometheus::core::Collector::collect(c)[0]
                .get_metric()
                .iter()
                .map(|m| {
                    let l = m.get_label();
                    format!("{}/{}", l[0].value(), l[1].value())
                })
                .collect();
            s.sort();
            s
        };
        assert_eq!(series(&counter), ["1/current", "2/current", "2/previous"]);
        // App 2 keeps its token but drops the previous one; app 1 is gone.
        let mut new =
            live("[[apps]]\nsdk_app_id = 2\ntoken = \"b\"\n[kafka]\nbrokers = \"k:9092\"\n");
        new.declare_token_series(&counter);
        new.retire_token_series(&old, &counter);
        assert_eq!(series(&counter), ["2/current"]);
    }

    #[test]
    fn a_snapshot_taken_stays_whole_while_another_is_stored() {
        let swap = Swap::new(vec![1, 2]);
        let before = swap.load();
        swap.store(vec![3]);
        assert_eq!(*before, vec![1, 2]);
        assert_eq!(*swap.load(), vec![3]);
    }
}
