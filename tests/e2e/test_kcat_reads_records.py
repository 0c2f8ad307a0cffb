"""Callbacks posted with `timbridge send` become read_receipt.v1 records that
Debian's kcat (librdkafka, not ours) reads back with the contract's keys,
headers and values."""

import json

import helpers
from helpers import C2C_TOPIC, GROUP_TOPIC, SIGNED_APP, SIGNED_APP_TOKEN


def test_kcat_reads_records(gateway, mock_broker, timbridge_bin, tmp_path):
    group = helpers.group_receipt_body("@TGS#2TTV7VSII", event_time="1670574414123")
    # Operator sorts after the peer: the key must put the peer first.
    receipt = helpers.c2c_receipt_body(operator="user_b", peer="user_a")
    # "Zed" < "alice" in byte order ('Z' is 0x5A, 'a' is 0x61), not in a case-insensitive one.
    report = helpers.c2c_report_body(reporter="alice", peer="Zed", last_read_time=1670574416,
                                     unread=3, event_time=1670574416789)
    bodies = [group, receipt, report]

    t0 = helpers.now_ms()
    for i, body in enumerate(bodies):
        path = tmp_path / f"body-{i}.json"
        path.write_text(json.dumps(body))
        sent = helpers.send_with_cli(timbridge_bin, gateway.callback_url, SIGNED_APP, path,
                                     token=SIGNED_APP_TOKEN)
        assert sent.status == 200, sent.output
        assert sent.answer == helpers.OK_ANSWER, sent.output
    t1 = helpers.now_ms()

    expected = [e for body in bodies for e in helpers.expected_events(body, SIGNED_APP)]
    expected_group = [e for e in expected if e["conversation_type"] == "group"]
    expected_c2c = [e for e in expected if e["conversation_type"] == "c2c"]
    assert (len(expected_group), len(expected_c2c)) == (2, 3)

    group_records = helpers.wait_for_kcat(mock_broker.bootstrap, GROUP_TOPIC, len(expected_group))
    c2c_records = helpers.wait_for_kcat(mock_broker.bootstrap, C2C_TOPIC, len(expected_c2c))

    assert [r.key for r in group_records] == [b"@TGS#2TTV7VSII"] * 2
    assert sorted(r.key for r in c2c_records) == sorted(
        [b"c2c:user_a:user_b"] * 2 + [b"c2c:Zed:alice"]
    )

    validator = helpers.load_validator()
    event_ids = []
    for records, exp in ((group_records, expected_group), (c2c_records, expected_c2c)):
        for record, want in helpers.match_records(records, exp):
            # `timbridge send` sets no ClientIP/OptPlatform of ours: string or null.
            event = helpers.check_record(record, want, validator, received_window=(t0, t1))
            event_ids.append(event["event_id"])
    assert len(set(event_ids)) == len(event_ids), f"event ids of different messages collide: {event_ids}"
