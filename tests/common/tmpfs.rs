//! A small tmpfs mounted over a test's directory, for a disk that fills up.
//! Mounting needs root (CI runs as root); elsewhere `mount` returns None
//! and the test says it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = super::fork::status(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        )
        .map(|s| s.success())
        .unwrap_or(false);
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Tmpfs {
    /// [`Tmpfs::mount`], saying on stderr that the test is skipped when it
    /// cannot: `let Some(_disk) = Tmpfs::mount_or_skip(..) else { return };`
    pub fn mount_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
        let mounted = Self::mount(dir, size);
        if mounted.is_none() {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        }
        mounted
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = super::fork::status(Command::new("umount").arg("-l").arg(&self.0));
    }
}
