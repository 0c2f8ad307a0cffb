"""A callback that is not a read receipt is answered 200 OK and forwarded to
raw_topic byte for byte, keyed by its GroupId."""

import helpers
from helpers import RAW_TOPIC, SIGNED_APP


def test_raw_forward(gateway, mock_broker):
    # Odd spacing, key order, escapes and non-ASCII text: anything but a
    # re-serialization of the parsed JSON would change these bytes.
    body = (
        b'{ "CallbackCommand" : "Group.CallbackAfterSendMsg",\n'
        b'  "GroupId":"@TGS#2RAWFWD",  "Type":"Public", "From_Account":"user0",\n'
        b'  "Operator_Account":"user0", "Random":123456, "MsgSeq":42, "MsgTime":1670574414,\n'
        b'  "MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"h\\u00e9llo \xc3\xa9 \\"x\\""}}],\n'
        b'  "CloudCustomData":"", "EventTime":1670574414123 }\n'
    )
    query = helpers.callback_query(SIGNED_APP, "Group.CallbackAfterSendMsg", token=helpers.SIGNED_APP_TOKEN,
                                   client_ip="203.0.113.9", platform="Web")
    helpers.assert_ok(helpers.post_callback(gateway.port, body, query))

    records = helpers.read_aiokafka(mock_broker.bootstrap, RAW_TOPIC, expected=1)
    assert len(records) == 1, records
    assert records[0].value == body, f"forwarded value differs:\n{records[0].value!r}\n!=\n{body!r}"
    assert records[0].key == b"@TGS#2RAWFWD"
