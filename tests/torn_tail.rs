//! A crash in the middle of a write leaves a torn record at the end of the
//! last segment. The gateway must still start, replay everything before the
//! tear, and say what it skipped.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_skipped_and_everything_before_it_is_replayed() {
    let s = setup();
    let text = s.config_text(&[]);
    let mut groups = s.spool_then_kill(&text, "g-torn", 0..10).await;

    // Cut the last segment in the middle of its last record.
    let last = s.last_segment();
    let len = std::fs::metadata(&last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 40).unwrap();
    drop(f);

    let mut gw = s.restart_with_kafka(&text);
    let line = gw.wait_for_log("spool recovery skipped data", Duration::from_secs(5));
    assert!(line.contains(".seg"), "names the file: {line}");
    let torn = groups.pop().unwrap();
    assert_groups_arrive(&s.bootstrap, &groups);
    let all = read_all(&s.bootstrap, GROUP_TOPIC);
    assert_eq!(all.len(), groups.len(), "everything before the tear, once");
    assert!(all.iter().all(|r| r.key != torn.as_bytes()));
    // And the gateway serves on after it.
    post_groups(gw.addr, "g-after-tear", 0..1).await;
}
