//! Log setup: `tracing` to stderr, `pretty` for people or `json` for log
//! pipelines, filtered by `log.level` unless `RUST_LOG` is set.
//! librdkafka's own log arrives through the producer's context (target
//! `librdkafka`), so one filter governs both.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG={v:?} is not a valid filter: {e}"))?,
        _ => EnvFilter::try_new(&config.level).map_err(|e| {
            anyhow::anyhow!("log.level = {:?} is not a valid filter: {e}", config.level)
        })?,
    };
    // Colour only for a person at a terminal: escape codes in a log file or
    // a collector are noise.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}
