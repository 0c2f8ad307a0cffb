//! A rate limit for log lines, so that a flood of bad requests cannot flood
//! the log (or the disk under it). The lines left out are counted and the
//! count is reported on the next line that gets through.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub struct LogThrottle {
    /// `log.rejections_per_second`, which a reload may change.
    per_second: AtomicU32,
    state: Mutex<State>,
}

struct State {
    window_start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(per_second: u32) -> LogThrottle {
        LogThrottle {
            per_second: AtomicU32::new(per_second),
            state: Mutex::new(State {
                window_start: Instant::now(),
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Lets `per_second` lines a second through from now on.
    pub fn set_per_second(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// `Some(lines suppressed since the last one logged)` when this line may
    /// be logged, `None` when it must be left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`LogThrottle::admit`], counting each line left out in `suppressed`
    /// (`timbridge_log_lines_suppressed_total`).
    pub fn admit_or_count(&self, suppressed: &prometheus::IntCounter) -> Option<u64> {
        let admitted = self.admit();
        if admitted.is_none() {
            suppressed.inc();
        }
        admitted
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(s.window_start) >= Duration::from_secs(1) {
            s.window_start = now;
            s.used = 0;
        }
        if s.used < self.per_second.load(Ordering::Relaxed) {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_second_and_reports_what_it_left_out() {
        let t = LogThrottle::new(3);
        let now = Instant::now();
        assert_eq!(t.admit_at(now), Some(0));
        assert_eq!(t.admit_at(now), Some(0));
        assert_eq!(t.admit_at(now), Some(0));
        assert_eq!(t.admit_at(now), None);
        assert_eq!(t.admit_at(now), None);
        assert_eq!(t.admit_at(now + Duration::from_secs(1)), Some(2));
        t.set_per_second(4);
        assert_eq!(t.admit_at(now + Duration::from_secs(1)), Some(0));
        assert_eq!(t.admit_at(now + Duration::from_secs(1)), Some(0));
        assert_eq!(t.admit_at(now + Duration::from_secs(1)), Some(0));
        assert_eq!(t.admit_at(now + Duration::from_secs(1)), None);
    }
}
