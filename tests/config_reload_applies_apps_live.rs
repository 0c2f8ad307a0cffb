//! SIGHUP applies `[[apps]]` to the running gateway: an app added to the
//! file is served at once, a removed one is refused, and a change to a
//! setting that needs a restart is named in the log and left alone.

mod common;

use common::process::GatewayProcess;
use common::reload::{RELOADED, query_signed_with, reload};
use common::*;

const NEW_APP: u64 = 1400000777;
const READ: &str = "Group.CallbackAfterReadReceipt";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_added_to_the_file_is_served_after_sighup_and_a_removed_one_refused() {
    let s = setup();
    let start = s.config_text(&[]);
    let mut p = GatewayProcess::start(s.dir.path(), &start);
    let body = group_body("live-app", 1);
    let new_app = query_signed_with(NEW_APP, Some("t-777"), READ);
    assert_fail(&post(p.addr, &new_app, body.as_bytes()).await, 403);

    // Added, with a token; and kafka.group_topic changed, which needs a restart.
    let added = format!("{start}\n[[apps]]\nsdk_app_id = {NEW_APP}\ntoken = \"t-777\"\n").replace(
        &format!("raw_topic = \"{RAW_TOPIC}\""),
        &format!("raw_topic = \"{RAW_TOPIC}\"\ngroup_topic = \"elsewhere\""),
    );
    let line = reload(&mut p, s.dir.path(), &added, RELOADED);
    assert!(
        line.contains("need a restart") && line.contains("kafka.group_topic"),
        "{line}"
    );
    assert_ok(&post(p.addr, &new_app, body.as_bytes()).await);
    // Its Sign is checked like any other's.
    let wrong = query_signed_with(NEW_APP, Some("not-it"), READ);
    assert_fail(
        &post(p.addr, &wrong, group_body("live-app", 2).as_bytes()).await,
        401,
    );
    // The topic stayed: the record is on the group topic the gateway started with.
    let recs = read_topic(
        &s.bootstrap,
        GROUP_TOPIC,
        1,
        std::time::Duration::from_secs(30),
    );
    assert!(recs.iter().any(|r| r.key == b"live-app"), "{recs:?}");

    // Removed again (and the topic back): refused, nothing about a restart.
    let line = reload(&mut p, s.dir.path(), &start, RELOADED);
    assert!(!line.contains("restart"), "{line}");
    assert_fail(
        &post(p.addr, &new_app, group_body("live-app", 3).as_bytes()).await,
        403,
    );
    // The apps of the start kept working throughout.
    assert_ok(&post(p.addr, &group_callback(), group_body("kept", 1).as_bytes()).await);
    let (_, metrics) = get_text(p.addr, "/metrics").await;
    assert!(
        metrics.contains("timbridge_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("timbridge_config_last_reload_successful 1"),
        "{metrics}"
    );
}
