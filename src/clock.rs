//! The wall clock, read in one place.
//!
//! Every stage stamps values with it (`received_at_ms` on events, append
//! times in the spool, `buried_at_ms` on dead letters, the Sign's
//! RequestTime), and none should reach into another stage to get it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it, which only
/// skews ages, never correctness).
pub fn now_ms() -> u64 {
    since_epoch()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_s() -> u64 {
    since_epoch().map(|d| d.as_secs()).unwrap_or(0)
}

fn since_epoch() -> Option<std::time::Duration> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok()
}
