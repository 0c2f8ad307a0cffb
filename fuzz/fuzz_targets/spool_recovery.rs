//! See `timbridge::fuzzing::recovery_sampled` for what this checks. Every
//! input goes through recovery in memory; one in 64 also through real files:
//! put their directory on a RAM disk (TMPDIR=/dev/shm) or the disk's speed
//! sets the pace.
#![no_main]

use std::sync::LazyLock;

static DIR: LazyLock<tempfile::TempDir> =
    LazyLock::new(|| tempfile::tempdir().expect("a temporary directory for the spool"));

libfuzzer_sys::fuzz_target!(|data: &[u8]| timbridge::fuzzing::recovery_sampled(DIR.path(), data));
