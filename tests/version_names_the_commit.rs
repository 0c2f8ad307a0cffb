//! `--version` names the commit the binary was built from, so a bug report
//! says exactly which code runs.

mod common;

use std::process::Command;

use common::process::BIN;

#[test]
fn version_has_the_package_version_and_the_commit() {
    let out = common::fork::output(Command::new(BIN).arg("--version")).unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("timbridge {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let commit = text
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap()
        .trim_end_matches("-dirty");
    // Built from a git checkout here: the short hash of HEAD.
    let head = common::fork::output(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        Some(head) => assert!(
            head.starts_with(commit) && commit.len() >= 7,
            "{text} vs {head}"
        ),
        None => assert_eq!(commit, "unknown", "{text}"),
    }
}
