//! Table-driven checks that report every failing case by name. A test that
//! sets up costly traffic once and then checks a dozen things must not stop
//! at the first mismatch: the one failure would hide what the others say.
//!
//! ```ignore
//! let mut cases = Cases::new();
//! for (name, got, want) in table { cases.eq(name, got, want); }
//! cases.finish(); // panics listing each failed case and why
//! ```

use std::fmt::{Debug, Display};

#[derive(Default)]
pub struct Cases {
    ran: usize,
    failed: Vec<String>,
    finished: bool,
}

impl Cases {
    pub fn new() -> Cases {
        Cases::default()
    }

    /// Records case `name`: passed when `outcome` is Ok, failed with the
    /// error's text otherwise.
    pub fn record(&mut self, name: impl Display, outcome: Result<(), String>) {
        self.ran += 1;
        if let Err(why) = outcome {
            self.failed.push(format!("{name}: {why}"));
        }
    }

    /// Case `name` passes when `ok`; `why` says what was seen otherwise.
    pub fn check(&mut self, name: impl Display, ok: bool, why: impl FnOnce() -> String) {
        self.record(name, if ok { Ok(()) } else { Err(why()) });
    }

    /// Case `name` passes when `got == want`.
    pub fn eq<T: PartialEq + Debug>(&mut self, name: impl Display, got: T, want: T) {
        self.check(name, got == want, || format!("got {got:?}, want {want:?}"));
    }

    /// Panics if any case failed, naming each one.
    pub fn finish(self) {
        self.finish_showing("", "");
    }

    /// [`Cases::finish`], the failure message ending with `what` (e.g. the
    /// /metrics text the cases read) under the heading `heading`.
    pub fn finish_showing(mut self, heading: &str, what: &str) {
        self.finished = true;
        assert!(self.ran > 0, "no case ran");
        if !self.failed.is_empty() {
            let context = if what.is_empty() {
                String::new()
            } else {
                format!("\n{heading}:\n{what}")
            };
            panic!(
                "{} of {} cases failed:\n- {}{context}",
                self.failed.len(),
                self.ran,
                self.failed.join("\n- ")
            );
        }
    }
}

impl Drop for Cases {
    fn drop(&mut self) {
        // A table whose failures are never reported would pass silently.
        if !self.finished && !std::thread::panicking() {
            panic!("Cases dropped without finish(): its failures were not reported");
        }
    }
}
