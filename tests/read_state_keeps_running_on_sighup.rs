//! `timbridge materialize` does not reload its config, and a SIGHUP meant
//! for the gateway beside it (or for every timbridge process) must not end
//! the fold: it says so in the log and goes on serving.

mod common;

use std::time::Duration;

use common::process::start_materializer;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_is_logged_and_the_materializer_keeps_running() {
    let s = setup();
    s.cluster.create_topic("tim.read_state", 3, 1).unwrap();
    let config = format!(
        "{}\n[read_state]\ntopic = \"tim.read_state\"\nlisten = \"127.0.0.1:0\"\n",
        config_text(&s.bootstrap, s.dir.path(), &[])
    );
    let mut m = start_materializer(s.dir.path(), "materialize", &config);
    m.signal("HUP");
    m.wait_for_log("does not reload its config", Duration::from_secs(10));
    let (status, _) = get_text(m.addr, "/healthz").await;
    assert_eq!(status, 200, "the materializer ended on SIGHUP");
    m.signal("TERM");
    assert!(m.wait_exit(Duration::from_secs(30)).success());
}
