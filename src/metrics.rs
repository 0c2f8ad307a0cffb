//! What Prometheus scrapes at `/metrics`.
//!
//! One registry of our own (not the global default, so tests can run many
//! gateways in one process), names in base units with the `timbridge_`
//! prefix, and labels with bounded values only: never a GroupId or an
//! account, which would give one series per user. The label values are the
//! enums of [`crate::labels`], and a series labelled by them is resolved once
//! at start ([`ByLabel`]): a callback increments a handle, never looks one up
//! by strings. Each field is named like its series, less the prefix and
//! `_total`.
//!
//! Every stage writes here; nothing here calls back into a stage. The spool
//! gauges are read from the spool at scrape time rather than kept in step by
//! hand, so they cannot drift.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Mutex;

use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::labels::{
    Command, HandshakeFailure, KafkaErrorReason, LabelValue, Listener, Outcome, ReadSource,
    RecordKind, ReloadResult, TimeoutStage, UpstreamDrop, UpstreamOutcome,
};
use crate::limits::Limit;
use crate::spool::{SYNC_BUCKETS, Spool, SyncDurations};

/// Buckets for a callback's time to answer: 100 µs to 5 s (Tencent waits 2 s).
const CALLBACK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];

/// Buckets for a record's time from the spool to Kafka: 1 ms to an hour of
/// outage ridden out.
const DELIVERY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// Buckets for an `[upstream]` request: 1 ms to 5 s.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0,
];

/// Declares [`Metrics`], one field per series, and the constructor that
/// makes and registers them all: a series is written down once, with its
/// name, labels and help, in the table below.
macro_rules! series {
    ($($field:ident: $ty:ty = $make:ident($($arg:expr),+);)+) => {
        pub struct Metrics {
            pub registry: Registry,
            $(pub $field: $ty,)+
        }

        impl Metrics {
            fn register_all(registry: Registry) -> Metrics {
                let s = Series(&registry);
                Metrics {
                    $($field: s.$make($($arg),+),)+
                    registry,
                }
            }
        }
    };
}

series! {
    callbacks: ByLabels<Command, Outcome, IntCounterVec> = counters_by_pair("timbridge_callbacks_total", &["command", "outcome"],
        "Callbacks answered, by command (the three read-receipt commands or other) and outcome.");
    callback_duration_seconds: Histogram = histogram("timbridge_callback_duration_seconds", CALLBACK_BUCKETS,
        "Time from the start of a callback request to its answer being handed to the connection.");
    callbacks_in_flight: IntGauge = gauge("timbridge_callbacks_in_flight",
        "Callback requests whose head has arrived and whose answer is not yet written.");
    events: ByLabel<RecordKind, IntCounterVec> = counters_by("timbridge_events_total", &["kind"],
        "Records accepted into the spool, by kind (group_message, c2c_message, c2c_watermark, raw).");
    kafka_delivered: IntCounterVec = counters("timbridge_kafka_delivered_total", &["topic"],
        "Records Kafka acknowledged, by topic.");
    kafka_errors: ByLabel<KafkaErrorReason, IntCounterVec> = counters_by("timbridge_kafka_errors_total", &["reason"],
        "Failed deliveries, by reason (only too_large and invalid_record are dead-lettered; the rest is retried).");
    kafka_delivery_seconds: Histogram = histogram("timbridge_kafka_delivery_seconds", DELIVERY_BUCKETS,
        "Time from a record's acceptance into the spool to Kafka's positive delivery report.");
    kafka_up: IntGauge = gauge("timbridge_kafka_up",
        "1 while at least one Kafka broker is connected, 0 otherwise.");
    kafka_producer_queue_messages: IntGauge = gauge("timbridge_kafka_producer_queue_messages",
        "Messages in librdkafka's producer queue (from its statistics).");
    kafka_broker_rtt_seconds: Gauge = float_gauge("timbridge_kafka_broker_rtt_seconds",
        "Average broker round-trip time over the last statistics interval, worst broker.");
    dead_letter: IntCounter = counter("timbridge_dead_letter_total",
        "Records Kafka will never take, moved to the dead-letter file (and topic, when set).");
    dead_letter_bytes: IntGauge = gauge("timbridge_dead_letter_bytes",
        "Size of the dead-letter file; at its budget, further dead letters stay in the spool.");
    dead_letter_max_bytes: IntGauge = gauge("timbridge_dead_letter_max_bytes",
        "The dead-letter file's budget, kafka.dead_letter_max_bytes.");
    kafka_producer_restarts: IntCounter = counter("timbridge_kafka_producer_restarts_total",
        "Times the Kafka producer failed fatally and was rebuilt.");
    duplicate_events: IntCounter = counter("timbridge_duplicate_events_total",
        "Events dropped because the same event_id was accepted within the dedup window.");
    log_lines_suppressed: IntCounter = counter("timbridge_log_lines_suppressed_total",
        "Log lines left out by a rate limit: rejected callbacks, spool write errors, unconfirmed deliveries.");
    callbacks_over_limit: ByLabel<Limit, IntCounterVec> = counters_by("timbridge_callbacks_over_limit_total", &["limit"],
        "Callbacks answered 400 for breaking an input limit, by limit (the [limits] key, or output_bytes).");
    build_info: IntGaugeVec = gauges("timbridge_build_info", &["version"],
        "Always 1; the version is in the label.");
    connections_open: ByLabel<Listener, IntGaugeVec> = gauges_by("timbridge_connections_open", &["listener"],
        "Connections being served, by listener (callback, admin).");
    connections_refused: ByLabel<Listener, IntCounterVec> = counters_by("timbridge_connections_refused_total", &["listener"],
        "Connections answered 503 and closed because the listener (or the client's address) was at its maximum.");
    connections_timed_out: ByLabels<Listener, TimeoutStage, IntCounterVec> = counters_by_pair("timbridge_connections_timed_out_total", &["listener", "stage"],
        "Connections closed because the client was too slow: stage=head (request head not in within header_read_timeout, idle keep-alive included) or answer (answer not taken within write_timeout).");
    body_memory_bytes: IntGauge = gauge("timbridge_body_memory_bytes",
        "Bytes reserved for request bodies in memory now (at most server.max_body_memory_bytes).");
    body_memory_exhausted: IntCounter = counter("timbridge_body_memory_exhausted_total",
        "Callbacks answered 503 because the bodies already in memory filled server.max_body_memory_bytes.");
    upstream_requests: ByLabel<UpstreamOutcome, IntCounterVec> = counters_by("timbridge_upstream_requests_total", &["outcome"],
        "Requests sent to [upstream], by outcome (answered with any status, unreachable, timeout, bad_answer, busy: refused at max_in_flight).");
    upstream_duration_seconds: Histogram = histogram("timbridge_upstream_duration_seconds", UPSTREAM_BUCKETS,
        "Time from sending a request to [upstream] to having its whole answer (or giving up).");
    upstream_forward_dropped: ByLabel<UpstreamDrop, IntCounterVec> = counters_by("timbridge_upstream_forward_dropped_total", &["reason"],
        "Read receipts not delivered to [upstream] with forward_read_receipts, by reason (queue_full, expired: retried until their Sign went stale). They are in Kafka all the same.");
    auth_token_matches: IntCounterVec = counters("timbridge_auth_token_matches_total", &["sdk_app_id", "token"],
        "Signed callbacks whose Sign matched, by app and token (current, or previous during a rotation: once previous stays at zero, remove previous_token).");
    config_reloads: ByLabel<ReloadResult, IntCounterVec> = counters_by("timbridge_config_reloads_total", &["result"],
        "Configuration reloads (SIGHUP), by result (success, error: the file was refused and nothing changed).");
    config_last_reload_successful: IntGauge = gauge("timbridge_config_last_reload_successful",
        "1 when the last configuration reload (or the start) succeeded, 0 when it was refused: the running configuration is not the file's.");
    tls_handshakes_failed: ByLabel<HandshakeFailure, IntCounterVec> = counters_by("timbridge_tls_handshakes_failed_total", &["reason"],
        "TLS handshakes on the callback listener that failed, by reason (timeout: not finished within server.header_read_timeout; error: plain HTTP, an unsupported client, a certificate the client refused).");
}

/// Makes each series and registers it in the same step, so that none can
/// be made and forgotten.
struct Series<'r>(&'r Registry);

impl Series<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: Result<C, prometheus::Error>) -> C {
        let c = c.expect("valid metric");
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help))
    }

    fn counters(&self, name: &str, labels: &[&str], help: &str) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }

    fn gauges(&self, name: &str, labels: &[&str], help: &str) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn counters_by<L: LabelValue>(
        &self,
        name: &str,
        labels: &[&str],
        help: &str,
    ) -> ByLabel<L, IntCounterVec> {
        ByLabel::new(self.counters(name, labels, help))
    }

    fn counters_by_pair<A: LabelValue, B: LabelValue>(
        &self,
        name: &str,
        labels: &[&str],
        help: &str,
    ) -> ByLabels<A, B, IntCounterVec> {
        ByLabels::new(self.counters(name, labels, help))
    }

    fn gauges_by<L: LabelValue>(
        &self,
        name: &str,
        labels: &[&str],
        help: &str,
    ) -> ByLabel<L, IntGaugeVec> {
        ByLabel::new(self.gauges(name, labels, help))
    }

    fn float_gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help))
    }

    fn histogram(&self, name: &str, buckets: &[f64], help: &str) -> Histogram {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        ))
    }
}

/// A labelled series (counters or gauges) whose label values are a closed
/// enum, every series resolved once when it is made. Each then exists from
/// the start, at zero: a series that appears only with its first increment
/// hides that first burst from rate() and increase(), which is exactly what
/// alerts look for. And the hot path finds it by index instead of hashing
/// the label strings under the vec's lock on every increment. Derefs to the
/// vec for the rest (tests read series by label strings).
pub struct ByLabel<L, V: Resolve> {
    vec: V,
    series: Box<[V::Series]>,
    label: PhantomData<fn(L)>,
}

impl<L: LabelValue, V: Resolve> ByLabel<L, V> {
    fn new(vec: V) -> ByLabel<L, V> {
        let series = L::VALUES
            .iter()
            .map(|l| vec.resolve(&[l.label()]))
            .collect();
        ByLabel {
            vec,
            series,
            label: PhantomData,
        }
    }

    /// The series of `value`.
    pub fn get(&self, value: L) -> &V::Series {
        &self.series[value.index()]
    }
}

impl<L, V: Resolve> Deref for ByLabel<L, V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.vec
    }
}

/// [`ByLabel`] for two labels: every pair of values resolved.
pub struct ByLabels<A, B, V: Resolve> {
    vec: V,
    /// Row by row: all of `B` for the first `A`, then for the next.
    series: Box<[V::Series]>,
    labels: PhantomData<fn(A, B)>,
}

impl<A: LabelValue, B: LabelValue, V: Resolve> ByLabels<A, B, V> {
    fn new(vec: V) -> ByLabels<A, B, V> {
        let series = A::VALUES
            .iter()
            .flat_map(|a| B::VALUES.iter().map(move |b| (a, b)))
            .map(|(a, b)| vec.resolve(&[a.label(), b.label()]))
            .collect();
        ByLabels {
            vec,
            series,
            labels: PhantomData,
        }
    }

    /// The series of `a` and `b`.
    pub fn get(&self, a: A, b: B) -> &V::Series {
        &self.series[a.index() * B::VALUES.len() + b.index()]
    }
}

impl<A, B, V: Resolve> Deref for ByLabels<A, B, V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.vec
    }
}

/// A vec of series that one series is looked up in by its label values.
pub trait Resolve {
    type Series;

    fn resolve(&self, values: &[&str]) -> Self::Series;
}

impl<T: MetricVecBuilder> Resolve for MetricVec<T> {
    type Series = T::M;

    fn resolve(&self, values: &[&str]) -> T::M {
        self.with_label_values(values)
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Every closed-enum label value is resolved, so exists at zero, by
        // now (see `ByLabel`).
        let m = Metrics::register_all(Registry::new());
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("process metrics register once");
        }
        m
    }

    /// One more callback answered: its command, outcome and time.
    pub fn callback_answered(&self, command: Command, outcome: Outcome, seconds: f64) {
        self.callbacks.get(command, outcome).inc();
        self.callback_duration_seconds.observe(seconds);
    }

    /// `n` more records of `kind` in the spool.
    pub fn spooled(&self, kind: RecordKind, n: u64) {
        self.events.get(kind).inc_by(n);
    }

    /// One more request to `[upstream]` (or one refused before it was sent).
    pub fn upstream_request(&self, outcome: UpstreamOutcome) {
        self.upstream_requests.get(outcome).inc();
    }

    /// One more failed delivery.
    pub fn kafka_error(&self, reason: KafkaErrorReason) {
        self.kafka_errors.get(reason).inc();
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
    oldest_event_age_seconds: Gauge,
    segments: IntGauge,
    queued_bytes: IntGauge,
    syncs: IntCounter,
    records_lost: IntCounter,
    read_retries: IntCounter,
    records_read: IntCounterVec,
    /// Concurrent scrapes must not both add the same increase to a counter.
    syncs_seen: Mutex<()>,
    /// `timbridge_spool_sync_duration_seconds`, built from the spool's own
    /// counts at each scrape (a prometheus `Histogram` cannot be set).
    sync_durations: Desc,
    /// The series above (sharing their values), listed once for both
    /// `desc` and `collect`.
    all: Vec<Box<dyn Collector>>,
}

impl SpoolCollector {
    fn new(spool: Spool, max_bytes: u64) -> SpoolCollector {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let events = gauge(
            "timbridge_spool_events",
            "Records in the spool that Kafka has not acknowledged yet.",
        );
        let bytes = gauge(
            "timbridge_spool_bytes",
            "Bytes of spool segment files on disk (with fsync = always, the zeros written ahead of the data, at most 1 MiB, count once data fills them).",
        );
        let max_bytes_gauge = gauge(
            "timbridge_spool_max_bytes",
            "The configured spool limit; callbacks are answered 503 beyond it.",
        );
        max_bytes_gauge.set(max_bytes as i64);
        let oldest_event_age_seconds = Gauge::new(
            "timbridge_spool_oldest_event_age_seconds",
            "Age of the oldest record not yet in Kafka (0 when the spool is empty): the lag to alert on.",
        )
        .expect("valid metric");
        let segments = gauge("timbridge_spool_segments", "Spool segment files on disk.");
        let queued_bytes = gauge(
            "timbridge_spool_queued_bytes",
            "Bytes of callbacks waiting in memory for the spool's disk (at most 16 MiB; past it a callback gets 503 with fsync = always or behind a new segment, and otherwise waits for the disk): above zero for long, the disk under spool.dir is not keeping up.",
        );
        let syncs = counter(
            "timbridge_spool_syncs_total",
            "fdatasync calls the spool has made (one per group commit with fsync = always).",
        );
        let records_lost = counter(
            "timbridge_spool_records_lost_total",
            "Spool records skipped because their bytes on disk are corrupt (found at start or while reading); each is logged, none is delivered.",
        );
        let read_retries = counter(
            "timbridge_spool_read_retries_total",
            "Reads of spool segment files that failed for a reason other than damage (no file descriptor left, an I/O error) and are tried again after a pause of 0.1 s doubling to 5 s; nothing is skipped. Each is logged with the file and the error; growing, the publisher is stalled on that read.",
        );
        let records_read = IntCounterVec::new(
            Opts::new(
                "timbridge_spool_records_read_total",
                "Spool records handed to the publisher, by source: memory (the newest writes, while it keeps up) or disk (replay after a restart, a backlog).",
            ),
            &["source"],
        )
        .expect("valid metric");
        for source in ReadSource::ALL {
            records_read.with_label_values(&[source.as_str()]);
        }
        // The limit is set once here: only `all` holds it.
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(events.clone()),
            Box::new(bytes.clone()),
            Box::new(max_bytes_gauge.clone()),
            Box::new(oldest_event_age_seconds.clone()),
            Box::new(segments.clone()),
            Box::new(queued_bytes.clone()),
            Box::new(syncs.clone()),
            Box::new(records_lost.clone()),
            Box::new(read_retries.clone()),
            Box::new(records_read.clone()),
        ];
        SpoolCollector {
            spool,
            events,
            bytes,
            oldest_event_age_seconds,
            segments,
            queued_bytes,
            syncs,
            records_lost,
            read_retries,
            records_read,
            syncs_seen: Mutex::new(()),
            sync_durations: Desc::new(
                SYNC_DURATIONS.into(),
                "Time each sync of the spool took, by kind: segment (fdatasync of a segment file) or directory (fsync of spool.dir when a segment is created). With fsync = always every callback waits for these, so a slow or stalling disk shows here first.".into(),
                vec!["kind".into()],
                Default::default(),
            )
            .expect("valid metric"),
            all,
        }
    }
}

impl Collector for SpoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.all
            .iter()
            .flat_map(|c| c.desc())
            .chain([&self.sync_durations])
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.spool.stats();
        self.events.set(s.pending_events as i64);
        self.bytes.set(s.bytes as i64);
        self.segments.set(s.segments as i64);
        self.queued_bytes.set(s.queued_bytes as i64);
        self.oldest_event_age_seconds
            .set(s.oldest_pending_age.map(|d| d.as_secs_f64()).unwrap_or(0.0));
        {
            let _one_at_a_time = self.syncs_seen.lock().unwrap_or_else(|p| p.into_inner());
            let seen = self.syncs.get();
            self.syncs.inc_by(s.counters.syncs.saturating_sub(seen));
            let seen = self.records_lost.get();
            self.records_lost
                .inc_by(s.counters.records_lost.saturating_sub(seen));
            let seen = self.read_retries.get();
            self.read_retries
                .inc_by(s.counters.read_retries.saturating_sub(seen));
            for source in ReadSource::ALL {
                let total = match source {
                    ReadSource::Disk => s.counters.records_read_disk,
                    ReadSource::Memory => s.counters.records_read_memory,
                };
                let c = self.records_read.with_label_values(&[source.as_str()]);
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
        let mut families: Vec<MetricFamily> = self.all.iter().flat_map(|c| c.collect()).collect();
        families.push(sync_histogram(
            &self.sync_durations,
            &[
                ("segment", &s.counters.sync_durations),
                ("directory", &s.counters.dir_sync_durations),
            ],
        ));
        families
    }
}

const SYNC_DURATIONS: &str = "timbridge_spool_sync_duration_seconds";

/// The spool's sync durations as a Prometheus histogram family, one
/// series per `kind`.
fn sync_histogram(desc: &Desc, kinds: &[(&str, &SyncDurations)]) -> MetricFamily {
    use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricType};
    let series = kinds
        .iter()
        .map(|&(kind, d)| {
            // Bounds, cumulative counts and the total all come from one
            // snapshot, so they agree with each other in every scrape.
            let mut cumulative = 0;
            let buckets = SYNC_BUCKETS
                .iter()
                .zip(d.counts)
                .map(|(&le, n)| {
                    cumulative += n;
                    let mut b = Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect();
            let mut h = Histogram::default();
            h.set_bucket(buckets);
            h.set_sample_count(d.counts.iter().sum());
            h.set_sample_sum(d.sum_nanos as f64 / 1e9);
            let mut label = LabelPair::default();
            label.set_name("kind".into());
            label.set_value(kind.into());
            let mut m = Metric::from_label(vec![label]);
            m.set_histogram(h);
            m
        })
        .collect();
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(MetricType::HISTOGRAM);
    f.set_metric(series);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_resolved_series_is_the_one_its_label_values_name() {
        let m = Metrics::new();
        // A distinct count per pair, so a series found at the wrong index
        // would show another pair's count.
        let mut n = 0;
        for &command in Command::ALL {
            for &outcome in Outcome::ALL {
                n += 1;
                m.callbacks.get(command, outcome).inc_by(n);
            }
        }
        let mut n = 0;
        for command in Command::ALL {
            for outcome in Outcome::ALL {
                n += 1;
                let by_text = m
                    .callbacks
                    .with_label_values(&[command.as_str(), outcome.as_str()]);
                assert_eq!(by_text.get(), n, "{command} {outcome}");
            }
        }
        for (i, &limit) in Limit::ALL.iter().enumerate() {
            m.callbacks_over_limit.get(limit).inc_by(i as u64 + 1);
        }
        for (i, limit) in Limit::ALL.iter().enumerate() {
            let by_text = m.callbacks_over_limit.with_label_values(&[limit.key()]);
            assert_eq!(by_text.get(), i as u64 + 1, "{}", limit.key());
        }
    }
}
