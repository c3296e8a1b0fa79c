"""Drives the simulator with the official OpenAI SDK: upload, create, poll, download, list,
cancel. Usage: check_openai.py BASE_URL (e.g. http://127.0.0.1:8089/v1). Exits non-zero on
any mismatch."""
import json
import sys
import time

from openai import OpenAI

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "tags"], "additionalProperties": False}


def request_line(i):
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini",
                                "messages": [{"role": "system", "content": "Enrich rows."},
                                             {"role": "user", "content": f"Row data to enhance:\ndescription: item number {i}\n\nRow context: "}],
                                "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "row", "strict": True, "schema": SCHEMA}}}})


def wait(client, batch_id, done):
    deadline = time.time() + 30
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in done:
            return batch
        assert time.time() < deadline, f"batch {batch_id} stuck in {batch.status}"
        time.sleep(0.05)


def main():
    client = OpenAI(base_url=sys.argv[1], api_key="not-a-real-key", max_retries=3)
    body = ("\n".join(request_line(i) for i in range(5)) + "\n").encode()
    uploaded = client.files.create(file=("rows.jsonl", body), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(body), uploaded
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"rowsmith_shard": "sdk.1.0"})
    assert batch.status == "validating", batch
    batch = wait(client, batch.id, {"completed", "failed", "expired", "cancelled"})
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 5, 0), batch
    assert batch.error_file_id is None and batch.completed_at is not None
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"r{i}" for i in range(5)]
    for line in lines:
        answer = json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert isinstance(answer["title"], str) and isinstance(answer["tags"], list), answer
        assert line["response"]["status_code"] == 200 and line["error"] is None
    second = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    listed = [b.id for b in client.batches.list(limit=1)]  # iterating pages on with `after`
    assert listed[:2] == [second.id, batch.id], listed
    cancelling = client.batches.cancel(second.id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling
    assert wait(client, second.id, {"cancelled"}).status == "cancelled"
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.delete(uploaded.id).deleted
    print("openai sdk: upload, create, poll, download, list, cancel ok")


if __name__ == "__main__":
    main()
