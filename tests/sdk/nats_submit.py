"""Submits a job with the official NATS Python client (nats-py) and waits for its end: a
JobSpec published by a client we did not write. Usage:
  nats_submit.py --nats URL --input STORE_KEY --job-id ID [--timeout SECONDS]
Exit 0 on `completed`, 1 on `failed`/`cancelled`/`refused`, 2 on timeout; any mismatch with
proto/ raises (exit 1 with a traceback). The final event is printed as one JSON line."""
import argparse
import asyncio
import json
import sys
import time

import nats
from nats.js.api import DeliverPolicy

WORK_STREAM, EVENTS_STREAM = "ROWSMITH_WORK", "ROWSMITH_EVENTS"
# proto/event.schema.json: the required fields of an Event and of its Counts.
EVENT_FIELDS = {"job_id": str, "kind": str, "at_ms": int, "message": str, "counts": dict}
COUNT_FIELDS = ("rows_total", "rows_skipped", "succeeded", "failed", "pending", "shards_total", "shards_ended")
KINDS = {"accepted", "refused", "ingested", "shard_submitted", "batch_progress", "shard_ended",
         "retrying", "completed", "failed", "cancelled", "warning"}
EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 1, "refused": 1}


def job_spec(job_id, input_key):
    """A JobSpec as proto/job-spec.schema.json describes it."""
    return {
        "job_id": job_id,
        "input": input_key,
        "instructions": "Write an SEO title of at most 60 characters and pick a category.",
        "target_columns": ["description"],
        "fields": [
            {"name": "seo_title", "type": "string", "description": "SEO title"},
            {"name": "category", "type": "enum", "values": ["toys", "tools", "garden"],
             "description": "the best shelf"},
        ],
        "provider": "sim",
    }


def check_event(event, job_id):
    for name, kind in EVENT_FIELDS.items():
        assert isinstance(event.get(name), kind), f"event field {name!r} missing or not {kind.__name__}: {event}"
    assert event["job_id"] == job_id, event
    assert event["kind"] in KINDS, f"unknown event kind: {event}"
    for name in COUNT_FIELDS:
        assert isinstance(event["counts"].get(name), int), f"counts.{name} missing: {event}"


async def submit_and_wait(args):
    nc = await nats.connect(args.nats, name="rowsmith-nats-py", connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        # An ordered ephemeral consumer from the first event: nothing is missed, even an event
        # published before this subscription.
        events = await js.subscribe(f"rowsmith.events.{args.job_id}.>", stream=EVENTS_STREAM,
                                    ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        body = json.dumps(job_spec(args.job_id, args.input)).encode()
        headers = {"Nats-Msg-Id": args.job_id}
        first = await js.publish("rowsmith.jobs.submit", body, stream=WORK_STREAM, headers=headers)
        assert first.stream == WORK_STREAM and first.seq > 0, first
        # Publishing again with the same id is JetStream's deduplication, not a second job.
        again = await js.publish("rowsmith.jobs.submit", body, stream=WORK_STREAM, headers=headers)
        assert again.stream == WORK_STREAM and again.duplicate is True, f"second publish not a duplicate: {again}"
        print(f"published {args.job_id}: seq {first.seq}, again duplicate={again.duplicate}", file=sys.stderr)

        deadline = time.monotonic() + args.timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await events.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            event = json.loads(msg.data)
            check_event(event, args.job_id)
            assert msg.subject == f"rowsmith.events.{args.job_id}.{event['kind']}", msg.subject
            seen.append(event["kind"])
            if event["kind"] in EXIT_CODES:
                print(json.dumps(event))
                print(f"events: {' '.join(seen)}", file=sys.stderr)
                return EXIT_CODES[event["kind"]]
        print(f"no final event for {args.job_id} within {args.timeout}s; saw: {seen}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", required=True, help="NATS URL, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--input", required=True, help="store key of the input, e.g. inputs/py/products.csv")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the end")
    sys.exit(asyncio.run(submit_and_wait(parser.parse_args())))


if __name__ == "__main__":
    main()
