//! Starting child processes, and taking a mock broker down, kept apart.
//!
//! librdkafka's mock broker goes down by closing its listening socket and
//! at once binding a new one to the same port. A child forked from this
//! process in that instant still holds the old socket, until its `exec`
//! closes it; the bind then fails, and the mock aborts the whole test
//! binary on an assertion. So every child is started under a read lock
//! (`Command::spawn` returns once the child has exec'd), and
//! [`broker_down`] takes the write lock. Start children only through
//! these functions.

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{PoisonError, RwLock};

use super::Cluster;

static FORKS: RwLock<()> = RwLock::new(());

/// `cluster.broker_down(broker)`, with no child being started meanwhile.
pub fn broker_down(cluster: &Cluster, broker: i32) {
    let _no_forks = FORKS.write().unwrap_or_else(PoisonError::into_inner);
    cluster.broker_down(broker).expect("broker down");
}

/// `cmd.spawn()`.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _forking = FORKS.read().unwrap_or_else(PoisonError::into_inner);
    cmd.spawn()
}

/// `cmd.output()`: runs it to its end, stdin closed, stdout and stderr
/// captured. The lock is held only while the child starts.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// `cmd.status()`: runs it to its end.
pub fn status(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    spawn(cmd)?.wait()
}
