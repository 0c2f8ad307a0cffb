//! A record Kafka will never take, that cannot be dead-lettered either
//! (the dead-letter file is at its budget), waits on the dead-letter side:
//! it does not cycle through Kafka, and fresh callbacks keep flowing at
//! their normal speed behind it.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_records_pass_a_dead_letter_waiting_for_room() {
    let s = setup();
    let gw = s
        .gateway(&[
            // Not even one line fits.
            ("kafka", "dead_letter_max_bytes = 100"),
            ("kafka.properties", "\"message.max.bytes\" = 4096"),
        ])
        .await;
    let (addr, metrics, spool) = (gw.local_addr(), gw.metrics().clone(), gw.spool().clone());
    assert_ok(&post(addr, &group_callback(), huge_receipt("g-stuck").as_bytes()).await);
    let m = metrics.clone();
    wait_until(
        "the too-large record refused",
        Duration::from_secs(30),
        || m.kafka_errors.with_label_values(&["too_large"]).get() >= 1,
    )
    .await;

    let groups = post_groups(addr, "g-fresh", 0..300).await;
    let posted = Instant::now();
    let recs = read_topic(
        &s.bootstrap,
        GROUP_TOPIC,
        groups.len(),
        Duration::from_secs(10),
    );
    let keys: std::collections::HashSet<&[u8]> = recs.iter().map(|r| r.key.as_slice()).collect();
    let missing = groups
        .iter()
        .filter(|g| !keys.contains(g.as_bytes()))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} fresh records not delivered {:?} after the last was posted",
        groups.len(),
        posted.elapsed()
    );

    // The stuck record is still in the spool, not in the file, and was
    // not sent to Kafka again and again.
    let sp = spool.clone();
    wait_until(
        "the spool holds only the stuck record",
        Duration::from_secs(30),
        || sp.stats().pending_events == 1,
    )
    .await;
    assert_eq!(metrics.dead_letter.get(), 0);
    assert_eq!(
        metrics.kafka_errors.with_label_values(&["too_large"]).get(),
        1
    );
    gw.shutdown().await.unwrap();
}
