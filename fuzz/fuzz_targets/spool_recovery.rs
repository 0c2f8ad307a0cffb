//! See `timbridge::fuzzing::recovery` for what this checks. Each input is
//! written as a segment file: put the directory on a RAM disk (TMPDIR=/dev/shm)
//! or the disk's speed sets the pace.
#![no_main]

use std::sync::LazyLock;

static DIR: LazyLock<tempfile::TempDir> =
    LazyLock::new(|| tempfile::tempdir().expect("a temporary directory for the spool"));

libfuzzer_sys::fuzz_target!(|data: &[u8]| timbridge::fuzzing::recovery(DIR.path(), data));
