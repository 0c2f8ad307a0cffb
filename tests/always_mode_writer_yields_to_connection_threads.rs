//! With `fsync = "always"` the spool writer thread runs at a lower priority
//! (nice +5) than the rest of the gateway, so that the connection threads
//! finish turning answers into the next requests before it starts a sync
//! (bigger groups per fdatasync; see `spool::writer::yield_to_callers`).
//! In the other modes it keeps the process's own priority: there a callback
//! handed to it waits for it to run.
//!
//! One test in its own file: it reads every thread of this process, and a
//! spool of another test running beside it would be counted too.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// Field `n` (1-based, as in proc(5)) of a `stat` file; the command name
/// in parentheses may hold spaces, so fields are counted after it.
fn stat_field(stat: &str, n: usize) -> i64 {
    let after = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    after
        .split(' ')
        .nth(n - 3)
        .expect("field")
        .parse()
        .expect("number")
}

/// Each "spool-writer" thread of this process: its nice value, and how
/// many times it has blocked.
fn writers() -> Vec<(i64, u64)> {
    let mut found = Vec::new();
    for task in fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task").path();
        // A thread that ended meanwhile has no files left to read.
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != "spool-writer" {
            continue;
        }
        let (Ok(stat), Ok(status)) = (
            fs::read_to_string(dir.join("stat")),
            fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        found.push((stat_field(&stat, 19), blocked));
    }
    found
}

/// The nice value of each writer thread that has gone round its loop: it
/// wakes every 100 ms to flush acks, so three voluntary switches are past
/// the start of its body, where the priority is set (one could still
/// happen inside the thread's own start-up).
fn writer_nices() -> Vec<i64> {
    writers()
        .into_iter()
        .filter(|&(_, blocked)| blocked >= 3)
        .map(|(nice, _)| nice)
        .collect()
}

fn process_nice() -> i64 {
    stat_field(
        &fs::read_to_string("/proc/self/stat").expect("/proc/self/stat"),
        19,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_writer_runs_below_the_connection_threads_only_when_every_callback_waits_for_it()
{
    let base = process_nice();
    if base > 14 {
        // nice +5 would be clamped at 19 and indistinguishable: nothing to
        // tell apart at this priority.
        eprintln!("skipped: the test runs at nice {base}; it needs 14 or less");
        return;
    }
    let s = setup();

    let gw = s.gateway(&[("spool", r#"fsync = "always""#)]).await;
    let want = base + 5;
    wait_until(
        "the always-mode spool writer at nice +5",
        Duration::from_secs(10),
        || writer_nices() == [want],
    )
    .await;
    // It still answers: the lower priority only orders it after busy
    // connection threads.
    let a = post(gw.local_addr(), &group_callback(), GROUP_BODY.as_bytes()).await;
    assert_ok(&a);
    gw.shutdown().await.expect("shutdown");
    wait_until("the writer thread gone", Duration::from_secs(10), || {
        writers().is_empty()
    })
    .await;

    let gw = s.gateway(&[("spool", r#"fsync = "interval""#)]).await;
    wait_until(
        "the interval-mode spool writer started",
        Duration::from_secs(10),
        || !writer_nices().is_empty(),
    )
    .await;
    assert_eq!(
        writer_nices(),
        [base],
        "interval mode keeps the process's priority"
    );
    gw.shutdown().await.expect("shutdown");
}
