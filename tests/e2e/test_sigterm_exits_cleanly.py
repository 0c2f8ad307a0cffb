"""SIGTERM stops the gateway cleanly: exit code 0, within the deadline, after
it has served a callback and published it."""

import helpers
from helpers import C2C_TOPIC


def test_sigterm_exits_cleanly(gateway, mock_broker):
    body = helpers.c2c_report_body(reporter="term_a", peer="term_b")
    helpers.assert_ok(helpers.post_signed(gateway.port, body))
    records = helpers.read_aiokafka(mock_broker.bootstrap, C2C_TOPIC, expected=1)
    assert [r.key for r in records] == [helpers.c2c_conversation("term_a", "term_b").encode()]

    code = gateway.stop()
    assert code == 0, f"exit code {code} after SIGTERM (negative: killed by that signal)"
    assert "SIGKILLed" not in gateway.log_text(), "the gateway did not exit within the deadline after SIGTERM"
