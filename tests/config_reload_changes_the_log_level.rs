//! `log.level` is applied by SIGHUP: lines the old filter left out appear
//! once the new one is in (unless RUST_LOG is set, which wins).

mod common;

use common::process::GatewayProcess;
use common::reload::{RELOADED, reload};
use common::*;

#[test]
fn a_new_log_level_applies_to_the_lines_after_the_reload() {
    let s = setup();
    let quiet = format!(
        "{}\n[log]\nlevel = \"info,timbridge::reload=error\"\n",
        s.config_text(&[])
    );
    let mut p = GatewayProcess::start_with(s.dir.path(), &quiet, |cmd| {
        cmd.env_remove("RUST_LOG");
    });
    let loud = quiet.replace("info,timbridge::reload=error", "info");
    // The reload's own "reloaded" line comes after the new filter is in.
    reload(&mut p, s.dir.path(), &loud, RELOADED);
    // The "SIGHUP: reloading" line before it was filtered by the old level.
    assert!(
        !p.log_text().contains("SIGHUP: reloading"),
        "{}",
        p.log_text()
    );
}
