"""The Python consumer example (consumers/python/consumer.py) run end to end:
it reads what the gateway wrote, validates it against the schema, drops a
repeated event_id and sets aside a record that is not an event."""

import asyncio
import json
import subprocess
import sys

import helpers
from helpers import C2C_TOPIC, GROUP_TOPIC, REPO_ROOT, SIGNED_APP

EXAMPLE = REPO_ROOT / "consumers" / "python" / "consumer.py"


async def _produce(bootstrap: str, records: list[tuple[str, bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def test_python_consumer_example(gateway, mock_broker):
    bodies = [
        helpers.group_receipt_body("@TGS#consumerA", first_seq=1),
        helpers.group_receipt_body("@TGS#consumerB", first_seq=5),
        helpers.c2c_receipt_body(operator="amy", peer="zed", first_seq=9),
    ]
    for body in bodies:
        query = helpers.callback_query(SIGNED_APP, body["CallbackCommand"], token=helpers.SIGNED_APP_TOKEN)
        helpers.assert_ok(helpers.post_callback(gateway.port, body, query))
    expected = [e for body in bodies for e in helpers.expected_events(body, SIGNED_APP)]
    records = helpers.read_aiokafka(mock_broker.bootstrap, [GROUP_TOPIC, C2C_TOPIC], len(expected))
    assert len(records) == len(expected)

    # A repeat (as a gateway replica or a replay would write it) and a record
    # that is not an event at all.
    repeat = records[0]
    asyncio.run(_produce(mock_broker.bootstrap, [
        (repeat.topic, repeat.key, repeat.value),
        (GROUP_TOPIC, b"@TGS#junk", b'{"schema": "read_receipt.v1", "event_id": "nope"}'),
    ]))

    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--bootstrap", mock_broker.bootstrap,
         "--group", "e2e-example", "--exit-when-idle"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), f"a repeat was not dropped: {ids}"
    assert sorted(ids) == sorted(json.loads(r.value)["event_id"] for r in records)
    assert f"handled {len(expected)} events, dropped 1 repeats, skipped 1 invalid records" in run.stderr, run.stderr
    assert "@TGS#junk" not in run.stdout
    assert "not a read_receipt.v1 event" in run.stderr, run.stderr
