"""The worst night: Kafka goes away, the gateway is SIGKILLed with callbacks
only in its spool, and Kafka comes back as a new cluster on a new address.
Restarted with --brokers pointing there, on the same spool, the gateway
delivers every callback it had acknowledged."""

import signal

import helpers
from conftest import MockBroker, start_gateway
from helpers import ALL_TOPICS, GROUP_TOPIC, TOPIC_PARTITIONS


def test_sigkill_and_a_new_broker_lose_nothing(timbridge_bin, mock_broker_bin, mock_broker, tmp_path):
    workdir = tmp_path / "gw"
    gw = start_gateway(timbridge_bin, mock_broker.bootstrap, workdir, "before-kill")
    mock_broker.down(1)
    # Post only once the gateway knows Kafka is away, so that the spool is
    # the only place these events are.
    helpers.wait_until(
        lambda: b'"kafka_reachable":false' in helpers.http_request(gw.port, "GET", "/readyz").body,
        30,
        "/readyz to report Kafka unreachable",
    )
    bodies = [helpers.group_receipt_body(f"@TGS#KILL{i}", first_seq=1) for i in range(20)]
    for body in bodies:
        helpers.assert_ok(helpers.post_signed(gw.port, body))
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    mock_broker.stop()

    log = tmp_path / "new_broker.log"
    new_broker = MockBroker(mock_broker_bin, log, {t: TOPIC_PARTITIONS for t in ALL_TOPICS})
    try:
        assert new_broker.bootstrap != mock_broker.bootstrap
        gw2 = start_gateway(timbridge_bin, new_broker.bootstrap, workdir, "after-kill")
        try:
            expected = [e for body in bodies for e in helpers.expected_events(body, helpers.SIGNED_APP)]
            wanted = {helpers.message_ref(e) for e in expected}

            def all_arrived():
                recs = helpers.read_aiokafka(new_broker.bootstrap, GROUP_TOPIC, len(expected), timeout=2)
                got = {helpers.message_ref(r.event) for r in recs}
                return recs if wanted <= got else None

            records = helpers.wait_until(all_arrived, 60, "every acknowledged event on the new broker")
            validator = helpers.load_validator()
            by_ref = {helpers.message_ref(e): e for e in expected}
            for r in records:
                helpers.check_record(r, by_ref[helpers.message_ref(r.event)], validator)
        finally:
            assert gw2.stop() == 0, gw2.log_text()[-3000:]
    finally:
        new_broker.stop()
