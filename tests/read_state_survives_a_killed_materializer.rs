//! The read state of every message, folded by `timbridge materialize` from
//! callbacks that went through two gateways (duplicates across replicas,
//! counts out of order), equals an independent fold of the same callbacks:
//! with one materializer, and after a second joined and the first was
//! SIGKILLed mid-way. Checked on the latest value per key of the state
//! topic, read by an independent consumer.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::process::{GatewayProcess, QUICK_REBALANCE, start_materializer};
use common::rng::Rng;
use common::*;
use serde_json::{Value, json};

const STATE_TOPIC: &str = "tim.read_state";

/// One callback: its command and body.
struct Call {
    command: &'static str,
    body: Value,
}

fn calls(rng: &mut Rng) -> Vec<Call> {
    let mut out = Vec::new();
    for g in 0..6 {
        for seq in 1..=4u64 {
            // Counts grow as reads accumulate; each callback names a few readers.
            for k in 1..=4u64 {
                let members: Vec<Value> = (0..1 + rng.below(3))
                    .map(|_| json!({"Member_Account": format!("u{}", rng.below(8))}))
                    .collect();
                out.push(Call {
                    command: "Group.CallbackAfterReadReceipt",
                    body: json!({"GroupId": format!("@TGS#rs{g}"), "Type": "Public",
                        "EventTime": 1_700_000_000_000u64 + 1000 * k + seq,
                        "GroupMsgReceiptList": [{"MsgSeq": seq, "ReadNum": k, "UnreadNum": 10 - k,
                            "ReadReceiptMembers": members}]}),
                });
            }
        }
    }
    for m in 1..=4 {
        out.push(Call {
            command: "C2C.CallbackAfterMsgReadReceipt",
            body: json!({"Operator_Account": "alice", "Peer_Account": "bob", "EventTime": 1_700_000_100_000u64 + m,
                "C2CMsgInfo": [{"From_Account": "bob", "To_Account": "alice", "MsgKey": format!("key-{m}"), "MsgId": format!("id-{m}")}]}),
        });
    }
    for (reader, peer) in [("bob", "alice"), ("carol", "dave")] {
        for t in [
            1_700_000_000u64,
            1_700_000_300,
            1_700_000_200,
            1_700_000_100,
        ] {
            out.push(Call {
                command: "C2C.CallbackAfterMsgReport",
                body: json!({"Report_Account": reader, "Peer_Account": peer, "LastReadTime": t, "EventTime": t * 1000 + 5}),
            });
        }
    }
    rng.shuffle(&mut out);
    out
}

/// The expected state per key, computed here from the callbacks alone.
fn expected_fold(calls: &[&Call]) -> BTreeMap<String, Value> {
    #[derive(Default)]
    struct S {
        kind: &'static str,
        conv: String,
        read: Option<u64>,
        unread: Option<u64>,
        readers: BTreeSet<String>,
        up_to: Option<u64>,
        first: u64,
        last: u64,
        seq: Option<u64>,
        key: Option<String>,
        reader: Option<String>,
    }
    let mut m: HashMap<String, S> = HashMap::new();
    fn touch<'a>(
        m: &'a mut HashMap<String, S>,
        k: String,
        kind: &'static str,
        conv: String,
        t: u64,
    ) -> &'a mut S {
        let s = m.entry(k).or_insert_with(|| S {
            kind,
            conv,
            first: u64::MAX,
            ..S::default()
        });
        s.first = s.first.min(t);
        s.last = s.last.max(t);
        s
    }
    for c in calls {
        let b = &c.body;
        let t = b["EventTime"].as_u64().unwrap();
        match c.command {
            "Group.CallbackAfterReadReceipt" => {
                let g = b["GroupId"].as_str().unwrap().to_owned();
                for it in b["GroupMsgReceiptList"].as_array().unwrap() {
                    let seq = it["MsgSeq"].as_u64().unwrap();
                    let s = touch(
                        &mut m,
                        format!("{APP}/{g}/{seq}"),
                        "group_message",
                        g.clone(),
                        t,
                    );
                    s.seq = Some(seq);
                    s.read = s.read.max(it["ReadNum"].as_u64());
                    let u = it["UnreadNum"].as_u64().unwrap();
                    s.unread = Some(s.unread.map_or(u, |x| x.min(u)));
                    for r in it["ReadReceiptMembers"].as_array().unwrap() {
                        s.readers
                            .insert(r["Member_Account"].as_str().unwrap().into());
                    }
                }
            }
            "C2C.CallbackAfterMsgReadReceipt" => {
                let op = b["Operator_Account"].as_str().unwrap();
                let conv =
                    timbridge::event::c2c_conversation_id(op, b["Peer_Account"].as_str().unwrap());
                for it in b["C2CMsgInfo"].as_array().unwrap() {
                    let key = it["MsgKey"].as_str().unwrap();
                    let s = touch(
                        &mut m,
                        format!("{APP}/{conv}/{key}"),
                        "c2c_message",
                        conv.clone(),
                        t,
                    );
                    s.key = Some(key.into());
                    s.readers.insert(op.into());
                }
            }
            _ => {
                let reader = b["Report_Account"].as_str().unwrap();
                let conv = timbridge::event::c2c_conversation_id(
                    reader,
                    b["Peer_Account"].as_str().unwrap(),
                );
                let s = touch(
                    &mut m,
                    format!("{APP}/{conv}/watermark/{reader}"),
                    "c2c_watermark",
                    conv.clone(),
                    t,
                );
                s.reader = Some(reader.into());
                s.readers.insert(reader.into());
                s.up_to = s
                    .up_to
                    .max(Some(b["LastReadTime"].as_u64().unwrap() * 1000));
            }
        }
    }
    m.into_iter()
        .map(|(k, s)| {
            let v = json!({
                "schema": "read_state.v1", "kind": s.kind, "sdk_app_id": APP,
                "conversation_id": s.conv,
                "group_id": if s.kind == "group_message" { json!(s.conv) } else { Value::Null },
                "msg_seq": s.seq, "msg_key": s.key, "reader": s.reader,
                "read_count": s.read, "unread_count": s.unread,
                "readers": s.readers, "readers_truncated": false, "read_up_to_ms": s.up_to,
                "first_event_time_ms": s.first, "last_event_time_ms": s.last,
            });
            (k, v)
        })
        .collect()
}

/// The latest value per key in the state topic, `updated_at_ms` set aside.
fn latest_states(bootstrap: &str) -> BTreeMap<String, Value> {
    let validator = state_schema();
    let mut latest = BTreeMap::new();
    for r in read_topic(bootstrap, STATE_TOPIC, usize::MAX, Duration::from_secs(2)) {
        assert_eq!(
            r.headers.get("timbridge-schema").map(String::as_str),
            Some("read_state.v1")
        );
        let mut v = r.value.clone();
        assert_valid(&validator, &v);
        v.as_object_mut().unwrap().remove("updated_at_ms");
        let key = String::from_utf8(r.key).unwrap();
        // State for input partition p is on state partition p.
        latest.insert(key, v);
    }
    latest
}

fn state_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/read_state.v1.json"
    ))
    .unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

/// Waits until the state topic holds `want`; panics with the differences.
fn wait_for_states(
    bootstrap: &str,
    want: &BTreeMap<String, Value>,
    within: Duration,
    logs: &[&GatewayProcess],
) {
    let deadline = Instant::now() + within;
    loop {
        let got = latest_states(bootstrap);
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: got {:?}\n   want {v}",
                    got.get(k).map(Value::to_string)
                )
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| p.log_text()).collect();
            panic!(
                "{} of {} keys differ from the expected fold:\n{}\n\nmaterializer logs:\n{}",
                wrong.len(),
                want.len(),
                wrong[..wrong.len().min(5)].join("\n"),
                logs.join("\n-----\n")
            );
        }
    }
}

async fn send(gateways: &[std::net::SocketAddr], calls: &[&Call], rng: &mut Rng) {
    for c in calls {
        // Some callbacks reach both replicas, as after a retry through a load balancer.
        let both = rng.below(10) < 3;
        let first = rng.below(2) as usize;
        let targets: Vec<_> = if both {
            gateways.to_vec()
        } else {
            vec![gateways[first]]
        };
        for addr in targets {
            let path = format!("/callback?{}", signed_query(c.command));
            assert_ok(&post(addr, &path, c.body.to_string().as_bytes()).await);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_state_equals_the_fold_after_one_of_two_materializers_is_killed() {
    let cluster = cluster();
    cluster.create_topic(STATE_TOPIC, PARTITIONS, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut gateways = Vec::new();
    for d in &dirs {
        let cfg =
            timbridge::config::Config::parse(&config_text(&bootstrap, d.path(), &[])).unwrap();
        gateways.push(timbridge::Gateway::start(cfg).await.unwrap());
    }
    let addrs: Vec<_> = gateways.iter().map(|g| g.local_addr()).collect();

    let mut rng = Rng(4001);
    let all = calls(&mut rng);
    let all: Vec<&Call> = all.iter().collect();
    let half = all.len() / 2;
    let three_quarters = all.len() * 3 / 4;

    let mat_config = format!(
        "{}\n[read_state]\ntopic = \"{STATE_TOPIC}\"\ngroup_id = \"read-state-test\"\nlisten = \"127.0.0.1:0\"\n\n{QUICK_REBALANCE}",
        config_text(&bootstrap, dirs[0].path(), &[])
    );

    // One materializer folds the first half.
    send(&addrs, &all[..half], &mut rng).await;
    let mut m1 = start_materializer(dirs[0].path(), "m1", &mat_config);
    wait_for_states(
        &bootstrap,
        &expected_fold(&all[..half]),
        Duration::from_secs(60),
        &[&m1],
    );
    let (status, _) = get_text(m1.addr, "/readyz").await;
    assert_eq!(status, 200);

    // A second joins; once the group has shared the partitions, more input
    // arrives and the first is killed while folding it.
    let mut m2 = start_materializer(dirs[1].path(), "m2", &mat_config);
    m2.wait_for_log("state rebuilt; folding", Duration::from_secs(40));
    m1.wait_for_log("partitions revoked", Duration::from_secs(5));
    send(&addrs, &all[half..three_quarters], &mut rng).await;
    m1.child.kill().unwrap();
    m1.child.wait().unwrap();
    send(&addrs, &all[three_quarters..], &mut rng).await;

    // The survivor takes over the dead one's partitions and the state
    // converges on a single fold of everything.
    wait_for_states(
        &bootstrap,
        &expected_fold(&all),
        Duration::from_secs(60),
        &[&m2],
    );
    let (_, metrics) = get_text(m2.addr, "/metrics").await;
    assert!(
        metrics.contains("timbridge_read_state_events_folded_total{kind=\"group_message\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("timbridge_read_state_consumer_lag{"),
        "{metrics}"
    );

    // SIGTERM: it commits and leaves the group cleanly.
    m2.signal("TERM");
    assert!(
        m2.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        m2.log_text()
    );
    for g in gateways {
        g.shutdown().await.unwrap();
    }
}
