//! The newest records, kept in memory for a reader that is caught up.
//!
//! While the publisher keeps up, every record it reads was written a moment
//! earlier; reading it back from the file (a hand-off to the blocking pool,
//! a pread, a CRC check and a parse per batch) was a measurable share of the
//! gateway's CPU. So the writer also hands each written group's payloads
//! (the very `Bytes` given to `append`, not a copy) to this tail, and the
//! reader takes them from here when its next record is the tail's first.
//!
//! The disk stays the source of truth: the tail only ever holds records
//! that are also in a segment file, as one contiguous run of ids ending at
//! the newest record. A group that would break the run (ids spent by a
//! failed write) or the caps starts the tail afresh at that group; the
//! records it drops are read from disk, and a reader that is behind (a
//! restart, a Kafka outage) reads from disk until it reaches the tail's
//! first record, then continues from memory by itself.
//!
//! An empty tail is only started while the reader is near, within
//! `max_records` ids of the group: a reader further behind (a Kafka outage,
//! a replay) reads from disk for a while yet, and a tail kept meanwhile
//! would be memory held for nothing, restarted before the reader got
//! there.

use std::collections::VecDeque;

use bytes::Bytes;

use super::SpooledRecord;

/// Payload bytes the tail may hold. It counts against no other budget, so
/// this is what it adds to the process's memory at most: while the
/// publisher is caught up the tail holds a few records, and only a reader
/// that falls behind lets it fill. 1 MiB is about 30 ms of writes at full
/// load: enough for a reader catching up from disk to meet the tail, and
/// small beside the 30 MiB the whole gateway aims to stay under (at 4 MiB
/// the peak RSS under wrk reached 30.1 MiB).
pub(crate) const TAIL_MAX_BYTES: usize = 1 << 20;
/// Records the tail may hold: bounds the queue's own memory (48 bytes per
/// entry, plus each entry's share of its request's buffer) when records
/// are small.
pub(crate) const TAIL_MAX_RECORDS: usize = 2048;

#[derive(Debug)]
pub(crate) struct Tail {
    /// Contiguous ids, ascending.
    records: VecDeque<SpooledRecord>,
    /// Payload bytes in `records`.
    bytes: usize,
    max_bytes: usize,
    max_records: usize,
    /// The next id the reader will read, as of its last look.
    reader_at: u64,
}

impl Default for Tail {
    fn default() -> Self {
        Self::with_caps(TAIL_MAX_BYTES, TAIL_MAX_RECORDS)
    }
}

impl Tail {
    /// A tail with other caps; 0 keeps nothing, so every read goes to disk.
    pub(crate) fn with_caps(max_bytes: usize, max_records: usize) -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_records,
            reader_at: 0,
        }
    }

    /// Where the reader is: the next id it will read.
    pub(crate) fn set_reader_at(&mut self, id: u64) {
        self.reader_at = id;
    }

    /// Adds a group the writer has just written: `payloads` got ids
    /// `first_id..`, all appended at `ts`. Called under the state lock, in
    /// the same step that makes them readable on disk, and only for writes
    /// that succeeded. Takes the payloads out of `payloads`.
    pub(crate) fn push_group(&mut self, first_id: u64, ts: u64, payloads: &mut Vec<Bytes>) {
        let n = payloads.len();
        let bytes: usize = payloads.iter().map(Bytes::len).sum();
        let continues = self
            .records
            .back()
            .is_none_or(|last| last.id + 1 == first_id);
        if !continues
            || self.records.len() + n > self.max_records
            || self.bytes + bytes > self.max_bytes
        {
            self.clear();
        }
        let reader_far = first_id.saturating_sub(self.reader_at) > self.max_records as u64;
        if n > self.max_records || bytes > self.max_bytes || (self.records.is_empty() && reader_far)
        {
            // Larger than the whole tail, or no reader near: the reader
            // takes it from disk.
            payloads.clear();
            return;
        }
        self.bytes += bytes;
        self.records
            .extend(
                payloads
                    .drain(..)
                    .zip(first_id..)
                    .map(|(payload, id)| SpooledRecord {
                        id,
                        append_time_ms: ts,
                        payload,
                    }),
            );
    }

    /// Forgets records below `id` (already returned, or skipped).
    pub(crate) fn drop_below(&mut self, id: u64) {
        while self.records.front().is_some_and(|r| r.id < id) {
            if let Some(r) = self.records.pop_front() {
                self.bytes -= r.payload.len();
            }
        }
    }

    /// When the tail holds record `id`: takes it and the records after it,
    /// up to `max_records` and (past the first) `max_bytes` of payload, the
    /// same limits a read from disk applies. None when `id` is not here.
    pub(crate) fn take_from(
        &mut self,
        id: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<SpooledRecord>> {
        self.drop_below(id);
        if self.records.front()?.id != id {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records.max(1) {
            let Some(len) = self.records.front().map(|r| r.payload.len()) else {
                break;
            };
            if !out.is_empty() && bytes + len > max_bytes {
                break;
            }
            let Some(r) = self.records.pop_front() else {
                break;
            };
            bytes += len;
            self.bytes -= len;
            out.push(r);
        }
        Some(out)
    }

    pub(crate) fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.records.iter().map(|r| r.id).collect()
    }

    #[cfg(test)]
    pub(crate) fn set_caps(&mut self, max_bytes: usize, max_records: usize) {
        self.clear();
        self.max_bytes = max_bytes;
        self.max_records = max_records;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(ids: std::ops::Range<u64>, len: usize) -> Vec<Bytes> {
        ids.map(|i| Bytes::from(vec![i as u8; len])).collect()
    }

    #[test]
    fn keeps_a_contiguous_run_and_restarts_on_a_gap() {
        let mut t = Tail::with_caps(1 << 20, 100);
        t.set_reader_at(1);
        let mut g = group(1..4, 10);
        t.push_group(1, 5, &mut g);
        assert!(g.is_empty(), "payloads are moved, not copied");
        t.push_group(4, 6, &mut group(4..6, 10));
        assert_eq!(t.ids(), vec![1, 2, 3, 4, 5]);
        // Ids 6 and 7 were spent by a failed write.
        t.push_group(8, 7, &mut group(8..9, 10));
        assert_eq!(t.ids(), vec![8]);
        assert_eq!(t.bytes, 10);
    }

    #[test]
    fn caps_restart_the_tail_and_an_oversized_group_is_left_to_disk() {
        // A reader close behind, so that the tail restarts.
        let mut t = Tail::with_caps(100, 4);
        t.set_reader_at(1);
        t.push_group(1, 0, &mut group(1..4, 30));
        t.push_group(4, 0, &mut group(4..5, 30)); // 120 bytes: over
        assert_eq!(t.ids(), vec![4]);
        t.push_group(5, 0, &mut group(5..8, 1));
        t.set_reader_at(5);
        t.push_group(8, 0, &mut group(8..9, 1)); // 5 records: over
        assert_eq!(t.ids(), vec![8]);
        let mut big = group(9..10, 101);
        t.push_group(9, 0, &mut big);
        assert!(t.ids().is_empty() && big.is_empty());
        assert_eq!(t.bytes, 0);
    }

    #[test]
    fn take_from_only_at_the_front_and_within_limits() {
        let mut t = Tail::with_caps(1 << 20, 100);
        t.set_reader_at(10);
        t.push_group(10, 42, &mut group(10..16, 100));
        assert!(t.take_from(9, 10, 1 << 20).is_none(), "9 is on disk only");
        let got = t.take_from(11, 2, 1 << 20).expect("11 is here");
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), vec![11, 12]);
        assert!(got.iter().all(|r| r.append_time_ms == 42));
        // The first record comes even when over max_bytes, alone.
        let got = t.take_from(13, 10, 50).expect("13 is here");
        assert_eq!(got.len(), 1);
        let got = t.take_from(14, 10, 250).expect("14 is here");
        assert_eq!(got.len(), 2);
        assert!(t.take_from(16, 10, 250).is_none());
        assert_eq!(t.bytes, 0);
    }

    #[test]
    fn no_tail_is_started_for_a_reader_far_behind() {
        let mut t = Tail::with_caps(1 << 20, 4);
        t.set_reader_at(1);
        t.push_group(1, 0, &mut group(1..5, 1));
        // Full; restarted while the reader could still reach it.
        t.push_group(5, 0, &mut group(5..9, 1));
        assert_eq!(t.ids(), vec![5, 6, 7, 8]);
        // Full again; the reader has not moved: the rest waits on disk.
        t.push_group(9, 0, &mut group(9..10, 1));
        t.push_group(10, 0, &mut group(10..11, 1));
        assert!(t.ids().is_empty() && t.bytes == 0);
        // The reader has come within reach.
        t.set_reader_at(7);
        t.push_group(11, 0, &mut group(11..12, 1));
        assert_eq!(t.ids(), vec![11]);
    }
}
