//! The effective configuration: the file with the command line and the
//! environment applied, which is what `serve` runs with and what
//! `check-config` shows.
//!
//! `check-config` used to print the file alone: with `TIMBRIDGE_BROKERS`
//! set it said `brokers = "embedded"` while `serve` used the variable. Both
//! now build the config here, and `check-config` marks each value that does
//! not come from the file with where it came from.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Where an overriding value came from: a flag or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(name) => write!(f, "the {name} flag"),
            Source::Env(name) => write!(f, "the environment ({name})"),
        }
    }
}

/// Values given outside the file, each with its source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<(String, Source)>,
    pub brokers: Option<(String, Source)>,
    pub require_topics: Option<Source>,
}

/// One key whose value does not come from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The TOML table holding it, e.g. `kafka`.
    pub table: &'static str,
    pub key: &'static str,
    pub source: Source,
    /// The value the file had (or the default it leaves), as TOML.
    pub file_value: String,
}

impl Overrides {
    /// Reads the config file, applies the overrides and validates the
    /// result once, so that a value the file leaves out or empty (the
    /// container config's brokers) may come from a flag or the environment.
    pub fn load(&self, path: &Path) -> Result<(Config, Vec<Applied>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.apply_to_text(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// The config in `text` with the overrides applied and validated.
    pub fn apply_to_text(&self, text: &str) -> Result<(Config, Vec<Applied>), ConfigError> {
        // Not a TOML table at all: the plain parse gives the usual error.
        let Ok(mut doc) = text.parse::<toml::Table>() else {
            return Config::parse(text).map(|c| (c, Vec::new()));
        };
        let mut applied = Vec::new();
        let defaults = (
            crate::config::ServerConfig::default().listen,
            crate::config::KafkaConfig::default().brokers,
        );
        let mut set = |table: &'static str,
                       key: &'static str,
                       value: toml::Value,
                       source: &Source,
                       default: toml::Value| {
            let t = doc
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = t {
                let before = t.insert(key.to_owned(), value).unwrap_or(default);
                applied.push(Applied {
                    table,
                    key,
                    source: source.clone(),
                    file_value: before.to_string(),
                });
            }
        };
        if let Some((listen, source)) = &self.listen {
            set(
                "server",
                "listen",
                listen.clone().into(),
                source,
                defaults.0.into(),
            );
        }
        if let Some((brokers, source)) = &self.brokers {
            set(
                "kafka",
                "brokers",
                brokers.clone().into(),
                source,
                defaults.1.into(),
            );
        }
        if let Some(source) = &self.require_topics {
            set("kafka", "require_topics", true.into(), source, false.into());
        }
        let brokers_empty = doc
            .get("kafka")
            .and_then(|k| k.get("brokers"))
            .and_then(|b| b.as_str())
            .is_some_and(|b| b.trim().is_empty());
        if brokers_empty {
            // The container config leaves brokers empty on purpose: a pod
            // that starts without being told where Kafka is must not look
            // healthy while it delivers nothing.
            return Err(ConfigError::Invalid(
                "kafka.brokers is empty and neither TIMBRIDGE_BROKERS nor --brokers is set: \
                 set TIMBRIDGE_BROKERS to your bootstrap servers (host:port[,host:port])"
                    .into(),
            ));
        }
        let text = toml::to_string(&doc)
            .map_err(|e| ConfigError::Invalid(format!("cannot apply the overrides: {e}")))?;
        let cfg = Config::parse(&text).map_err(|e| match e {
            // Name the source of an overridden value the error is about.
            ConfigError::Invalid(mut m) => {
                for a in &applied {
                    if m.contains(&format!("{}.{}", a.table, a.key)) {
                        m.push_str(&format!(" (given by {})", a.source));
                    }
                }
                ConfigError::Invalid(m)
            }
            other => other,
        })?;
        Ok((cfg, applied))
    }
}

/// The effective config as TOML, secrets redacted, each overridden value
/// followed by a comment saying where it came from and what the file said.
pub fn render(cfg: &Config, file: &Path, file_source: &str, applied: &[Applied]) -> String {
    let mut out = format!(
        "# The effective configuration: {} (from {file_source}),\n\
         # with flags and environment applied; secrets are shown as <redacted>.\n",
        file.display()
    );
    if applied.is_empty() {
        out.push_str("# No value is overridden by a flag or the environment.\n");
    }
    let mut table = String::new();
    for line in cfg.redacted_toml().lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed.trim_matches(|c| c == '[' || c == ']').to_owned();
        }
        out.push_str(line);
        if let Some((key, _)) = trimmed.split_once(" = ")
            && let Some(a) = applied
                .iter()
                .find(|a| a.table == table && a.key == key.trim())
        {
            out.push_str(&format!(
                "  # from {}; the file says {}",
                a.source, a.file_value
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_applied_validated_and_marked_with_their_source() {
        let file =
            "[[apps]]\nsdk_app_id = 1\ntoken = \"hunter2\"\n[kafka]\nbrokers = \"embedded\"\n";
        let o = Overrides {
            brokers: Some(("k1:9092".into(), Source::Env("TIMBRIDGE_BROKERS"))),
            listen: Some(("0.0.0.0:9000".into(), Source::Flag("--listen"))),
            require_topics: None,
        };
        let (cfg, applied) = o.apply_to_text(file).unwrap();
        assert_eq!(cfg.kafka.brokers, "k1:9092");
        let text = render(&cfg, Path::new("c.toml"), "--config", &applied);
        assert!(
            text.contains("brokers = \"k1:9092\"  # from the environment (TIMBRIDGE_BROKERS); the file says \"embedded\""),
            "{text}"
        );
        assert!(
            text.contains("listen = \"0.0.0.0:9000\"  # from the --listen flag"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        // Still a valid config.
        Config::parse(&text).unwrap();

        let bad = Overrides {
            listen: Some(("nowhere".into(), Source::Env("TIMBRIDGE_LISTEN"))),
            ..Overrides::default()
        };
        let err = bad.apply_to_text(file).unwrap_err().to_string();
        assert!(err.contains("TIMBRIDGE_LISTEN"), "{err}");
        assert!(err.contains("server.listen"), "{err}");

        // An empty brokers (the container config) needs the variable.
        let empty = "[[apps]]\nsdk_app_id = 1\n[kafka]\nbrokers = \"\"\n";
        let err = Overrides::default()
            .apply_to_text(empty)
            .unwrap_err()
            .to_string();
        assert!(err.contains("TIMBRIDGE_BROKERS"), "{err}");
        let o = Overrides {
            brokers: Some(("k1:9092".into(), Source::Env("TIMBRIDGE_BROKERS"))),
            ..Overrides::default()
        };
        let (cfg, applied) = o.apply_to_text(empty).unwrap();
        assert_eq!(cfg.kafka.brokers, "k1:9092");
        assert_eq!(applied[0].file_value, "\"\"");
        // A key the file leaves out: the default is what is overridden.
        let (_, applied) = o.apply_to_text("[[apps]]\nsdk_app_id = 1\n").unwrap();
        assert_eq!(applied[0].file_value, "\"127.0.0.1:9092\"");
    }
}
