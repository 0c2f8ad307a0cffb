//! What Prometheus scrapes at `/metrics`.
//!
//! One registry of our own (not the global default, so tests can run many
//! gateways in one process), names in base units with the `timbridge_`
//! prefix, and labels with bounded values only: never a GroupId or an
//! account, which would give one series per user.
//!
//! Every stage writes here; nothing here calls back into a stage. The spool
//! gauges are read from the spool at scrape time rather than kept in step by
//! hand, so they cannot drift.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every value the `command` label takes.
pub const COMMAND_LABELS: [&str; 4] = [
    crate::tencent::GROUP_READ_RECEIPT,
    crate::tencent::C2C_READ_RECEIPT,
    crate::tencent::C2C_REPORT,
    "other",
];

/// Every value the `outcome` label takes.
pub const OUTCOME_LABELS: [&str; 9] = [
    "accepted",
    "duplicate",
    "ignored",
    "forwarded",
    "invalid",
    "unauthorized",
    "unknown_app",
    "too_large",
    "overloaded",
];

/// Every value the `kind` label of `timbridge_events_total` takes.
pub const EVENT_KIND_LABELS: [&str; 4] = ["group_message", "c2c_message", "c2c_watermark", "raw"];

/// Every value the `reason` label of `timbridge_kafka_errors_total` takes.
pub const KAFKA_ERROR_LABELS: [&str; 7] = [
    "timed_out",
    "too_large",
    "not_authorized",
    "unknown_topic",
    "queue_full",
    "transport",
    "other",
];

/// The label values `command` may take: the three read-receipt commands, or `other`.
pub fn command_label(command: &str) -> &'static str {
    use crate::tencent::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};
    match command {
        GROUP_READ_RECEIPT => GROUP_READ_RECEIPT,
        C2C_READ_RECEIPT => C2C_READ_RECEIPT,
        C2C_REPORT => C2C_REPORT,
        _ => "other",
    }
}

use crate::spool::Spool;

pub struct Metrics {
    pub registry: Registry,
    pub callbacks: IntCounterVec,
    pub callback_duration: Histogram,
    pub callbacks_in_flight: IntGauge,
    pub events: IntCounterVec,
    pub kafka_delivered: IntCounterVec,
    pub kafka_errors: IntCounterVec,
    pub kafka_delivery_seconds: Histogram,
    pub kafka_up: IntGauge,
    pub kafka_queue_messages: IntGauge,
    pub kafka_broker_rtt: Gauge,
    pub dead_letter: IntCounter,
    pub duplicates_dropped: IntCounter,
    pub log_lines_suppressed: IntCounter,
    pub callbacks_over_limit: IntCounterVec,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.0, 5.0,
        ];
        let delivery_buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            300.0, 900.0, 3600.0,
        ];
        let m = Metrics {
            callbacks: IntCounterVec::new(
                Opts::new(
                    "timbridge_callbacks_total",
                    "Callbacks answered, by command (the three read-receipt commands or other) and outcome.",
                ),
                &["command", "outcome"],
            )
            .expect("valid metric"),
            callback_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "timbridge_callback_duration_seconds",
                    "Time from the start of a callback request to its answer being handed to the connection.",
                )
                .buckets(latency_buckets),
            )
            .expect("valid metric"),
            callbacks_in_flight: IntGauge::new(
                "timbridge_callbacks_in_flight",
                "Callback requests whose head has arrived and whose answer is not yet written.",
            )
            .expect("valid metric"),
            events: IntCounterVec::new(
                Opts::new(
                    "timbridge_events_total",
                    "Records accepted into the spool, by kind (group_message, c2c_message, c2c_watermark, raw).",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            kafka_delivered: IntCounterVec::new(
                Opts::new(
                    "timbridge_kafka_delivered_total",
                    "Records Kafka acknowledged, by topic.",
                ),
                &["topic"],
            )
            .expect("valid metric"),
            kafka_errors: IntCounterVec::new(
                Opts::new(
                    "timbridge_kafka_errors_total",
                    "Failed deliveries, by reason (retried unless the reason is permanent).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            kafka_delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "timbridge_kafka_delivery_seconds",
                    "Time from a record's acceptance into the spool to Kafka's positive delivery report.",
                )
                .buckets(delivery_buckets),
            )
            .expect("valid metric"),
            kafka_up: IntGauge::new(
                "timbridge_kafka_up",
                "1 while at least one Kafka broker is connected, 0 otherwise.",
            )
            .expect("valid metric"),
            kafka_queue_messages: IntGauge::new(
                "timbridge_kafka_producer_queue_messages",
                "Messages in librdkafka's producer queue (from its statistics).",
            )
            .expect("valid metric"),
            kafka_broker_rtt: Gauge::new(
                "timbridge_kafka_broker_rtt_seconds",
                "Average broker round-trip time over the last statistics interval, worst broker.",
            )
            .expect("valid metric"),
            dead_letter: IntCounter::new(
                "timbridge_dead_letter_total",
                "Records Kafka will never take, moved to the dead-letter file (and topic, when set).",
            )
            .expect("valid metric"),
            duplicates_dropped: IntCounter::new(
                "timbridge_duplicate_events_total",
                "Events dropped because the same event_id was accepted within the dedup window.",
            )
            .expect("valid metric"),
            log_lines_suppressed: IntCounter::new(
                "timbridge_log_lines_suppressed_total",
                "Rejection log lines left out by the rate limit.",
            )
            .expect("valid metric"),
            callbacks_over_limit: IntCounterVec::new(
                Opts::new(
                    "timbridge_callbacks_over_limit_total",
                    "Callbacks answered 400 for breaking an input limit, by limit (the [limits] key, or output_bytes).",
                ),
                &["limit"],
            )
            .expect("valid metric"),
            build_info: IntGaugeVec::new(
                Opts::new("timbridge_build_info", "Always 1; the version is in the label."),
                &["version"],
            )
            .expect("valid metric"),
            registry,
        };
        // Every label value exists from the start, at zero: a series that
        // appears only with its first increment hides that first burst from
        // rate() and increase(), which is exactly what alerts look for.
        for command in COMMAND_LABELS {
            for outcome in OUTCOME_LABELS {
                m.callbacks.with_label_values(&[command, outcome]);
            }
        }
        for kind in EVENT_KIND_LABELS {
            m.events.with_label_values(&[kind]);
        }
        for reason in KAFKA_ERROR_LABELS {
            m.kafka_errors.with_label_values(&[reason]);
        }
        for limit in crate::limits::Limit::ALL {
            m.callbacks_over_limit.with_label_values(&[limit.key()]);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.callbacks.clone()),
            Box::new(m.callback_duration.clone()),
            Box::new(m.callbacks_in_flight.clone()),
            Box::new(m.events.clone()),
            Box::new(m.kafka_delivered.clone()),
            Box::new(m.kafka_errors.clone()),
            Box::new(m.kafka_delivery_seconds.clone()),
            Box::new(m.kafka_up.clone()),
            Box::new(m.kafka_queue_messages.clone()),
            Box::new(m.kafka_broker_rtt.clone()),
            Box::new(m.dead_letter.clone()),
            Box::new(m.duplicates_dropped.clone()),
            Box::new(m.log_lines_suppressed.clone()),
            Box::new(m.callbacks_over_limit.clone()),
            Box::new(m.build_info.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("process metrics register once");
        }
        m
    }

    /// Registers the spool's gauges, read from the spool at each scrape.
    pub fn register_spool(&self, spool: Spool, max_bytes: u64) {
        let c = SpoolCollector::new(spool, max_bytes);
        if let Err(e) = self.registry.register(Box::new(c)) {
            tracing::error!(error = %e, "cannot register the spool metrics");
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The spool's state as gauges, taken from [`Spool::stats`] when Prometheus
/// scrapes, so they can never drift from the spool itself.
struct SpoolCollector {
    spool: Spool,
    events: IntGauge,
    bytes: IntGauge,
    max_bytes: IntGauge,
    oldest_age: Gauge,
    segments: IntGauge,
    syncs: IntCounter,
    /// Concurrent scrapes must not both add the same syncs to the counter.
    syncs_seen: Mutex<()>,
    descs: Vec<Desc>,
}

impl SpoolCollector {
    fn new(spool: Spool, max_bytes: u64) -> SpoolCollector {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let c = SpoolCollector {
            spool,
            events: gauge(
                "timbridge_spool_events",
                "Records in the spool that Kafka has not acknowledged yet.",
            ),
            bytes: gauge("timbridge_spool_bytes", "Bytes of spool segment files on disk."),
            max_bytes: gauge(
                "timbridge_spool_max_bytes",
                "The configured spool limit; callbacks are answered 503 beyond it.",
            ),
            oldest_age: Gauge::new(
                "timbridge_spool_oldest_event_age_seconds",
                "Age of the oldest record not yet in Kafka (0 when the spool is empty): the lag to alert on.",
            )
            .expect("valid metric"),
            segments: gauge("timbridge_spool_segments", "Spool segment files on disk."),
            syncs: IntCounter::new(
                "timbridge_spool_syncs_total",
                "fdatasync calls the spool has made (one per group commit with fsync = always).",
            )
            .expect("valid metric"),
            syncs_seen: Mutex::new(()),
            descs: Vec::new(),
        };
        c.max_bytes.set(max_bytes as i64);
        let descs = [
            c.events.desc(),
            c.bytes.desc(),
            c.max_bytes.desc(),
            c.oldest_age.desc(),
            c.segments.desc(),
            c.syncs.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        SpoolCollector { descs, ..c }
    }
}

impl Collector for SpoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.spool.stats();
        self.events.set(s.pending_events as i64);
        self.bytes.set(s.bytes as i64);
        self.segments.set(s.segments as i64);
        self.oldest_age
            .set(s.oldest_pending_age.map(|d| d.as_secs_f64()).unwrap_or(0.0));
        {
            let _one_at_a_time = self.syncs_seen.lock().unwrap_or_else(|p| p.into_inner());
            let seen = self.syncs.get();
            self.syncs.inc_by(s.counters.syncs.saturating_sub(seen));
        }
        [
            self.events.collect(),
            self.bytes.collect(),
            self.max_bytes.collect(),
            self.oldest_age.collect(),
            self.segments.collect(),
            self.syncs.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}
