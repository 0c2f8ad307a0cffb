//! The materializer's `/metrics`: a registry of its own, since it runs as a
//! process of its own. Same naming scheme as the gateway's
//! (`timbridge_read_state_` prefix, base units, bounded labels).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::fold::Kind;

pub struct MaterializeMetrics {
    pub registry: Registry,
    pub events_folded: IntCounterVec,
    pub events_invalid: IntCounter,
    pub events_too_old: IntCounter,
    pub readers_cut_for_size: IntCounter,
    pub states_emitted: IntCounterVec,
    pub states_evicted: IntCounter,
    pub states_in_memory: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub rebuild_seconds: Histogram,
    pub rebuilt_states: IntCounter,
    pub partitions_assigned: IntGauge,
    pub up: IntGauge,
}

impl MaterializeMetrics {
    pub fn new() -> MaterializeMetrics {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let by_kind = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["kind"]).expect("valid metric")
        };
        let m = MaterializeMetrics {
            registry: Registry::new(),
            events_folded: by_kind(
                "timbridge_read_state_events_folded_total",
                "read_receipt.v1 events folded into the read state, by kind (duplicates included).",
            ),
            events_invalid: counter(
                "timbridge_read_state_events_invalid_total",
                "Input records that are not valid read_receipt.v1 events; skipped.",
            ),
            events_too_old: counter(
                "timbridge_read_state_events_too_old_total",
                "Events for a message already evicted, older than read_state.evict_after; skipped.",
            ),
            readers_cut_for_size: counter(
                "timbridge_read_state_readers_cut_for_size_total",
                "State records whose readers were cut to keep the value under Kafka's record limit (768 KiB of readers); readers_truncated is set.",
            ),
            states_emitted: by_kind(
                "timbridge_read_state_states_emitted_total",
                "State records written (acknowledged by Kafka), by kind: one per event that changed a state.",
            ),
            states_evicted: counter(
                "timbridge_read_state_states_evicted_total",
                "States forgotten by age (read_state.evict_after), each with a tombstone.",
            ),
            states_in_memory: gauge(
                "timbridge_read_state_states",
                "States held in memory for the assigned partitions.",
            ),
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "timbridge_read_state_consumer_lag",
                    "Input records not yet folded, per assigned input topic and partition.",
                ),
                &["topic", "partition"],
            )
            .expect("valid metric"),
            rebuild_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "timbridge_read_state_rebuild_seconds",
                    "Time to rebuild the state of newly assigned partitions from the state topic.",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )
            .expect("valid metric"),
            rebuilt_states: counter(
                "timbridge_read_state_rebuilt_records_total",
                "State records read back from the state topic during rebuilds.",
            ),
            partitions_assigned: gauge(
                "timbridge_read_state_partitions_assigned",
                "Input partitions this process folds now.",
            ),
            up: gauge(
                "timbridge_read_state_ready",
                "1 when folding, 0 while starting or rebuilding (as /readyz).",
            ),
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let m = self;
        // Every label value exists from the start, at zero (lag labels
        // follow the assignment, which is not known in advance).
        for kind in Kind::ALL {
            m.events_folded.with_label_values(&[kind.as_str()]);
            m.states_emitted.with_label_values(&[kind.as_str()]);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.events_folded.clone()),
            Box::new(m.events_invalid.clone()),
            Box::new(m.events_too_old.clone()),
            Box::new(m.readers_cut_for_size.clone()),
            Box::new(m.states_emitted.clone()),
            Box::new(m.states_evicted.clone()),
            Box::new(m.states_in_memory.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.rebuild_seconds.clone()),
            Box::new(m.rebuilt_states.clone()),
            Box::new(m.partitions_assigned.clone()),
            Box::new(m.up.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for MaterializeMetrics {
    fn default() -> Self {
        MaterializeMetrics::new()
    }
}
