"""The official `mistralai` client (pinned in scripts/tools-requirements.txt) drives one
batch job through the simulator: upload a file, create the job, poll it, download its
output. The client parses every answer into its own models, so a field the simulator leaves
out or misnames fails here.   check_mistral.py BASE_URL (without /v1)"""
import json
import sys
import time

from mistralai.client import Mistral


def request(i: int) -> dict:
    return {
        "custom_id": f"r{i}",
        "body": {
            "model": "mistral-small-latest",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"Row {i}: say something"}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "row", "strict": True,
                "schema": {"type": "object", "properties": {"title": {"type": "string"}},
                           "required": ["title"], "additionalProperties": False}}},
        },
    }


def main() -> None:
    client = Mistral(api_key="not-a-real-key", server_url=sys.argv[1])
    lines = "".join(json.dumps(request(i)) + "\n" for i in range(5)).encode()
    uploaded = client.files.upload(file={"file_name": "batch.jsonl", "content": lines}, purpose="batch")
    job = client.batch.jobs.create(
        endpoint="/v1/chat/completions",
        input_files=[uploaded.id],
        model="mistral-small-latest",
        metadata={"rowsmith_shard": "sdk.1.0"},
    )
    assert job.status in ("QUEUED", "RUNNING"), job.status
    deadline = time.time() + 60
    while job.status not in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"):
        assert time.time() < deadline, f"job never ended: {job.status}"
        time.sleep(0.1)
        job = client.batch.jobs.get(job_id=job.id)
    assert job.status == "SUCCESS", job
    assert (job.total_requests, job.succeeded_requests, job.failed_requests) == (5, 5, 0), job
    listed = client.batch.jobs.list(page=0, page_size=10)
    assert any(j.id == job.id for j in listed.data), listed
    output = client.files.download(file_id=job.output_file).read().decode()
    ids = sorted(json.loads(line)["custom_id"] for line in output.splitlines())
    assert ids == [f"r{i}" for i in range(5)], ids
    for line in output.splitlines():
        result = json.loads(line)
        assert result["response"]["status_code"] == 200, result
        json.loads(result["response"]["body"]["choices"][0]["message"]["content"])
    print(f"mistralai drove job {job.id} to {job.status}")


if __name__ == "__main__":
    main()
