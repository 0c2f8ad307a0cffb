"""Every kind of bad callback gets its status and a FAIL answer, and none of
them reaches Kafka: after them, one valid callback is the only record."""

import json
import time

import helpers
from helpers import (
    ALL_TOPICS, GROUP_RECEIPT, MAX_BODY_BYTES, SIGNED_APP, SIGNED_APP_TOKEN, UNKNOWN_APP, UNSIGNED_APP,
)


def test_rejections_write_nothing(gateway, mock_broker):
    port = gateway.port
    # The rejected callbacks and the final valid one share the GroupId (so the
    # same partition) but not the messages, so a leaked record cannot pass for
    # the valid one's.
    good = helpers.group_receipt_body("@TGS#2REJECT", first_seq=1)

    def signed(**kw):
        return helpers.callback_query(SIGNED_APP, GROUP_RECEIPT, token=SIGNED_APP_TOKEN, **kw)

    # 403: SdkAppid not configured, or missing.
    helpers.assert_fail(
        helpers.post_callback(port, good, helpers.callback_query(UNKNOWN_APP, GROUP_RECEIPT, token=SIGNED_APP_TOKEN)),
        403,
    )
    helpers.assert_fail(helpers.post_callback(port, good, helpers.callback_query(None, GROUP_RECEIPT)), 403)

    # 401: wrong Sign; stale RequestTime (correctly signed for that time); Sign missing.
    now = int(time.time())
    helpers.assert_fail(
        helpers.post_callback(port, good, signed(request_time=now, sign_value=helpers.sign("not-the-token", now))),
        401,
    )
    stale = now - 3600
    helpers.assert_fail(helpers.post_callback(port, good, signed(request_time=stale)), 401)
    helpers.assert_fail(helpers.post_callback(port, good, helpers.callback_query(SIGNED_APP, GROUP_RECEIPT)), 401)

    # 400: not JSON; a read receipt without GroupId (ErrorInfo names it).
    helpers.assert_fail(helpers.post_callback(port, b"{this is not json", signed()), 400)
    no_group = {k: v for k, v in good.items() if k != "GroupId"}
    doc = helpers.assert_fail(helpers.post_callback(port, no_group, signed()), 400, info_contains="GroupId")
    assert doc["ErrorInfo"], doc

    # 413: a well-formed, correctly signed read receipt that is only too big,
    # with a Content-Length and without one (chunked).
    big = helpers.group_receipt_body("@TGS#2REJECT", first_seq=500)
    big["GroupMsgReceiptList"][0]["ReadReceiptMembers"] = [
        {"Member_Account": f"member-{i:05d}"} for i in range(200)
    ]
    big_bytes = json.dumps(big).encode()
    assert len(big_bytes) > MAX_BODY_BYTES
    helpers.assert_fail(helpers.post_callback(port, big_bytes, signed()), 413)
    chunks = [big_bytes[i:i + 1000] for i in range(0, len(big_bytes), 1000)]
    helpers.assert_fail(helpers.post_callback(port, iter(chunks), signed(), chunked=True), 413)

    # Then one valid callback (from the app without a token: no Sign needed).
    valid = helpers.group_receipt_body("@TGS#2REJECT", first_seq=900)
    helpers.assert_ok(helpers.post_callback(port, valid, helpers.callback_query(UNSIGNED_APP, GROUP_RECEIPT)))
    expected = helpers.expected_events(valid, UNSIGNED_APP)
    records = helpers.read_aiokafka(mock_broker.bootstrap, ALL_TOPICS, expected=len(expected))

    # The rejected callbacks came first; had any of them been spooled, its
    # records would be ahead of the valid ones in the same partition.
    pairs = helpers.match_records(records, expected)
    validator = helpers.load_validator()
    for record, want in pairs:
        helpers.check_record(record, want, validator)
    counts = helpers.count_records(mock_broker.bootstrap, ALL_TOPICS)
    assert counts == {helpers.GROUP_TOPIC: len(expected), helpers.C2C_TOPIC: 0, helpers.RAW_TOPIC: 0}, counts
