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
    /// The value the file had (or its default), as TOML.
    pub file_value: String,
}

impl Overrides {
    /// The config with the overrides applied and validated like the file.
    pub fn apply(&self, mut cfg: Config) -> Result<(Config, Vec<Applied>), ConfigError> {
        let mut applied = Vec::new();
        let quoted = |s: &str| toml::Value::String(s.to_owned()).to_string();
        if let Some((listen, source)) = &self.listen {
            applied.push(Applied {
                table: "server",
                key: "listen",
                source: source.clone(),
                file_value: quoted(&cfg.server.listen),
            });
            cfg.server.listen = listen.clone();
        }
        if let Some((brokers, source)) = &self.brokers {
            applied.push(Applied {
                table: "kafka",
                key: "brokers",
                source: source.clone(),
                file_value: quoted(&cfg.kafka.brokers),
            });
            cfg.kafka.brokers = brokers.clone();
        }
        if let Some(source) = &self.require_topics {
            applied.push(Applied {
                table: "kafka",
                key: "require_topics",
                source: source.clone(),
                file_value: cfg.kafka.require_topics.to_string(),
            });
            cfg.kafka.require_topics = true;
        }
        if applied.is_empty() {
            return Ok((cfg, applied));
        }
        // Overrides are validated like the file: render and parse again.
        let text = toml::to_string(&cfg)
            .map_err(|e| ConfigError::Invalid(format!("cannot apply the overrides: {e}")))?;
        let cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!(
                "{m} (given by {})",
                applied
                    .iter()
                    .map(|a| a.source.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
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
        let cfg = Config::parse(
            "[[apps]]\nsdk_app_id = 1\ntoken = \"hunter2\"\n[kafka]\nbrokers = \"embedded\"\n",
        )
        .unwrap();
        let o = Overrides {
            brokers: Some(("k1:9092".into(), Source::Env("TIMBRIDGE_BROKERS"))),
            listen: Some(("0.0.0.0:9000".into(), Source::Flag("--listen"))),
            require_topics: None,
        };
        let (cfg, applied) = o.apply(cfg).unwrap();
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
        let err = bad.apply(cfg).unwrap_err().to_string();
        assert!(err.contains("TIMBRIDGE_LISTEN"), "{err}");
    }
}
