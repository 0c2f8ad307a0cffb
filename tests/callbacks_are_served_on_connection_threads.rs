//! Callback connections are served on the connection threads (`conn-N`,
//! one single-threaded runtime per core), the admin listener's on the main
//! runtime, so that a connection thread held up by the disk cannot fail the
//! probes. Told apart by the CPU time each thread of this process used
//! (`/proc/self/task/*/schedstat`, in nanoseconds).

mod common;

use common::*;

const ADMIN: (&str, &str) = ("server", "admin_listen = \"127.0.0.1:0\"");

/// Nanoseconds of CPU the connection threads of this process have used.
fn connection_threads_cpu_ns() -> u64 {
    let mut total = 0;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task").path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // ended meanwhile
        };
        if !name.starts_with("conn-") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).expect("schedstat");
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .expect("run time in schedstat");
        threads += 1;
    }
    assert!(threads > 0, "no connection threads in this process");
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_run_on_connection_threads_and_probes_do_not() {
    let s = setup();
    let gw = s.gateway(&[ADMIN]).await;
    let admin = gw.admin_addr().expect("an admin listener");

    let before = connection_threads_cpu_ns();
    for _ in 0..100 {
        assert_eq!(get_text(admin, "/metrics").await.0, 200);
    }
    let probes = connection_threads_cpu_ns() - before;

    let before = connection_threads_cpu_ns();
    let mut groups = Vec::new();
    for i in 0..100 {
        let group = format!("on-conn-thread-{i}");
        let body = group_body(&group, 1);
        assert_ok(&post(gw.local_addr(), &group_callback(), body.as_bytes()).await);
        groups.push(group);
    }
    let callbacks = connection_threads_cpu_ns() - before;
    assert_groups_arrive(&s.bootstrap, &groups);

    assert!(
        callbacks > 2_000_000,
        "100 callbacks took {callbacks} ns on the connection threads: served elsewhere"
    );
    assert!(
        probes * 10 < callbacks,
        "100 admin requests took {probes} ns on the connection threads (callbacks {callbacks} ns)"
    );
}
