//! On-disk format of segment files, and the code that encodes, decodes and
//! scans them.
//!
//! A segment file is `<first_id:020>.seg`:
//!
//! ```text
//! header (24 bytes)  magic "TBSPOOL\0" | version u32 | header_len u32 | first_id u64
//! record (24 bytes + payload), repeated:
//!     len u32 | crc32 u32 | id u64 | append_time_ms u64 | payload[len]
//! ```
//!
//! All integers are little-endian. The CRC (crc32fast, IEEE) covers id,
//! append time and payload, so a record whose bytes were torn by a crash or
//! flipped on disk is detected; the length is validated separately (bounded
//! and checked against the bytes that actually exist). Ids inside one segment
//! are consecutive from `first_id`, which lets recovery also reject records
//! that are intact but stale (left behind after a failed truncation).
//!
//! The sidecar `<first_id:020>.acks` is a plain sequence of u64 ids: no header
//! and no CRC, because losing or tearing it only causes duplicates, which the
//! at-least-once contract allows. Id 0 is never assigned, so zero-filled
//! blocks left by a crash read as "no ack".

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Identifies a file as a timbridge spool segment.
pub(crate) const MAGIC: [u8; 8] = *b"TBSPOOL\0";
/// Bumped on any incompatible format change; newer files are refused, not
/// quarantined, so a downgrade never destroys data.
pub(crate) const VERSION: u32 = 1;
/// Size of the segment header.
pub(crate) const HEADER_LEN: u64 = 24;
/// Size of the fixed part of a record.
pub(crate) const RECORD_HEADER_LEN: usize = 24;
/// Largest payload accepted. Bounding it lets recovery tell a corrupt length
/// field from a real record without trying to allocate gigabytes.
pub const MAX_RECORD_LEN: usize = 64 << 20;

/// `dir/<first_id:020>.seg`.
pub(crate) fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.seg"))
}

/// `dir/<first_id:020>.acks`.
pub(crate) fn acks_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.acks"))
}

/// Kind of spool file recognised by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Segment(u64),
    Acks(u64),
}

/// Parses `<20 digits>.seg` / `<20 digits>.acks`; anything else is not ours.
pub(crate) fn classify(name: &str) -> Option<FileKind> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u64 = stem.parse().ok()?;
    match ext {
        "seg" => Some(FileKind::Segment(id)),
        "acks" => Some(FileKind::Acks(id)),
        _ => None,
    }
}

/// Bytes a record occupies on disk.
pub(crate) fn record_size(payload_len: usize) -> u64 {
    (RECORD_HEADER_LEN + payload_len) as u64
}

pub(crate) fn encode_header(first_id: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&first_id.to_le_bytes());
    h
}

/// Why a segment header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// Fewer bytes than a header: a crash right after creating the file.
    Short(u64),
    BadMagic,
    UnsupportedVersion(u32),
    WrongFirstId(u64),
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short(n) => write!(f, "file holds only {n} bytes, less than a segment header"),
            Self::BadMagic => f.write_str("not a timbridge spool segment (bad magic)"),
            Self::UnsupportedVersion(v) => write!(f, "segment format version {v} is not supported"),
            Self::WrongFirstId(id) => write!(
                f,
                "header says first id {id}, which does not match the file name"
            ),
        }
    }
}

pub(crate) fn check_header(h: &[u8], first_id: u64) -> Result<(), HeaderProblem> {
    if h.len() < HEADER_LEN as usize {
        return Err(HeaderProblem::Short(h.len() as u64));
    }
    if h[0..8] != MAGIC {
        return Err(HeaderProblem::BadMagic);
    }
    let version = u32::from_le_bytes(le4(&h[8..12]));
    if version != VERSION {
        return Err(HeaderProblem::UnsupportedVersion(version));
    }
    let found = u64::from_le_bytes(le8(&h[16..24]));
    if found != first_id {
        return Err(HeaderProblem::WrongFirstId(found));
    }
    Ok(())
}

pub(crate) fn record_crc(id: u64, ts: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(&ts.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one encoded record to `buf`. The caller has bounded `payload` by
/// [`MAX_RECORD_LEN`], so the length always fits the u32 field.
pub(crate) fn encode_record(buf: &mut Vec<u8>, id: u64, ts: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_crc(id, ts, payload).to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Fixed part of a record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordHeader {
    pub len: u32,
    pub crc: u32,
    pub id: u64,
    pub ts: u64,
}

impl RecordHeader {
    pub(crate) fn parse(b: &[u8; RECORD_HEADER_LEN]) -> Self {
        Self {
            len: u32::from_le_bytes(le4(&b[0..4])),
            crc: u32::from_le_bytes(le4(&b[4..8])),
            id: u64::from_le_bytes(le8(&b[8..16])),
            ts: u64::from_le_bytes(le8(&b[16..24])),
        }
    }

    pub(crate) fn total_len(&self) -> u64 {
        record_size(self.len as usize)
    }

    /// Checks what can be checked before reading the payload.
    pub(crate) fn validate(&self, expected_id: u64) -> Result<(), Damage> {
        if self.len as usize > MAX_RECORD_LEN {
            return Err(Damage::BadLength(self.len));
        }
        if self.id != expected_id {
            return Err(Damage::UnexpectedId {
                expected: expected_id,
                found: self.id,
            });
        }
        Ok(())
    }
}

/// Why reading a segment stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Damage {
    /// The file ends in the middle of a record: a write cut short by a crash.
    Torn,
    BadLength(u32),
    BadCrc,
    UnexpectedId {
        expected: u64,
        found: u64,
    },
    /// Ids run into the next segment's ids (should never happen; handled so
    /// an id is never owned by two segments).
    Overlap,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Torn => f.write_str("torn record at end of file (interrupted write)"),
            Self::BadLength(n) => write!(f, "corrupt record length {n}"),
            Self::BadCrc => f.write_str("record checksum mismatch (corrupt data)"),
            Self::UnexpectedId { expected, found } => {
                write!(
                    f,
                    "record id {found} where {expected} was expected (stale or corrupt data)"
                )
            }
            Self::Overlap => f.write_str("record ids overlap the next segment"),
        }
    }
}

/// Result of parsing one record out of an in-memory window.
pub(crate) enum Parsed {
    /// A valid record; the payload is `buf[RECORD_HEADER_LEN..total]`.
    Record {
        header: RecordHeader,
        total: usize,
    },
    /// The window ends inside the record; it needs this many bytes in all.
    NeedMore(usize),
    Damaged(Damage),
}

/// Parses and verifies the record at the start of `buf`.
pub(crate) fn parse_record(buf: &[u8], expected_id: u64) -> Parsed {
    let Some(head) = buf.first_chunk::<RECORD_HEADER_LEN>() else {
        return Parsed::NeedMore(RECORD_HEADER_LEN);
    };
    let header = RecordHeader::parse(head);
    if let Err(d) = header.validate(expected_id) {
        return Parsed::Damaged(d);
    }
    let total = RECORD_HEADER_LEN + header.len as usize;
    let Some(payload) = buf.get(RECORD_HEADER_LEN..total) else {
        return Parsed::NeedMore(total);
    };
    if record_crc(header.id, header.ts, payload) != header.crc {
        return Parsed::Damaged(Damage::BadCrc);
    }
    Parsed::Record { header, total }
}

/// Outcome of scanning the records of one segment.
#[derive(Debug)]
pub(crate) struct ScanOutcome {
    /// Records up to the last valid one, consecutive from the first id;
    /// includes those in `corrupt`.
    pub records: u64,
    /// Offset just past the last valid record.
    pub valid_len: u64,
    /// Why the scan stopped early, if it did.
    pub damage: Option<Damage>,
    /// Records (index, offset, size on disk) whose checksum failed although
    /// their framing held: a valid record follows each, so only that one
    /// record is unusable. Counted in `records`; never to be delivered.
    pub corrupt: Vec<(u64, u64, u64)>,
}

/// Reads records after the header until the end of the data, the first
/// damage that hides where the next record starts, or `limit` records.
/// `on_record(index, append_time_ms, offset)` sees each valid record.
///
/// A record whose checksum fails but whose length and id are right (a bit
/// flipped in its payload) costs that record alone when a valid record
/// follows it: it goes to `corrupt` and the scan goes on. When none does
/// (it is part of a torn tail), the data ends at the first such record.
/// Only real I/O errors are returned as errors; every kind of bad content
/// ends the scan cleanly.
pub(crate) fn scan_records<R: Read>(
    r: &mut R,
    first_id: u64,
    limit: u64,
    mut on_record: impl FnMut(u64, u64, u64),
) -> io::Result<ScanOutcome> {
    let mut out = ScanOutcome {
        records: 0,
        valid_len: HEADER_LEN,
        damage: None,
        corrupt: Vec::new(),
    };
    // Bad-checksum records since the last valid one: skipped only once a
    // valid record shows that the framing after them held.
    let mut unconfirmed: Vec<(u64, u64, u64)> = Vec::new();
    let mut idx = 0u64;
    let mut offset = HEADER_LEN;
    let mut head = [0u8; RECORD_HEADER_LEN];
    let mut payload = Vec::new();
    let damage = loop {
        let n = read_full(r, &mut head)?;
        if n == 0 {
            break None;
        }
        if n < head.len() {
            break Some(Damage::Torn);
        }
        // A zero header where the next record would start: the end of the
        // data, if zeros run to the end of the file (written ahead in
        // `always` mode, see `writer::PREFORMAT_BYTES`). No record has one:
        // the checksum of a zero id, time and payload is not zero.
        if head.iter().all(|&b| b == 0) {
            if zeros_to_end(r, &mut payload)? {
                break None;
            }
            let header = RecordHeader::parse(&head);
            break Some(
                header
                    .validate(first_id.saturating_add(idx))
                    .err()
                    .unwrap_or(Damage::BadCrc),
            );
        }
        if idx >= limit {
            break Some(Damage::Overlap);
        }
        let header = RecordHeader::parse(&head);
        let expected = first_id.saturating_add(idx);
        if let Err(d) = header.validate(expected) {
            break Some(d);
        }
        payload.resize(header.len as usize, 0);
        if read_full(r, &mut payload)? < payload.len() {
            break Some(Damage::Torn);
        }
        if record_crc(header.id, header.ts, &payload) != header.crc {
            unconfirmed.push((idx, offset, header.total_len()));
        } else {
            on_record(idx, header.ts, offset);
            out.corrupt.append(&mut unconfirmed);
            out.records = idx + 1;
            out.valid_len = offset + header.total_len();
        }
        idx += 1;
        offset += header.total_len();
    };
    // Bad records with nothing valid after them are a torn tail: the data
    // ends at the first of them.
    out.damage = if unconfirmed.is_empty() {
        damage
    } else {
        Some(Damage::BadCrc)
    };
    Ok(out)
}

/// Whether everything left in `r` is zero bytes (reads it all).
fn zeros_to_end<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.resize(64 << 10, 0);
    loop {
        let n = read_full(r, buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Like `read_exact`, but reports how much was read before end of file
/// instead of failing, which is how a torn tail is told from an I/O error.
pub(crate) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Decodes an ack file's bytes, dropping a torn tail and the id 0 that
/// zero-filled blocks would produce.
pub(crate) fn decode_acks(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(le8(c)))
        .filter(|&id| id != 0)
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(first_id: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = encode_header(first_id).to_vec();
        for (i, p) in payloads.iter().enumerate() {
            encode_record(&mut buf, first_id + i as u64, 1000 + i as u64, p);
        }
        buf
    }

    fn scan(bytes: &[u8], first_id: u64, limit: u64) -> ScanOutcome {
        check_header(bytes, first_id).expect("header");
        let mut r = &bytes[HEADER_LEN as usize..];
        scan_records(&mut r, first_id, limit, |_, _, _| {}).expect("scan")
    }

    #[test]
    fn names_round_trip() {
        let p = segment_path(Path::new("/d"), 1);
        assert_eq!(p, Path::new("/d/00000000000000000001.seg"));
        assert_eq!(
            classify("00000000000000000001.seg"),
            Some(FileKind::Segment(1))
        );
        assert_eq!(
            classify("00000000000000000042.acks"),
            Some(FileKind::Acks(42))
        );
        assert_eq!(classify("1.seg"), None);
        assert_eq!(classify("LOCK"), None);
        assert_eq!(classify("00000000000000000001.seg.corrupt"), None);
    }

    #[test]
    fn header_checks() {
        let h = encode_header(7);
        assert_eq!(check_header(&h, 7), Ok(()));
        assert_eq!(check_header(&h[..10], 7), Err(HeaderProblem::Short(10)));
        assert_eq!(check_header(&h, 8), Err(HeaderProblem::WrongFirstId(7)));
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(check_header(&bad, 7), Err(HeaderProblem::BadMagic));
        let mut newer = h;
        newer[8] = 2;
        assert_eq!(
            check_header(&newer, 7),
            Err(HeaderProblem::UnsupportedVersion(2))
        );
    }

    #[test]
    fn scan_valid_and_every_truncation() {
        let bytes = encoded(5, &[b"alpha", b"", b"gamma-gamma"]);
        let full = scan(&bytes, 5, u64::MAX);
        assert_eq!(full.records, 3);
        assert_eq!(full.valid_len, bytes.len() as u64);
        assert_eq!(full.damage, None);
        // Every possible cut yields exactly the records that fit entirely.
        let ends: Vec<u64> = {
            let mut v = vec![HEADER_LEN];
            for l in [5usize, 0, 11] {
                v.push(v[v.len() - 1] + record_size(l));
            }
            v
        };
        for cut in HEADER_LEN as usize..bytes.len() {
            let s = scan(&bytes[..cut], 5, u64::MAX);
            let whole = ends.iter().filter(|&&e| e <= cut as u64).count() as u64 - 1;
            assert_eq!(s.records, whole, "cut at {cut}");
            assert_eq!(s.valid_len, ends[whole as usize]);
            let at_boundary = ends.contains(&(cut as u64));
            assert_eq!(s.damage.is_some(), !at_boundary, "cut at {cut}");
        }
    }

    #[test]
    fn scan_takes_zeros_to_the_end_of_the_file_as_the_end_of_the_data() {
        // No record can have an all-zero header.
        assert_ne!(record_crc(0, 0, b""), 0);
        let data = encoded(5, &[b"alpha", b"", b"gamma-gamma"]);
        for zeros in [RECORD_HEADER_LEN, 100, 200_000] {
            let mut bytes = data.clone();
            bytes.resize(data.len() + zeros, 0);
            let s = scan(&bytes, 5, u64::MAX);
            assert_eq!((s.records, s.damage), (3, None), "{zeros} zeros");
            assert_eq!(s.valid_len, data.len() as u64);
        }
        // Fewer zeros than a header: a torn one, as before.
        let mut bytes = data.clone();
        bytes.resize(data.len() + 10, 0);
        assert_eq!(scan(&bytes, 5, u64::MAX).damage, Some(Damage::Torn));
        // Zeros with data after them are damage, wherever the data is.
        for at in [RECORD_HEADER_LEN, 100_000] {
            let mut bytes = data.clone();
            bytes.resize(data.len() + 200_000, 0);
            bytes[data.len() + at] = 1;
            let s = scan(&bytes, 5, u64::MAX);
            assert_eq!(s.records, 3);
            assert_eq!(s.valid_len, data.len() as u64);
            assert_eq!(
                s.damage,
                Some(Damage::UnexpectedId {
                    expected: 8,
                    found: 0
                }),
                "data at {at} past the zeros"
            );
        }
    }

    #[test]
    fn scan_detects_flipped_bits_anywhere() {
        let bytes = encoded(1, &[b"one", b"two-two", b"three"]);
        let second = (HEADER_LEN + record_size(3)) as usize;
        for pos in second..second + record_size(7) as usize {
            let mut b = bytes.clone();
            b[pos] ^= 0x40;
            let s = scan(&b, 1, u64::MAX);
            let framing = matches!(pos - second, 0..4 | 8..16);
            if framing {
                // Length or id broken: where the next record starts is
                // unknown, so the data ends here.
                assert_eq!(s.records, 1, "flip at {pos}");
                assert!(s.damage.is_some(), "flip at {pos}");
                assert!(s.corrupt.is_empty(), "flip at {pos}");
            } else {
                // Checksum, time or payload: that record alone is lost.
                assert_eq!(s.records, 3, "flip at {pos}");
                assert_eq!(s.damage, None, "flip at {pos}");
                assert_eq!(
                    s.corrupt,
                    vec![(1, second as u64, record_size(7))],
                    "flip at {pos}"
                );
                assert_eq!(s.valid_len, bytes.len() as u64);
            }
        }
    }

    #[test]
    fn bad_checksums_with_nothing_valid_after_them_are_a_torn_tail() {
        let bytes = encoded(1, &[b"one", b"two", b"three", b"four"]);
        let third = (HEADER_LEN + 2 * record_size(3)) as usize;
        let fourth = third + record_size(5) as usize;
        let mut b = bytes.clone();
        b[third + 25] ^= 1;
        b[fourth + 25] ^= 1;
        let s = scan(&b, 1, u64::MAX);
        assert_eq!(s.records, 2);
        assert_eq!(s.valid_len, third as u64);
        assert_eq!(s.damage, Some(Damage::BadCrc));
        assert!(s.corrupt.is_empty());

        // Two bad in a row, then a valid one: both skipped, all kept.
        let bytes = encoded(1, &[b"one", b"two", b"three", b"four", b"five"]);
        let mut b = bytes.clone();
        b[third + 25] ^= 1;
        b[fourth + 25] ^= 1;
        let s = scan(&b, 1, u64::MAX);
        assert_eq!(s.records, 5);
        assert_eq!(s.damage, None);
        assert_eq!(
            s.corrupt.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn scan_rejects_out_of_sequence_ids_and_overlap() {
        let mut bytes = encode_header(1).to_vec();
        encode_record(&mut bytes, 1, 0, b"a");
        encode_record(&mut bytes, 3, 0, b"b");
        let s = scan(&bytes, 1, u64::MAX);
        assert_eq!(s.records, 1);
        assert_eq!(
            s.damage,
            Some(Damage::UnexpectedId {
                expected: 2,
                found: 3
            })
        );

        let bytes = encoded(1, &[b"a", b"b", b"c"]);
        let s = scan(&bytes, 1, 2);
        assert_eq!(s.records, 2);
        assert_eq!(s.damage, Some(Damage::Overlap));
    }

    #[test]
    fn huge_length_is_damage_not_allocation() {
        let mut bytes = encoded(1, &[b"a"]);
        let at = bytes.len();
        encode_record(&mut bytes, 2, 0, b"b");
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let s = scan(&bytes, 1, u64::MAX);
        assert_eq!(s.records, 1);
        assert_eq!(s.damage, Some(Damage::BadLength(u32::MAX)));
        assert!(matches!(
            parse_record(&bytes[at..], 2),
            Parsed::Damaged(Damage::BadLength(_))
        ));
    }

    #[test]
    fn parse_record_windows() {
        let bytes = encoded(9, &[b"payload"]);
        let rec = &bytes[HEADER_LEN as usize..];
        match parse_record(rec, 9) {
            Parsed::Record { header, total } => {
                assert_eq!(header.id, 9);
                assert_eq!(header.ts, 1000);
                assert_eq!(&rec[RECORD_HEADER_LEN..total], b"payload");
            }
            _ => panic!("expected a record"),
        }
        assert!(matches!(parse_record(&rec[..10], 9), Parsed::NeedMore(24)));
        assert!(matches!(parse_record(&rec[..26], 9), Parsed::NeedMore(31)));
        let mut bad = rec.to_vec();
        bad[30] ^= 1;
        assert!(matches!(
            parse_record(&bad, 9),
            Parsed::Damaged(Damage::BadCrc)
        ));
    }

    #[test]
    fn acks_ignore_torn_tail_and_zeros() {
        let mut b = Vec::new();
        for id in [3u64, 0, 7] {
            b.extend_from_slice(&id.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode_acks(&b).collect::<Vec<_>>(), vec![3, 7]);
    }
}
