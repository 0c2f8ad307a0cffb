//! /metrics after known traffic: each counter moved by exactly the traffic
//! that should move it, and the output passes a real parser (promtool).

mod common;

use std::time::Duration;

use common::*;
use timbridge::Gateway;

/// The value of the sample line starting with `series ` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

fn must(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// What a sample must be.
#[derive(Debug, Clone, Copy)]
enum Want {
    Exactly(f64),
    AboveZero,
}

impl Want {
    fn check(self, got: Option<f64>) -> Result<(), String> {
        let Some(got) = got else {
            return Err("no such series".to_owned());
        };
        let ok = match self {
            Want::Exactly(want) => got == want,
            Want::AboveZero => got > 0.0,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{got}, want {self:?}"))
        }
    }
}

use Want::*;

/// Every series after `counters_follow_the_traffic`'s traffic: two group
/// receipts (one a duplicate), a c2c receipt, a c2c report, one forwarded
/// command, one invalid body, one unknown app.
const AFTER_THE_TRAFFIC: &[(&str, Want)] = &[
    (
        r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="accepted"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="duplicate"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="invalid"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="Group.CallbackAfterReadReceipt",outcome="unknown_app"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="C2C.CallbackAfterMsgReadReceipt",outcome="accepted"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="C2C.CallbackAfterMsgReport",outcome="accepted"}"#,
        Exactly(1.0),
    ),
    (
        r#"timbridge_callbacks_total{command="other",outcome="forwarded"}"#,
        Exactly(1.0),
    ),
    // Every label value is there from the start, at zero, so that alerts
    // see the first increase.
    (
        r#"timbridge_callbacks_total{command="other",outcome="overloaded"}"#,
        Exactly(0.0),
    ),
    (
        r#"timbridge_callbacks_total{command="C2C.CallbackAfterMsgReport",outcome="too_large"}"#,
        Exactly(0.0),
    ),
    (
        r#"timbridge_kafka_errors_total{reason="timed_out"}"#,
        Exactly(0.0),
    ),
    ("timbridge_callback_duration_seconds_count", Exactly(7.0)),
    (
        r#"timbridge_events_total{kind="group_message"}"#,
        Exactly(2.0),
    ),
    (
        r#"timbridge_events_total{kind="c2c_message"}"#,
        Exactly(2.0),
    ),
    (
        r#"timbridge_events_total{kind="c2c_watermark"}"#,
        Exactly(1.0),
    ),
    (r#"timbridge_events_total{kind="raw"}"#, Exactly(1.0)),
    ("timbridge_duplicate_events_total", Exactly(2.0)),
    (
        r#"timbridge_kafka_delivered_total{topic="tim.group.read_receipts"}"#,
        Exactly(2.0),
    ),
    (
        r#"timbridge_kafka_delivered_total{topic="tim.c2c.read_receipts"}"#,
        Exactly(3.0),
    ),
    (
        r#"timbridge_kafka_delivered_total{topic="tim.callbacks.raw"}"#,
        Exactly(1.0),
    ),
    ("timbridge_kafka_delivery_seconds_count", Exactly(6.0)),
    ("timbridge_kafka_up", Exactly(1.0)),
    ("timbridge_spool_events", Exactly(0.0)),
    ("timbridge_spool_oldest_event_age_seconds", Exactly(0.0)),
    ("timbridge_spool_max_bytes", Exactly(1073741824.0)),
    ("timbridge_spool_bytes", AboveZero),
    // A publisher that keeps up takes the records from memory, not disk.
    (
        r#"timbridge_spool_records_read_total{source="memory"}"#,
        Exactly(6.0),
    ),
    (
        r#"timbridge_spool_records_read_total{source="disk"}"#,
        Exactly(0.0),
    ),
    ("timbridge_dead_letter_total", Exactly(0.0)),
    ("timbridge_callbacks_in_flight", Exactly(0.0)),
    (
        concat!(
            "timbridge_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"}"
        ),
        Exactly(1.0),
    ),
    ("process_resident_memory_bytes", AboveZero),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_follow_the_traffic() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let addr = gw.local_addr();
    let q = |cmd: &str| format!("/callback?{}", signed_query(cmd));
    let group = "Group.CallbackAfterReadReceipt";
    assert_ok(&post(addr, &q(group), GROUP_BODY.as_bytes()).await); // 2 events
    assert_ok(&post(addr, &q(group), GROUP_BODY.as_bytes()).await); // duplicate
    assert_ok(
        &post(
            addr,
            &q("C2C.CallbackAfterMsgReadReceipt"),
            C2C_RECEIPT_BODY.as_bytes(),
        )
        .await,
    ); // 2
    assert_ok(
        &post(
            addr,
            &q("C2C.CallbackAfterMsgReport"),
            C2C_REPORT_BODY.as_bytes(),
        )
        .await,
    ); // 1
    assert_ok(
        &post(
            addr,
            &q("Group.CallbackAfterSendMsg"),
            br#"{"GroupId":"g"}"#,
        )
        .await,
    ); // raw
    assert_fail(&post(addr, &q(group), b"nope").await, 400);
    assert_fail(
        &post(
            addr,
            &format!("/callback?SdkAppid=1&CallbackCommand={group}"),
            b"{}",
        )
        .await,
        403,
    );

    // Wait for Kafka to take all six records, then read the numbers.
    let m = gw.metrics().clone();
    wait_until("6 deliveries", Duration::from_secs(30), || {
        [
            "tim.group.read_receipts",
            "tim.c2c.read_receipts",
            "tim.callbacks.raw",
        ]
        .iter()
        .map(|t| m.kafka_delivered.with_label_values(&[t]).get())
        .sum::<u64>()
            == 6
    })
    .await;
    let spool = gw.spool().clone();
    wait_until("an empty spool", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;
    let (status, text) = get_text(addr, "/metrics").await;
    assert_eq!(status, 200);

    let mut cases = Cases::new();
    for (series, want) in AFTER_THE_TRAFFIC {
        cases.record(series, want.check(sample(&text, series)));
    }
    // No label carries a GroupId or an account: one series per user would
    // ruin Prometheus.
    for forbidden in ["@TGS#", "c2c:amy", "user0", "\"amy\"", "\"zed\""] {
        cases.check(
            format!("no label holds {forbidden}"),
            !text.contains(forbidden),
            || "it leaked into a label".to_owned(),
        );
    }
    cases.record("promtool check metrics", promtool_check(&text));
    cases.finish_showing("/metrics", &text);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_gauges_show_an_outage_and_its_end() {
    let s = setup();
    common::broker_down(&s.cluster, 1);
    let gw = Gateway::start(config(&s.bootstrap, s.dir.path(), "fsync = \"always\""))
        .await
        .unwrap();
    let addr = gw.local_addr();
    post_groups(addr, "g-m", 0..5).await;
    let (_, text) = get_text(addr, "/metrics").await;
    assert_eq!(must(&text, "timbridge_spool_events"), 5.0);
    assert_eq!(must(&text, "timbridge_kafka_up"), 0.0);
    let syncs = must(&text, "timbridge_spool_syncs_total");
    assert!(syncs >= 1.0, "fsync = always syncs");
    // Each of those syncs is timed, in buckets Prometheus can read, and so
    // is the directory's fsync that made the new segment's name durable.
    let hist = |part: &str| {
        must(
            &text,
            &format!("timbridge_spool_sync_duration_seconds{part}"),
        )
    };
    assert_eq!(hist(r#"_count{kind="segment"}"#), syncs);
    assert_eq!(hist(r#"_bucket{kind="segment",le="+Inf"}"#), syncs);
    assert!(hist(r#"_sum{kind="segment"}"#) > 0.0);
    assert!(hist(r#"_count{kind="directory"}"#) >= 1.0);
    promtool_check(&text).unwrap();
    assert!(must(&text, "timbridge_spool_segments") >= 1.0);
    // Kafka away is not a slow disk: nothing waits for the disk.
    assert_eq!(must(&text, "timbridge_spool_queued_bytes"), 0.0);
    let metrics = gw.metrics().clone();
    wait_until("the oldest event ages", Duration::from_secs(10), || {
        sample(
            &String::from_utf8_lossy(&metrics.render()),
            "timbridge_spool_oldest_event_age_seconds",
        )
        .is_some_and(|v| v >= 0.5)
    })
    .await;
    s.cluster.broker_up(1).unwrap();
    let spool = gw.spool().clone();
    wait_until("drained", Duration::from_secs(30), || {
        spool.stats().pending_events == 0
    })
    .await;
    let (_, text) = get_text(addr, "/metrics").await;
    assert_eq!(must(&text, "timbridge_spool_events"), 0.0);
    assert_eq!(must(&text, "timbridge_spool_oldest_event_age_seconds"), 0.0);
    // Delivery latency includes the outage.
    assert!(must(&text, "timbridge_kafka_delivery_seconds_sum") >= 2.5);
    gw.shutdown().await.unwrap();
}

/// `promtool check metrics` prints nothing for clean output. Passes (with a
/// note) where promtool is not installed; CI installs it.
fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let child = common::fork::spawn(
        std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let Ok(mut child) = child else {
        eprintln!("SKIPPED promtool check: promtool is not installed (apt-get install prometheus)");
        return Ok(());
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool: {said}"))
    }
}
