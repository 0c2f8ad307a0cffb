//! Rebuilding the spool's state from its files at open, and the read-only
//! variant of the same survey used by `stat_dir`.
//!
//! Recovery is split so that everything it decides can be tested and fuzzed
//! without files. Pure parts: what a segment's bytes and its ack file's
//! bytes mean ([`scan_segment`], [`Scanned::note_acks`]: valid records, where
//! the usable data ends and why, corrupt records skipped alone, acks), and
//! what to do about the segments found ([`plan`], [`settle`], [`finish`]).
//! The file-system part around them ([`survey`], [`recover`]) lists the
//! directory, feeds them the files' bytes, and carries out the plan: cut a
//! torn tail, set aside files that are not segments, delete what is fully
//! delivered. [`recover_bytes`] runs the same decisions on segments held in
//! memory, for the fuzzer.
//!
//! The scan reads through `io::Read` rather than taking one slice: a
//! segment may exceed 64 MiB, and reading it whole at open would raise the
//! gateway's peak memory by as much. Over a `&[u8]` it is a pure function.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::segment::{
    Damage, FileKind, HEADER_LEN, HeaderProblem, acks_path, check_header, classify, decode_acks,
    read_full, scan_records, segment_path,
};
use super::state::{Sample, SegMeta, State};
use super::writer::{ActiveFile, PREFORMAT_BYTES};
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
    /// Zeros written ahead of the data (`fsync = always`) cut off the last
    /// segment: no damage, only said in the log.
    pub zeros_cut: u64,
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

/// One segment file as found on disk (or given in memory).
struct Surveyed {
    first_id: u64,
    path: PathBuf,
    file_len: u64,
    content: Result<Scanned, HeaderProblem>,
}

/// What a segment's bytes and its ack file say.
struct Scanned {
    meta: SegMeta,
    /// Offset and kind of the damage that ends the usable data.
    damage: Option<(u64, Damage)>,
    /// Single corrupt records inside the usable data (index, offset, size).
    corrupt: Vec<(u64, u64, u64)>,
    /// Highest plausible id in the ack file.
    max_ack: Option<u64>,
}

/// Decides, from a segment's bytes (`file_len` of them, read from `r`),
/// whether its header is usable, which records are valid, where the usable
/// data ends and why, and which corrupt records are skipped alone. Only the
/// reader's errors are errors; over a `&[u8]` there are none.
fn scan_segment<R: Read>(
    r: &mut R,
    first_id: u64,
    limit: u64,
    file_len: u64,
) -> io::Result<Result<Scanned, HeaderProblem>> {
    let mut head = [0u8; HEADER_LEN as usize];
    let n = read_full(r, &mut head)?;
    if let Err(p) = check_header(&head[..n], first_id) {
        return Ok(Err(p));
    }
    let mut meta = SegMeta::new(first_id, HEADER_LEN, file_len);
    let scan = scan_records(r, first_id, limit, |idx, ts, offset| {
        meta.note(Sample { idx, ts, offset });
    })?;
    meta.extend(scan.records, scan.valid_len);
    // Given up on at once, so they are neither replayed nor counted as
    // pending, and the segment can still be deleted once the rest is
    // delivered. Not persisted: the next open finds them again.
    for &(idx, _, _) in &scan.corrupt {
        meta.set_acked(first_id.saturating_add(idx));
    }
    Ok(Ok(Scanned {
        meta,
        damage: scan.damage.map(|d| (scan.valid_len, d)),
        corrupt: scan.corrupt,
        max_ack: None,
    }))
}

impl Scanned {
    /// Marks the ids in a stretch of the segment's ack file as delivered
    /// and remembers the highest plausible one (it may exceed the records
    /// that survived). Stretches must start at multiples of 8 bytes.
    fn note_acks(&mut self, bytes: &[u8]) {
        let first_id = self.meta.first_id;
        let plausible = first_id..first_id.saturating_add(MAX_ACK_AHEAD);
        for id in decode_acks(bytes) {
            self.meta.set_acked(id);
            if plausible.contains(&id) {
                self.max_ack = self.max_ack.max(Some(id));
            }
        }
    }
}

/// An id may belong to one segment only: records of segment `i` running
/// into the next segment's range are not used.
fn id_limit(ids: &[u64], i: usize) -> u64 {
    ids.get(i + 1).map_or(u64::MAX, |next| next - ids[i])
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
        segments.push(survey_segment(dir, first_id, id_limit(&ids, i))?);
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
    let mut content = scan_segment(&mut r, first_id, limit, file_len).map_err(ctx)?;
    if let Ok(scanned) = &mut content {
        read_acks(dir, scanned)?;
    }
    Ok(Surveyed {
        first_id,
        path,
        file_len,
        content,
    })
}

/// Feeds the segment's ack file, if it has one, to [`Scanned::note_acks`].
fn read_acks(dir: &Path, scanned: &mut Scanned) -> Result<(), SpoolError> {
    let path = acks_path(dir, scanned.meta.first_id);
    let ctx = |e| SpoolError::Io(io_context(e, "read ack file", &path));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx(e)),
    };
    let mut r = BufReader::new(file);
    // A multiple of 8, so chunks stay aligned to whole ids.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read_full(&mut r, &mut buf).map_err(ctx)?;
        scanned.note_acks(&buf[..n]);
        if n < buf.len() {
            return Ok(());
        }
    }
}

/// A segment whose records are used.
struct Good {
    path: PathBuf,
    file_len: u64,
    scanned: Scanned,
}

/// A file whose header is unusable, and what is done with it.
struct SetAside {
    first_id: u64,
    path: PathBuf,
    action: DamageAction,
}

/// What recovery will do, decided from the survey alone.
struct Plan {
    /// In id order, to be carried out before anything else.
    set_aside: Vec<SetAside>,
    /// A well-formed segment of another format version: the open is
    /// refused once the files before it are set aside (the plan's other
    /// fields are then incomplete and unused).
    refusal: Option<SpoolError>,
    /// In id order; the last one's `disk_len` is already its cut length.
    good: Vec<Good>,
    /// The last segment's torn tail: cut the file to this length.
    truncate: Option<(PathBuf, u64)>,
    next_id: u64,
    /// Everything but the figures only known once the state is settled.
    report: RecoveryReport,
}

/// Decides what to do about the segments found: which are set aside, what
/// damage is reported, where the last one is cut, which id comes next.
fn plan(segments: Vec<Surveyed>) -> Plan {
    let mut plan = Plan {
        set_aside: Vec::new(),
        refusal: None,
        good: Vec::new(),
        truncate: None,
        next_id: 1,
        report: RecoveryReport::default(),
    };
    for s in segments {
        match s.content {
            Ok(scanned) => plan.good.push(Good {
                path: s.path,
                file_len: s.file_len,
                scanned,
            }),
            Err(HeaderProblem::UnsupportedVersion(version)) => {
                plan.refusal = Some(SpoolError::UnsupportedFormat {
                    file: s.path,
                    version,
                });
                return plan;
            }
            Err(problem) => plan.set_aside_file(s.first_id, s.path, s.file_len, &problem),
        }
    }
    for g in &plan.good {
        report_corrupt_runs(&mut plan.report, g);
    }
    plan.report_tails();
    plan.next_id = next_id(&plan.good);
    plan
}

impl Plan {
    /// An empty or short file can only be a segment whose creation was
    /// interrupted, so it is removed; anything else is renamed out of the
    /// way but kept.
    fn set_aside_file(&mut self, first_id: u64, path: PathBuf, file_len: u64, p: &HeaderProblem) {
        let action = if matches!(p, HeaderProblem::Short(_)) {
            DamageAction::Removed
        } else {
            let mut name = path.as_os_str().to_owned();
            name.push(".corrupt");
            DamageAction::Quarantined(PathBuf::from(name))
        };
        self.report.damaged.push(DamagedSegment {
            file: path.clone(),
            offset: 0,
            bytes_skipped: file_len,
            reason: p.to_string(),
            action: action.clone(),
        });
        self.set_aside.push(SetAside {
            first_id,
            path,
            action,
        });
    }

    /// Damage that ends a segment's usable data: the last segment is cut
    /// there (a torn tail from a crash), the rest of an older one ignored.
    ///
    /// Zeros from the data to the end of the file end the scan without
    /// damage. On the last segment, and no more of them than `always` mode
    /// writes ahead, they are its zeros: cut without a report (counted in
    /// `zeros_cut`), so that the writer and the byte count start from the
    /// data. Anywhere else (an older segment, more zeros) they are what a
    /// lost write or a zeroed block looks like, and reported as before.
    fn report_tails(&mut self) {
        let last = self.good.len().checked_sub(1);
        for (i, g) in self.good.iter_mut().enumerate() {
            let meta = &g.scanned.meta;
            let (offset, damage) = match &g.scanned.damage {
                Some((offset, damage)) => (*offset, damage.clone()),
                None if g.file_len <= meta.data_len => continue,
                None if Some(i) == last && g.file_len - meta.data_len <= PREFORMAT_BYTES => {
                    self.report.zeros_cut += g.file_len - meta.data_len;
                    self.truncate = Some((g.path.clone(), meta.data_len));
                    g.scanned.meta.disk_len = meta.data_len;
                    continue;
                }
                None => (
                    meta.data_len,
                    Damage::UnexpectedId {
                        expected: meta.end_id(),
                        found: 0,
                    },
                ),
            };
            let action = if Some(i) == last {
                self.truncate = Some((g.path.clone(), offset));
                g.scanned.meta.disk_len = offset;
                DamageAction::Truncated
            } else {
                DamageAction::SkippedRest
            };
            self.report.damaged.push(DamagedSegment {
                file: g.path.clone(),
                offset,
                bytes_skipped: g.file_len.saturating_sub(offset),
                reason: damage.to_string(),
                action,
            });
        }
    }
}

/// One report entry (and one log line) per run of adjacent bad records.
fn report_corrupt_runs(report: &mut RecoveryReport, g: &Good) {
    report.records_skipped += g.scanned.corrupt.len() as u64;
    let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new(); // last idx, offset, bytes, count
    for &(idx, offset, size) in &g.scanned.corrupt {
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
            file: g.path.clone(),
            offset,
            bytes_skipped: bytes,
            reason,
            action: DamageAction::RecordSkipped,
        });
    }
}

/// Ids never go backwards: not below the last segment's name, and not onto
/// ids that were acked but whose records were lost in a crash (their stale
/// acks would hide the new records).
fn next_id(good: &[Good]) -> u64 {
    let next_id = good.last().map_or(1, |g| {
        let m = &g.scanned.meta;
        m.end_id()
            .max(m.first_id)
            .max(g.scanned.max_ack.map_or(0, |a| a + 1))
    });
    next_id.max(1)
}

/// The segment appends continue in: the last one, when its records end
/// right before the next id.
fn active_segment(plan: &Plan) -> Option<&Good> {
    plan.good
        .last()
        .filter(|g| g.scanned.meta.end_id() == plan.next_id)
}

/// The state the plan leads to, `active` being the segment appends
/// continue in; the report gains the records recovered.
fn settle(plan: Plan, active: Option<u64>) -> (State, RecoveryReport) {
    let mut report = plan.report;
    let mut state = State {
        active,
        ..State::default()
    };
    for g in plan.good {
        let meta = g.scanned.meta;
        report.records_recovered += meta.count;
        state.bytes += meta.disk_len;
        state.segments.insert(meta.first_id, meta);
    }
    (state, report)
}

/// Completes the report once fully delivered segments are taken out of
/// `state`; returns the id the reader starts at.
fn finish(report: &mut RecoveryReport, state: &State, next_id: u64, deleted: usize) -> u64 {
    report.segments_deleted = deleted;
    report.segments = state.segments.len();
    report.records_pending = state.pending();
    report.next_id = next_id;
    state
        .segments
        .values()
        .find_map(SegMeta::first_unacked_id)
        .unwrap_or(next_id)
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
    let plan = plan(survey.segments);
    for s in &plan.set_aside {
        set_aside(dir, s)?;
    }
    if let Some(refusal) = plan.refusal {
        return Err(refusal);
    }
    if let Some((path, len)) = &plan.truncate {
        truncate(path, *len)?;
    }
    let active = active_segment(&plan).map(open_active).transpose()?;
    let next_id = plan.next_id;
    let (mut state, mut report) = settle(plan, active.as_ref().map(|a| a.first_id));

    for path in survey.orphan_acks {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot delete ack file of a deleted segment");
        }
    }
    let deletions = state.take_deletable(dir);
    let reader_start = finish(&mut report, &state, next_id, deletions.len());
    deletions.run();
    Ok(Recovered {
        state,
        next_id,
        active,
        reader_start,
        report,
    })
}

fn open_active(g: &Good) -> Result<ActiveFile, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&g.path)
        .map_err(|e| SpoolError::Io(io_context(e, "open segment", &g.path)))?;
    let m = &g.scanned.meta;
    Ok(ActiveFile {
        first_id: m.first_id,
        file,
        len: m.data_len,
        count: m.count,
        // Any zeros written ahead were cut (`Plan::report_tails`).
        preformatted_to: m.data_len,
    })
}

/// Carries out what [`Plan::set_aside_file`] decided.
fn set_aside(dir: &Path, s: &SetAside) -> Result<(), SpoolError> {
    let path = &s.path;
    match &s.action {
        DamageAction::Quarantined(to) => {
            fs::rename(path, to).map_err(|e| SpoolError::Io(io_context(e, "rename", path)))?;
        }
        _ => fs::remove_file(path).map_err(|e| SpoolError::Io(io_context(e, "remove", path)))?,
    }
    // Its acks can only refer to records that are gone now.
    let acks = acks_path(dir, s.first_id);
    if let Err(e) = fs::remove_file(&acks)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %acks.display(), error = %e, "cannot delete ack file");
    }
    Ok(())
}

fn truncate(path: &Path, len: u64) -> Result<(), SpoolError> {
    let ctx = |e| SpoolError::Io(io_context(e, "truncate the tail of", path));
    let f = OpenOptions::new().write(true).open(path).map_err(ctx)?;
    f.set_len(len).map_err(ctx)?;
    f.sync_all().map_err(ctx)
}

/// A segment held in memory, for [`recover_bytes`]: the bytes of its file
/// and of its ack file, if it has one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentBytes<'a> {
    pub first_id: u64,
    pub data: &'a [u8],
    pub acks: Option<&'a [u8]>,
}

/// What recovery makes of segments held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecoveredBytes {
    /// The report [`super::Spool::open`] would give for these files in `dir`.
    pub report: RecoveryReport,
    /// The segments kept, in id order.
    pub segments: Vec<KeptSegment>,
    /// The segment appends continue in, if any (else a new one at `next_id`).
    pub active: Option<u64>,
    /// Where the reader starts.
    pub reader_start: u64,
}

/// One segment kept by [`recover_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeptSegment {
    pub first_id: u64,
    /// Records kept, consecutive ids from `first_id` (corrupt ones skipped
    /// alone included).
    pub count: u64,
    /// Where the readable records end: appends continue here.
    pub data_len: u64,
    /// The file's length once recovery has cut a torn tail.
    pub disk_len: u64,
    /// The ids to be delivered, in order.
    pub pending: Vec<u64>,
}

/// Recovery's decisions on segments held in memory, as if they were the
/// only files in `dir` (no orphan ack files): the same code as at open,
/// without a file read or changed. Segments are taken in id order, the
/// first of any with the same id. For the fuzzer (`crate::fuzzing`).
pub(crate) fn recover_bytes(
    dir: &Path,
    segments: &[SegmentBytes<'_>],
) -> Result<RecoveredBytes, SpoolError> {
    let mut segments = segments.to_vec();
    segments.sort_by_key(|s| s.first_id);
    segments.dedup_by_key(|s| s.first_id);
    let ids: Vec<u64> = segments.iter().map(|s| s.first_id).collect();
    let surveyed = segments
        .iter()
        .enumerate()
        .map(|(i, s)| survey_bytes(dir, s, id_limit(&ids, i)))
        .collect();
    let plan = plan(surveyed);
    if let Some(refusal) = plan.refusal {
        return Err(refusal);
    }
    let active = active_segment(&plan).map(|g| g.scanned.meta.first_id);
    let next_id = plan.next_id;
    let (mut state, mut report) = settle(plan, active);
    let deletions = state.take_deletable(dir);
    let reader_start = finish(&mut report, &state, next_id, deletions.len());
    let segments = state.segments.values().map(kept_segment).collect();
    Ok(RecoveredBytes {
        report,
        segments,
        active,
        reader_start,
    })
}

fn survey_bytes(dir: &Path, s: &SegmentBytes<'_>, limit: u64) -> Surveyed {
    let mut r = s.data;
    let content = match scan_segment(&mut r, s.first_id, limit, s.data.len() as u64) {
        Ok(content) => content,
        Err(e) => unreachable!("reading a byte slice failed: {e}"),
    };
    let content = content.map(|mut scanned| {
        scanned.note_acks(s.acks.unwrap_or_default());
        scanned
    });
    Surveyed {
        first_id: s.first_id,
        path: segment_path(dir, s.first_id),
        file_len: s.data.len() as u64,
        content,
    }
}

fn kept_segment(m: &SegMeta) -> KeptSegment {
    KeptSegment {
        first_id: m.first_id,
        count: m.count,
        data_len: m.data_len,
        disk_len: m.disk_len,
        pending: (m.first_id..m.end_id())
            .filter(|&id| !m.is_acked(id))
            .collect(),
    }
}

/// See [`super::stat_dir`].
pub(crate) fn stat_dir(dir: &Path) -> Result<SpoolStats, SpoolError> {
    let survey = survey(dir)?;
    let mut state = State::default();
    let mut files = 0u64;
    let mut segments = BTreeMap::new();
    for s in survey.segments {
        files += 1;
        // Zeros written ahead of the data count as the gateway counts them:
        // once data fills them.
        state.bytes += match &s.content {
            Ok(scanned) if scanned.damage.is_none() => scanned.meta.data_len,
            _ => s.file_len,
        };
        if let Ok(scanned) = s.content {
            segments.insert(s.first_id, scanned.meta);
        }
    }
    state.segments = segments;
    let mut stats = state.stats(SpoolCounters::default(), 0);
    stats.segments = files;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::segment::{encode_header, encode_record, record_size};

    fn segment(first_id: u64, n: u64) -> Vec<u8> {
        let mut b = encode_header(first_id).to_vec();
        for id in first_id..first_id + n {
            encode_record(&mut b, id, 1000 + id, format!("record {id}").as_bytes());
        }
        b
    }

    fn acks(ids: &[u64]) -> Vec<u8> {
        ids.iter().flat_map(|id| id.to_le_bytes()).collect()
    }

    /// Offset of the record with index `idx` in a segment built by `segment`.
    fn offset(first_id: u64, idx: u64) -> usize {
        let sizes: u64 = (first_id..first_id + idx)
            .map(|id| record_size(format!("record {id}").len()))
            .sum();
        (HEADER_LEN + sizes) as usize
    }

    /// The fuzzer checks recovery in memory; this holds it to what recovery
    /// of the same files does, on every kind of damage at once.
    #[test]
    fn recovery_in_memory_decides_as_recovery_of_the_files() {
        // Fully delivered, so deleted.
        let delivered = segment(1, 4);
        // Record 6's payload flipped (skipped alone), record 8's length
        // broken (the rest of this older segment ignored); 5 delivered.
        let mut damaged = segment(5, 5);
        damaged[offset(5, 1) + 30] ^= 1;
        let at = offset(5, 3);
        damaged[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let bad_magic = b"not a segment at all, but long enough".to_vec();
        // The last one: a torn tail, and an ack beyond its records.
        let mut last = segment(20, 3);
        last.extend_from_slice(&segment(20, 4)[offset(20, 3)..][..10]);
        let files = [
            (1, &delivered[..], Some(acks(&[1, 2, 3, 4]))),
            (5, &damaged, Some(acks(&[5]))),
            (10, &bad_magic, Some(acks(&[10]))),
            (15, &[][..], None),
            (20, &last, Some(acks(&[21, 30]))),
        ];
        let dir = tempfile::tempdir().unwrap();
        let mut in_memory = Vec::new();
        for (first_id, data, ack_file) in &files {
            fs::write(segment_path(dir.path(), *first_id), data).unwrap();
            if let Some(a) = ack_file {
                fs::write(acks_path(dir.path(), *first_id), a).unwrap();
            }
            in_memory.push(SegmentBytes {
                first_id: *first_id,
                data,
                acks: ack_file.as_deref(),
            });
        }
        let memory = recover_bytes(dir.path(), &in_memory).unwrap();
        let on_disk = recover(dir.path()).unwrap();

        assert_eq!(memory.report, on_disk.report);
        let kept: Vec<KeptSegment> = on_disk.state.segments.values().map(kept_segment).collect();
        assert_eq!(memory.segments, kept);
        assert_eq!(memory.active, on_disk.state.active);
        assert_eq!(memory.reader_start, on_disk.reader_start);

        let r = &memory.report;
        let actions: Vec<(u64, &DamageAction)> =
            r.damaged.iter().map(|d| (d.offset, &d.action)).collect();
        let quarantined = {
            let mut name = segment_path(dir.path(), 10).into_os_string();
            name.push(".corrupt");
            DamageAction::Quarantined(name.into())
        };
        assert_eq!(
            actions,
            [
                (0, &quarantined),
                (0, &DamageAction::Removed),
                (offset(5, 1) as u64, &DamageAction::RecordSkipped),
                (offset(5, 3) as u64, &DamageAction::SkippedRest),
                (offset(20, 3) as u64, &DamageAction::Truncated),
            ]
        );
        assert_eq!(
            (r.segments_deleted, r.segments, r.records_skipped),
            (1, 2, 1)
        );
        // The deleted segment's records count as recovered too.
        assert_eq!((r.records_recovered, r.records_pending), (10, 3));
        assert_eq!(r.next_id, 31, "ids continue after the plausible ack");
        let pending: Vec<&[u64]> = memory.segments.iter().map(|s| &s.pending[..]).collect();
        assert_eq!(pending, [&[7][..], &[20, 22]]);
        assert_eq!((memory.active, memory.reader_start), (None, 7));
    }

    /// Zeros after the data are the writer's own only on the last segment
    /// and no longer than it writes them; anywhere else they are reported.
    #[test]
    fn zeros_after_the_data_are_cut_silently_only_where_the_writer_leaves_them() {
        let with_zeros = |first_id, n, zeros: u64| {
            let mut b = segment(first_id, n);
            b.resize(b.len() + zeros as usize, 0);
            b
        };
        // The one damage reported: where, and what was done.
        let only_damage = |r: &RecoveredBytes| {
            let d = &r.report.damaged[..];
            assert_eq!(d.len(), 1, "{d:?}");
            (d[0].offset, d[0].action.clone(), d[0].reason.clone())
        };
        let recover_one = |segs: &[(u64, Vec<u8>)]| {
            let dir = tempfile::tempdir().unwrap();
            let in_memory: Vec<SegmentBytes> = segs
                .iter()
                .map(|(first_id, data)| SegmentBytes {
                    first_id: *first_id,
                    data,
                    acks: None,
                })
                .collect();
            recover_bytes(dir.path(), &in_memory).unwrap()
        };

        // The last segment, with what `always` mode writes ahead: cut, said
        // only in the log.
        let r = recover_one(&[(1, with_zeros(1, 3, PREFORMAT_BYTES))]);
        assert!(r.report.damaged.is_empty(), "{:?}", r.report);
        assert_eq!(r.report.zeros_cut, PREFORMAT_BYTES);
        assert_eq!(r.segments[0].disk_len, offset(1, 3) as u64);
        assert_eq!((r.report.records_pending, r.report.next_id), (3, 4));

        // More zeros than the writer writes ahead: reported and cut.
        let r = recover_one(&[(1, with_zeros(1, 3, PREFORMAT_BYTES + 1))]);
        assert_eq!(r.report.zeros_cut, 0);
        let (at, action, reason) = only_damage(&r);
        assert_eq!((at, action), (offset(1, 3) as u64, DamageAction::Truncated));
        assert!(
            reason.contains("record id 0 where 4 was expected"),
            "{reason}"
        );

        // Zeros on an older segment: reported, its records kept.
        let r = recover_one(&[(1, with_zeros(1, 3, 4096)), (4, segment(4, 2))]);
        assert_eq!(r.report.zeros_cut, 0);
        let (at, action, _) = only_damage(&r);
        assert_eq!(
            (at, action),
            (offset(1, 3) as u64, DamageAction::SkippedRest)
        );
        assert_eq!(r.report.records_pending, 5);
    }

    #[test]
    fn recovery_in_memory_refuses_a_newer_format_as_the_open_does() {
        let mut newer = segment(1, 1);
        newer[8] = 2;
        let refused = recover_bytes(
            Path::new("spool"),
            &[SegmentBytes {
                first_id: 1,
                data: &newer,
                acks: None,
            }],
        );
        assert!(matches!(
            refused,
            Err(SpoolError::UnsupportedFormat { version: 2, .. })
        ));
    }
}
