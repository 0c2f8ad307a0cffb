#!/usr/bin/env python3
"""A minimal consumer of timbridge's read_receipt.v1 records, with aiokafka.

What every consumer of these topics needs, in about a hundred lines:

- validate each value against the shipped JSON Schema, and set aside what
  does not match (a producer bug must not stop the stream);
- drop repeats by event_id: timbridge delivers at least once (a retry after
  a lost acknowledgement, a replay after a crash, two gateway replicas given
  the same callback all produce the same event_id);
- commit offsets only after the events are handled (at-least-once here too).

Each accepted event is printed as one JSON line on stdout; rejected records
are reported on stderr. Replace `handle()` with your own processing.

    pip install aiokafka jsonschema
    python3 consumer.py --bootstrap kafka-1:9092 --group my-service

Run it with --help for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import OrderedDict
from pathlib import Path

import jsonschema
from aiokafka import AIOKafkaConsumer

DEFAULT_TOPICS = ["tim.group.read_receipts", "tim.c2c.read_receipts"]
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "schema" / "read_receipt.v1.json"


class RecentIds:
    """The event_ids seen lately, at most `limit` of them (oldest forgotten).

    Repeats arrive close together (a retry, a replay of the gateway's spool),
    so a bounded window is enough; size it to a few minutes of traffic.
    A service that must never see a repeat keeps the ids with its own data
    (e.g. a unique key on event_id) instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        if event_id in self.ids:
            self.ids.move_to_end(event_id)
            return True
        self.ids[event_id] = None
        if len(self.ids) > self.limit:
            self.ids.popitem(last=False)
        return False


def handle(event: dict) -> None:
    """Your processing goes here; this example prints the event."""
    print(json.dumps(event, ensure_ascii=False, sort_keys=True), flush=True)


async def consume(args: argparse.Namespace) -> int:
    schema = json.loads(Path(args.schema).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    recent = RecentIds(args.dedup_window)
    consumer = AIOKafkaConsumer(
        *args.topics,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    handled = duplicates = invalid = 0
    read_any = False
    try:
        while args.max_events is None or handled < args.max_events:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches and args.exit_when_idle and read_any:
                break
            read_any = read_any or bool(batches)
            for records in batches.values():
                for record in records:
                    try:
                        event = json.loads(record.value)
                        validator.validate(event)
                    except (ValueError, jsonschema.ValidationError) as e:
                        invalid += 1
                        reason = e.message if isinstance(e, jsonschema.ValidationError) else str(e)
                        print(f"skipped {record.topic}/{record.partition}@{record.offset}: "
                              f"not a read_receipt.v1 event: {reason}", file=sys.stderr, flush=True)
                        continue
                    if recent.seen(event["event_id"]):
                        duplicates += 1
                        continue
                    handle(event)
                    handled += 1
            # Handled, so committed: a crash before this line means the batch
            # is read again, and the event_id window drops what was handled.
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()
    print(f"handled {handled} events, dropped {duplicates} repeats, skipped {invalid} invalid records",
          file=sys.stderr, flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="Kafka brokers, host:port[,host:port]")
    p.add_argument("--group", default="read-receipts-example", help="the consumer group id")
    p.add_argument("--topic", dest="topics", action="append",
                   help=f"a topic to read (repeatable); default: {' and '.join(DEFAULT_TOPICS)}")
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="the read_receipt.v1 JSON Schema file")
    p.add_argument("--dedup-window", type=int, default=1_000_000,
                   help="how many recent event_ids to remember for dropping repeats")
    p.add_argument("--max-events", type=int, help="stop after this many events (for scripts)")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="stop once a one-second poll returns nothing after records were read (for scripts)")
    args = p.parse_args()
    args.topics = args.topics or DEFAULT_TOPICS
    return asyncio.run(consume(args))


if __name__ == "__main__":
    sys.exit(main())
