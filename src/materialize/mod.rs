//! `timbridge materialize`: the read state of every message, folded from
//! the `read_receipt.v1` topics into a compacted topic by a consumer group.
//!
//! ```text
//! kafka.group_topic [p] ─┐                                  ┌─▶ read_state.topic [p]
//!                        ├─▶ consumer ─▶ fold (join) ─▶ producer   (compacted, read_state.v1)
//! kafka.c2c_topic   [p] ─┘   (group)    store per partition  │
//!                            commit input offsets ◀── acks ──┘
//! ```
//!
//! Every team reading read receipts wants "how many have read message X,
//! and who"; this computes it once. The state is a join-semilattice
//! ([`fold`]), so at-least-once input, duplicates across gateway replicas
//! and any order converge. The state topic is the fold's only memory: input
//! partition p is written to state partition p, so whoever is assigned an
//! input partition rebuilds its state from one state partition
//! ([`rebuild`]) and carries on from the committed offset ([`consumer`]).
//!
//! - `fold`: the state and its join; `value`: the `read_state.v1` record;
//! - `store`: the states of the assigned partitions, eviction by age;
//! - `consumer`: the loop, the rebalance hand-over, commit after acks;
//! - `rebuild`: reading a state partition back; `topic`: the start check;
//! - `admin` and `metrics`: `/metrics`, `/healthz`, `/readyz`.

pub mod admin;
pub mod consumer;
pub mod fold;
pub mod metrics;
pub mod rebuild;
pub mod store;
pub mod topic;
pub mod value;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use rdkafka::config::ClientConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use fold::Kind;

/// Which input topic a partition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputRole {
    Group,
    C2c,
}

impl InputRole {
    pub const ALL: [InputRole; 2] = [InputRole::Group, InputRole::C2c];

    /// Group states come from the group topic, the others from the c2c topic.
    pub fn of_kind(kind: Kind) -> InputRole {
        if kind.is_group() {
            InputRole::Group
        } else {
            InputRole::C2c
        }
    }
}

/// librdkafka properties: `[kafka.properties]`, then `[read_state.properties]`
/// over them.
fn base_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in config
        .kafka
        .properties
        .iter()
        .chain(config.read_state.properties.iter())
    {
        c.set(k, v.to_string());
    }
    c
}

/// The input consumer's, the state producer's and the rebuild reader's
/// librdkafka settings.
fn client_configs(
    config: &Config,
    base: &ClientConfig,
) -> (ClientConfig, ClientConfig, ClientConfig) {
    let rs = &config.read_state;
    let mut consumer_config = ClientConfig::new();
    consumer_config
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("auto.offset.reset", "earliest");
    for (k, v) in base.config_map().iter() {
        consumer_config.set(*k, *v);
    }
    // Not overridable: offsets are committed by hand, after the states they
    // caused are acknowledged.
    consumer_config
        .set("group.id", &rs.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let mut producer_config = ClientConfig::new();
    producer_config
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in base.config_map().iter() {
        producer_config.set(*k, *v);
    }
    // Not overridable: retries must neither duplicate nor reorder a key's
    // states, and a state counts as written only once all replicas have it.
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let mut rebuild_config = base.clone();
    rebuild_config.set("group.id", format!("{}.rebuild", rs.group_id));

    (consumer_config, producer_config, rebuild_config)
}

/// Runs the materializer until `shutdown` completes or a failure that a
/// restart must resolve.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.kafka.is_embedded() {
        bail!(
            "kafka.brokers = \"embedded\" is a gateway's private in-memory Kafka, which another process cannot read: \
             set kafka.brokers to your cluster"
        );
    }
    let rs = &config.read_state;
    let base = base_config(&config);
    topic::ensure_state_topic(&base, &config).await?;

    let (consumer_config, producer_config, rebuild_config) = client_configs(&config, &base);

    let metrics = Arc::new(metrics::MaterializeMetrics::new());
    let ready = admin::Readiness::default();
    let listen: SocketAddr = rs
        .listen
        .parse()
        .context("read_state.listen is not an address")?;
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen}: is another process using it? set read_state.listen")
    })?;
    let addr = listener.local_addr()?;
    let (stop_admin, stop_admin_rx) = watch::channel(false);
    tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        ready.clone(),
        stop_admin_rx,
    ));
    tracing::info!(%addr, group_id = %rs.group_id, state_topic = %rs.topic, "materializer listening");

    let stop = Arc::new(AtomicBool::new(false));
    let settings = consumer::Settings {
        group_topic: config.kafka.group_topic.clone(),
        c2c_topic: config.kafka.c2c_topic.clone(),
        state_topic: rs.topic.clone(),
        max_readers: fold::readers_that_fit(rs.max_readers, config.limits.account_bytes),
        evict_after: rs.evict_after,
    };
    if settings.max_readers < rs.max_readers {
        tracing::warn!(
            configured = rs.max_readers,
            kept = settings.max_readers,
            account_bytes = config.limits.account_bytes,
            "read_state.max_readers accounts of up to limits.account_bytes would not fit in one Kafka record; each state keeps at most {} readers (readers_truncated says when more are known)",
            settings.max_readers
        );
    }
    let mut worker = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            consumer::run(
                consumer_config,
                producer_config,
                rebuild_config,
                settings,
                metrics,
                ready,
                stop,
            )
        }
    });
    let result = tokio::select! {
        r = &mut worker => r,
        _ = shutdown => {
            tracing::info!("stopping: writing the last states, committing, leaving the group");
            stop.store(true, Ordering::SeqCst);
            worker.await
        }
    };
    let _ = stop_admin.send(true);
    let result = result.context("the consumer thread panicked")?;
    if result.is_ok() {
        tracing::info!("materializer stopped");
    }
    result
}
