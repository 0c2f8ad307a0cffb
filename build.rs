//! Stamps the binary with the commit it was built from, so `--version` and
//! the startup log say exactly which code runs. A build without git (a
//! source tarball, a container build context without `.git`) still works:
//! the commit is then "unknown", or whatever TIMBRIDGE_BUILD_COMMIT says.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TIMBRIDGE_BUILD_COMMIT");
    let commit = std::env::var("TIMBRIDGE_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TIMBRIDGE_COMMIT={}", commit.trim());
    // Rebuild when HEAD moves (a commit, a checkout); harmless if absent.
    // --git-path finds the files in a linked worktree as well.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", head.trim());
    }
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", head_ref.trim()])
    {
        println!("cargo:rerun-if-changed={}", path.trim());
    }
}

fn git_commit() -> Option<String> {
    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    Some(format!(
        "{}{}",
        hash.trim(),
        if dirty { "-dirty" } else { "" }
    ))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
