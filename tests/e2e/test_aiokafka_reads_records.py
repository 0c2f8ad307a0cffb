"""The same records, read by aiokafka (a pure-Python Kafka protocol client):
keys, headers, values, schema; one partition per conversation, in order; and
an event_id that depends only on the callback's content."""

import json
from collections import defaultdict

import helpers
from helpers import C2C_TOPIC, GROUP_TOPIC, SIGNED_APP, UNSIGNED_APP


def test_aiokafka_reads_records(gateway, mock_broker):
    # (sdk_app_id, body) in posting order. Several callbacks per conversation,
    # so "one partition, in order" means something.
    posts = [
        (SIGNED_APP, helpers.group_receipt_body("@TGS#2AAAA", first_seq=1, event_time=1670574414123)),
        (SIGNED_APP, helpers.c2c_receipt_body(operator="user_b", peer="user_a", first_seq=101)),
        (UNSIGNED_APP, helpers.group_receipt_body("@TGS#2BBBB", first_seq=40, event_time="1670574414200",
                                                  group_type="Private")),
        (SIGNED_APP, helpers.group_receipt_body("@TGS#2AAAA", first_seq=3, event_time=1670574414999)),
        # Same conversation as the receipt above, seen from the other side;
        # no EventTime, no UnreadMsgNum: event_time_ms falls back to LastReadTime.
        (SIGNED_APP, helpers.c2c_report_body(reporter="user_a", peer="user_b", last_read_time=1670574420,
                                             unread=None, event_time=None)),
        # Non-ASCII accounts: the key is their UTF-8 bytes, in byte order.
        (UNSIGNED_APP, helpers.c2c_receipt_body(operator="zoë", peer="émile", first_seq=7)),
    ]
    t0 = helpers.now_ms()
    for app, body in posts:
        query = helpers.callback_query(
            app, body["CallbackCommand"],
            token=helpers.SIGNED_APP_TOKEN if app == SIGNED_APP else None,
            client_ip="203.0.113.7", platform="iOS",
        )
        helpers.assert_ok(helpers.post_callback(gateway.port, body, query))
    t1 = helpers.now_ms()

    expected = [e for app, body in posts for e in helpers.expected_events(body, app)]
    records = helpers.read_aiokafka(mock_broker.bootstrap, [GROUP_TOPIC, C2C_TOPIC], len(expected))
    pairs = helpers.match_records(records, expected)

    validator = helpers.load_validator()
    for record, want in pairs:
        helpers.check_record(record, want, validator, received_window=(t0, t1),
                             client_ip="203.0.113.7", platform="iOS")

    assert {r.key for r in records} == {
        b"@TGS#2AAAA", b"@TGS#2BBBB", b"c2c:user_a:user_b",
        # 'z' is 0x7A, 'é' starts with 0xC3: "zoë" sorts first.
        "c2c:zoë:émile".encode(),
    }

    # Every conversation in one partition, and in the order it was posted.
    by_key = defaultdict(list)
    for record in records:
        by_key[(record.topic, record.key)].append(record)
    for (topic, key), recs in by_key.items():
        assert len({r.partition for r in recs}) == 1, (
            f"{topic} key {key!r} spread over partitions {[r.partition for r in recs]}"
        )
    order = {helpers.message_ref(e): i for i, e in enumerate(expected)}
    for (topic, key), recs in by_key.items():
        posted = [order[helpers.message_ref(r.event)] for r in sorted(recs, key=lambda r: r.offset)]
        assert posted == sorted(posted), f"{topic} key {key!r}: records out of posting order"


def test_event_id_is_the_same_for_the_same_callback(gateway_factory, mock_broker):
    replica_a = gateway_factory("replica-a")
    replica_b = gateway_factory("replica-b")
    body = helpers.c2c_report_body(reporter="dup_reader", peer="dup_peer", last_read_time=1670574500,
                                   unread=2, event_time=1670574500123)
    conversation = helpers.c2c_conversation("dup_reader", "dup_peer")

    def sentinel(last_read_time):
        return helpers.c2c_report_body(reporter="dup_reader", peer="dup_peer",
                                       last_read_time=last_read_time, unread=0, event_time=None)

    # The same content twice to one replica, once to another; each replica then
    # sends a later event of the same conversation. The conversation is ordered
    # in its partition, so once a replica's sentinel is there, so is everything
    # that replica published of the repeated callback.
    helpers.assert_ok(helpers.post_signed(replica_a.port, body, client_ip="198.51.100.1", platform="Android"))
    helpers.assert_ok(helpers.post_signed(replica_a.port, json.dumps(body).encode(),
                                          command=body["CallbackCommand"],
                                          client_ip="198.51.100.1", platform="Android"))
    helpers.assert_ok(helpers.post_signed(replica_a.port, sentinel(1670574600)))
    helpers.assert_ok(helpers.post_signed(replica_b.port, body, client_ip="198.51.100.1", platform="Android"))
    helpers.assert_ok(helpers.post_signed(replica_b.port, sentinel(1670574700)))

    def sentinels_arrived():
        recs = helpers.read_aiokafka(mock_broker.bootstrap, C2C_TOPIC, expected=4, timeout=2)
        times = {r.event["read_up_to_ms"] for r in recs}
        return recs if {1670574600000, 1670574700000} <= times else None

    records = helpers.wait_until(sentinels_arrived, 30, "both replicas' sentinel records")
    repeated = [r for r in records if r.event["read_up_to_ms"] == 1670574500000]
    assert all(r.key == conversation.encode() for r in records)
    # Replica A may drop its repeat as a duplicate; replica B has never seen it.
    assert 2 <= len(repeated) <= 3, f"{len(repeated)} records of the repeated callback: {repeated}"
    ids = {r.event["event_id"] for r in repeated}
    assert len(ids) == 1, f"the same callback got different event ids: {ids}"
    assert {r.header("timbridge-event-id") for r in repeated} == ids
    sentinel_ids = {r.event["event_id"] for r in records} - ids
    assert len(sentinel_ids) == 2, "different callbacks must have different event ids"
