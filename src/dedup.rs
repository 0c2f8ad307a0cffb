//! Drops an event that was accepted moments ago: Tencent's retry-on-timeout
//! and a caller's own retries must not double the stream.
//!
//! Bounded twice: by time (`spool.dedup_window`) and by count
//! (`spool.dedup_max_entries`, about 25 bytes each), whichever comes first.
//! An entry is 64 bits of the event id (itself a hash; two different events
//! sharing them among 200,000 remembered is a one-in-a-billion event, and
//! the cost would be one dropped duplicate-looking event) and the time it
//! was accepted, in milliseconds since the window started.
//! This is a best effort on the way in; duplicates that can still happen
//! (a replay after a crash) carry the same `event_id` for consumers to drop.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::record::EventId;

/// Event ids are already uniform hashes; hashing them again is wasted work.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdSet = HashSet<u64, BuildHasherDefault<IdHasher>>;

pub struct Dedup {
    window: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Times are kept as milliseconds since this instant, to keep entries small.
    epoch: Instant,
    seen: IdSet,
    order: VecDeque<(u64, u64)>,
}

fn compact(id: &EventId) -> u64 {
    let mut raw = [0u8; 8];
    if hex::decode_to_slice(&id.0[..16], &mut raw).is_err() {
        // Not reachable for ids we make; fall back to the leading bytes.
        raw.copy_from_slice(&id.0[..8]);
    }
    u64::from_le_bytes(raw)
}

impl Dedup {
    pub fn new(window: Duration, max_entries: usize) -> Dedup {
        Dedup {
            window,
            max_entries,
            inner: Mutex::new(Inner {
                epoch: Instant::now(),
                seen: IdSet::default(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Remembers the ids that are new and reports which they were (`true` =
    /// new). A request that repeats one of its own ids counts it once.
    pub fn admit(&self, ids: &[EventId], now: Instant) -> Vec<bool> {
        if self.max_entries == 0 || self.window.is_zero() {
            return vec![true; ids.len()];
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = now.saturating_duration_since(inner.epoch).as_millis() as u64;
        let window_ms = self.window.as_millis() as u64;
        inner.expire(
            now_ms,
            window_ms,
            self.max_entries.saturating_sub(ids.len()),
        );
        ids.iter()
            .map(|id| {
                let key = compact(id);
                let new = inner.seen.insert(key);
                if new {
                    inner.order.push_back((now_ms, key));
                }
                new
            })
            .collect()
    }

    /// Forgets ids whose acceptance failed (spool full), so that the retry
    /// Tencent or the caller makes is not dropped as a duplicate.
    pub fn forget(&self, ids: &[EventId]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            inner.seen.remove(&compact(id));
        }
        // Their entries in `order` stay until they expire; removing an
        // absent key then is harmless.
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map(|i| i.seen.len()).unwrap_or(0)
    }
}

impl Inner {
    fn expire(&mut self, now_ms: u64, window_ms: u64, keep_at_most: usize) {
        while let Some(&(at, key)) = self.order.front() {
            if now_ms.saturating_sub(at) < window_ms && self.order.len() <= keep_at_most {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EventId {
        let mut b = [b'0'; 32];
        b[1] = b"0123456789abcdef"[(n % 16) as usize];
        b[0] = b"0123456789abcdef"[(n / 16) as usize];
        EventId(b)
    }

    #[test]
    fn a_repeat_within_the_window_is_dropped() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let t = Instant::now();
        assert_eq!(d.admit(&[id(1), id(2)], t), vec![true, true]);
        assert_eq!(d.admit(&[id(2), id(3)], t), vec![false, true]);
        assert_eq!(d.admit(&[id(4), id(4)], t), vec![true, false]);
    }

    #[test]
    fn ids_expire_after_the_window() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let t = Instant::now();
        d.admit(&[id(1)], t);
        assert_eq!(d.admit(&[id(1)], t + Duration::from_secs(59)), vec![false]);
        assert_eq!(d.admit(&[id(1)], t + Duration::from_secs(61)), vec![true]);
    }

    #[test]
    fn memory_is_bounded_by_count() {
        let d = Dedup::new(Duration::from_secs(3600), 10);
        let t = Instant::now();
        for n in 0..100 {
            d.admit(&[id(n)], t);
        }
        assert!(d.len() <= 10, "{}", d.len());
        // The newest are still remembered.
        assert_eq!(d.admit(&[id(99)], t), vec![false]);
    }

    #[test]
    fn forgotten_ids_are_admitted_again() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let t = Instant::now();
        d.admit(&[id(1)], t);
        d.forget(&[id(1)]);
        assert_eq!(d.admit(&[id(1)], t), vec![true]);
    }
}
