//! The dead-letter file cannot fill the disk: at `kafka.dead_letter_max_bytes`
//! further dead letters wait in the spool (without blocking the records
//! behind them), and go to a new file once the operator moves the old one
//! away.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_beyond_the_budget_wait_in_the_spool() {
    let s = setup();
    let gw = s
        .gateway(&[
            ("kafka", "dead_letter_max_bytes = 30000"),
            ("kafka.properties", "\"message.max.bytes\" = 4096"),
        ])
        .await;
    let (addr, metrics, spool) = (gw.local_addr(), gw.metrics().clone(), gw.spool().clone());
    let file = s.dir.path().join("spool").join(timbridge::DEAD_LETTER_FILE);
    assert_eq!(metrics.dead_letter_max_bytes.get(), 30000);

    assert_ok(&post(addr, &group_callback(), huge_receipt("g-huge-1").as_bytes()).await);
    wait_until("the first dead letter", Duration::from_secs(30), || {
        metrics.dead_letter.get() == 1
    })
    .await;
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 15_000, "one line is {size} bytes");
    assert_eq!(metrics.dead_letter_bytes.get(), size as i64);

    // A second one would pass the budget: it stays in the spool, and is
    // tried again, while the records behind it flow.
    assert_ok(&post(addr, &group_callback(), huge_receipt("g-huge-2").as_bytes()).await);
    let groups = post_groups(addr, "g-behind", 0..5).await;
    assert_groups_arrive(&s.bootstrap, &groups);
    let m = metrics.clone();
    wait_until("the second tried again", Duration::from_secs(30), || {
        m.kafka_errors.with_label_values(&["too_large"]).get() >= 2
    })
    .await;
    assert_eq!(metrics.dead_letter.get(), 1);
    assert_eq!(spool.stats().pending_events, 1);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);

    // The operator moves the file away: the waiting record gets a new one.
    std::fs::rename(&file, file.with_extension("jsonl.1")).unwrap();
    wait_until("the second dead letter", Duration::from_secs(30), || {
        metrics.dead_letter.get() == 2 && spool.stats().pending_events == 0
    })
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("g-huge-2"));
    assert_eq!(metrics.dead_letter_bytes.get(), text.len() as i64);
    gw.shutdown().await.unwrap();
}
