"""While the broker is down, callbacks are still answered 200 (the spool holds
them) and the gateway stays ready; when it is back, every accepted event
reaches Kafka: nothing lost, duplicates only with the same event_id."""

import json
import re
from collections import defaultdict

import helpers
from helpers import C2C_TOPIC, GROUP_TOPIC, SIGNED_APP


def says_kafka_unreachable(body: bytes) -> bool:
    """/readyz's body "says whether Kafka is reachable" (contract section 3);
    its shape is not fixed, so accept a JSON field about kafka that is false,
    or words to that effect."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        flags = [v for k, v in doc.items() if "kafka" in k.lower() and isinstance(v, bool)]
        if flags:
            return flags == [False]
    return bool(re.search(rb"(?i)kafka\W+(\w+\W+)?(unreachable|not reachable|down|false)", body))


def test_kafka_outage_is_absorbed(gateway, mock_broker):
    first = helpers.c2c_report_body(reporter="outage_a", peer="outage_b", last_read_time=1670575000)
    helpers.assert_ok(helpers.post_signed(gateway.port, first))
    # Connected and publishing before the outage.
    assert helpers.read_aiokafka(mock_broker.bootstrap, C2C_TOPIC, expected=1), "no record before the outage"

    mock_broker.down(1)

    # Post only once the gateway has noticed, so the events are held while Kafka is away.
    def unreachable_reported():
        ready = helpers.http_request(gateway.port, "GET", "/readyz")
        assert ready.status == 200, f"Kafka being away must not make the gateway unready: {ready}"
        return says_kafka_unreachable(ready.body)

    helpers.wait_until(unreachable_reported, 30, "/readyz to report Kafka unreachable")
    during = [
        helpers.group_receipt_body("@TGS#2OUTAGE", first_seq=1),
        helpers.c2c_receipt_body(operator="outage_b", peer="outage_a", first_seq=11),
        helpers.c2c_report_body(reporter="outage_a", peer="outage_b", last_read_time=1670575100, event_time=None),
    ]
    for body in during:
        helpers.assert_ok(helpers.post_signed(gateway.port, body))
    ready = helpers.http_request(gateway.port, "GET", "/readyz")
    assert ready.status == 200, f"Kafka being away must not make the gateway unready: {ready}"

    mock_broker.up(1)
    expected = [e for body in [first, *during] for e in helpers.expected_events(body, SIGNED_APP)]
    wanted = {helpers.message_ref(e) for e in expected}

    def all_arrived():
        recs = helpers.read_aiokafka(mock_broker.bootstrap, [GROUP_TOPIC, C2C_TOPIC], len(expected), timeout=2)
        return recs if wanted <= {helpers.message_ref(r.event) for r in recs} else None

    records = helpers.wait_until(all_arrived, 60, "every event accepted during the outage")
    by_ref = defaultdict(set)
    for r in records:
        by_ref[helpers.message_ref(r.event)].add(r.event["event_id"])
    assert set(by_ref) == wanted, f"unexpected records: {set(by_ref) - wanted}"
    repeated = {ref: ids for ref, ids in by_ref.items() if len(ids) != 1}
    assert not repeated, f"a duplicate must carry the same event_id: {repeated}"
