//! A failed command says what went wrong once: a missing config file used
//! to print "No such file or directory" twice.

mod common;

use std::process::Command;

use common::process::BIN;

#[test]
fn a_missing_config_file_is_one_clear_line() {
    let out = common::fork::output(Command::new(BIN).args([
        "check-config",
        "--config",
        "/nonexistent/timbridge.toml",
    ]))
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/timbridge.toml"), "{err}");
    assert!(err.contains("TIMBRIDGE_CONFIG"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
