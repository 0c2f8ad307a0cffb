//! Rebuilding the state of newly assigned input partitions from the state
//! topic, before any of their input is folded.
//!
//! The state topic is the fold's changelog: every change was written to the
//! state partition of the input partition it came from. Reading that
//! partition from its beginning to its end and joining every value gives
//! the state as the last owner left it (a tombstone removes its key, in
//! offset order). The input is then folded from the committed offset, which
//! is never ahead of what the state topic holds, so at worst some events
//! are folded twice, which the join absorbs.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::InputRole;
use super::store::PartitionStore;
use super::value;

/// How long one rebuild may take before the process gives up (and is
/// restarted); far beyond what a compacted partition needs.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Rebuilt {
    pub stores: HashMap<(InputRole, i32), PartitionStore>,
    pub records: u64,
}

/// Reads the state partitions of `wanted` and returns their stores.
pub fn rebuild(
    base: &ClientConfig,
    state_topic: &str,
    wanted: &[(InputRole, i32)],
    max_readers: usize,
) -> anyhow::Result<Rebuilt> {
    let mut stores: HashMap<(InputRole, i32), PartitionStore> = wanted
        .iter()
        .map(|w| (*w, PartitionStore::default()))
        .collect();
    let consumer: BaseConsumer = base
        .clone()
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the rebuild consumer")?;
    let partitions: HashSet<i32> = wanted.iter().map(|(_, p)| *p).collect();
    let mut tpl = TopicPartitionList::new();
    let mut open = HashMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(state_topic, p, Duration::from_secs(15))
            .with_context(|| format!("cannot read the offsets of {state_topic} [{p}]"))?;
        if high > low {
            tpl.add_partition_offset(state_topic, p, Offset::Beginning)?;
            open.insert(p, high);
        }
    }
    let mut records = 0;
    if open.is_empty() {
        return Ok(Rebuilt { stores, records });
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + REBUILD_TIMEOUT;
    while !open.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "rebuilding from {state_topic} took over {REBUILD_TIMEOUT:?}; partitions left: {open:?}"
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // EOF is also reported for a partition that has not caught
                // up with the high watermark read above; check the position.
                let reached = consumer.position().ok().and_then(|pos| {
                    match pos.find_partition(state_topic, p)?.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    }
                });
                if let (Some(o), Some(high)) = (reached, open.get(&p))
                    && o >= *high
                {
                    open.remove(&p);
                }
            }
            Some(Err(e)) => return Err(e).context("cannot read the state topic"),
            Some(Ok(m)) => {
                records += 1;
                let p = m.partition();
                if open.get(&p).is_some_and(|high| m.offset() + 1 >= *high) {
                    open.remove(&p);
                }
                apply(&mut stores, &m, max_readers);
            }
        }
    }
    Ok(Rebuilt { stores, records })
}

/// Applies one state record to the store of its partition and kind: a value
/// is joined, a tombstone removes the key.
fn apply(
    stores: &mut HashMap<(InputRole, i32), PartitionStore>,
    m: &BorrowedMessage<'_>,
    max_readers: usize,
) {
    let p = m.partition();
    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
        return;
    };
    let Some(bytes) = m.payload() else {
        for role in InputRole::ALL {
            if let Some(s) = stores.get_mut(&(role, p)) {
                s.forget(key);
            }
        }
        return;
    };
    let Some(state) = value::decode(bytes) else {
        tracing::warn!(
            topic = m.topic(),
            partition = p,
            offset = m.offset(),
            "a record in the state topic is not read_state.v1; skipped"
        );
        return;
    };
    if let Some(s) = stores.get_mut(&(InputRole::of_kind(state.kind), p)) {
        s.restore(key.to_owned(), state, max_readers);
    }
}
