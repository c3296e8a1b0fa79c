"""Gemini batch lines as rowsmith renders them, checked by the official `google-genai` SDK
(pinned in scripts/tools-requirements.txt), then driven through the simulator by that SDK:
  check_gemini.py BASE_URL LINES
- each line is {key, request}; the request's contents, systemInstruction and
  generationConfig (responseSchema included) are the SDK's `Content` and `GenerationConfig`,
  whose models refuse any key they do not declare; the request holds no other key;
- the SDK uploads the file (resumable protocol), creates a batch from it, polls it to its
  end, finds it in the listing and downloads its responses, each parsed as the SDK's
  `GenerateContentResponse`; then sends the same requests inline and reads the answers from
  the batch (`dest.inlined_responses`). A field the simulator leaves out or misnames fails here.
Exits 1 with the first misfit."""
import json
import sys
import time

from google import genai
from google.genai import types

REQUEST_KEYS = {"contents", "systemInstruction", "generationConfig"}


def check_line(line: dict) -> list:
    if set(line) != {"key", "request"}:
        raise ValueError(f"line keys {sorted(line)}")
    request = line["request"]
    unknown = set(request) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"request keys rowsmith should not send: {sorted(unknown)}")
    for content in request["contents"]:
        types.Content.model_validate(content)
    types.Content.model_validate(request["systemInstruction"])
    config = types.GenerationConfig.model_validate(request["generationConfig"])
    if config.response_mime_type != "application/json" or config.response_schema is None:
        raise ValueError("no JSON response schema")
    if config.response_json_schema is not None:
        raise ValueError("responseJsonSchema is reported broken in batch mode")
    return config.response_schema.property_ordering


def ended(client, job):
    """The batch polled until it ends, which must be in success."""
    terminal = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
    deadline = time.time() + 60
    while job.state.name not in terminal:
        assert time.time() < deadline, f"batch never ended: {job.state}"
        time.sleep(0.1)
        job = client.batches.get(name=job.name)
    assert job.state.name == "JOB_STATE_SUCCEEDED", job
    return job


def main() -> None:
    base_url, path = sys.argv[1], sys.argv[2]
    orderings = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                orderings.append(check_line(json.loads(line)))
            except Exception as error:  # noqa: BLE001 - any misfit fails the check
                sys.exit(f"{path}:{number}: {error}")
    keys = [json.loads(line)["key"] for line in open(path, encoding="utf-8")]

    # The REST reference's version, which rowsmith calls (the SDK itself defaults to v1 since 3.x).
    options = types.HttpOptions(base_url=base_url, api_version="v1beta")
    client = genai.Client(api_key="not-a-real-key", http_options=options)
    uploaded = client.files.upload(
        file=path, config=types.UploadFileConfig(display_name="rowsmith-sdk.1.0", mime_type="jsonl")
    )
    assert uploaded.name.startswith("files/"), uploaded
    job = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "rowsmith-sdk.1.0"}
    )
    job = ended(client, job)
    assert job.display_name == "rowsmith-sdk.1.0", job
    assert job.create_time is not None and job.end_time is not None, job
    listed = [j.name for j in client.batches.list(config={"page_size": 10})]
    assert job.name in listed, listed
    output = client.files.download(file=job.dest.file_name).decode()
    answered = []
    for line in output.splitlines():
        result = json.loads(line)
        response = types.GenerateContentResponse.model_validate(result["response"])
        answer = json.loads(response.text)
        assert list(answer) == orderings[0], (list(answer), orderings[0])
        answered.append(result["key"])
    assert sorted(answered) == sorted(keys), (answered, keys)
    # The same requests inline: the SDK's own inline wire shape, its answers in the operation.
    inline = []
    for line in open(path, encoding="utf-8"):
        line = json.loads(line)
        request = line["request"]
        config = types.GenerateContentConfig.model_validate(
            {**request["generationConfig"], "systemInstruction": request["systemInstruction"]}
        )
        inline.append(types.InlinedRequest(contents=request["contents"], config=config,
                                           metadata={"key": line["key"]}))
    job = client.batches.create(model="gemini-2.5-flash", src=inline,
                                config={"display_name": "rowsmith-sdk.1.1"})
    job = ended(client, job)
    inlined = job.dest.inlined_responses
    assert sorted(r.metadata["key"] for r in inlined) == sorted(keys), inlined
    for answer in inlined:
        assert answer.error is None, answer
        assert list(json.loads(answer.response.text)) == orderings[0]
    from importlib.metadata import version
    print(f"checked {len(keys)} lines; google-genai {version('google-genai')} drove {job.name} to {job.state.name}")


if __name__ == "__main__":
    main()
