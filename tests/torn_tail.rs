//! A crash in the middle of a write leaves a torn record at the end of the
//! last segment. The gateway must still start, replay everything before the
//! tear, and say what it skipped.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_skipped_and_everything_before_it_is_replayed() {
    let cluster = cluster();
    let bootstrap = cluster.bootstrap_servers();
    cluster.broker_down(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&bootstrap, dir.path(), &[]);
    let gw = GatewayProcess::start(dir.path(), &text);
    const N: u64 = 10;
    for i in 0..N {
        let q = format!(
            "/callback?{}",
            signed_query("Group.CallbackAfterReadReceipt")
        );
        assert_ok(
            &post(
                gw.addr,
                &q,
                group_body(&format!("g-torn-{i}"), i).as_bytes(),
            )
            .await,
        );
    }
    gw.kill9();

    // Cut the last segment in the middle of its last record.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment file");
    let len = std::fs::metadata(last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    f.set_len(len - 40).unwrap();
    drop(f);

    cluster.broker_up(1).unwrap();
    let mut gw = GatewayProcess::start(dir.path(), &text);
    let line = gw.wait_for_log("spool recovery skipped data", Duration::from_secs(5));
    assert!(line.contains(".seg"), "names the file: {line}");
    let recs = read_topic(
        &bootstrap,
        GROUP_TOPIC,
        (N - 1) as usize,
        Duration::from_secs(60),
    );
    let mut keys: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8(r.key.clone()).unwrap())
        .collect();
    keys.sort_by_key(|k| k.trim_start_matches("g-torn-").parse::<u64>().unwrap());
    let expected: Vec<String> = (0..N - 1).map(|i| format!("g-torn-{i}")).collect();
    assert_eq!(keys, expected, "everything before the tear, once");
    // And the gateway serves on after it.
    let q = format!(
        "/callback?{}",
        signed_query("Group.CallbackAfterReadReceipt")
    );
    assert_ok(&post(gw.addr, &q, group_body("g-after-tear", 0).as_bytes()).await);
}
