"""Drives the simulator with the official Anthropic SDK: create, poll, results, list, cancel,
delete. Usage: check_anthropic.py BASE_URL (e.g. http://127.0.0.1:8089). Exits non-zero on
any mismatch."""
import sys
import time

import anthropic

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "in_stock": {"type": "boolean"}},
          "required": ["title", "in_stock"], "additionalProperties": False}


def request(i):
    return {"custom_id": f"r{i}", "params": {
        "model": "claude-sonnet-4-5", "max_tokens": 256, "system": "Enrich rows.",
        "messages": [{"role": "user", "content": f"Row data to enhance:\ndescription: item number {i}\n\nRow context: "}],
        "tools": [{"name": "row_enrichment", "description": "Record the fields.", "input_schema": SCHEMA}],
        "tool_choice": {"type": "tool", "name": "row_enrichment"}}}


def wait_ended(client, batch_id):
    deadline = time.time() + 30
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert batch.request_counts.succeeded == 0, "counts stay 0 until the batch ends"
        assert time.time() < deadline, f"batch {batch_id} stuck in {batch.processing_status}"
        time.sleep(0.05)


def main():
    client = anthropic.Anthropic(base_url=sys.argv[1], api_key="not-a-real-key", max_retries=3)
    batch = client.messages.batches.create(requests=[request(i) for i in range(5)])
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 5, batch
    batch = wait_ended(client, batch.id)
    assert batch.request_counts.succeeded == 5 and batch.results_url and batch.ended_at, batch
    results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == [f"r{i}" for i in range(5)]
    for result in results:
        assert result.result.type == "succeeded", result
        tool_use = [c for c in result.result.message.content if c.type == "tool_use"][0]
        assert isinstance(tool_use.input["title"], str) and isinstance(tool_use.input["in_stock"], bool)
    second = client.messages.batches.create(requests=[request(i) for i in range(3)])
    listed = [b.id for b in client.messages.batches.list(limit=1)]
    assert listed[:2] == [second.id, batch.id], listed
    try:
        client.messages.batches.delete(second.id)
        raise AssertionError("deleting an unended batch must fail")
    except anthropic.BadRequestError:
        pass
    cancelled = client.messages.batches.cancel(second.id)
    assert cancelled.processing_status in ("canceling", "ended"), cancelled
    ended = wait_ended(client, second.id)
    assert ended.cancel_initiated_at is not None
    assert client.messages.batches.delete(second.id).type == "message_batch_deleted"
    try:
        client.messages.batches.create(requests=[{"custom_id": "bad id!", "params": request(0)["params"]}])
        raise AssertionError("an invalid custom_id must be refused")
    except anthropic.BadRequestError:
        pass
    print("anthropic sdk: create, poll, results, list, cancel, delete ok")


if __name__ == "__main__":
    main()
