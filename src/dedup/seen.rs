//! The ids accepted within the dedup window, in as little memory as an
//! exact answer allows.
//!
//! A `HashSet<u64>` beside a `VecDeque<(time, id)>` took about 45 bytes per
//! remembered id once full: the queue doubles past its needs, and a set
//! whose oldest ids leave as new ones arrive fills with deleted markers
//! until it doubles too (200,000 ids: 4.7 MB of table). With the default
//! 200,000 ids that was a third of the gateway's memory. Here the arrival
//! order is a ring sized to the configured count, and the index an
//! open-addressing table of the ids themselves, kept at most three quarters
//! full, whose deletions move entries back instead of leaving markers (so
//! it never grows past its size): 16 + 10.7 bytes per id.
//!
//! Slots are found by a hash with a per-process random key: ids derive
//! from content an attacker chooses, and a predictable slot would let it
//! build long probe runs. The hash is foldhash's (see `dedup.rs`), not
//! std's SipHash, several times slower for a u64: a removal rehashes every
//! entry it moves back. What the set costs now is mostly cache misses on
//! the table's slots (bench/README.md, sixth pass).

use std::collections::VecDeque;
use std::hash::BuildHasher;

/// Keys the slot hash: randomly per process, except in the crate's unit
/// tests, which use fixed keys so that a failure replays from its seed.
#[cfg(not(test))]
type SlotHasher = foldhash::quality::SeedableRandomState;
#[cfg(not(test))]
fn slot_hasher() -> SlotHasher {
    super::random_hasher()
}
#[cfg(test)]
type SlotHasher = foldhash::quality::FixedState;
#[cfg(test)]
fn slot_hasher() -> SlotHasher {
    SlotHasher::default()
}

/// An empty slot. The id 0 is stored as 1: two ids in 2^64 share a slot
/// name, which costs one dropped duplicate-looking event at worst.
const EMPTY: u64 = 0;

/// How many slots a request loads ahead of probing them: enough for the
/// usual one to a few ids per callback to overlap their misses; a request
/// of hundreds would only evict its first lines before it reached them.
pub(super) const PREFETCH_AHEAD: usize = 16;

/// The smallest table, so that a few ids do not rehash at every step.
const MIN_SLOTS: usize = 64;

pub(super) struct Seen {
    /// Accepted ids in arrival order with their time (ms), oldest first.
    ring: VecDeque<(u64, u64)>,
    /// Open addressing, linear probing; `EMPTY` marks a free slot.
    slots: Vec<u64>,
    hasher: SlotHasher,
    /// The most ids the ring and table are sized for.
    max_entries: usize,
}

impl Seen {
    pub(super) fn new(max_entries: usize) -> Seen {
        Seen {
            ring: VecDeque::new(),
            slots: Vec::new(),
            hasher: slot_hasher(),
            max_entries,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ring.len()
    }

    pub(super) fn contains(&self, key: u64) -> bool {
        let key = stored(key);
        if self.slots.is_empty() {
            return false;
        }
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                EMPTY => return false,
                k if k == key => return true,
                _ => i = self.next(i),
            }
        }
    }

    /// Remembers `key` as accepted at `at_ms`; false when it already was.
    /// Callers expire by time first ([`Seen::oldest`], [`Seen::pop_oldest`]);
    /// at `max_entries` the oldest id makes room here, so that even one
    /// request with more ids than that cannot grow the set past it.
    pub(super) fn insert(&mut self, key: u64, at_ms: u64) -> bool {
        if self.contains(key) {
            return false;
        }
        while self.ring.len() >= self.max_entries.max(1) {
            self.pop_oldest();
        }
        let key = stored(key);
        self.reserve_one();
        let mut i = self.home(key);
        while self.slots[i] != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = key;
        self.push_ring(key, at_ms);
        true
    }

    /// Starts loading the table slot where `key` would be found, so that
    /// a later [`Seen::contains`] or [`Seen::insert`] of it does not stall
    /// on memory: the table is megabytes, and each lookup a miss.
    pub(super) fn prefetch(&self, key: u64) {
        if !self.slots.is_empty() {
            prefetch(&self.slots[self.home(stored(key))]);
        }
    }

    /// The same for the slots of the `n` oldest ids, which the next
    /// insertions at capacity remove.
    pub(super) fn prefetch_oldest(&self, n: usize) {
        for &(_, key) in self.ring.iter().take(n) {
            self.prefetch(key);
        }
    }

    /// The oldest remembered id's time, if any.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.ring.front().map(|&(at, _)| at)
    }

    pub(super) fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.ring.pop_front() {
            self.remove(key);
        }
    }

    /// Deletion by backward shift: the entries after the freed slot that
    /// could live there move back, so no probe run is ever cut short and no
    /// marker is left behind.
    fn remove(&mut self, key: u64) {
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                EMPTY => return,
                k if k == key => break,
                _ => i = self.next(i),
            }
        }
        let mut j = i;
        loop {
            j = self.next(j);
            let k = self.slots[j];
            if k == EMPTY {
                self.slots[i] = EMPTY;
                return;
            }
            // `k` may move back to `i` unless its home lies cyclically in
            // (i, j]: then `i` comes before its home and a lookup would
            // never reach it there.
            let h = self.home(k);
            let stays = if i <= j {
                i < h && h <= j
            } else {
                i < h || h <= j
            };
            if !stays {
                self.slots[i] = k;
                i = j;
            }
        }
    }

    fn push_ring(&mut self, key: u64, at_ms: u64) {
        if self.ring.len() == self.ring.capacity() {
            // Grow as usual, but never past the configured count: a full
            // ring is the steady state, and doubling would waste half.
            let room = self.max_entries.saturating_sub(self.ring.len());
            let more = self.ring.len().max(16).min(room.max(1));
            self.ring.reserve_exact(more);
        }
        self.ring.push_back((at_ms, key));
    }

    /// Makes sure one more id keeps the table at most 3/4 full.
    fn reserve_one(&mut self) {
        let needed = (self.ring.len() + 1) * 4 / 3 + 1;
        if needed <= self.slots.len() {
            return;
        }
        // Double, but stop at the size the configured count needs, so a full
        // set sits at three quarters of its table rather than at a third.
        let cap = (self.max_entries.max(1).saturating_mul(4) / 3 + 1).max(MIN_SLOTS);
        let size = (self.slots.len() * 2).max(MIN_SLOTS).min(cap).max(needed);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; size]);
        for key in old.into_iter().filter(|&k| k != EMPTY) {
            let mut i = self.home(key);
            while self.slots[i] != EMPTY {
                i = self.next(i);
            }
            self.slots[i] = key;
        }
    }

    fn home(&self, key: u64) -> usize {
        // The hash scaled onto the table's size (which need not be a power
        // of two): the high half of the 128-bit product.
        let h = self.hasher.hash_one(key);
        ((u128::from(h) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }
}

/// A hint to the CPU to bring `slot` into its cache; it never faults and
/// changes nothing the program can see. Only on x86_64: elsewhere (aarch64
/// has no stable prefetch intrinsic yet) it does nothing, and the lookups
/// take their misses one after another as before.
#[inline(always)]
fn prefetch(slot: &u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch reads nothing the program can observe and
        // cannot fault; SSE, which it needs, is part of x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(slot).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = slot;
}

fn stored(key: u64) -> u64 {
    if key == EMPTY { 1 } else { key }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashSet, VecDeque};

    /// The table against std's set under random inserts and oldest-first
    /// removals, at every fill level up to the cap and past it.
    #[test]
    fn agrees_with_a_hash_set_under_churn() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for max in [1usize, 7, 100, 1000] {
            let mut seen = Seen::new(max);
            let mut model: HashSet<u64> = HashSet::new();
            let mut order: VecDeque<u64> = VecDeque::new();
            for step in 0..20_000u64 {
                // A small key space, so that repeats and removals of keys
                // that collide in the table are common.
                let key = next() % (max as u64 * 3 + 5);
                let expect_new = !model.contains(&stored(key));
                assert_eq!(seen.contains(key), !expect_new, "max {max} step {step}");
                if expect_new {
                    if order.len() == max {
                        seen.pop_oldest();
                        model.remove(&order.pop_front().unwrap());
                    }
                    assert!(seen.insert(key, step));
                    model.insert(stored(key));
                    order.push_back(stored(key));
                } else {
                    assert!(!seen.insert(key, step));
                }
                assert_eq!(seen.len(), model.len());
            }
            for &k in &model {
                assert!(seen.contains(k), "max {max}: lost {k}");
            }
            assert!(seen.ring.capacity() <= max.max(16), "ring grew past max");
            assert!(seen.slots.len() <= (max * 4 / 3 + 1).max(MIN_SLOTS));
        }
    }

    #[test]
    fn more_ids_at_once_than_the_set_holds_keep_it_at_its_size() {
        let mut seen = Seen::new(10);
        for key in 0..1000u64 {
            assert!(seen.insert(key * 7919, 1));
        }
        assert_eq!(seen.len(), 10);
        assert!(seen.contains(999 * 7919) && !seen.contains(989 * 7919));
        assert!(seen.slots.len() <= MIN_SLOTS && seen.ring.capacity() <= 16);
    }

    #[test]
    fn zero_is_a_key_like_any_other() {
        let mut seen = Seen::new(4);
        assert!(!seen.contains(0));
        assert!(seen.insert(0, 1));
        assert!(seen.contains(0));
        assert!(!seen.insert(0, 2));
        seen.pop_oldest();
        assert!(!seen.contains(0));
    }
}
