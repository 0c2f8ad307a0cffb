//! See `timbridge::fuzzing::payload` for what this checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| timbridge::fuzzing::payload(data));
