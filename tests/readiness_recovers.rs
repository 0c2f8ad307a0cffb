//! `/readyz` reports the spool's actual room. A callback whose records are
//! larger than the whole spool is answered 413 and leaves readiness alone;
//! it used to be answered 503 and latch `/readyz` at 503 on an empty spool,
//! with no traffic ever to clear it.

mod common;

use std::time::Duration;

use common::tmpfs::Tmpfs;
use common::*;

/// A group receipt with `items` distinct messages, each read by a member
/// with a long account name: small on the wire, large once spooled.
fn wide_group_body(seqs: std::ops::Range<u64>) -> String {
    let list: Vec<String> = seqs
        .map(|i| {
            format!(
                r#"{{"MsgSeq":{i},"ReadNum":1,"UnreadNum":1,"ReadReceiptMembers":[{{"Member_Account":"{}"}}]}}"#,
                "m".repeat(60)
            )
        })
        .collect();
    format!(
        r#"{{"GroupId":"g-wide","Type":"Public","GroupMsgReceiptList":[{}],"EventTime":1670574414123}}"#,
        list.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_spool_is_413_and_readiness_stays() {
    let s = setup();
    let gw = s
        .gateway(&[("spool", "max_bytes = 65536\nsegment_bytes = 4096")])
        .await;
    let addr = gw.local_addr();
    assert_eq!(get_text(addr, "/readyz").await.0, 200);

    let a = post(addr, &group_callback(), wide_group_body(0..300).as_bytes()).await;
    let info = assert_fail(&a, 413);
    assert!(info.contains("larger than the spool"), "{info}");
    let (status, body) = get_text(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.spool().stats().pending_events, 0);

    // A normal callback is taken right after.
    assert_ok(&post(addr, &group_callback(), group_body("g-after", 1).as_bytes()).await);
    assert_groups_arrive(&s.bootstrap, &["g-after".to_owned()]);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_returns_without_traffic_once_a_refusal_is_over() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let gw = s
        .gateway(&[
            ("spool", "max_bytes = 65536\nsegment_bytes = 4096"),
            // Kafka stays away: do not wait for it at the end.
            ("server", "shutdown_timeout = \"1s\""),
        ])
        .await;
    let addr = gw.local_addr();
    // A callback that fits the spool but not the room left: 503, unready.
    assert_ok(&post(addr, &group_callback(), wide_group_body(0..40).as_bytes()).await);
    let big = post(
        addr,
        &group_callback(),
        wide_group_body(100..160).as_bytes(),
    )
    .await;
    assert_fail(&big, 503);
    assert_eq!(get_text(addr, "/readyz").await.0, 503);
    // With no traffic and Kafka still away, the spool has room for other
    // callbacks: readiness comes back by itself.
    wait_for_status(
        addr,
        "/readyz",
        200,
        "readiness after the refusal",
        Duration::from_secs(10),
    )
    .await;
    assert_ok(&post(addr, &group_callback(), group_body("g-small", 1).as_bytes()).await);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_returns_by_itself_after_a_transient_disk_full() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let Some(_tmpfs) = Tmpfs::mount_or_skip(s.dir.path(), "256k") else {
        return;
    };
    // Something else on the disk takes most of it, for a while.
    let filler = s.dir.path().join("filler");
    std::fs::write(&filler, vec![0u8; 200 << 10]).unwrap();
    let gw = s
        .gateway(&[
            ("spool", "max_bytes = 1048576\nsegment_bytes = 8192"),
            ("server", "shutdown_timeout = \"1s\""),
        ])
        .await;
    let addr = gw.local_addr();
    let (_, refusal) = post_groups_until_refused(addr, "g-enospc", 2000).await;
    let info = assert_fail(&refusal, 503);
    assert!(info.contains("cannot be written"), "{info}");
    assert_eq!(get_text(addr, "/readyz").await.0, 503);

    // The disk has room again; nothing else happens: no callback, and
    // Kafka still away, so no delivery frees anything either.
    std::fs::remove_file(&filler).unwrap();
    wait_for_status(
        addr,
        "/readyz",
        200,
        "readiness after the disk had room again",
        Duration::from_secs(10),
    )
    .await;
    assert_ok(&post(addr, &group_callback(), group_body("g-room", 1).as_bytes()).await);
    gw.shutdown().await.unwrap();
}
