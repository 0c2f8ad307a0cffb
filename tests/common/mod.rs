//! What the integration tests share: a gateway on an ephemeral port in front
//! of librdkafka's mock cluster (a real Kafka-protocol broker on 127.0.0.1),
//! an HTTP client, and an independent rdkafka consumer to read records back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use timbridge::config::Config;

pub const APP: u64 = 1400000000;
pub const OPEN_APP: u64 = 1400000099;
pub const TOKEN: &str = "test-token";
pub const GROUP_TOPIC: &str = "tim.group.read_receipts";
pub const C2C_TOPIC: &str = "tim.c2c.read_receipts";
pub const RAW_TOPIC: &str = "tim.callbacks.raw";
pub const PARTITIONS: i32 = 3;

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// A one-broker mock cluster with the gateway's topics.
pub fn cluster() -> Cluster {
    cluster_of(1, PARTITIONS)
}

/// A mock cluster of `brokers` brokers (so leaders can move), the topics
/// with `partitions` partitions each (the mock keeps only ~5 MB per
/// partition: more partitions keep more records readable).
pub fn cluster_of(brokers: i32, partitions: i32) -> Cluster {
    let c = MockCluster::new(brokers).expect("mock cluster");
    for t in [GROUP_TOPIC, C2C_TOPIC, RAW_TOPIC] {
        c.create_topic(t, partitions, brokers.min(3))
            .expect("topic");
    }
    c
}

/// A config for tests: one app with a token, one without, raw forwarding
/// on, the spool in `dir`, port 0.
pub fn config(brokers: &str, dir: &Path, spool_extra: &str) -> Config {
    Config::parse(&config_text(brokers, dir, &[("spool", spool_extra)])).expect("test config")
}

/// The same as TOML text, with `extra` lines added to the named tables
/// (`server`, `kafka`, `kafka.properties`, `spool`).
pub fn config_text(brokers: &str, dir: &Path, extra: &[(&str, &str)]) -> String {
    let more = |table: &str| {
        extra
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, lines)| *lines)
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
{}

[[apps]]
sdk_app_id = {APP}
token = "{TOKEN}"

[[apps]]
sdk_app_id = {OPEN_APP}

[kafka]
brokers = "{brokers}"
raw_topic = "{RAW_TOPIC}"
{}

[kafka.properties]
"linger.ms" = 1
{}

[spool]
dir = "{}"
{}
"#,
        more("server"),
        more("kafka"),
        more("kafka.properties"),
        dir.join("spool").display(),
        more("spool"),
    )
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The query Tencent would send for `command`, signed with the test token.
pub fn signed_query(command: &str) -> String {
    timbridge::send::tencent_query(APP, command, Some(TOKEN), now_s())
        + "&ClientIP=127.0.0.1&OptPlatform=iOS"
}

pub struct Answer {
    pub status: u16,
    pub json: serde_json::Value,
    pub headers: hyper::HeaderMap,
}

/// POSTs `body` to `path_and_query` on a fresh connection.
pub async fn post(addr: std::net::SocketAddr, path_and_query: &str, body: &[u8]) -> Answer {
    request(addr, "POST", path_and_query, body.to_vec(), &[]).await
}

pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path_and_query: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Answer {
    try_request(addr, method, path_and_query, body, headers)
        .await
        .expect("the gateway answers")
}

/// POSTs like [`post`], but a gateway that is gone (killed) gives None.
pub async fn try_post(
    addr: std::net::SocketAddr,
    path_and_query: &str,
    body: &[u8],
) -> Option<Answer> {
    try_request(addr, "POST", path_and_query, body.to_vec(), &[]).await
}

pub async fn try_request(
    addr: std::net::SocketAddr,
    method: &str,
    path_and_query: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    send_on(
        &mut sender,
        addr,
        method,
        path_and_query,
        body.into(),
        headers,
    )
    .await
}

/// One request on an open HTTP/1 connection; `None` when it fails.
pub async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: std::net::SocketAddr,
    method: &str,
    path_and_query: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    Some(Answer {
        status,
        json,
        headers,
    })
}

pub async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let a = request(addr, "GET", path, vec![], &[]).await;
    let text = match a.json {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    (a.status, text)
}

/// Asserts Tencent's OK answer.
pub fn assert_ok(a: &Answer) {
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(
        a.json,
        serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""})
    );
}

/// Asserts a FAIL answer with `status`, and returns its ErrorInfo.
pub fn assert_fail(a: &Answer, status: u16) -> String {
    fail_info(a, status).unwrap_or_else(|why| panic!("{why}"))
}

/// A FAIL answer with `status` gives its ErrorInfo; any other answer says
/// how it differs (for table-driven tests, which report every case).
pub fn fail_info(a: &Answer, status: u16) -> Result<String, String> {
    let json = &a.json;
    if a.status != status {
        return Err(format!("status {}, want {status}: {json}", a.status));
    }
    if json["ActionStatus"] != "FAIL" {
        return Err(format!("ActionStatus is not FAIL: {json}"));
    }
    match json["ErrorCode"].as_u64() {
        Some(code) if code != 0 => {}
        _ => return Err(format!("ErrorCode is not a non-zero integer: {json}")),
    }
    json["ErrorInfo"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no ErrorInfo string: {json}"))
}

#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: serde_json::Value,
    pub raw_value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning with an independent consumer until
/// `want` records have arrived or `within` has passed.
pub fn read_topic(bootstrap: &str, topic: &str, want: usize, within: Duration) -> Vec<Received> {
    read_partitions(bootstrap, topic, PARTITIONS, want, within)
}

/// [`read_topic`] for a topic of `partitions` partitions.
pub fn read_partitions(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    within: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "timbridge-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let hd = h.get(i);
                        headers.insert(
                            hd.key.to_owned(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                let raw_value = m.payload().unwrap_or_default().to_vec();
                out.push(Received {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: serde_json::from_slice(&raw_value).unwrap_or(serde_json::Value::Null),
                    raw_value,
                    headers,
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Whatever is on `topic` now: waits briefly for stragglers, so use it to
/// show that nothing more arrived after a known record.
pub fn read_all(bootstrap: &str, topic: &str) -> Vec<Received> {
    read_topic(bootstrap, topic, usize::MAX, Duration::from_secs(2))
}

/// The shipped JSON Schema of `read_receipt.v1`.
pub fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/read_receipt.v1.json"
    ))
    .expect("schema file");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

pub fn assert_valid(v: &jsonschema::Validator, value: &serde_json::Value) {
    let errors: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{value} fails the schema: {errors:?}");
}

/// Fetches /metrics from `addr` and asserts that it has every one of
/// `lines` (whole samples, e.g. `name{label="v"} 1`), naming each one that
/// is missing. Returns the text.
pub async fn assert_metrics_show(addr: std::net::SocketAddr, lines: &[&str]) -> String {
    let (status, text) = get_text(addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let mut cases = Cases::new();
    for line in lines {
        cases.check(line, text.lines().any(|l| l == *line), || {
            "missing".to_owned()
        });
    }
    cases.finish_showing("/metrics", &text);
    text
}

/// Posts a signed group receipt for `group` again and again until it is
/// accepted, at most `within`; panics with the last refusal and `what`.
/// For a gateway that refuses for a while and must come back by itself.
pub async fn post_until_accepted(
    addr: std::net::SocketAddr,
    group: &str,
    what: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let a = post(addr, &group_callback(), group_body(group, 1).as_bytes()).await;
        if a.status == 200 {
            assert_ok(&a);
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {} {}", a.status, a.json);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls GET `path` until it answers `status`, at most `within`; panics
/// with the last answer and `what`.
pub async fn wait_for_status(
    addr: std::net::SocketAddr,
    path: &str,
    status: u16,
    what: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = get_text(addr, path).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {path} stayed {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `listener` ("callback" or "admin") has `n` connections open.
pub async fn wait_open_connections(gw: &timbridge::Gateway, listener: &str, n: i64) {
    let open = gw.metrics().connections_open.with_label_values(&[listener]);
    wait_until(
        &format!("{n} connections open on the {listener} listener"),
        Duration::from_secs(5),
        || open.get() == n,
    )
    .await;
}

/// Waits for a condition, polling; panics with `what` at the deadline.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const GROUP_BODY: &str = r#"{
    "CallbackCommand": "Group.CallbackAfterReadReceipt",
    "GroupId": "@TGS#2TTV7VSII",
    "Type": "Public",
    "GroupMsgReceiptList": [
        {"MsgSeq": 1, "ReadNum": 1, "UnreadNum": 6, "ReadReceiptMembers": [{"Member_Account": "user0"}]},
        {"MsgSeq": 2, "ReadNum": 2, "UnreadNum": 5, "ReadReceiptMembers": [{"Member_Account": "user0"}, {"Member_Account": "user1"}]}
    ],
    "EventTime": "1670574414123"
}"#;

pub const C2C_RECEIPT_BODY: &str = r#"{
    "CallbackCommand": "C2C.CallbackAfterMsgReadReceipt",
    "Operator_Account": "zed",
    "Peer_Account": "amy",
    "C2CMsgInfo": [
        {"From_Account": "amy", "To_Account": "zed", "MsgKey": "1_2_3", "MsgId": "m-1"},
        {"From_Account": "amy", "To_Account": "zed", "MsgKey": "4_5_6", "MsgId": "m-2"}
    ],
    "EventTime": 1670574414123
}"#;

pub const C2C_REPORT_BODY: &str = r#"{
    "CallbackCommand": "C2C.CallbackAfterMsgReport",
    "Report_Account": "amy",
    "Peer_Account": "zed",
    "LastReadTime": 1670574414,
    "UnreadMsgNum": 3,
    "EventTime": 1670574414999
}"#;

/// A group receipt whose event (about 9 kB) is far larger than a
/// `message.max.bytes` of 4096.
pub fn huge_receipt(group: &str) -> String {
    let members: Vec<String> = (0..200)
        .map(|i| format!(r#"{{"Member_Account":"member-with-a-long-account-name-{i:04}"}}"#))
        .collect();
    format!(
        r#"{{"GroupId":"{group}","Type":"Public","GroupMsgReceiptList":[{{"MsgSeq":1,"ReadNum":200,"UnreadNum":0,"ReadReceiptMembers":[{}]}}],"EventTime":1670574414123}}"#,
        members.join(",")
    )
}

/// A group receipt for a distinct group, so tests can post many that the
/// dedup window does not fold together.
pub fn group_body(group: &str, seq: u64) -> String {
    format!(
        r#"{{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"{group}","Type":"Public","GroupMsgReceiptList":[{{"MsgSeq":{seq},"ReadNum":1,"UnreadNum":1,"ReadReceiptMembers":[{{"Member_Account":"u"}}]}}],"EventTime":1670574414123}}"#
    )
}
pub mod cases;
pub mod faults;
pub mod fork;
pub mod process;
pub mod reload;
pub mod rng;
pub mod tmpfs;
pub mod upstream;

pub use fork::broker_down;

// Not every test binary checks a table of cases.
#[allow(unused_imports)]
pub use cases::Cases;

/// A mock cluster and a temp dir for one test's gateway and spool.
pub struct Setup {
    pub cluster: Cluster,
    pub bootstrap: String,
    pub dir: tempfile::TempDir,
}

pub fn setup() -> Setup {
    setup_with(cluster())
}

/// [`setup`] around a cluster of the caller's making.
pub fn setup_with(cluster: Cluster) -> Setup {
    let bootstrap = cluster.bootstrap_servers();
    Setup {
        cluster,
        bootstrap,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    /// The test config as text, with `extra` lines in the named tables.
    pub fn config_text(&self, extra: &[(&str, &str)]) -> String {
        config_text(&self.bootstrap, self.dir.path(), extra)
    }

    /// An in-process gateway on the test config plus `extra`.
    pub async fn gateway(&self, extra: &[(&str, &str)]) -> timbridge::Gateway {
        let config = Config::parse(&self.config_text(extra)).expect("test config");
        timbridge::Gateway::start(config)
            .await
            .expect("gateway starts")
    }
}

/// The path and query of a signed group read receipt.
pub fn group_callback() -> String {
    format!(
        "/callback?{}",
        signed_query("Group.CallbackAfterReadReceipt")
    )
}

/// Posts group receipts for groups `{prefix}-{i}`, each expected to be
/// accepted; returns the group ids (the record keys to look for).
pub async fn post_groups(
    addr: std::net::SocketAddr,
    prefix: &str,
    range: std::ops::Range<u64>,
) -> Vec<String> {
    let mut groups = Vec::new();
    for i in range {
        let group = format!("{prefix}-{i}");
        assert_ok(&post(addr, &group_callback(), group_body(&group, i).as_bytes()).await);
        groups.push(group);
    }
    groups
}

/// Posts group receipts until one is refused (at most `limit`); returns
/// the accepted groups and the refusal.
pub async fn post_groups_until_refused(
    addr: std::net::SocketAddr,
    prefix: &str,
    limit: u64,
) -> (Vec<String>, Answer) {
    let mut accepted = Vec::new();
    for i in 0..limit {
        let group = format!("{prefix}-{i}");
        let a = post(addr, &group_callback(), group_body(&group, i).as_bytes()).await;
        if a.status != 200 {
            return (accepted, a);
        }
        assert_ok(&a);
        accepted.push(group);
    }
    panic!("none of {limit} callbacks was refused");
}

/// Reads the group topic until every one of `groups` has a record (or a
/// minute passes) and asserts none is missing. Duplicates (delivery is at
/// least once) can make up the count before every group is in, so a short
/// read is followed by a longer one rather than taken as a loss.
pub fn assert_groups_arrive(bootstrap: &str, groups: &[String]) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut want = groups.len();
    loop {
        let recs = read_topic(
            bootstrap,
            GROUP_TOPIC,
            want,
            deadline.saturating_duration_since(Instant::now()),
        );
        let keys: std::collections::HashSet<&[u8]> =
            recs.iter().map(|r| r.key.as_slice()).collect();
        let missing: Vec<&String> = groups
            .iter()
            .filter(|g| !keys.contains(g.as_bytes()))
            .collect();
        match missing.first() {
            None => return recs,
            Some(g) if recs.len() < want || Instant::now() >= deadline => panic!("{g} lost"),
            Some(_) => want = recs.len() + missing.len(),
        }
    }
}
