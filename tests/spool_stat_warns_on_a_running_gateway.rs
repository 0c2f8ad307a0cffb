//! `timbridge spool stat` on the spool of a running gateway says so: the
//! figures are a moving snapshot. On a stopped gateway's spool it does not.

mod common;

use std::process::Command;

use common::process::{BIN, GatewayProcess};
use common::*;

fn spool_stat(config: &std::path::Path) -> (bool, String, String) {
    let out = common::fork::output(
        Command::new(BIN)
            .args(["spool", "stat", "--config"])
            .arg(config),
    )
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_spool_gets_a_warning() {
    let s = setup();
    let gw = GatewayProcess::start(s.dir.path(), &s.config_text(&[]));
    post_groups(gw.addr, "g-stat", 0..3).await;
    let config = s.dir.path().join("config.toml");
    let (ok, out, err) = spool_stat(&config);
    assert!(ok, "{err}");
    assert!(out.contains("pending events:"), "{out}");
    assert!(
        err.contains("a running timbridge holds this spool"),
        "{err}"
    );
    gw.kill9();
    let (ok, out, err) = spool_stat(&config);
    assert!(ok, "{err}");
    assert!(out.contains("pending events:"), "{out}");
    assert!(!err.contains("running timbridge"), "{err}");
}
