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

/// Text someone outside chose (a GroupId, a command, an error quoting the
/// body), made safe for one log line: control characters (newline, ESC,
/// C1 controls) and the Unicode line separators are written as escapes,
/// and `\` is doubled so that an escape cannot be faked. Everything else
/// prints as is, so ordinary values read the same in `pretty` and `json`.
pub struct Untrusted<'a>(pub &'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    write!(f, "{}", c.escape_debug())?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn untrusted_text_cannot_break_a_line_or_reach_the_terminal() {
        let forged = "x\nFORGED ERROR\r\u{1b}[31m\u{85}\u{2028}\\n";
        let shown = Untrusted(forged).to_string();
        assert_eq!(shown, "x\\nFORGED ERROR\\r\\u{1b}[31m\\u{85}\\u{2028}\\\\n");
        assert!(!shown.chars().any(|c| c.is_control()));
        let plain = "Group.CallbackAfterReadReceipt: \"quoted\" é";
        assert_eq!(Untrusted(plain).to_string(), plain);
    }
}
