//! Rebuilding the spool's state from its files at open, and the read-only
//! variant of the same survey used by `stat_dir`.
//!
//! The survey never changes a file; [`recover`] then applies the few
//! changes needed to keep appending safely (cut a torn tail, set aside
//! files that are not segments, delete what is fully delivered).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use super::segment::{
    Damage, FileKind, HEADER_LEN, HeaderProblem, acks_path, check_header, classify, decode_acks,
    read_full, scan_records, segment_path,
};
use super::state::{Sample, SegMeta, State};
use super::writer::ActiveFile;
use super::{SpoolCounters, SpoolError, SpoolStats, io_context};

/// Read buffer for scanning segments: large sequential reads.
const SCAN_BUF: usize = 256 << 10;
/// Acks this far beyond a segment's last record are taken as corruption,
/// not as deliveries of records lost in a crash.
const MAX_ACK_AHEAD: u64 = 1 << 32;

/// What recovery found, for the caller to log at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in use after recovery.
    pub segments: usize,
    /// Records kept in all segments: every valid one, and every corrupt one
    /// skipped alone (it keeps its id, counted as delivered and never
    /// replayed; see `damaged`).
    pub records_recovered: u64,
    /// Of those, records not yet delivered: they will be replayed.
    pub records_pending: u64,
    /// Id the next append will get.
    pub next_id: u64,
    /// Fully delivered segments deleted during recovery.
    pub segments_deleted: usize,
    /// Every place where data was skipped, with the reason.
    pub damaged: Vec<DamagedSegment>,
    /// Records skipped one by one because their checksum failed while the
    /// records around them were intact (also listed in `damaged`); they
    /// will not be delivered.
    pub records_skipped: u64,
}

impl RecoveryReport {
    /// Total bytes of segment data that could not be used.
    pub fn bytes_skipped(&self) -> u64 {
        self.damaged.iter().map(|d| d.bytes_skipped).sum()
    }
}

/// One stretch of unusable data found at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    /// The segment file.
    pub file: PathBuf,
    /// Where the unusable data starts.
    pub offset: u64,
    /// How many bytes from there were not used.
    pub bytes_skipped: u64,
    /// What was wrong with them.
    pub reason: String,
    /// What recovery did about it.
    pub action: DamageAction,
}

impl fmt::Display for DamagedSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} at offset {}; {} bytes skipped ({})",
            self.file.display(),
            self.reason,
            self.offset,
            self.bytes_skipped,
            self.action
        )
    }
}

/// What recovery did with damaged data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageAction {
    /// The last segment was cut at the damage, so appends continue after
    /// good data (a torn tail from a crash: the normal case).
    Truncated,
    /// The rest of an older segment is ignored; its file stays until the
    /// good records before the damage are delivered.
    SkippedRest,
    /// The file is not a usable segment; renamed so it is kept for
    /// inspection but no longer read.
    Quarantined(PathBuf),
    /// An empty file left by a crash while creating a segment; removed.
    Removed,
    /// A record's checksum failed (or those of a run of adjacent records)
    /// but the records after it are intact: only the bad ones are skipped
    /// (never delivered), the rest is kept.
    RecordSkipped,
}

impl fmt::Display for DamageAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("file truncated there"),
            Self::SkippedRest => f.write_str("rest of the file ignored"),
            Self::Quarantined(p) => write!(f, "file renamed to {}", p.display()),
            Self::Removed => f.write_str("file removed"),
            Self::RecordSkipped => {
                f.write_str("only these bytes skipped, the records after them kept")
            }
        }
    }
}

/// One segment file as found on disk.
struct Surveyed {
    first_id: u64,
    path: PathBuf,
    file_len: u64,
    content: Result<Scanned, HeaderProblem>,
}

struct Scanned {
    meta: SegMeta,
    /// Offset and kind of the damage that ends the usable data.
    damage: Option<(u64, Damage)>,
    /// Single corrupt records inside the usable data (index, offset, size).
    corrupt: Vec<(u64, u64, u64)>,
    /// Highest plausible id in the ack file.
    max_ack: Option<u64>,
}

struct Survey {
    segments: Vec<Surveyed>,
    orphan_acks: Vec<PathBuf>,
}

/// Scans the directory without modifying anything.
fn survey(dir: &Path) -> Result<Survey, SpoolError> {
    let ctx = |e, path: &Path| SpoolError::Io(io_context(e, "read spool directory", path));
    let mut segs = BTreeSet::new();
    let mut acks = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(|e| ctx(e, dir))? {
        let entry = entry.map_err(|e| ctx(e, dir))?;
        let Some(kind) = entry.file_name().to_str().and_then(classify) else {
            continue;
        };
        if !entry
            .file_type()
            .map_err(|e| ctx(e, &entry.path()))?
            .is_file()
        {
            continue;
        }
        match kind {
            FileKind::Segment(id) => segs.insert(id),
            FileKind::Acks(id) => acks.insert(id),
        };
    }
    let ids: Vec<u64> = segs.iter().copied().collect();
    let mut segments = Vec::with_capacity(ids.len());
    for (i, &first_id) in ids.iter().enumerate() {
        // An id may belong to one segment only: records running into the
        // next segment's range are not used.
        let limit = ids.get(i + 1).map_or(u64::MAX, |next| next - first_id);
        segments.push(survey_segment(dir, first_id, limit)?);
    }
    let orphan_acks = acks
        .difference(&segs)
        .map(|&id| acks_path(dir, id))
        .collect();
    Ok(Survey {
        segments,
        orphan_acks,
    })
}

fn survey_segment(dir: &Path, first_id: u64, limit: u64) -> Result<Surveyed, SpoolError> {
    let path = segment_path(dir, first_id);
    let ctx = |e| SpoolError::Io(io_context(e, "read segment", &path));
    let file = File::open(&path).map_err(ctx)?;
    let file_len = file.metadata().map_err(ctx)?.len();
    let mut r = BufReader::with_capacity(SCAN_BUF, file);
    let mut head = [0u8; HEADER_LEN as usize];
    let n = read_full(&mut r, &mut head).map_err(ctx)?;
    if let Err(p) = check_header(&head[..n], first_id) {
        return Ok(Surveyed {
            first_id,
            path,
            file_len,
            content: Err(p),
        });
    }
    let mut meta = SegMeta::new(first_id, HEADER_LEN, file_len);
    let scan = scan_records(&mut r, first_id, limit, |idx, ts, offset| {
        meta.note(Sample { idx, ts, offset });
    })
    .map_err(ctx)?;
    meta.extend(scan.records, scan.valid_len);
    // Given up on at once, so they are neither replayed nor counted as
    // pending, and the segment can still be deleted once the rest is
    // delivered. Not persisted: the next open finds them again.
    for &(idx, _, _) in &scan.corrupt {
        meta.set_acked(first_id.saturating_add(idx));
    }
    let max_ack = apply_acks(dir, &mut meta)?;
    let damage = scan.damage.map(|d| (scan.valid_len, d));
    Ok(Surveyed {
        first_id,
        path,
        file_len,
        content: Ok(Scanned {
            meta,
            damage,
            corrupt: scan.corrupt,
            max_ack,
        }),
    })
}

/// Marks the ids listed in the segment's ack file as delivered; returns the
/// highest plausible acked id (it may exceed the records that survived).
fn apply_acks(dir: &Path, meta: &mut SegMeta) -> Result<Option<u64>, SpoolError> {
    let path = acks_path(dir, meta.first_id);
    let ctx = |e| SpoolError::Io(io_context(e, "read ack file", &path));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ctx(e)),
    };
    let mut r = BufReader::new(file);
    // A multiple of 8, so chunks stay aligned to whole ids.
    let mut buf = vec![0u8; 64 << 10];
    let mut max_ack = None;
    let plausible = meta.first_id..meta.first_id.saturating_add(MAX_ACK_AHEAD);
    loop {
        let n = read_full(&mut r, &mut buf).map_err(ctx)?;
        for id in decode_acks(&buf[..n]) {
            meta.set_acked(id);
            if plausible.contains(&id) {
                max_ack = max_ack.max(Some(id));
            }
        }
        if n < buf.len() {
            return Ok(max_ack);
        }
    }
}

/// The state rebuilt at open.
pub(crate) struct Recovered {
    pub state: State,
    pub next_id: u64,
    /// The last segment, when appends can continue in it.
    pub active: Option<ActiveFile>,
    pub reader_start: u64,
    pub report: RecoveryReport,
}

/// Rebuilds the state from the files, repairing what must be repaired.
/// Must only run while holding the directory lock.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, SpoolError> {
    let survey = survey(dir)?;
    let mut report = RecoveryReport::default();
    let mut good: Vec<(PathBuf, u64, Scanned)> = Vec::new();
    for s in survey.segments {
        match s.content {
            Ok(scanned) => good.push((s.path, s.file_len, scanned)),
            Err(HeaderProblem::UnsupportedVersion(version)) => {
                return Err(SpoolError::UnsupportedFormat {
                    file: s.path,
                    version,
                });
            }
            Err(problem) => report
                .damaged
                .push(set_aside(dir, s.first_id, &s.path, s.file_len, &problem)?),
        }
    }

    let last = good.len().checked_sub(1);
    for (path, _, scanned) in &good {
        report.records_skipped += scanned.corrupt.len() as u64;
        // One entry (and one log line) per run of adjacent bad records.
        let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new(); // last idx, offset, bytes, count
        for &(idx, offset, size) in &scanned.corrupt {
            match runs.last_mut() {
                Some(run) if run.0 + 1 == idx => {
                    run.0 = idx;
                    run.2 += size;
                    run.3 += 1;
                }
                _ => runs.push((idx, offset, size, 1)),
            }
        }
        for (_, offset, bytes, count) in runs {
            let reason = if count == 1 {
                Damage::BadCrc.to_string()
            } else {
                format!("{count} records in a row: {}", Damage::BadCrc)
            };
            report.damaged.push(DamagedSegment {
                file: path.clone(),
                offset,
                bytes_skipped: bytes,
                reason,
                action: DamageAction::RecordSkipped,
            });
        }
    }
    for (i, (path, file_len, scanned)) in good.iter_mut().enumerate() {
        let Some((offset, damage)) = &scanned.damage else {
            continue;
        };
        let action = if Some(i) == last {
            truncate(path, *offset)?;
            scanned.meta.disk_len = *offset;
            DamageAction::Truncated
        } else {
            DamageAction::SkippedRest
        };
        report.damaged.push(DamagedSegment {
            file: path.clone(),
            offset: *offset,
            bytes_skipped: file_len.saturating_sub(*offset),
            reason: damage.to_string(),
            action,
        });
    }

    // Ids never go backwards: not below the last segment's name, and not
    // onto ids that were acked but whose records were lost in a crash
    // (their stale acks would hide the new records).
    let next_id = good.last().map_or(1, |(_, _, s)| {
        let m = &s.meta;
        m.end_id()
            .max(m.first_id)
            .max(s.max_ack.map_or(0, |a| a + 1))
    });
    let next_id = next_id.max(1);

    let mut active = None;
    let mut state = State::default();
    if let Some((path, _, s)) = good.last()
        && s.meta.end_id() == next_id
    {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| SpoolError::Io(io_context(e, "open segment", path)))?;
        active = Some(ActiveFile {
            first_id: s.meta.first_id,
            file,
            len: s.meta.data_len,
            count: s.meta.count,
        });
        state.active = Some(s.meta.first_id);
    }
    for (_, _, s) in good {
        report.records_recovered += s.meta.count;
        state.bytes += s.meta.disk_len;
        state.segments.insert(s.meta.first_id, s.meta);
    }

    for path in survey.orphan_acks {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot delete ack file of a deleted segment");
        }
    }
    let deletions = state.take_deletable(dir);
    report.segments_deleted = deletions.len();
    deletions.run();

    report.segments = state.segments.len();
    report.records_pending = state.pending();
    report.next_id = next_id;
    let reader_start = state
        .segments
        .values()
        .find_map(SegMeta::first_unacked_id)
        .unwrap_or(next_id);
    Ok(Recovered {
        state,
        next_id,
        active,
        reader_start,
        report,
    })
}

/// Deals with a file whose header is unusable: an empty or short one can
/// only be a segment whose creation was interrupted, so it is removed;
/// anything else is renamed out of the way but kept.
fn set_aside(
    dir: &Path,
    first_id: u64,
    path: &Path,
    file_len: u64,
    problem: &HeaderProblem,
) -> Result<DamagedSegment, SpoolError> {
    let action = if matches!(problem, HeaderProblem::Short(_)) {
        fs::remove_file(path).map_err(|e| SpoolError::Io(io_context(e, "remove", path)))?;
        DamageAction::Removed
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(".corrupt");
        let to = PathBuf::from(name);
        fs::rename(path, &to).map_err(|e| SpoolError::Io(io_context(e, "rename", path)))?;
        DamageAction::Quarantined(to)
    };
    // Its acks can only refer to records that are gone now.
    let acks = acks_path(dir, first_id);
    if let Err(e) = fs::remove_file(&acks)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %acks.display(), error = %e, "cannot delete ack file");
    }
    Ok(DamagedSegment {
        file: path.to_path_buf(),
        offset: 0,
        bytes_skipped: file_len,
        reason: problem.to_string(),
        action,
    })
}

fn truncate(path: &Path, len: u64) -> Result<(), SpoolError> {
    let ctx = |e| SpoolError::Io(io_context(e, "truncate damaged tail of", path));
    let f = OpenOptions::new().write(true).open(path).map_err(ctx)?;
    f.set_len(len).map_err(ctx)?;
    f.sync_all().map_err(ctx)
}

/// See [`super::stat_dir`].
pub(crate) fn stat_dir(dir: &Path) -> Result<SpoolStats, SpoolError> {
    let survey = survey(dir)?;
    let mut state = State::default();
    let mut files = 0u64;
    let mut segments = BTreeMap::new();
    for s in survey.segments {
        files += 1;
        state.bytes += s.file_len;
        if let Ok(scanned) = s.content {
            segments.insert(s.first_id, scanned.meta);
        }
    }
    state.segments = segments;
    let mut stats = state.stats(SpoolCounters::default());
    stats.segments = files;
    Ok(stats)
}
