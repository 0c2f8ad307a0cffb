//! A token rotation loses no callback: with `previous_token` the gateway
//! takes Signs made with either token while Tencent's console switches over,
//! and once the old token is removed (another SIGHUP) it is refused.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::GatewayProcess;
use common::reload::{RELOADED, query_signed_with, reload};
use common::*;

const OLD: &str = "old-token";
const NEW: &str = "new-token";
const READ: &str = "Group.CallbackAfterReadReceipt";

fn config(s: &Setup, tokens: &str) -> String {
    s.config_text(&[])
        .replace(&format!("token = \"{TOKEN}\""), tokens)
}

/// Waits until `series` on /metrics is at least `min`.
async fn wait_metric(addr: std::net::SocketAddr, series: &str, min: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get_text(addr, "/metrics").await;
        if metric(&text, series) >= min {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} stays below {min}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_with_previous_token_answers_no_401_and_the_old_token_goes_after() {
    let s = setup();
    let mut p = GatewayProcess::start(s.dir.path(), &config(&s, &format!("token = \"{OLD}\"")));
    let addr = p.addr;

    // Tencent, signing with whatever token its console has now, without a pause.
    let console = Arc::new(Mutex::new(OLD.to_owned()));
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = tokio::spawn({
        let (console, stop) = (console.clone(), stop.clone());
        async move {
            let mut answers = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let token = console.lock().unwrap().clone();
                let q = query_signed_with(APP, Some(&token), READ);
                let a = post(addr, &q, group_body(&format!("rot-{i}"), i).as_bytes()).await;
                answers.push((token, a.status, a.json.to_string()));
                i += 1;
            }
            answers
        }
    });
    let previous =
        "timbridge_auth_token_matches_total{sdk_app_id=\"1400000000\",token=\"previous\"}";
    let current = "timbridge_auth_token_matches_total{sdk_app_id=\"1400000000\",token=\"current\"}";

    // 1. The operator adds the new token, keeping the old one as previous;
    //    Tencent still signs with the old one.
    let both = format!("token = \"{NEW}\"\nprevious_token = \"{OLD}\"");
    reload(&mut p, s.dir.path(), &config(&s, &both), RELOADED);
    wait_metric(addr, previous, 3.0).await;
    // 2. Tencent's console switches to the new token (the old one now
    //    counts as previous: only the new one moves current).
    let current_before = metric(&get_text(addr, "/metrics").await.1, current);
    *console.lock().unwrap() = NEW.to_owned();
    wait_metric(addr, current, current_before + 3.0).await;
    // 3. The old token goes.
    reload(
        &mut p,
        s.dir.path(),
        &config(&s, &format!("token = \"{NEW}\"")),
        RELOADED,
    );
    stop.store(true, Ordering::Relaxed);
    let answers = hammer.await.unwrap();
    let refused: Vec<_> = answers
        .iter()
        .filter(|(_, status, _)| *status != 200)
        .collect();
    assert!(
        refused.is_empty(),
        "callbacks refused during the rotation: {refused:?}"
    );
    assert!(answers.iter().any(|(t, ..)| t == OLD) && answers.iter().any(|(t, ..)| t == NEW));

    let old = post(
        addr,
        &query_signed_with(APP, Some(OLD), READ),
        group_body("after", 1).as_bytes(),
    )
    .await;
    let info = assert_fail(&old, 401);
    assert!(info.contains("Sign does not match"), "{info}");
    assert_ok(
        &post(
            addr,
            &query_signed_with(APP, Some(NEW), READ),
            group_body("after", 2).as_bytes(),
        )
        .await,
    );
    let log = p.log_text();
    assert!(
        !log.contains(OLD) && !log.contains(NEW),
        "a token in the log:\n{log}"
    );
}
