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
pub const OUTCOME_LABELS: [&str; 12] = [
    "accepted",
    "duplicate",
    "ignored",
    "forwarded",
    "proxied",
    "upstream_failed",
    "invalid",
    "unauthorized",
    "unknown_app",
    "forbidden_source",
    "too_large",
    "overloaded",
];

/// Every value the `kind` label of `timbridge_events_total` takes.
pub const EVENT_KIND_LABELS: [&str; 4] = ["group_message", "c2c_message", "c2c_watermark", "raw"];

/// Every value the `reason` label of `timbridge_kafka_errors_total` takes.
pub const KAFKA_ERROR_LABELS: [&str; 11] = [
    "timed_out",
    "too_large",
    "invalid_record",
    "not_authorized",
    "authentication",
    "unknown_topic",
    "queue_full",
    "transport",
    "fatal",
    "purged",
    "other",
];

/// Every value the `listener` label of the connection metrics takes.
pub const LISTENER_LABELS: [&str; 2] = ["callback", "admin"];

/// Every value the `stage` label of `timbridge_connections_timed_out_total`
/// takes: the request head did not arrive in time, or the client did not
/// take its answer in time.
pub const TIMEOUT_STAGE_LABELS: [&str; 2] = ["head", "answer"];
/// Every value the `outcome` label of `timbridge_upstream_requests_total` takes.
pub const UPSTREAM_OUTCOME_LABELS: [&str; 5] =
    ["answered", "unreachable", "timeout", "bad_answer", "busy"];

/// Every value the `reason` label of `timbridge_upstream_forward_dropped_total` takes.
pub const UPSTREAM_DROP_LABELS: [&str; 2] = ["queue_full", "expired"];

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
    pub dead_letter_bytes: IntGauge,
    pub dead_letter_max_bytes: IntGauge,
    pub kafka_producer_restarts: IntCounter,
    pub duplicates_dropped: IntCounter,
    pub log_lines_suppressed: IntCounter,
    pub callbacks_over_limit: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub connections_open: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub connections_timed_out: IntCounterVec,
    pub body_memory_bytes: IntGauge,
    pub body_memory_exhausted: IntCounter,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: Histogram,
    pub upstream_forward_dropped: IntCounterVec,
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
                    "Failed deliveries, by reason (only too_large and invalid_record are dead-lettered; the rest is retried).",
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
            dead_letter_bytes: IntGauge::new(
                "timbridge_dead_letter_bytes",
                "Size of the dead-letter file; at its budget, further dead letters stay in the spool.",
            )
            .expect("valid metric"),
            dead_letter_max_bytes: IntGauge::new(
                "timbridge_dead_letter_max_bytes",
                "The dead-letter file's budget, kafka.dead_letter_max_bytes.",
            )
            .expect("valid metric"),
            kafka_producer_restarts: IntCounter::new(
                "timbridge_kafka_producer_restarts_total",
                "Times the Kafka producer failed fatally and was rebuilt.",
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
            connections_open: IntGaugeVec::new(
                Opts::new(
                    "timbridge_connections_open",
                    "Connections being served, by listener (callback, admin).",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            connections_refused: IntCounterVec::new(
                Opts::new(
                    "timbridge_connections_refused_total",
                    "Connections answered 503 and closed because the listener (or the client's address) was at its maximum.",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            connections_timed_out: IntCounterVec::new(
                Opts::new(
                    "timbridge_connections_timed_out_total",
                    "Connections closed because the client was too slow: stage=head (request head not in within header_read_timeout, idle keep-alive included) or answer (answer not taken within write_timeout).",
                ),
                &["listener", "stage"],
            )
            .expect("valid metric"),
            body_memory_bytes: IntGauge::new(
                "timbridge_body_memory_bytes",
                "Bytes reserved for request bodies in memory now (at most server.max_body_memory_bytes).",
            )
            .expect("valid metric"),
            body_memory_exhausted: IntCounter::new(
                "timbridge_body_memory_exhausted_total",
                "Callbacks answered 503 because the bodies already in memory filled server.max_body_memory_bytes.",
            )
            .expect("valid metric"),
            upstream_requests: IntCounterVec::new(
                Opts::new(
                    "timbridge_upstream_requests_total",
                    "Requests sent to [upstream], by outcome (answered with any status, unreachable, timeout, bad_answer, busy: refused at max_in_flight).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            upstream_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "timbridge_upstream_duration_seconds",
                    "Time from sending a request to [upstream] to having its whole answer (or giving up).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0,
                ]),
            )
            .expect("valid metric"),
            upstream_forward_dropped: IntCounterVec::new(
                Opts::new(
                    "timbridge_upstream_forward_dropped_total",
                    "Read receipts not delivered to [upstream] with forward_read_receipts, by reason (queue_full, expired: retried until their Sign went stale). They are in Kafka all the same.",
                ),
                &["reason"],
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
        for listener in LISTENER_LABELS {
            m.connections_open.with_label_values(&[listener]);
            m.connections_refused.with_label_values(&[listener]);
            for stage in TIMEOUT_STAGE_LABELS {
                m.connections_timed_out
                    .with_label_values(&[listener, stage]);
            }
        }
        for outcome in UPSTREAM_OUTCOME_LABELS {
            m.upstream_requests.with_label_values(&[outcome]);
        }
        for reason in UPSTREAM_DROP_LABELS {
            m.upstream_forward_dropped.with_label_values(&[reason]);
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
            Box::new(m.dead_letter_bytes.clone()),
            Box::new(m.dead_letter_max_bytes.clone()),
            Box::new(m.kafka_producer_restarts.clone()),
            Box::new(m.duplicates_dropped.clone()),
            Box::new(m.log_lines_suppressed.clone()),
            Box::new(m.callbacks_over_limit.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.connections_open.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.connections_timed_out.clone()),
            Box::new(m.body_memory_bytes.clone()),
            Box::new(m.body_memory_exhausted.clone()),
            Box::new(m.upstream_requests.clone()),
            Box::new(m.upstream_duration.clone()),
            Box::new(m.upstream_forward_dropped.clone()),
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
    records_lost: IntCounter,
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
            records_lost: IntCounter::new(
                "timbridge_spool_records_lost_total",
                "Spool records skipped because their bytes on disk are corrupt (found at start or while reading); each is logged, none is delivered.",
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
            c.records_lost.desc(),
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
            let seen = self.records_lost.get();
            self.records_lost
                .inc_by(s.counters.records_lost.saturating_sub(seen));
        }
        [
            self.events.collect(),
            self.bytes.collect(),
            self.max_bytes.collect(),
            self.oldest_age.collect(),
            self.segments.collect(),
            self.syncs.collect(),
            self.records_lost.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}
