//! Drops an event that was accepted moments ago: Tencent's retry-on-timeout
//! and a caller's own retries must not double the stream.
//!
//! An id is remembered as *pending* while the request that brought it first
//! writes it to the spool, and as *seen* only once that write succeeded. A
//! copy arriving meanwhile waits for the original's outcome instead of being
//! answered "duplicate" at once: otherwise it would be told OK for an event
//! that, if the original's write then fails (spool full, disk error) or its
//! client goes away, is nowhere. The pending mark is held by a [`Claim`]
//! that releases it when dropped, so a request whose future hyper drops
//! mid-way (client gone) cannot leave its ids marked.
//!
//! Seen ids are bounded twice: by time (`spool.dedup_window`) and by count
//! (`spool.dedup_max_entries`, about 27 bytes each, see `seen.rs`),
//! whichever comes first.
//! An entry is 64 bits of the event id (itself a hash; two different events
//! sharing them among 200,000 remembered is a one-in-a-billion event, and
//! the cost would be one dropped duplicate-looking event) and the time it
//! was accepted, in milliseconds since the window started. Pending ids are
//! bounded by the requests in flight.
//!
//! The sets are hashed with a per-process random key: event ids derive
//! from content an attacker chooses, and with a fixed hash they could be
//! ground into long probe chains while the one lock is held. The hash is
//! foldhash (already in the build through hashbrown), a few times cheaper
//! than std's SipHash for a u64, keyed like std's from the system's random
//! source ([`random_hasher`]) rather than from foldhash's own seed, which
//! mixes addresses and the time. Its stated limit, an attacker who studies
//! the process until it can reconstruct the key, would take timing single
//! table probes over the network: the keys are 64 bits of SHA-256 over
//! content, and no answer depends on where an id sits.
//!
//! This is a best effort on the way in; duplicates that can still happen
//! (a replay after a crash) carry the same `event_id` for consumers to drop.

mod seen;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use foldhash::SharedSeed;
use foldhash::quality::SeedableRandomState;
use tokio::sync::watch;

use crate::record::EventId;

/// What is known about one id of a request.
#[derive(Debug)]
pub enum Admission {
    /// Not seen and not pending: this request now owns it (see [`Claim`]).
    New,
    /// Accepted (in the spool) within the window, or repeated within this
    /// same request: drop it.
    Seen,
    /// Another request is writing it right now; wait with
    /// [`Pending::released`], then ask again.
    Pending(Pending),
}

/// Another request's pending write of an id.
#[derive(Debug)]
pub struct Pending(watch::Receiver<()>);

impl Pending {
    /// Resolves once the owning request has committed or released its ids
    /// (its [`Claim`] was dropped), whichever way its write went.
    pub async fn released(mut self) {
        // No value is ever sent: the sender is only dropped, which ends
        // `changed` with an error for every receiver.
        while self.0.changed().await.is_ok() {}
    }
}

pub struct Dedup {
    window: Duration,
    max_entries: usize,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    /// Times are kept as milliseconds since this instant, to keep entries small.
    epoch: Instant,
    seen: seen::Seen,
    /// Ids being written by some request, with the number of that
    /// request's [`Claim`].
    pending: HashMap<u64, u64, SeedableRandomState>,
    /// For each claim that another request waits for, the sender whose
    /// drop wakes the waiters. Made only when a copy has to wait, which
    /// is rare: a channel per request cost an allocation, and eight locks
    /// at its drop (about 0.7% of the CPU samples under wrk).
    waiters: HashMap<u64, watch::Sender<()>>,
    /// The next claim's number.
    next_claim: u64,
}

/// A foldhash hasher keyed from the system's random source: std's
/// `RandomState` draws its keys there once per thread, and each new one
/// hashes differently.
fn random_hasher() -> SeedableRandomState {
    use std::hash::BuildHasher;
    use std::sync::LazyLock;
    fn random() -> u64 {
        std::hash::RandomState::new().hash_one(0u64)
    }
    static SHARED: LazyLock<SharedSeed> = LazyLock::new(|| SharedSeed::from_u64(random()));
    SeedableRandomState::with_seed(random(), &SHARED)
}

/// The id's first 64 bits: its first 16 hex digits, decoded as
/// little-endian bytes. A digit's value without a branch: in ASCII, `0`-`9`
/// have bit 6 clear and `a`-`f` (and `A`-`F`) set, and the low four bits
/// plus 9 for a letter are its value. The ids are SHA-256 in hex, so each
/// digit is a digit or a letter at random (10 to 6), and a decoder that
/// branched on it (the `hex` crate's did) mispredicted a good share of
/// them: it was 0.8% of the CPU under wrk. Ids we make are always hex; anything else
/// still maps to one key, always the same.
fn compact(id: &EventId) -> u64 {
    let mut key = 0u64;
    for &c in &id.0[..16] {
        key = (key << 4) | u64::from(((c & 0x0f) + 9 * (c >> 6)) & 0x0f);
    }
    // Built most significant digit first: the first byte is the lowest.
    key.swap_bytes()
}

/// The ids a request owns while it writes them. [`Claim::commit`] after a
/// successful append makes them "seen"; dropping the claim without commit
/// (a failed append, or the request's future dropped) forgets them, so
/// a retry is not taken for a duplicate. Either way waiters are woken.
pub struct Claim {
    inner: Arc<Mutex<Inner>>,
    window_ms: u64,
    max_entries: usize,
    keys: Vec<u64>,
    /// Its number in `Inner::pending` and `Inner::waiters`.
    id: u64,
}

impl Claim {
    /// The append succeeded: remember the ids as accepted at `now`, which
    /// must be read after the append (an older time could store them
    /// already expired under a short window).
    pub fn commit(mut self, now: Instant) {
        if self.keys.is_empty() {
            return;
        }
        let mut inner = lock(&self.inner);
        let now_ms = inner.now_ms(now);
        let keys = &self.keys;
        // At capacity each id inserted removes the oldest one: the slots of
        // both are misses, loaded together here (the ids' were loaded in
        // `admit`, but the append since may have evicted them).
        inner
            .seen
            .prefetch_oldest(keys.len().min(seen::PREFETCH_AHEAD));
        for &key in keys.iter().take(seen::PREFETCH_AHEAD) {
            inner.seen.prefetch(key);
        }
        inner.expire(
            now_ms,
            self.window_ms,
            self.max_entries.saturating_sub(keys.len()),
        );
        for &key in keys {
            inner.pending.remove(&key);
            inner.seen.insert(key, now_ms);
        }
        let waiters = inner.take_waiters(self.id);
        // Only now: had anything above panicked, `Drop` would still have
        // the keys to clear from `pending` and its waiters to wake.
        self.keys.clear();
        drop(inner);
        drop(waiters);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            // Committed, or it owned nothing: nobody can be waiting for it.
            return;
        }
        let mut inner = lock(&self.inner);
        for key in &self.keys {
            inner.pending.remove(key);
        }
        let waiters = inner.take_waiters(self.id);
        drop(inner);
        // Wakes the waiters after the entries are gone (and the lock let
        // go), so that when they ask again they find the ids free.
        drop(waiters);
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // No code panics midway through an update; the sets stay consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How much the intake remembers. Written in the file as
/// `spool.dedup_window` and `spool.dedup_max_entries` (their documented
/// names), but the intake's: the spool itself never drops a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupSettings {
    pub window: Duration,
    pub max_entries: usize,
}

impl From<&crate::config::SpoolSettings> for DedupSettings {
    fn from(s: &crate::config::SpoolSettings) -> DedupSettings {
        DedupSettings {
            window: s.dedup_window,
            max_entries: s.dedup_max_entries,
        }
    }
}

impl Dedup {
    pub fn new(
        DedupSettings {
            window,
            max_entries,
        }: DedupSettings,
    ) -> Dedup {
        Dedup {
            window,
            max_entries,
            inner: Arc::new(Mutex::new(Inner {
                epoch: Instant::now(),
                seen: seen::Seen::new(max_entries),
                pending: HashMap::with_hasher(random_hasher()),
                waiters: HashMap::new(),
                next_claim: 0,
            })),
        }
    }

    fn enabled(&self) -> bool {
        self.max_entries > 0 && !self.window.is_zero()
    }

    /// Classifies each id (see [`Admission`]) and claims the new ones for
    /// this request. A request that repeats one of its own ids gets it once
    /// as `New` and then as `Seen`.
    pub fn admit(&self, ids: &[EventId], now: Instant) -> (Vec<Admission>, Claim) {
        let window_ms = self.window.as_millis() as u64;
        let mut claim = Claim {
            inner: self.inner.clone(),
            window_ms,
            max_entries: self.max_entries,
            keys: Vec::new(),
            id: 0,
        };
        if !self.enabled() {
            return (ids.iter().map(|_| Admission::New).collect(), claim);
        }
        // The first ids' keys, worked out before the lock is taken.
        let mut ahead = [0u64; seen::PREFETCH_AHEAD];
        for (key, id) in ahead.iter_mut().zip(ids) {
            *key = compact(id);
        }
        let ahead = &ahead[..ids.len().min(seen::PREFETCH_AHEAD)];
        let mut inner = lock(&self.inner);
        // Each lookup below is a cache miss in a table of megabytes:
        // started together, they overlap instead of queueing (see
        // `seen::PREFETCH_AHEAD`).
        for &key in ahead {
            inner.seen.prefetch(key);
        }
        let now_ms = inner.now_ms(now);
        inner.expire(now_ms, window_ms, self.max_entries);
        claim.id = inner.next_claim;
        inner.next_claim += 1;
        let inner = &mut *inner;
        let admissions = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let key = ahead.get(i).copied().unwrap_or_else(|| compact(id));
                if inner.seen.contains(key) {
                    return Admission::Seen;
                }
                match inner.pending.entry(key) {
                    Entry::Occupied(e) if *e.get() == claim.id => Admission::Seen,
                    Entry::Occupied(e) => Admission::Pending(Pending(
                        inner
                            .waiters
                            .entry(*e.get())
                            .or_insert_with(|| watch::channel(()).0)
                            .subscribe(),
                    )),
                    Entry::Vacant(e) => {
                        e.insert(claim.id);
                        claim.keys.push(key);
                        Admission::New
                    }
                }
            })
            .collect();
        (admissions, claim)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).seen.len()
    }

    #[cfg(test)]
    fn pending_len(&self) -> usize {
        lock(&self.inner).pending.len()
    }

    #[cfg(test)]
    fn waiters_len(&self) -> usize {
        lock(&self.inner).waiters.len()
    }
}

impl Inner {
    /// The sender that wakes whoever waits for claim `id`, if anyone does,
    /// to be dropped once the lock is let go.
    fn take_waiters(&mut self, id: u64) -> Option<watch::Sender<()>> {
        if self.waiters.is_empty() {
            None
        } else {
            self.waiters.remove(&id)
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn expire(&mut self, now_ms: u64, window_ms: u64, keep_at_most: usize) {
        while let Some(at) = self.seen.oldest() {
            if now_ms.saturating_sub(at) < window_ms && self.seen.len() <= keep_at_most {
                break;
            }
            self.seen.pop_oldest();
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

    /// A set remembering ids for `window_s` seconds, at most `max_entries`.
    fn dedup(window_s: u64, max_entries: usize) -> Dedup {
        Dedup::new(DedupSettings {
            window: Duration::from_secs(window_s),
            max_entries,
        })
    }

    /// Admits and commits at once, as a request whose append succeeded.
    fn accept(d: &Dedup, ids: &[EventId], t: Instant) -> Vec<bool> {
        let (adm, claim) = d.admit(ids, t);
        claim.commit(t);
        adm.iter().map(|a| matches!(a, Admission::New)).collect()
    }

    #[test]
    fn a_repeat_within_the_window_is_dropped() {
        let d = dedup(60, 100);
        let t = Instant::now();
        assert_eq!(accept(&d, &[id(1), id(2)], t), vec![true, true]);
        assert_eq!(accept(&d, &[id(2), id(3)], t), vec![false, true]);
        assert_eq!(accept(&d, &[id(4), id(4)], t), vec![true, false]);
    }

    #[test]
    fn compact_is_the_first_eight_bytes_little_endian() {
        for id in [
            *b"0123456789abcdef0123456789abcdef",
            *b"fedcba9876543210ffffffffffffffff",
        ]
        .into_iter()
        .chain((0..=255u8).map(|n| {
            let mut b = *b"00000000000000000000000000000000";
            let digits = b"0123456789abcdef";
            for (i, c) in b.iter_mut().take(16).enumerate() {
                *c = digits[(usize::from(n) * 7 + i * 13) % 16];
            }
            b
        })) {
            let mut raw = [0u8; 8];
            hex::decode_to_slice(&id[..16], &mut raw).expect("hex");
            assert_eq!(compact(&EventId(id)), u64::from_le_bytes(raw), "{id:?}");
            let upper = id.map(|c| c.to_ascii_uppercase());
            assert_eq!(compact(&EventId(upper)), u64::from_le_bytes(raw));
        }
    }

    /// The first ids' keys are worked out ahead (for the prefetch), the
    /// rest as they come: both must classify the same.
    #[test]
    fn a_request_of_many_ids_is_classified_past_the_prefetched_ones() {
        let d = dedup(60, 1000);
        let t = Instant::now();
        let n = 3 * seen::PREFETCH_AHEAD;
        let mut ids: Vec<EventId> = (0..n as u8).map(id).collect();
        // Repeats of an early id and a late one, past the prefetched ids.
        ids.push(id(1));
        ids.push(id(n as u8 - 1));
        let mut want = vec![true; n];
        want.extend([false, false]);
        assert_eq!(accept(&d, &ids, t), want);
        let again = [id(200), id(0), id(n as u8 - 2), id(201)];
        assert_eq!(accept(&d, &again, t), vec![true, false, false, true]);
    }

    #[test]
    fn ids_expire_after_the_window() {
        let d = dedup(60, 100);
        let t = Instant::now();
        accept(&d, &[id(1)], t);
        assert_eq!(
            accept(&d, &[id(1)], t + Duration::from_secs(59)),
            vec![false]
        );
        assert_eq!(
            accept(&d, &[id(1)], t + Duration::from_secs(61)),
            vec![true]
        );
    }

    #[test]
    fn memory_is_bounded_by_count() {
        let d = dedup(3600, 10);
        let t = Instant::now();
        for n in 0..100 {
            accept(&d, &[id(n)], t);
        }
        assert!(d.len() <= 10, "{}", d.len());
        // The newest are still remembered.
        assert_eq!(accept(&d, &[id(99)], t), vec![false]);
    }

    #[test]
    fn a_released_claim_lets_the_ids_in_again() {
        let d = dedup(60, 100);
        let t = Instant::now();
        let (_, claim) = d.admit(&[id(1)], t);
        drop(claim);
        assert_eq!(d.pending_len(), 0);
        assert_eq!(accept(&d, &[id(1)], t), vec![true]);
    }

    #[tokio::test]
    async fn a_copy_of_a_pending_id_waits_for_the_original() {
        let d = dedup(60, 100);
        let t = Instant::now();
        let (_, claim) = d.admit(&[id(1)], t);
        let (mut adm, second) = d.admit(&[id(1)], t);
        drop(second);
        let Some(Admission::Pending(p)) = adm.pop() else {
            panic!("a copy of a pending id must wait");
        };
        let mut wait = tokio_test_wait(p);
        assert!(
            futures_poll_once(&mut wait).is_none(),
            "released before the original finished"
        );
        assert_eq!(d.waiters_len(), 1, "the copy waits on the original's claim");
        claim.commit(t);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the commit woke the copy");
        assert_eq!(accept(&d, &[id(1)], t), vec![false], "committed id is seen");
        assert_eq!(d.pending_len(), 0);
        assert_eq!(d.waiters_len(), 0, "the commit let go of its waiters");
    }

    /// A request can take longer than a short window from its start to
    /// its commit (a slow upload, a slow disk): its ids are remembered
    /// from the commit, so a retry right after it is still caught.
    #[test]
    fn ids_are_remembered_from_the_commit_not_the_admission() {
        let d = dedup(2, 100);
        // Well after the set's epoch, so that no time clamps to it.
        let t0 = Instant::now() + Duration::from_secs(100);
        let (_, claim) = d.admit(&[id(7)], t0);
        claim.commit(t0 + Duration::from_secs(3));
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(
            accept(&d, &[id(7)], s(4)),
            vec![false],
            "a retry a second later"
        );
        assert_eq!(accept(&d, &[id(8)], s(6)), vec![true]);
        assert_eq!(
            accept(&d, &[id(7)], s(6)),
            vec![true],
            "gone after the window"
        );
    }

    #[test]
    fn a_claim_nobody_waits_for_makes_no_waiter_entry() {
        let d = dedup(60, 100);
        let t = Instant::now();
        let (_, claim) = d.admit(&[id(1), id(2)], t);
        let (_, other) = d.admit(&[id(3)], t);
        assert_eq!(d.waiters_len(), 0);
        drop(other);
        claim.commit(t);
        assert_eq!((d.pending_len(), d.waiters_len()), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_arriving_after_the_release_is_not_stuck() {
        let d = dedup(60, 100);
        let t = Instant::now();
        let (_, claim) = d.admit(&[id(1)], t);
        let (mut adm, _) = d.admit(&[id(1)], t);
        drop(claim);
        let Some(Admission::Pending(p)) = adm.pop() else {
            panic!("expected pending");
        };
        tokio::time::timeout(Duration::from_secs(5), p.released())
            .await
            .expect("release seen");
        assert_eq!(accept(&d, &[id(1)], t), vec![true], "released id is free");
        assert_eq!(d.waiters_len(), 0, "the drop let go of its waiters");
    }

    fn tokio_test_wait(p: Pending) -> std::pin::Pin<Box<impl Future<Output = ()>>> {
        Box::pin(p.released())
    }

    fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
