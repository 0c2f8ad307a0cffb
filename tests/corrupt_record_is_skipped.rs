//! One flipped bit inside a spooled record costs that record alone: the
//! records after it in the same segment are still delivered after a
//! restart, and the loss is logged and counted. Recovery used to cut the
//! segment at the bad record, losing everything after it.

mod common;

use std::time::Duration;

use common::*;

/// Offsets of the records in a segment file (24-byte file header; each
/// record: u32 length, u32 crc, u64 id, u64 time, payload).
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 24;
    let mut out = Vec::new();
    while at + 24 <= bytes.len() {
        out.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 24 + len;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_skipped_and_the_ones_after_it_are_delivered() {
    let s = setup();
    let text = s.config_text(&[]);
    let mut groups = s.spool_then_kill(&text, "g-bitflip", 0..5).await;

    let seg = s.last_segment();
    let mut bytes = std::fs::read(&seg).unwrap();
    let offsets = record_offsets(&bytes);
    assert_eq!(offsets.len(), 5, "one record per callback");
    // A payload byte of the third record: its length and id stay intact.
    bytes[offsets[2] + 24 + 10] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let mut gw = s.restart_with_kafka(&text);
    let line = gw.wait_for_log("spool recovery skipped data", Duration::from_secs(5));
    assert!(line.contains("checksum"), "says why: {line}");
    let lost = groups.remove(2);
    assert_groups_arrive(&s.bootstrap, &groups);
    let all = read_all(&s.bootstrap, GROUP_TOPIC);
    assert_eq!(all.len(), 4, "the four intact records, once each");
    assert!(all.iter().all(|r| r.key != lost.as_bytes()));
    // Replayed after the restart, so read from disk.
    assert_metrics_show(
        gw.addr,
        &[
            "timbridge_spool_records_lost_total 1",
            r#"timbridge_spool_records_read_total{source="disk"} 4"#,
            r#"timbridge_spool_records_read_total{source="memory"} 0"#,
        ],
    )
    .await;
    // The segment is not cut: new callbacks are taken and delivered.
    post_groups(gw.addr, "g-after-flip", 0..1).await;
}
