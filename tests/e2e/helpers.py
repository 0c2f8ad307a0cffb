"""Shared helpers for the end-to-end suite.

Everything here talks to the real processes from the outside: HTTP to the
gateway (raw `http.client`, or the gateway's own `timbridge send`), Kafka
protocol to the mock broker through independent clients (`kcat`, which links
Debian's librdkafka, and `aiokafka`, a pure-Python implementation). Nothing
here knows how the gateway is built.

Waiting is always "poll a condition until a deadline", never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
# E2E_EVENT_SCHEMA: check against another copy of the schema (default: the repo's).
SCHEMA_PATH = Path(os.environ.get("E2E_EVENT_SCHEMA") or REPO_ROOT / "schema" / "read_receipt.v1.json")

# What conftest.py writes into the gateway's config.toml.
SIGNED_APP = 1400000001
SIGNED_APP_TOKEN = "e2e-token"
UNSIGNED_APP = 1400000002
UNKNOWN_APP = 1400009999
CALLBACK_PATH = "/callback"
MAX_BODY_BYTES = 4096
GROUP_TOPIC = "tim.group.read_receipts"
C2C_TOPIC = "tim.c2c.read_receipts"
RAW_TOPIC = "tim.callbacks.raw"
ALL_TOPICS = (GROUP_TOPIC, C2C_TOPIC, RAW_TOPIC)
TOPIC_PARTITIONS = 3

OK_ANSWER = {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}
SCHEMA_NAME = "read_receipt.v1"
REQUIRED_HEADERS = (
    "timbridge-event-id",
    "timbridge-schema",
    "tim-callback-command",
    "tim-sdkappid",
    "content-type",
)
EVENT_ID_RE = re.compile(r"^[0-9a-f]{32}$")

GROUP_RECEIPT = "Group.CallbackAfterReadReceipt"
C2C_RECEIPT = "C2C.CallbackAfterMsgReadReceipt"
C2C_REPORT = "C2C.CallbackAfterMsgReport"


def now_ms() -> int:
    return int(time.time() * 1000)


def wait_until(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Polls `condition` until it returns something truthy; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# Signing and posting
# --------------------------------------------------------------------------


def sign(token: str, request_time: int | str) -> str:
    """Tencent's Sign: lower-case hex sha256 of token + RequestTime (not HMAC)."""
    return hashlib.sha256(f"{token}{request_time}".encode()).hexdigest()


def callback_query(
    sdk_app_id: int | None,
    command: str | None,
    token: str | None = None,
    request_time: int | None = None,
    sign_value: str | None = None,
    client_ip: str | None = None,
    platform: str | None = None,
) -> dict[str, str]:
    """The query string Tencent appends to the callback URL."""
    query: dict[str, str] = {}
    if sdk_app_id is not None:
        query["SdkAppid"] = str(sdk_app_id)
    if command is not None:
        query["CallbackCommand"] = command
    query["contenttype"] = "json"
    if client_ip is not None:
        query["ClientIP"] = client_ip
    if platform is not None:
        query["OptPlatform"] = platform
    if token is not None or sign_value is not None or request_time is not None:
        rt = int(time.time()) if request_time is None else request_time
        query["RequestTime"] = str(rt)
        query["Sign"] = sign_value if sign_value is not None else sign(token or "", rt)
    return query


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str | None

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(
                f"answer (HTTP {self.status}) is not JSON: {self.body[:300]!r}"
            ) from e


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    chunked: bool = False,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        try:
            conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError) as e:
            # A server may answer (413) and close before it has read the whole
            # body, as soon as the Content-Length is too big: legitimate. The
            # answer is already on its way; read it.
            send_error = e
        else:
            send_error = None
        try:
            resp = conn.getresponse()
        except (ConnectionResetError, http.client.RemoteDisconnected) as e:
            raise AssertionError(
                f"{method} {path}: the connection was closed without an answer "
                f"(send error: {send_error!r}, read error: {e!r})"
            ) from e
        return Answer(resp.status, resp.read(), resp.getheader("Content-Type"))
    finally:
        conn.close()


def post_callback(
    port: int,
    body: bytes | dict | Iterable[bytes],
    query: dict[str, str],
    chunked: bool = False,
) -> Answer:
    """POSTs one callback body the way Tencent does (raw HTTP, JSON body)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    path = CALLBACK_PATH + "?" + urllib.parse.urlencode(query)
    return http_request(
        port,
        "POST",
        path,
        body=body,
        headers={"Content-Type": "application/json"},
        chunked=chunked,
    )


def post_signed(port: int, body: bytes | dict, command: str | None = None, **query_extra) -> Answer:
    """POSTs a correctly signed callback for SIGNED_APP."""
    if command is None:
        command = (body if isinstance(body, dict) else json.loads(body))["CallbackCommand"]
    query = callback_query(SIGNED_APP, command, token=SIGNED_APP_TOKEN, **query_extra)
    return post_callback(port, body, query)


def assert_ok(answer: Answer) -> None:
    assert answer.status == 200, f"HTTP {answer.status}: {answer.body[:500]!r}"
    assert answer.json == OK_ANSWER


def assert_fail(answer: Answer, status: int, info_contains: str | None = None) -> dict:
    """A rejection: the HTTP status and Tencent's FAIL answer with a non-zero code."""
    assert answer.status == status, (
        f"expected HTTP {status}, got {answer.status}: {answer.body[:500]!r}"
    )
    doc = answer.json
    assert isinstance(doc, dict), doc
    assert set(doc) >= {"ActionStatus", "ErrorCode", "ErrorInfo"}, doc
    assert doc["ActionStatus"] == "FAIL", doc
    assert isinstance(doc["ErrorCode"], int) and doc["ErrorCode"] != 0, doc
    assert isinstance(doc["ErrorInfo"], str), doc
    if info_contains is not None:
        assert info_contains in doc["ErrorInfo"], doc
    return doc


@dataclass
class SendResult:
    status: int
    answer: Any
    output: str


def parse_send_output(output: str) -> tuple[int, Any]:
    """`timbridge send` prints the status (e.g. `200 OK`) then the JSON answer.

    Tolerant: the status is the first 3-digit number, the answer the first
    JSON object in the output.
    """
    # Prefer a line that starts with the status ("200 OK", "HTTP/1.1 200 OK"),
    # so that a URL or port printed earlier cannot pass for it.
    status_match = re.search(r"^\s*(?:HTTP/[\d.]+\s+)?([1-5]\d\d)(?!\d)", output, re.MULTILINE) or re.search(
        r"(?<!\d)([1-5]\d\d)(?!\d)", output
    )
    if status_match is None:
        raise AssertionError(f"no HTTP status in `timbridge send` output: {output!r}")
    start = output.find("{")
    if start < 0:
        raise AssertionError(f"no JSON answer in `timbridge send` output: {output!r}")
    answer, _ = json.JSONDecoder().raw_decode(output[start:])
    return int(status_match.group(1)), answer


def send_with_cli(
    timbridge_bin: Path,
    url: str,
    sdk_app_id: int,
    body_file: Path,
    token: str | None = None,
    command: str | None = None,
    timeout: float = 30.0,
) -> SendResult:
    """Posts `body_file` with the gateway's own `timbridge send`."""
    argv = [str(timbridge_bin), "send", "--url", url, "--sdkappid", str(sdk_app_id)]
    if token is not None:
        argv += ["--token", token]
    if command is not None:
        argv += ["--command", command]
    argv.append(str(body_file))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 or done.stdout, (
        f"`{' '.join(argv)}` exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    )
    status, answer = parse_send_output(done.stdout)
    return SendResult(status, answer, done.stdout + done.stderr)


# --------------------------------------------------------------------------
# Reading Kafka back
# --------------------------------------------------------------------------


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"header {name} appears {len(values)} times: {self.headers}"
        return values[0].decode() if values else None

    @property
    def event(self) -> dict:
        assert self.value is not None, f"record without value: {self}"
        return json.loads(self.value.decode("utf-8"))

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else self.key.decode("utf-8")


def read_kcat_once(bootstrap: str, topic: str) -> list[Record]:
    """Reads the whole topic, from the beginning of each partition, with kcat -J."""
    argv = ["kcat", "-b", bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-J", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}"
        )
    records = []
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        flat = doc.get("headers") or []
        headers = [(flat[i], (flat[i + 1] or "").encode()) for i in range(0, len(flat), 2)]
        records.append(
            Record(
                topic=doc["topic"],
                partition=doc["partition"],
                offset=doc["offset"],
                key=None if doc.get("key") is None else doc["key"].encode(),
                value=None if doc.get("payload") is None else doc["payload"].encode(),
                headers=headers,
            )
        )
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def _read_aiokafka(bootstrap: str, topics: Iterable[str], expected: int, timeout: float) -> list[Record]:
    # Imported here so that a missing aiokafka fails the tests that need it, not collection.
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    topics = list(topics)
    # Quirk: a consumer with no subscription has no metadata, so its
    # partitions_for_topic() returns None and topics() does not fill that
    # cache. The admin client's describe_topics (a Metadata request) does.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    tps = []
    for t in described:
        assert t["error_code"] == 0, f"describe_topics: {t}"
        tps += [TopicPartition(t["topic"], p["partition"]) for p in t["partitions"]]

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        records: list[Record] = []

        async def fetch() -> None:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                records.extend(
                    Record(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers or ()))
                    for m in msgs
                )

        while len(records) < expected and loop.time() < deadline:
            await fetch()
        # Then everything up to the current end of every partition, so that a
        # test also sees records beyond the ones it waited for.
        ends = await consumer.end_offsets(tps)
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            if loop.time() >= deadline + 10:
                raise AssertionError("aiokafka could not catch up with the end offsets")
            await fetch()
        return sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
    finally:
        await consumer.stop()


def read_aiokafka(bootstrap: str, topics: str | Iterable[str], expected: int, timeout: float = 30.0) -> list[Record]:
    """Reads `topics` from the beginning of every partition with aiokafka.

    Collects until at least `expected` records have arrived or `timeout`
    passes, then also drains up to the end offsets; returns all of them.
    """
    if isinstance(topics, str):
        topics = [topics]
    return asyncio.run(_read_aiokafka(bootstrap, topics, expected, timeout))


def count_records(bootstrap: str, topics: Iterable[str]) -> dict[str, int]:
    """How many records each topic holds right now (read up to the end offsets)."""
    topics = list(topics)
    recs = read_aiokafka(bootstrap, topics, expected=0, timeout=5.0)
    counts = {t: 0 for t in topics}
    for r in recs:
        counts[r.topic] += 1
    return counts


def wait_for_kcat(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Record]:
    """Re-reads `topic` with kcat until it holds at least `expected` records."""
    found: list[Record] = []

    def enough():
        nonlocal found
        found = read_kcat_once(bootstrap, topic)
        return len(found) >= expected

    wait_until(enough, timeout, f"{expected} records on {topic} (kcat)", interval=0.3)
    return found


# --------------------------------------------------------------------------
# Callback bodies and the events they must become
# --------------------------------------------------------------------------


def group_receipt_body(group_id: str, first_seq: int = 1, event_time: int | str = "1670574414123",
                       group_type: str = "Public") -> dict:
    return {
        "CallbackCommand": GROUP_RECEIPT,
        "GroupId": group_id,
        "Type": group_type,
        "GroupMsgReceiptList": [
            {
                "MsgSeq": first_seq,
                "ReadNum": 1,
                "UnreadNum": 6,
                "ReadReceiptMembers": [{"Member_Account": "user0"}],
            },
            {
                "MsgSeq": first_seq + 1,
                "ReadNum": 2,
                "UnreadNum": 5,
                "ReadReceiptMembers": [{"Member_Account": "user0"}, {"Member_Account": "user1"}],
            },
        ],
        "EventTime": event_time,
    }


def c2c_receipt_body(operator: str, peer: str, event_time: int = 1670574415000, first_seq: int = 101) -> dict:
    items = []
    for i in range(2):
        seq = first_seq + i
        items.append(
            {
                "From_Account": peer,
                "To_Account": operator,
                "MsgKey": f"{seq}_{1234567 + i}_1670574400",
                "MsgId": f"144115233406643804-1670574400-{1234567 + i}",
            }
        )
    return {
        "CallbackCommand": C2C_RECEIPT,
        "Operator_Account": operator,
        "Peer_Account": peer,
        "C2CMsgInfo": items,
        "EventTime": event_time,
    }


def c2c_report_body(reporter: str, peer: str, last_read_time: int = 1670574416,
                    unread: int | None = 3, event_time: int | None = 1670574416789) -> dict:
    body: dict[str, Any] = {
        "CallbackCommand": C2C_REPORT,
        "Report_Account": reporter,
        "Peer_Account": peer,
        "LastReadTime": last_read_time,
    }
    if unread is not None:
        body["UnreadMsgNum"] = unread
    if event_time is not None:
        body["EventTime"] = event_time
    return body


def c2c_conversation(a: str, b: str) -> str:
    """`c2c:<a>:<b>` with a <= b in byte order (UTF-8 bytes, not Python's str order)."""
    x, y = sorted([a, b], key=lambda s: s.encode("utf-8"))
    return f"c2c:{x}:{y}"


NULL_FIELDS_BY_KIND = {
    "group_message": ("msg_key", "msg_id", "peer", "read_up_to_ms", "unread_total"),
    "c2c_message": ("group_id", "group_type", "msg_seq", "read_count", "unread_count",
                    "read_up_to_ms", "unread_total"),
    "c2c_watermark": ("group_id", "group_type", "msg_seq", "msg_key", "msg_id",
                      "read_count", "unread_count"),
}


def expected_events(body: dict, sdk_app_id: int) -> list[dict]:
    """The contract's section 5 table, applied to one body: the fields every
    resulting event must carry (event_id, received_at_ms, client_ip and
    platform are checked separately)."""
    cmd = body["CallbackCommand"]
    common = {"schema": SCHEMA_NAME, "sdk_app_id": sdk_app_id, "callback_command": cmd}
    out = []
    if cmd == GROUP_RECEIPT:
        for item in body["GroupMsgReceiptList"]:
            out.append({
                **common,
                "kind": "group_message",
                "conversation_type": "group",
                "conversation_id": body["GroupId"],
                "group_id": body["GroupId"],
                "group_type": body["Type"],
                "msg_seq": item["MsgSeq"],
                "msg_key": None,
                "msg_id": None,
                "read_count": item["ReadNum"],
                "unread_count": item["UnreadNum"],
                "readers": [m["Member_Account"] for m in item["ReadReceiptMembers"]],
                "peer": None,
                "read_up_to_ms": None,
                "unread_total": None,
                "event_time_ms": int(body["EventTime"]),
            })
    elif cmd == C2C_RECEIPT:
        for item in body["C2CMsgInfo"]:
            out.append({
                **common,
                "kind": "c2c_message",
                "conversation_type": "c2c",
                "conversation_id": c2c_conversation(body["Operator_Account"], body["Peer_Account"]),
                "group_id": None,
                "group_type": None,
                "msg_seq": None,
                "msg_key": item["MsgKey"],
                "msg_id": item["MsgId"],
                "read_count": None,
                "unread_count": None,
                "readers": [body["Operator_Account"]],
                "peer": body["Peer_Account"],
                "read_up_to_ms": None,
                "unread_total": None,
                "event_time_ms": int(body["EventTime"]),
            })
    elif cmd == C2C_REPORT:
        event_time = body.get("EventTime")
        out.append({
            **common,
            "kind": "c2c_watermark",
            "conversation_type": "c2c",
            "conversation_id": c2c_conversation(body["Report_Account"], body["Peer_Account"]),
            "group_id": None,
            "group_type": None,
            "msg_seq": None,
            "msg_key": None,
            "msg_id": None,
            "read_count": None,
            "unread_count": None,
            "readers": [body["Report_Account"]],
            "peer": body["Peer_Account"],
            "read_up_to_ms": body["LastReadTime"] * 1000,
            "unread_total": body.get("UnreadMsgNum"),
            "event_time_ms": int(event_time) if event_time is not None else body["LastReadTime"] * 1000,
        })
    else:
        raise ValueError(f"not a read-receipt command: {cmd}")
    return out


def topic_for(expected_event: dict) -> str:
    return GROUP_TOPIC if expected_event["conversation_type"] == "group" else C2C_TOPIC


def message_ref(event: dict) -> tuple:
    """What tells the events of one callback apart."""
    return tuple(event.get(name) for name in (
        "callback_command", "conversation_id", "msg_seq", "msg_key", "msg_id", "event_time_ms"))


def describe(records: list[Record]) -> str:
    return "\n".join(
        f"  {r.topic}[{r.partition}]@{r.offset} key={r.key!r} headers={r.headers} value={r.value!r}"
        for r in records
    )


def match_records(records: list[Record], expected: list[dict]) -> list[tuple[Record, dict]]:
    """Pairs every expected event with exactly one record, by message reference;
    fails on missing, repeated and unexpected records."""
    by_ref: dict[tuple, list[Record]] = {}
    unreadable = []
    for r in records:
        try:
            event = r.event
            assert isinstance(event, dict)
        except (ValueError, AssertionError, UnicodeDecodeError):
            unreadable.append(r)
            continue
        by_ref.setdefault(message_ref(event), []).append(r)
    assert not unreadable, "records whose value is not a JSON object:\n" + describe(unreadable)
    wanted = {message_ref(e) for e in expected}
    unexpected = [r for ref, rs in by_ref.items() if ref not in wanted for r in rs]
    assert not unexpected, "unexpected records:\n" + describe(unexpected)
    pairs = []
    for exp in expected:
        ref = message_ref(exp)
        found = by_ref.get(ref, [])
        assert len(found) == 1, (
            f"expected exactly one record for {ref}, found {len(found)}; all records:\n" + describe(records)
        )
        pairs.append((found[0], exp))
    return pairs


def load_validator():
    import jsonschema

    assert SCHEMA_PATH.is_file(), (
        f"the event's JSON Schema is missing: {SCHEMA_PATH} (contract.md section 5 says it is published there)"
    )
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_record(
    record: Record,
    expected: dict,
    validator,
    received_window: tuple[int, int] | None = None,
    client_ip: str | None | type(...) = ...,
    platform: str | None | type(...) = ...,
) -> dict:
    """Checks one Kafka record against the contract: key, headers, schema, fields.

    `client_ip`/`platform`: the exact value expected, or `...` to only require
    a string or null (when the sender's query string is not under our control).
    """
    event = record.event
    errors = sorted(validator.iter_errors(event), key=lambda e: list(e.path))
    assert not errors, "event does not validate against the schema: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors
    ) + f"\nevent: {event}"

    assert record.topic == topic_for(expected), (record.topic, expected)
    assert record.key == expected["conversation_id"].encode("utf-8"), (
        f"key {record.key!r}, expected {expected['conversation_id']!r}"
    )

    for name in REQUIRED_HEADERS:
        assert record.header(name) is not None, f"header {name} missing: {record.headers}"
    assert record.header("timbridge-schema") == SCHEMA_NAME
    assert record.header("content-type") == "application/json"
    assert record.header("tim-callback-command") == expected["callback_command"]
    assert record.header("tim-sdkappid") == str(expected["sdk_app_id"])
    assert record.header("timbridge-event-id") == event["event_id"], (record.headers, event["event_id"])
    assert EVENT_ID_RE.match(event["event_id"]), f"event_id {event['event_id']!r} is not 32 lower-case hex"

    for name, want in expected.items():
        assert name in event, f"field {name} missing from {event}"
        assert event[name] == want, f"field {name}: got {event[name]!r}, expected {want!r}\nevent: {event}"
        # JSON true/1 and 1.0/1 compare equal in Python: insist on the JSON type too.
        assert type(event[name]) is type(want), f"field {name}: {event[name]!r} is not a {type(want).__name__}"

    assert isinstance(event.get("received_at_ms"), int), event
    if received_window is not None:
        lo, hi = received_window
        assert lo - 1000 <= event["received_at_ms"] <= hi + 1000, (
            f"received_at_ms {event['received_at_ms']} outside the posting window [{lo}, {hi}]"
        )
    for name, want in (("client_ip", client_ip), ("platform", platform)):
        assert name in event, f"field {name} missing from {event}"
        if want is ...:
            assert event[name] is None or isinstance(event[name], str), event
        else:
            assert event[name] == want, f"field {name}: got {event[name]!r}, expected {want!r}"
    return event
