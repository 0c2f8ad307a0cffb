//! A disk that fills up under the spool (a 64 KiB tmpfs): callbacks are
//! answered 503, not a panic, the gateway keeps serving, and it accepts
//! again by itself once Kafka has taken enough to free the disk. While it
//! is full, its error is logged once a second, not once per callback: the
//! log may be on the same disk.
//!
//! Mounting a tmpfs needs root (CI runs as root); elsewhere the test says
//! it was skipped and why.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::tmpfs::Tmpfs;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_recovers() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let Some(_tmpfs) = Tmpfs::mount_or_skip(s.dir.path(), "64k") else {
        return;
    };
    // The spool's own limit is far above the disk's size: the disk fills first.
    let gw = s
        .gateway(&[("spool", "max_bytes = 1048576\nsegment_bytes = 8192")])
        .await;
    let addr = gw.local_addr();
    let (accepted, refusal) = post_groups_until_refused(addr, "g-disk", 2000).await;
    let info = assert_fail(&refusal, 503);
    assert!(info.contains("cannot be written"), "{info}");
    // Serving goes on.
    assert_eq!(get_text(addr, "/healthz").await.0, 200);
    assert_eq!(get_text(addr, "/readyz").await.0, 503);
    let again = post(
        addr,
        &group_callback(),
        group_body("g-disk-again", 0).as_bytes(),
    )
    .await;
    assert_fail(&again, 503);

    s.cluster.broker_up(1).unwrap();
    assert_groups_arrive(&s.bootstrap, &accepted);
    // Delivered segments are deleted, the disk has room, callbacks are taken again.
    post_until_accepted(
        addr,
        "g-disk-after",
        "callbacks not taken again once the disk had room",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(get_text(addr, "/readyz").await.0, 200);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_logged_once_a_second_not_once_per_callback() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let Some(_tmpfs) = Tmpfs::mount_or_skip(s.dir.path(), "64k") else {
        return;
    };
    let text = config_text(
        &s.bootstrap,
        s.dir.path(),
        &[("spool", "max_bytes = 1048576\nsegment_bytes = 8192")],
    );
    let mut gw = GatewayProcess::start(s.dir.path(), &text);
    let (_, refusal) = post_groups_until_refused(gw.addr, "g-disk-log", 2000).await;
    assert_fail(&refusal, 503);
    gw.wait_for_log("cannot write to the spool", Duration::from_secs(5));
    let suppressed = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("timbridge_log_lines_suppressed_total "))
            .expect("the suppressed counter")
            .parse()
            .expect("a number")
    };
    let lines = |gw: &GatewayProcess, needle: &str| -> u64 {
        gw.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count() as u64
    };
    let suppressed_before = suppressed(&get_text(gw.addr, "/metrics").await.1);
    let (spool_before, rejected_before) = (
        lines(&gw, "cannot write to the spool"),
        lines(&gw, "callback rejected"),
    );
    let started = std::time::Instant::now();
    for i in 0..300 {
        let body = group_body(&format!("g-disk-log-more-{i}"), 1);
        assert_fail(
            &post(gw.addr, &group_callback(), body.as_bytes()).await,
            503,
        );
    }
    let seconds = started.elapsed().as_secs() + 2;
    let left_out = suppressed(&get_text(gw.addr, "/metrics").await.1) - suppressed_before;
    let spool_logged = lines(&gw, "cannot write to the spool") - spool_before;
    let rejected_logged = lines(&gw, "callback rejected") - rejected_before;
    assert!(
        spool_logged <= seconds + 1,
        "{spool_logged} spool error lines in about {seconds} s"
    );
    // Each callback meets both limits, the rejection line's and the spool
    // error's: what either leaves out is counted.
    assert!(
        left_out + 2 >= (300 - spool_logged) + (300 - rejected_logged),
        "{left_out} lines counted as left out; logged {spool_logged} spool errors and {rejected_logged} rejections of 300"
    );
}
