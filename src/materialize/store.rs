//! The states of the input partitions this process is assigned, in memory.
//!
//! Input partition p of either input topic writes to partition p of the
//! state topic, so each assigned (topic, partition) owns one map; a revoked
//! partition's map is dropped and whoever gets the partition next rebuilds
//! it from the state topic. Nothing else is kept, so memory follows the
//! assigned partitions.
//!
//! Memory per message is the key, the state and the readers listed:
//! measured, about 390 bytes without readers, 700 with up to 11 (the set
//! allocates in nodes of 11), then about 55 per reader (README, "Read state").
//! Eviction is by event time, not wall clock, so replaying old input
//! behaves like the original run: a state whose `last_event_time_ms` is
//! `evict_after` older than the newest event of its partition is dropped
//! and a tombstone written, so the state topic forgets it as well. A read
//! that arrives after that starts the message's state afresh.

use std::collections::HashMap;
use std::time::Duration;

use super::fold::{ReadEvent, ReadState};

/// The states one input partition owns, by key.
#[derive(Default)]
pub struct PartitionStore {
    states: HashMap<String, ReadState>,
    /// The newest event time seen in this partition: eviction's clock.
    newest_event_ms: u64,
}

/// What folding an event did.
pub enum Folded<'a> {
    /// The state changed: write it.
    Changed(&'a mut ReadState),
    /// A duplicate or an older count: nothing to write.
    Unchanged,
    /// Older than the eviction horizon and not held: it would be evicted at
    /// once, so it is dropped.
    TooOld,
}

impl PartitionStore {
    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Folds an event into its key's state.
    pub fn fold(
        &mut self,
        key: String,
        e: &ReadEvent,
        max_readers: usize,
        evict_after: Duration,
    ) -> Folded<'_> {
        if !self.states.contains_key(&key)
            && e.event_time_ms < self.horizon_ms(evict_after).unwrap_or(0)
        {
            return Folded::TooOld;
        }
        self.newest_event_ms = self.newest_event_ms.max(e.event_time_ms);
        match self.states.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let s = o.into_mut();
                if s.fold(e, max_readers) {
                    Folded::Changed(s)
                } else {
                    Folded::Unchanged
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                Folded::Changed(v.insert(ReadState::of_event(e, max_readers)))
            }
        }
    }

    /// Joins a state read back from the state topic (a rebuild).
    pub fn restore(&mut self, key: String, state: ReadState, max_readers: usize) {
        self.newest_event_ms = self.newest_event_ms.max(state.last_event_time_ms);
        match self.states.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                o.get_mut().join(&state, max_readers);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(state);
            }
        }
    }

    /// A tombstone read back: the key was evicted.
    pub fn forget(&mut self, key: &str) {
        self.states.remove(key);
    }

    fn horizon_ms(&self, evict_after: Duration) -> Option<u64> {
        let age = u64::try_from(evict_after.as_millis()).unwrap_or(u64::MAX);
        self.newest_event_ms.checked_sub(age)
    }

    /// Removes the states past the eviction horizon; returns their keys,
    /// for tombstones.
    pub fn evict(&mut self, evict_after: Duration) -> Vec<String> {
        let Some(horizon) = self.horizon_ms(evict_after) else {
            return Vec::new();
        };
        let old: Vec<String> = self
            .states
            .iter()
            .filter(|(_, s)| s.last_event_time_ms < horizon)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.states.remove(k);
        }
        old
    }

    pub fn get(&self, key: &str) -> Option<&ReadState> {
        self.states.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, t: u64) -> ReadEvent {
        ReadEvent::parse(format!(
            r#"{{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":1,"conversation_id":"g","msg_seq":{seq},"read_count":1,"unread_count":1,"readers":["u"],"event_time_ms":{t}}}"#
        ).as_bytes())
        .unwrap()
    }

    #[test]
    fn states_older_than_the_horizon_are_evicted_and_late_strangers_dropped() {
        let day = Duration::from_secs(86_400);
        let mut p = PartitionStore::default();
        let e1 = event(1, 1_000);
        assert!(matches!(p.fold(e1.key(), &e1, 10, day), Folded::Changed(_)));
        let e2 = event(2, 1_000 + 2 * 86_400_000);
        assert!(matches!(p.fold(e2.key(), &e2, 10, day), Folded::Changed(_)));
        assert_eq!(p.evict(day), vec![e1.key()]);
        assert_eq!(p.len(), 1);
        // A read of an evicted message, as old as it was, is dropped.
        assert!(matches!(p.fold(e1.key(), &e1, 10, day), Folded::TooOld));
        // A recent read of it starts afresh.
        let e3 = event(1, 1_000 + 2 * 86_400_000);
        assert!(matches!(p.fold(e3.key(), &e3, 10, day), Folded::Changed(_)));
    }
}
