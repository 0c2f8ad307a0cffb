//! See `timbridge::fuzzing::record` for what this checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| timbridge::fuzzing::record(data));
