"""Together batch lines as rowsmith renders them, checked by the official `together` SDK
(pinned in scripts/tools-requirements.txt), then driven through the simulator by that SDK:
  check_together.py BASE_URL LINES        (BASE_URL e.g. http://127.0.0.1:8089/together/v1)
BASE_URL is rowsmith's (with /v1); the SDK's own is the root without it (it defaults to
https://api.together.ai and puts /v1 in every path).
- each line is {custom_id, body} or OpenAI's {custom_id, method, url, body}; its body holds
  only parameters of the SDK's chat `CompletionCreateParams` (Together's allowance is
  `max_tokens`), its response_format only the keys of `ResponseFormatJsonSchema`; the SDK's
  own `check_file` passes the file for purpose batch-api;
- `files.upload` runs the SDK's 3-step flow (announce with the SHA-256 -> 302 to the
  presigned URL -> PUT -> preprocess) against the simulator; uploading the same bytes again
  gets the existing file back (409 {"file_id"}); a batch is created, polled to COMPLETED
  (each answer parsed as the SDK's `BatchJob`: ISO 8601 times, upper-case status), found in
  the bare-array listing, its output read with `files.content` and every custom_id answered
  with JSON that has the schema's fields; a second, larger batch is cancelled and reaches
  CANCELLED; a batch of a missing file (404) or with a member BatchCreateParams lacks (400)
  is refused with Together's `{"error": "..."}`, a PUT to the upload URL without its
  signature with 403.
Exits 1 with the first misfit."""
import datetime
import json
import pathlib
import shutil
import sys
import tempfile
import time
from importlib.metadata import version

import httpx
from together import BadRequestError, NotFoundError, Together
from together.lib import check_file
from together.types import BatchJob, FileResponse
from together.types.chat import completion_create_params as params

LINE_KEYS = {"custom_id", "method", "url", "body"}
BODY_KEYS = params.CompletionCreateParamsNonStreaming.__optional_keys__
FORMAT_KEYS = params.ResponseFormatJsonSchema.__optional_keys__
SCHEMA_KEYS = params.ResponseFormatJsonSchemaJsonSchema.__optional_keys__
TERMINAL = {"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"}


def check_line(line: dict) -> dict:
    """The line's JSON schema, once its keys fit Together's request types."""
    if not set(line) <= LINE_KEYS or not {"custom_id", "body"} <= set(line):
        raise ValueError(f"line keys {sorted(line)}")
    if line.get("method", "POST") != "POST" or line.get("url", "/v1/chat/completions") != "/v1/chat/completions":
        raise ValueError(f"method/url {line.get('method')} {line.get('url')}")
    body = line["body"]
    unknown = set(body) - BODY_KEYS
    if unknown:
        raise ValueError(f"body parameters Together does not declare: {sorted(unknown)}")
    if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
        raise ValueError("body.model and body.messages are required")
    response_format = body["response_format"]
    if response_format.get("type") != "json_schema" or not set(response_format) <= FORMAT_KEYS:
        raise ValueError(f"response_format {sorted(response_format)}")
    if not set(response_format["json_schema"]) <= SCHEMA_KEYS:
        raise ValueError(f"json_schema keys {sorted(response_format['json_schema'])}")
    return response_format["json_schema"]["schema"]


def ended(client, job_id: str) -> BatchJob:
    deadline = time.time() + 60
    while True:
        job = client.batches.retrieve(job_id)
        assert isinstance(job, BatchJob), job
        assert job.status in TERMINAL | {"VALIDATING", "IN_PROGRESS"}, job.status
        if job.status in TERMINAL:
            return job
        assert time.time() < deadline, f"batch {job_id} stuck in {job.status}"
        time.sleep(0.05)


def check_times(job: BatchJob) -> None:
    for stamp in (job.created_at, job.job_deadline, job.completed_at):
        assert isinstance(stamp, datetime.datetime) and stamp.tzinfo is not None, job
    assert job.job_deadline - job.created_at == datetime.timedelta(hours=24), job


def upload(client, path: pathlib.Path) -> FileResponse:
    uploaded = client.files.upload(path, purpose="batch-api")
    assert isinstance(uploaded, FileResponse), uploaded
    assert uploaded.filename == path.name and uploaded.purpose == "batch-api", uploaded
    assert uploaded.bytes == path.stat().st_size and uploaded.file_type == "jsonl", uploaded
    assert uploaded.processing_status == "COMPLETED", uploaded
    return uploaded


def check_output(client, job: BatchJob, ids: list, schema: dict) -> None:
    output = client.files.content(job.output_file_id).read().decode()
    answered = []
    for line in output.splitlines():
        result = json.loads(line)
        assert result["response"]["status_code"] == 200 and result["error"] is None, result
        answer = json.loads(result["response"]["body"]["choices"][0]["message"]["content"])
        assert sorted(answer) == sorted(schema["properties"]), answer
        answered.append(result["custom_id"])
    assert sorted(answered) == sorted(ids), (answered, ids)
    assert job.error_file_id is None, job


def cancelled(client, model: str, lines: list, directory: pathlib.Path) -> BatchJob:
    """A 1000-request batch (the lines again under new ids), cancelled at once."""
    path = directory / "rowsmith-sdk.1.1.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for copy in range(1000 // len(lines) + 1):
            for line in lines:
                out.write(json.dumps({**line, "custom_id": f"{line['custom_id']}-{copy}"}) + "\n")
    uploaded = upload(client, path)
    job = client.batches.create(endpoint="/v1/chat/completions", input_file_id=uploaded.id,
                                model_id=model).job
    shown = client.batches.cancel(job.id)
    assert isinstance(shown, BatchJob) and shown.id == job.id, shown
    assert shown.status in {"VALIDATING", "IN_PROGRESS", "CANCELLED"}, shown
    job = ended(client, job.id)
    assert job.status == "CANCELLED" and job.progress < 100, job
    check_times(job)
    return job


def refusals(client, uploaded: FileResponse, base_url: str) -> None:
    for create, error_type in (
        ({"input_file_id": "file-missing"}, NotFoundError),
        ({"input_file_id": uploaded.id, "extra_body": {"metadata": {"k": "v"}}}, BadRequestError),
    ):
        try:
            client.batches.create(endpoint="/v1/chat/completions", **create)
            sys.exit(f"a batch was created from {create}")
        except error_type as error:
            assert isinstance(error.body, dict) and isinstance(error.body.get("error"), str), error.body
    # Announced by hand: the presigned URL refuses a PUT without its signature.
    announced = httpx.post(f"{base_url}/files", headers={"Authorization": "Bearer not-a-real-key"},
                           files={"purpose": (None, "batch-api"), "file_name": (None, "unsigned.jsonl")},
                           follow_redirects=False)
    assert announced.status_code == 302, announced
    unsigned = announced.headers["location"].split("?")[0]
    assert httpx.put(unsigned, content=b"{}\n").status_code == 403


def main() -> None:
    base_url, source = sys.argv[1], pathlib.Path(sys.argv[2])
    lines, schemas = [], []
    for number, text in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        try:
            line = json.loads(text)
            schemas.append(check_line(line))
        except Exception as error:  # noqa: BLE001 - any misfit fails the check
            sys.exit(f"{source}:{number}: {error}")
        lines.append(line)
    directory = pathlib.Path(tempfile.mkdtemp())
    try:
        # The name rowsmith uploads a shard under: the simulator reads the job from it.
        path = directory / "rowsmith-sdk.1.0.jsonl"
        shutil.copyfile(source, path)
        report = check_file(path, purpose="batch-api")
        assert report["is_check_passed"], report
        assert report["num_samples"] == len(lines), report

        client = Together(api_key="not-a-real-key", base_url=base_url.rstrip("/").removesuffix("/v1"))
        uploaded = upload(client, path)
        again = client.files.upload(path, purpose="batch-api")
        assert again.id == uploaded.id, (again, uploaded)
        assert uploaded.id in [f.id for f in client.files.list().data]

        model = lines[0]["body"]["model"]
        created = client.batches.create(endpoint="/v1/chat/completions", input_file_id=uploaded.id,
                                        model_id=model, completion_window="24h")
        assert created.warning is None and created.job.status in {"VALIDATING", "IN_PROGRESS"}, created
        job = ended(client, created.job.id)
        assert job.status == "COMPLETED" and job.progress == 100, job
        assert (job.input_file_id, job.x_model_id, job.endpoint) == (uploaded.id, model, "/v1/chat/completions"), job
        assert job.file_size_bytes == uploaded.bytes and job.error is None, job
        check_times(job)
        listed = client.batches.list()
        assert isinstance(listed, list) and job.id in [j.id for j in listed], listed
        check_output(client, job, [line["custom_id"] for line in lines], schemas[0])

        stopped = cancelled(client, model, lines, directory)
        refusals(client, uploaded, base_url.rstrip("/"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"checked {len(lines)} lines; together {version('together')} drove {job.id} to {job.status} "
          f"and {stopped.id} to {stopped.status}")


if __name__ == "__main__":
    main()
