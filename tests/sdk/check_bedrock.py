"""Bedrock batch records and job creation as rowsmith renders them, checked against code and
data we did not write (pinned in scripts/tools-requirements.txt), then driven through the
simulator by the official AWS SDK:
  check_bedrock.py LINES CREATE_REQUEST SIM_URL S3_ENDPOINT BUCKET
- each line is {recordId, modelInput}; recordId is alphanumeric; modelInput is Claude's
  InvokeModel body: AWS's `anthropic_version` "bedrock-2023-05-31", and the rest with the
  job's model put back is the `anthropic` SDK's `MessageCreateParamsNonStreaming`, unknown
  keys refused at every level (the SDK's own Bedrock client pops `model` the same way);
- CREATE_REQUEST (the body rowsmith's client sends) is a `CreateModelInvocationJob` input of
  botocore's service model: botocore's validator (types, required members, lengths, ranges)
  plus every `pattern` of the model, matched in full;
- boto3, pointed at the simulator, creates that job again from the lines put into S3
  (moto), reads it back until it ends, finds it in the listing by name, stops a second job,
  and reads the output file, whose every line parses and joins a recordId.
Exits 1 with the first misfit."""
import json
import re
import sys
import time

import anthropic
import boto3
import botocore
import botocore.session
from botocore.config import Config
from botocore.validate import ParamValidator
from pydantic import TypeAdapter, ValidationError

from check_contract import forbid_extras

BEDROCK_VERSION = "bedrock-2023-05-31"


def check_lines(path: str, model: str) -> list:
    forbid_extras("anthropic.types")
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

    params = TypeAdapter(MessageCreateParamsNonStreaming)
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            where = f"{path}:{number}"
            if set(record) != {"recordId", "modelInput"}:
                sys.exit(f"{where}: record keys {sorted(record)}")
            if not re.fullmatch(r"[A-Za-z0-9]+", record["recordId"]):
                sys.exit(f"{where}: recordId {record['recordId']!r} is not alphanumeric")
            body = dict(record["modelInput"])
            if body.pop("anthropic_version", None) != BEDROCK_VERSION:
                sys.exit(f"{where}: anthropic_version is not {BEDROCK_VERSION}")
            if "model" in body:
                sys.exit(f"{where}: modelInput names a model (the job does)")
            body["model"] = model
            try:
                params.validate_python(body)
            except ValidationError as error:
                sys.exit(f"{where}: {error}")
            records.append(record)
    return records


def check_patterns(shape, value, where: str) -> None:
    """Every string against its member's `pattern` in full (botocore's validator skips them)."""
    if shape.type_name == "structure":
        for name, member in shape.members.items():
            if name in value:
                check_patterns(member, value[name], f"{where}.{name}")
    elif shape.type_name == "list":
        for index, item in enumerate(value):
            check_patterns(shape.member, item, f"{where}[{index}]")
    elif shape.type_name == "string":
        pattern = shape.metadata.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            sys.exit(f"{where} = {value!r} does not match {pattern}")


def check_create(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        request = json.load(file)
    model = botocore.session.get_session().get_service_model("bedrock")
    operation = model.operation_model("CreateModelInvocationJob")
    report = ParamValidator().validate(request, operation.input_shape)
    if report.has_errors():
        sys.exit(f"{path}: {report.generate_report()}")
    check_patterns(operation.input_shape, request, "CreateModelInvocationJob")
    return request


def drive(request: dict, lines_path: str, sim: str, s3_endpoint: str, bucket: str, count: int) -> None:
    session = dict(region_name="us-east-1", aws_access_key_id="AKIDSDKCHECK",
                   aws_secret_access_key="sdk-check-secret")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **session)
    bedrock = boto3.client("bedrock", endpoint_url=sim, config=Config(retries={"max_attempts": 1}),
                           **session)
    key = "sdk-check/input.jsonl"
    with open(lines_path, "rb") as lines:
        s3.put_object(Bucket=bucket, Key=key, Body=lines.read())
    request = dict(request)
    request["jobName"] = "sdk-check-" + str(int(time.time() * 1000))
    request["clientRequestToken"] = request["jobName"].replace(".", "-")
    request["inputDataConfig"] = {"s3InputDataConfig": {"s3Uri": f"s3://{bucket}/{key}"}}
    request["outputDataConfig"] = {"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/sdk-check/out/"}}
    arn = bedrock.create_model_invocation_job(**request)["jobArn"]
    again = bedrock.create_model_invocation_job(**request)["jobArn"]
    if again != arn:
        sys.exit(f"the same clientRequestToken made a second job: {arn} then {again}")
    deadline = time.time() + 30
    while True:
        job = bedrock.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in ("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"):
            break
        if time.time() > deadline:
            sys.exit(f"job still {job['status']} after 30 s")
        time.sleep(0.1)
    if job["status"] != "Completed":
        sys.exit(f"job ended {job['status']}: {job.get('message')}")
    for field in ("submitTime", "lastModifiedTime", "endTime"):
        if not hasattr(job.get(field), "year"):
            sys.exit(f"{field} did not parse as a timestamp: {job.get(field)!r}")
    listed = bedrock.list_model_invocation_jobs(nameContains=request["jobName"])
    names = [summary["jobName"] for summary in listed["invocationJobSummaries"]]
    if names != [request["jobName"]]:
        sys.exit(f"listing by name found {names}")
    job_id = arn.rsplit("/", 1)[1]
    output = s3.get_object(Bucket=bucket, Key=f"sdk-check/out/{job_id}/input.jsonl.out")
    lines = output["Body"].read().decode().splitlines()
    ids = {json.loads(line)["recordId"] for line in lines}
    if len(lines) != count or len(ids) != count:
        sys.exit(f"output holds {len(lines)} lines for {count} records")
    manifest = s3.get_object(Bucket=bucket, Key=f"sdk-check/out/{job_id}/manifest.json.out")
    counts = json.loads(manifest["Body"].read())
    if counts.get("totalRecordCount") != count:
        sys.exit(f"manifest: {counts}")
    second = dict(request, jobName=request["jobName"] + "-stop",
                  clientRequestToken=request["clientRequestToken"] + "-stop")
    stopped = bedrock.create_model_invocation_job(**second)["jobArn"]
    bedrock.stop_model_invocation_job(jobIdentifier=stopped)
    status = bedrock.get_model_invocation_job(jobIdentifier=stopped)["status"]
    if status not in ("Stopping", "Stopped"):
        sys.exit(f"a stopped job is {status}")


def main() -> None:
    lines, create, sim, s3_endpoint, bucket = sys.argv[1:6]
    request = check_create(create)
    records = check_lines(lines, request["modelId"])
    drive(request, lines, sim, s3_endpoint, bucket, len(records))
    print(f"checked {len(records)} records against anthropic {anthropic.__version__} and a "
          f"create against botocore {botocore.__version__}'s bedrock model; boto3 drove a job "
          f"through the simulator")


if __name__ == "__main__":
    main()
