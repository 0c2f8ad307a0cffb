//! A disk that fills up under the spool (a 64 KiB tmpfs): callbacks are
//! answered 503, not a panic, the gateway keeps serving, and it accepts
//! again by itself once Kafka has taken enough to free the disk.
//!
//! Mounting a tmpfs needs root (CI runs as root); elsewhere the test says
//! it was skipped and why.

mod common;

use std::time::Duration;

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
