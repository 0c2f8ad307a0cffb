//! librdkafka's log, made readable: one line when Kafka goes away (with the
//! reason), one when it comes back (with how long it was away), and every
//! other librdkafka message once, at its own level.
//!
//! Left alone, librdkafka reports an unreachable cluster several times a
//! second and through two channels at once (the log callback and the error
//! callback, the latter delivered twice), which made an outage about 30,000
//! lines an hour and buried everything else. The spool rides an outage out,
//! so the operator needs to know when it started, why, and when it ended,
//! not every reconnect attempt in between.
//!
//! The producer's context feeds this from its `log` and `error` callbacks
//! and tells it when a broker is up again (statistics or a delivery).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The same message (or a connection failure of the same broker) is logged
/// at most once in this window; the repeats are counted on the next line.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(300);

/// While Kafka stays unreachable, a reminder that it still is, this often.
pub const REMINDER_EVERY: Duration = Duration::from_secs(300);

/// Distinct messages remembered for the repeat window, at most: a bound on
/// memory should librdkafka ever put ever-changing text in its messages.
const MAX_REMEMBERED: usize = 1024;

/// The level of a line to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// One line to log: what [`KafkaLog`] decided, before it goes to `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub level: Level,
    pub message: String,
    /// librdkafka's facility (`FAIL`, `CONFWARN`...), when it came from its log.
    pub facility: Option<String>,
}

/// The gateway's view of its connection to Kafka.
#[derive(Debug)]
enum Link {
    /// No broker has answered yet.
    Unknown,
    Up,
    Down {
        since: Instant,
        reason: String,
        /// Connection errors swallowed since `since`.
        errors: u64,
        last_reminder: Instant,
    },
}

#[derive(Debug)]
struct State {
    link: Link,
    /// The latest connection failure's text: the reason given when every
    /// broker is down (librdkafka's own "1/1 brokers are down" says less).
    last_failure: Option<(String, Instant)>,
    /// Message key → when it was last logged, and repeats since.
    seen: HashMap<String, (Instant, u64)>,
}

/// Decides which of librdkafka's messages become log lines. One per
/// producer; cheap to call on every delivery.
#[derive(Debug)]
pub struct KafkaLog {
    /// Mirrors `link == Up`, so that the per-delivery call takes no lock.
    up: AtomicBool,
    state: Mutex<State>,
}

impl Default for KafkaLog {
    fn default() -> Self {
        KafkaLog::new()
    }
}

impl KafkaLog {
    pub fn new() -> KafkaLog {
        KafkaLog {
            up: AtomicBool::new(false),
            state: Mutex::new(State {
                link: Link::Unknown,
                last_failure: None,
                seen: HashMap::new(),
            }),
        }
    }

    /// librdkafka's log callback.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let line = self.on_log(level, facility, message, Instant::now());
        emit(line);
    }

    /// librdkafka's error callback.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        let line = self.on_error(
            error.rdkafka_error_code(),
            &error.to_string(),
            reason,
            Instant::now(),
        );
        emit(line);
    }

    /// Whether a broker answers now (from statistics or a delivery report).
    /// Only "up" changes anything: "down" needs a reason, which comes with
    /// librdkafka's error.
    pub fn kafka_up(&self, up: bool) {
        if !up || self.up.load(Ordering::Relaxed) {
            return;
        }
        let line = self.on_up(Instant::now());
        emit(line);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The decision for a log callback, at `now`.
    pub fn on_log(
        &self,
        level: RDKafkaLogLevel,
        facility: &str,
        message: &str,
        now: Instant,
    ) -> Option<Line> {
        let text = strip_thread(message);
        let mut st = self.lock();
        if facility == "FAIL" {
            return st.connection_failure(text, Some(facility), now);
        }
        let level = match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => Level::Error,
            RDKafkaLogLevel::Warning => Level::Warn,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => Level::Info,
            RDKafkaLogLevel::Debug => Level::Debug,
        };
        st.once(level, text, Some(facility), now)
    }

    /// The decision for an error callback, at `now`.
    pub fn on_error(
        &self,
        code: Option<RDKafkaErrorCode>,
        error: &str,
        reason: &str,
        now: Instant,
    ) -> Option<Line> {
        let mut st = self.lock();
        match code {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                let line = st.all_down(reason, now);
                self.up.store(false, Ordering::Relaxed);
                line
            }
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::NetworkException,
            ) => st.connection_failure(reason, None, now),
            _ => {
                let text = if reason.is_empty() { error } else { reason };
                st.once(Level::Error, &format!("{text} ({error})"), None, now)
            }
        }
    }

    /// The decision when a broker is seen up, at `now`.
    pub fn on_up(&self, now: Instant) -> Option<Line> {
        let mut st = self.lock();
        self.up.store(true, Ordering::Relaxed);
        let before = std::mem::replace(&mut st.link, Link::Up);
        st.last_failure = None;
        match before {
            Link::Up => None,
            Link::Unknown => Some(Line {
                level: Level::Info,
                message: "connected to Kafka".into(),
                facility: None,
            }),
            Link::Down { since, errors, .. } => {
                // A broker's own failure lines may come again in the next outage.
                st.seen.retain(|k, _| !k.starts_with("FAIL "));
                Some(Line {
                    level: Level::Info,
                    message: format!(
                        "Kafka is reachable again after {} ({errors} connection errors not logged); sending what the spool holds",
                        humantime::format_duration(round_to_ms(
                            now.saturating_duration_since(since)
                        ))
                    ),
                    facility: None,
                })
            }
        }
    }
}

impl State {
    /// One broker's connection failed. While all are down it is only
    /// counted; otherwise each broker's failure is logged once per window.
    fn connection_failure(
        &mut self,
        text: &str,
        facility: Option<&str>,
        now: Instant,
    ) -> Option<Line> {
        let text = strip_after(text);
        self.last_failure = Some((text.to_owned(), now));
        if let Link::Down { errors, .. } = &mut self.link {
            *errors += 1;
            return self.remind(now);
        }
        // "host:port/id: Connect to ... failed": one key per broker, so a
        // broker flapping between reasons is still one line per window.
        let broker = text.split(": ").next().unwrap_or(text);
        let key = format!("FAIL {broker}");
        self.once_keyed(Level::Warn, key, text, facility, now)
    }

    /// Every broker is down: the one line for the outage's start.
    fn all_down(&mut self, text: &str, now: Instant) -> Option<Line> {
        if let Link::Down { errors, .. } = &mut self.link {
            *errors += 1;
            return self.remind(now);
        }
        let reason = match &self.last_failure {
            Some((r, at)) if now.saturating_duration_since(*at) < Duration::from_secs(30) => {
                r.clone()
            }
            _ => text.to_owned(),
        };
        let line = Line {
            level: Level::Warn,
            message: format!(
                "Kafka is unreachable: {reason}. Callbacks are still answered and kept in the spool until it is back; \
                 connection errors are not logged again until then (see timbridge_kafka_up)"
            ),
            facility: None,
        };
        self.link = Link::Down {
            since: now,
            reason,
            errors: 0,
            last_reminder: now,
        };
        Some(line)
    }

    fn remind(&mut self, now: Instant) -> Option<Line> {
        let Link::Down {
            since,
            reason,
            errors,
            last_reminder,
        } = &mut self.link
        else {
            return None;
        };
        if let Some((latest, _)) = &self.last_failure {
            reason.clone_from(latest);
        }
        if now.saturating_duration_since(*last_reminder) < REMINDER_EVERY {
            return None;
        }
        *last_reminder = now;
        Some(Line {
            level: Level::Warn,
            message: format!(
                "Kafka is still unreachable after {} ({errors} connection errors not logged): {reason}",
                humantime::format_duration(Duration::from_secs(
                    now.saturating_duration_since(*since).as_secs()
                ))
            ),
            facility: None,
        })
    }

    fn once(
        &mut self,
        level: Level,
        text: &str,
        facility: Option<&str>,
        now: Instant,
    ) -> Option<Line> {
        // The error callback repeats what the log callback said, with the
        // same text: one key for both.
        self.once_keyed(level, strip_after(text).to_owned(), text, facility, now)
    }

    fn once_keyed(
        &mut self,
        level: Level,
        key: String,
        text: &str,
        facility: Option<&str>,
        now: Instant,
    ) -> Option<Line> {
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < REPEAT_WINDOW);
            if self.seen.len() >= MAX_REMEMBERED {
                self.seen.clear();
            }
        }
        let repeats = match self.seen.get_mut(&key) {
            Some((at, repeats)) if now.saturating_duration_since(*at) < REPEAT_WINDOW => {
                *repeats += 1;
                return None;
            }
            Some((at, repeats)) => {
                *at = now;
                std::mem::take(repeats)
            }
            None => {
                self.seen.insert(key, (now, 0));
                0
            }
        };
        let message = if repeats > 0 {
            format!(
                "{text} (and {repeats} times more in the last {} minutes)",
                REPEAT_WINDOW.as_secs() / 60
            )
        } else {
            text.to_owned()
        };
        Some(Line {
            level,
            message,
            facility: facility.map(str::to_owned),
        })
    }
}

/// librdkafka prefixes its log text with the thread: `[thrd:NAME]: `.
fn strip_thread(message: &str) -> &str {
    match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map(|(_, m)| m).unwrap_or(message),
        None => message,
    }
}

/// librdkafka appends `(after 2ms in state CONNECT, 1 identical error(s)
/// suppressed)`: noise for a person, and it makes each repeat look new.
fn strip_after(text: &str) -> &str {
    match text.rfind(" (after ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text,
    }
}

fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn emit(line: Option<Line>) {
    let Some(line) = line else { return };
    let fac = line.facility.as_deref().unwrap_or("");
    let msg = &line.message;
    match (line.level, fac.is_empty()) {
        (Level::Error, false) => tracing::error!(target: "librdkafka", facility = fac, "{msg}"),
        (Level::Error, true) => tracing::error!(target: "librdkafka", "{msg}"),
        (Level::Warn, false) => tracing::warn!(target: "librdkafka", facility = fac, "{msg}"),
        (Level::Warn, true) => tracing::warn!(target: "librdkafka", "{msg}"),
        (Level::Info, false) => tracing::info!(target: "librdkafka", facility = fac, "{msg}"),
        (Level::Info, true) => tracing::info!(target: "librdkafka", "{msg}"),
        (Level::Debug, _) => tracing::debug!(target: "librdkafka", facility = fac, "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: &str = "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 2ms in state CONNECT)";
    const FAIL_REASON: &str =
        "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused";

    /// What librdkafka delivers for one failed reconnect with the only
    /// broker away: the log line, the transport error twice, all-down twice.
    fn one_attempt(k: &KafkaLog, now: Instant) -> Vec<Line> {
        let mut lines = vec![k.on_log(RDKafkaLogLevel::Error, "FAIL", FAIL, now)];
        for _ in 0..2 {
            lines.push(k.on_error(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "Global error: BrokerTransportFailure",
                &FAIL[FAIL.find("]: ").unwrap() + 3..],
                now,
            ));
        }
        for _ in 0..2 {
            lines.push(k.on_error(
                Some(RDKafkaErrorCode::AllBrokersDown),
                "Global error: AllBrokersDown",
                "1/1 brokers are down",
                now,
            ));
        }
        lines.into_iter().flatten().collect()
    }

    #[test]
    fn an_outage_is_one_line_down_with_the_reason_and_one_line_up_with_its_length() {
        let k = KafkaLog::new();
        let t0 = Instant::now();
        assert_eq!(k.on_up(t0).unwrap().message, "connected to Kafka");
        let mut lines = Vec::new();
        // Two reconnect attempts a second for four minutes.
        for i in 0..480 {
            lines.extend(one_attempt(&k, t0 + Duration::from_millis(500 * i)));
        }
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert_eq!(lines[0].level, Level::Warn);
        assert_eq!(lines[0].message, FAIL_REASON);
        assert_eq!(lines[1].level, Level::Warn);
        assert!(
            lines[1]
                .message
                .starts_with(&format!("Kafka is unreachable: {FAIL_REASON}.")),
            "{lines:?}"
        );
        // Statistics say so every second while down: nothing new.
        k.kafka_up(false);
        let back = k.on_up(t0 + Duration::from_secs(241)).unwrap();
        assert_eq!(back.level, Level::Info);
        assert!(
            back.message.contains("reachable again after 4m 1s"),
            "{back:?}"
        );
        assert!(k.on_up(t0 + Duration::from_secs(242)).is_none());
        // The next outage is announced again.
        let next = one_attempt(&k, t0 + Duration::from_secs(300));
        assert_eq!(next.len(), 2, "{next:#?}");
    }

    #[test]
    fn a_long_outage_is_recalled_every_few_minutes() {
        let k = KafkaLog::new();
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 0..(2 * 60 * 12) {
            lines.extend(one_attempt(&k, t0 + Duration::from_millis(500 * i)));
        }
        // The failure, the outage, and reminders at 5 and 10 minutes.
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(
            lines[2].message.contains("still unreachable after 5m"),
            "{lines:?}"
        );
    }

    #[test]
    fn other_messages_are_logged_once_at_their_own_level_and_repeats_counted() {
        let k = KafkaLog::new();
        let t0 = Instant::now();
        let l = k
            .on_log(
                RDKafkaLogLevel::Warning,
                "CONFWARN",
                "[thrd:app]: Configuration property x is deprecated",
                t0,
            )
            .unwrap();
        assert_eq!(l.level, Level::Warn);
        assert_eq!(l.facility.as_deref(), Some("CONFWARN"));
        assert_eq!(l.message, "Configuration property x is deprecated");
        for s in 1..10 {
            assert!(
                k.on_log(
                    RDKafkaLogLevel::Warning,
                    "CONFWARN",
                    "[thrd:app]: Configuration property x is deprecated",
                    t0 + Duration::from_secs(s)
                )
                .is_none()
            );
        }
        let again = k
            .on_log(
                RDKafkaLogLevel::Warning,
                "CONFWARN",
                "[thrd:app]: Configuration property x is deprecated",
                t0 + REPEAT_WINDOW,
            )
            .unwrap();
        assert!(again.message.contains("and 9 times more"), "{again:?}");
        let info = k
            .on_log(RDKafkaLogLevel::Info, "INIT", "hello", t0)
            .unwrap();
        assert_eq!(info.level, Level::Info);
        let err = k
            .on_error(
                Some(RDKafkaErrorCode::Authentication),
                "Global error: Authentication",
                "SASL authentication failed",
                t0,
            )
            .unwrap();
        assert_eq!(err.level, Level::Error);
        assert!(
            err.message.contains("SASL authentication failed"),
            "{err:?}"
        );
        assert!(
            k.on_error(
                Some(RDKafkaErrorCode::Authentication),
                "Global error: Authentication",
                "SASL authentication failed",
                t0
            )
            .is_none()
        );
    }

    #[test]
    fn one_broker_of_several_failing_is_a_warning_per_broker() {
        let k = KafkaLog::new();
        let t0 = Instant::now();
        k.on_up(t0);
        let a = "b1:9092/1: Connect to ipv4#10.0.0.1:9092 failed: Connection refused (after 1ms in state CONNECT)";
        let b = "b2:9092/2: Connect to ipv4#10.0.0.2:9092 failed: Connection refused (after 1ms in state CONNECT)";
        let mut lines = Vec::new();
        for i in 0..100 {
            let now = t0 + Duration::from_secs(i);
            lines.extend(k.on_log(RDKafkaLogLevel::Error, "FAIL", a, now));
            lines.extend(k.on_log(RDKafkaLogLevel::Error, "FAIL", b, now));
        }
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines.iter().all(|l| l.level == Level::Warn));
    }
}
