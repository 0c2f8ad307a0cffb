//! Log setup: `tracing` to stderr, `pretty` for people or `json` for log
//! pipelines, filtered by `log.level` unless `RUST_LOG` is set.
//! librdkafka's own log arrives through the producer's context (target
//! `librdkafka`), so one filter governs both.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::{LogConfig, LogFormat};

/// Where a reload puts a new `log.level`; unset while `RUST_LOG` wins.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let from_env = matches!(std::env::var("RUST_LOG"), Ok(v) if !v.is_empty());
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
    let (filter, handle) = reload::Layer::new(filter);
    let pretty = (config.format == LogFormat::Pretty)
        .then(|| fmt::layer().with_ansi(colour).with_writer(std::io::stderr));
    let json = (config.format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(colour)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(pretty)
        .with(json)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    if !from_env {
        let _ = LEVEL.set(handle);
    }
    Ok(())
}

/// Whether `level` is a filter [`set_level`] would take; the error names the key.
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("log.level = {level:?} is not a valid filter: {e}"))
}

/// Filters the log by `level` from now on; false when `RUST_LOG` is set
/// (it wins) or logging was not set up by [`init`].
pub fn set_level(level: &str) -> bool {
    match (LEVEL.get(), EnvFilter::try_new(level)) {
        (Some(handle), Ok(filter)) => handle.reload(filter).is_ok(),
        _ => false,
    }
}

/// Text someone outside chose (a GroupId, a command, an error quoting the
/// body), made safe for one log line. Ordinary values (letters, digits and
/// `._:/@#+-_`) print as they are, so they read the same in `pretty` and
/// `json`. Anything else is quoted, with `"` and `\` escaped, so spaces and
/// `=` cannot forge a field (`x status=200`) in the `pretty` format; control
/// characters (newline, ESC, C1), the Unicode line separators and format
/// characters (bidi overrides such as U+202E, zero-width ones) are written
/// as escapes, so they can neither break the line nor reorder what an
/// operator sees.
pub struct Untrusted<'a>(pub &'a str);

/// Characters that need no quoting: nothing in them can end a value, start
/// another field or change how the line is shown.
fn is_plain(c: char) -> bool {
    (c.is_alphanumeric() && !is_format(c)) || "._:/@#+-_".contains(c)
}

/// Unicode's format characters (general category Cf): invisible, and some
/// reorder the text around them (bidi controls).
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064
        | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD
        | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0001 | 0xE0020..=0xE007F)
}

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        if !self.0.is_empty() && self.0.chars().all(is_plain) {
            return f.write_str(self.0);
        }
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                c if c.is_control() => write!(f, "{}", c.escape_debug())?,
                c if c == '\u{2028}' || c == '\u{2029}' || is_format(c) => {
                    write!(f, "\\u{{{:x}}}", c as u32)?
                }
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn untrusted_text_cannot_break_a_line_or_reach_the_terminal() {
        let forged = "x\nFORGED ERROR\r\u{1b}[31m\u{85}\u{2028}\\n";
        let shown = Untrusted(forged).to_string();
        assert_eq!(
            shown,
            "\"x\\nFORGED ERROR\\r\\u{1b}[31m\\u{85}\\u{2028}\\\\n\""
        );
        assert!(!shown.chars().any(|c| c.is_control()));
        for plain in [
            "Group.CallbackAfterReadReceipt",
            "@TGS#2abc-9_x",
            "组1",
            "1400000000",
        ] {
            assert_eq!(Untrusted(plain).to_string(), plain);
        }
    }

    #[test]
    fn untrusted_text_cannot_forge_a_field_or_reorder_the_line() {
        assert_eq!(Untrusted("x status=200").to_string(), "\"x status=200\"");
        assert_eq!(Untrusted("a\" ok=\"1").to_string(), "\"a\\\" ok=\\\"1\"");
        assert_eq!(
            Untrusted("abc\u{202e}fed").to_string(),
            "\"abc\\u{202e}fed\""
        );
        assert_eq!(Untrusted("\u{200b}").to_string(), "\"\\u{200b}\"");
        assert_eq!(Untrusted("").to_string(), "\"\"");
    }
}
