//! The consumer loop: poll input, fold, write changed states, and commit
//! input offsets only once the states they caused are acknowledged.
//!
//! It runs on a thread of its own with librdkafka's blocking API, because
//! the rebalance callbacks run inside `poll` on that thread, which is what
//! makes the hand-over safe:
//!
//! - on **revoke**, before the partitions go to someone else, the producer
//!   is flushed and the offsets folded so far are committed, then the
//!   partitions' states are dropped. The next owner starts from that commit
//!   and finds every state it caused in the state topic, and no late write
//!   of ours can land after one of theirs;
//! - on **assign**, the new partitions' states are rebuilt from the state
//!   topic before `poll` returns, so no input of theirs is folded into an
//!   empty state.
//!
//! A process killed between a write and its commit leaves states ahead of
//! the committed input; the next owner folds those events again, and the
//! join changes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::admin::Readiness;
use super::fold::{self, Kind, ReadEvent};
use super::metrics::MaterializeMetrics;
use super::store::{Folded, PartitionStore};
use super::{InputRole, rebuild, value};

/// Offsets are committed at least this often while input flows.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// And after at most this many input records.
const COMMIT_RECORDS: usize = 5_000;
const LAG_INTERVAL: Duration = Duration::from_secs(5);
const EVICT_INTERVAL: Duration = Duration::from_secs(60);

/// What the loop needs to know.
pub struct Settings {
    pub group_topic: String,
    pub c2c_topic: String,
    pub state_topic: String,
    pub max_readers: usize,
    pub evict_after: Duration,
}

/// Counts delivery reports of state records.
pub struct Deliveries {
    metrics: Arc<MaterializeMetrics>,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The opaque passed with a record: the kind index, or `TOMBSTONE`.
const TOMBSTONE: usize = usize::MAX;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, kind: usize) {
        match result {
            // An implicit ack, which may stand for a state never written
            // (see `publish::delivery`): a failure, so that the input is
            // read again rather than committed past it.
            Ok(m) if m.offset() == crate::publish::OFFSET_INVALID => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                    "a state record was reported written without an offset (not confirmed)".into(),
                );
            }
            Ok(_) => {
                if let Some(k) = Kind::ALL.get(kind) {
                    self.metrics
                        .states_emitted
                        .with_label_values(&[k.as_str()])
                        .inc();
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }
}

type StateProducer = BaseProducer<Deliveries>;

/// What the loop and the rebalance callbacks share.
struct Shared {
    settings: Settings,
    producer: StateProducer,
    rebuild_config: ClientConfig,
    metrics: Arc<MaterializeMetrics>,
    ready: Readiness,
    stores: Mutex<HashMap<(InputRole, i32), PartitionStore>>,
    /// Next offset to commit, per input partition, for records whose states
    /// are written (not yet acknowledged).
    pending: Mutex<HashMap<(InputRole, i32), i64>>,
    /// A failure inside a callback, which cannot return one.
    failure: Mutex<Option<anyhow::Error>>,
    /// Set on assignment, so the lag of new partitions shows at once.
    assignment_changed: AtomicBool,
    /// Set once a state record failed: from then on this process commits
    /// no input offset, on any path (the loop's end, the revoke as the
    /// consumer closes), so that the restart folds that input again.
    write_failed: AtomicBool,
}

impl Shared {
    fn topic(&self, role: InputRole) -> &str {
        match role {
            InputRole::Group => &self.settings.group_topic,
            InputRole::C2c => &self.settings.c2c_topic,
        }
    }

    fn role(&self, topic: &str) -> Option<InputRole> {
        if topic == self.settings.group_topic {
            Some(InputRole::Group)
        } else if topic == self.settings.c2c_topic {
            Some(InputRole::C2c)
        } else {
            None
        }
    }

    fn fail(&self, e: anyhow::Error) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }

    fn take_failure(&self) -> Option<anyhow::Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Waits until every state record written so far is acknowledged, then
    /// commits the input offsets that caused them.
    fn flush_and_commit(&self, consumer: &BaseConsumer<FoldContext>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.producer.in_flight_count() > 0 {
            let _ = self.producer.flush(Duration::from_millis(500));
            if Instant::now() > deadline {
                bail!("Kafka has not acknowledged the state records for 5 minutes");
            }
        }
        let failed = self.producer.context().failed.swap(0, Ordering::SeqCst);
        if failed > 0 {
            self.write_failed.store(true, Ordering::SeqCst);
            let why = self
                .producer
                .context()
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            // The input offsets stay uncommitted: a restart folds them again.
            bail!(
                "{failed} state record(s) could not be written to {} ({why}); exiting so that a restart folds their input again",
                self.settings.state_topic
            );
        }
        if self.write_failed.load(Ordering::SeqCst) {
            bail!("a state record failed earlier: no input offset is committed until a restart");
        }
        let pending: Vec<((InputRole, i32), i64)> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((role, p), next) in &pending {
            tpl.add_partition_offset(self.topic(*role), *p, Offset::Offset(*next))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            // The states are written; a later commit covers these offsets,
            // and if the partitions moved on, their next owner folds the
            // records again, which changes nothing.
            tracing::warn!(error = %e, "cannot commit input offsets; they are retried with the next commit");
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (k, next) in pending {
                let e = p.entry(k).or_insert(next);
                *e = (*e).max(next);
            }
        }
        Ok(())
    }

    fn update_state_gauge(&self, stores: &HashMap<(InputRole, i32), PartitionStore>) {
        self.metrics
            .states_in_memory
            .set(stores.values().map(|s| s.len() as i64).sum());
        self.metrics.partitions_assigned.set(stores.len() as i64);
    }
}

pub struct FoldContext {
    shared: Arc<Shared>,
}

impl ClientContext for FoldContext {}

impl ConsumerContext for FoldContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let s = &self.shared;
        // Everything folded so far is written and committed before the
        // partitions can go to another process.
        if let Err(e) = s.flush_and_commit(consumer) {
            s.fail(e);
        }
        let mut stores = s.stores.lock().unwrap_or_else(|p| p.into_inner());
        let mut revoked = Vec::new();
        for e in tpl.elements() {
            if let Some(role) = s.role(e.topic()) {
                stores.remove(&(role, e.partition()));
                let _ = s
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[e.topic(), &e.partition().to_string()]);
                revoked.push(format!("{}[{}]", e.topic(), e.partition()));
            }
        }
        s.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        s.update_state_gauge(&stores);
        tracing::info!(partitions = %revoked.join(","), "partitions revoked; their state is dropped");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        match rebalance {
            Rebalance::Assign(tpl) => {
                let wanted: Vec<(InputRole, i32)> = {
                    let stores = s.stores.lock().unwrap_or_else(|p| p.into_inner());
                    tpl.elements()
                        .iter()
                        .filter_map(|e| Some((s.role(e.topic())?, e.partition())))
                        .filter(|k| !stores.contains_key(k))
                        .collect()
                };
                if wanted.is_empty() {
                    return;
                }
                s.ready.set(false);
                s.metrics.up.set(0);
                let started = Instant::now();
                let names: Vec<String> = wanted
                    .iter()
                    .map(|(r, p)| format!("{}[{p}]", s.topic(*r)))
                    .collect();
                tracing::info!(partitions = %names.join(","), "partitions assigned; rebuilding their state from {}", s.settings.state_topic);
                match rebuild::rebuild(
                    &s.rebuild_config,
                    &s.settings.state_topic,
                    &wanted,
                    s.settings.max_readers,
                ) {
                    Ok(r) => {
                        let took = started.elapsed();
                        s.metrics.rebuild_seconds.observe(took.as_secs_f64());
                        s.metrics.rebuilt_states.inc_by(r.records);
                        let mut stores = s.stores.lock().unwrap_or_else(|p| p.into_inner());
                        let states: usize = r.stores.values().map(PartitionStore::len).sum();
                        stores.extend(r.stores);
                        s.update_state_gauge(&stores);
                        tracing::info!(
                            partitions = %names.join(","),
                            states,
                            records_read = r.records,
                            seconds = took.as_secs_f64(),
                            "state rebuilt; folding"
                        );
                        s.ready.set(true);
                        s.metrics.up.set(1);
                        s.assignment_changed.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        s.fail(e.context("cannot rebuild the state of the assigned partitions"))
                    }
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Runs until `stop` is set or an error that a restart must resolve.
pub fn run(
    consumer_config: ClientConfig,
    producer_config: ClientConfig,
    rebuild_config: ClientConfig,
    settings: Settings,
    metrics: Arc<MaterializeMetrics>,
    ready: Readiness,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let producer: StateProducer = producer_config
        .create_with_context(Deliveries {
            metrics: metrics.clone(),
            failed: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
        .context("cannot create the state producer: check [read_state.properties]")?;
    let shared = Arc::new(Shared {
        settings,
        producer,
        rebuild_config,
        metrics,
        ready: ready.clone(),
        stores: Mutex::new(HashMap::new()),
        pending: Mutex::new(HashMap::new()),
        failure: Mutex::new(None),
        assignment_changed: AtomicBool::new(false),
        write_failed: AtomicBool::new(false),
    });
    let consumer: BaseConsumer<FoldContext> = consumer_config
        .create_with_context(FoldContext {
            shared: shared.clone(),
        })
        .context("cannot create the input consumer: check [read_state.properties]")?;
    consumer
        .subscribe(&[&shared.settings.group_topic, &shared.settings.c2c_topic])
        .context("cannot subscribe to the input topics")?;
    ready.set(true);
    shared.metrics.up.set(1);
    tracing::info!(
        group_topic = %shared.settings.group_topic,
        c2c_topic = %shared.settings.c2c_topic,
        state_topic = %shared.settings.state_topic,
        "materializer subscribed; waiting for partitions"
    );
    let result = fold_loop(&consumer, &shared, &stop);
    ready.set(false);
    shared.metrics.up.set(0);
    let flushed = shared.flush_and_commit(&consumer);
    // Leaving the group (dropping the consumer) revokes the partitions at
    // once, so others need not wait for the session timeout.
    drop(consumer);
    result.and(flushed)
}

fn fold_loop(
    consumer: &BaseConsumer<FoldContext>,
    s: &Shared,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let headers = OwnedHeaders::new().insert(Header {
        key: value::SCHEMA_HEADER,
        value: Some(value::SCHEMA),
    });
    let mut since_commit = 0usize;
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut last_evict = Instant::now();
    let mut positions: HashMap<(InputRole, i32), i64> = HashMap::new();
    let mut invalid_seen = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(e) = s.take_failure() {
            return Err(e);
        }
        match polled {
            None => {}
            // Only when enable.partition.eof is set in the properties: not an error.
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "input consumer error (librdkafka retries)"),
            Some(Ok(m)) => {
                let Some(role) = s.role(m.topic()) else {
                    continue;
                };
                let next = m.offset() + 1;
                positions.insert((role, m.partition()), next);
                match parse(&m, role) {
                    Ok(event) => fold_event(s, &event, role, m.partition(), &headers)?,
                    Err(why) => {
                        s.metrics.events_invalid.inc();
                        invalid_seen += 1;
                        // The first and then every thousandth: a topic full of
                        // junk must not flood the log.
                        if invalid_seen % 1000 == 1 {
                            tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %why,
                                skipped_so_far = invalid_seen, "input record is not a read_receipt.v1 event; skipped");
                        }
                    }
                }
                s.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((role, m.partition()), next);
                since_commit += 1;
            }
        }
        s.producer.poll(Duration::ZERO);
        // A refused write is acted on at once, also when no input follows
        // it (an eviction's tombstones have none): flush_and_commit exits.
        let refused = s.producer.context().failed.load(Ordering::SeqCst) > 0;
        if refused
            || since_commit > 0
                && (since_commit >= COMMIT_RECORDS || last_commit.elapsed() >= COMMIT_INTERVAL)
        {
            s.flush_and_commit(consumer)?;
            since_commit = 0;
            last_commit = Instant::now();
        }
        if last_lag.elapsed() >= LAG_INTERVAL || s.assignment_changed.swap(false, Ordering::SeqCst)
        {
            update_lag(consumer, s, &mut positions);
            last_lag = Instant::now();
        }
        if last_evict.elapsed() >= EVICT_INTERVAL {
            evict(s)?;
            last_evict = Instant::now();
        }
    }
    Ok(())
}

/// The event in an input record, if it is one and sits on its own topic
/// (a c2c event on the group topic would be written by the wrong owner).
fn parse(m: &BorrowedMessage<'_>, role: InputRole) -> Result<ReadEvent, String> {
    let e = ReadEvent::parse(m.payload().unwrap_or_default()).map_err(|e| e.to_string())?;
    if e.kind.is_group() == (role == InputRole::Group) {
        Ok(e)
    } else {
        Err(format!("a {} event on {}", e.kind.as_str(), m.topic()))
    }
}

/// Folds one event into its partition's store and writes the state if it
/// changed.
fn fold_event(
    s: &Shared,
    event: &ReadEvent,
    role: InputRole,
    p: i32,
    headers: &OwnedHeaders,
) -> anyhow::Result<()> {
    s.metrics
        .events_folded
        .with_label_values(&[event.kind.as_str()])
        .inc();
    let key = event.key();
    let mut stores = s.stores.lock().unwrap_or_else(|p| p.into_inner());
    let Some(store) = stores.get_mut(&(role, p)) else {
        bail!(
            "a record of {}[{p}] arrived without its state: not assigned here",
            s.topic(role)
        );
    };
    match store.fold(
        key.clone(),
        event,
        s.settings.max_readers,
        s.settings.evict_after,
    ) {
        Folded::Unchanged => {}
        Folded::TooOld => s.metrics.events_too_old.inc(),
        Folded::Changed(state) => {
            // Checked only when the value is large: the readers alone are
            // under the cap whenever the whole value is.
            let mut bytes = value::encode(state, value::now_ms());
            if bytes.len() > fold::READERS_MAX_JSON_BYTES && state.cap_reader_bytes() {
                s.metrics.readers_cut_for_size.inc();
                bytes = value::encode(state, value::now_ms());
            }
            let kind = Kind::ALL.iter().position(|k| *k == state.kind).unwrap_or(0);
            send(
                &s.producer,
                BaseRecord::with_opaque_to(&s.settings.state_topic, kind)
                    .partition(p)
                    .key(&key)
                    .payload(&bytes)
                    .headers(headers.clone()),
            )?;
        }
    }
    s.update_state_gauge(&stores);
    Ok(())
}

/// Hands a record to librdkafka, waiting while its queue is full.
fn send(
    producer: &StateProducer,
    mut record: BaseRecord<'_, String, Vec<u8>, usize>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e).context("cannot write a state record"),
        }
    }
}

/// Sets the lag gauge of each assigned partition: high watermark minus the
/// next offset to fold.
fn update_lag(
    consumer: &BaseConsumer<FoldContext>,
    s: &Shared,
    positions: &mut HashMap<(InputRole, i32), i64>,
) {
    let assigned: Vec<(InputRole, i32)> = s
        .stores
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .copied()
        .collect();
    positions.retain(|k, _| assigned.contains(k));
    for (role, p) in assigned {
        let topic = s.topic(role);
        let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(1)) else {
            continue;
        };
        let next = match positions.get(&(role, p)) {
            Some(n) => *n,
            None => match consumer.committed_offsets(
                {
                    let mut t = TopicPartitionList::new();
                    t.add_partition(topic, p);
                    t
                },
                Duration::from_secs(1),
            ) {
                Ok(c) => match c.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                },
                Err(_) => continue,
            },
        };
        s.metrics
            .consumer_lag
            .with_label_values(&[topic, &p.to_string()])
            .set((high - next).max(0));
    }
}

/// Drops states past `evict_after` and writes their tombstones.
fn evict(s: &Shared) -> anyhow::Result<()> {
    let mut stores = s.stores.lock().unwrap_or_else(|p| p.into_inner());
    let mut evicted = 0;
    for ((_, p), store) in stores.iter_mut() {
        for key in store.evict(s.settings.evict_after) {
            let record: BaseRecord<'_, String, Vec<u8>, usize> =
                BaseRecord::with_opaque_to(&s.settings.state_topic, TOMBSTONE)
                    .partition(*p)
                    .key(&key);
            send(&s.producer, record)?;
            evicted += 1;
        }
    }
    if evicted > 0 {
        s.metrics.states_evicted.inc_by(evicted);
        s.update_state_gauge(&stores);
        tracing::info!(evicted, evict_after = ?s.settings.evict_after, "old states evicted, tombstones written");
    }
    Ok(())
}
