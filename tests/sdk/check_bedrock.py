"""Bedrock batch records and job creation as rowsmith renders them, checked against code and
data we did not write (pinned in scripts/tools-requirements.txt), then driven through the
simulator by the official AWS SDK:
  check_bedrock.py LINES CREATE_REQUEST SIM_URL S3_ENDPOINT BUCKET KEYS_JSON
- each line is {recordId, modelInput}; recordId is alphanumeric; modelInput is Claude's
  InvokeModel body: AWS's `anthropic_version` "bedrock-2023-05-31", and the rest with the
  job's model put back is the `anthropic` SDK's `MessageCreateParamsNonStreaming`, unknown
  keys refused at every level (the SDK's own Bedrock client pops `model` the same way);
- CREATE_REQUEST (the body rowsmith's client sends) is a `CreateModelInvocationJob` input of
  botocore's service model: botocore's validator (types, required members, lengths, ranges)
  plus every `pattern` of the model, matched in full;
- boto3, pointed at the simulator, creates that job again from the lines put into S3
  (moto), reads it back until it ends, finds it in the listing by name, stops a second job,
  and reads the output file, whose every line parses and joins a recordId;
- every control-plane request the simulator received (rowsmith's client's and boto3's) has
  its SigV4 signature recomputed by botocore's `SigV4Auth` from what arrived (KEYS_JSON maps
  access key ids to their secrets) and must match: a signature AWS would refuse fails here.
Exits 1 with the first misfit."""
import json
import re
import sys
import time
import urllib.request

import anthropic
import boto3
import botocore
import botocore.session
from botocore.config import Config
from botocore.validate import ParamValidator
from pydantic import TypeAdapter, ValidationError

from check_contract import forbid_extras

BEDROCK_VERSION = "bedrock-2023-05-31"
# boto3's own credentials against the simulator: its signatures must verify too, which checks
# the check.
SDK_KEY, SDK_SECRET = "AKIDSDKCHECK", "sdk-check-secret"


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
    session = dict(region_name="us-east-1", aws_access_key_id=SDK_KEY,
                   aws_secret_access_key=SDK_SECRET)
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


AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, ?"
    r"SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})")


def verify_signatures(sim: str, secrets: dict) -> dict:
    """Recomputes with botocore the signature of every request the simulator kept."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    with urllib.request.urlopen(f"{sim}/sim/bedrock/requests") as answer:
        seen = json.load(answer)
    checked = {}
    for number, request in enumerate(seen):
        headers = request["headers"]
        match = AUTHORIZATION.fullmatch(headers.get("authorization", ""))
        where = f"request {number} ({request['method']} {request['path']})"
        if not match:
            sys.exit(f"{where}: not a SigV4 Authorization: {headers.get('authorization')!r}")
        key, day, region, service, signed, signature = match.groups()
        if key not in secrets:
            sys.exit(f"{where}: signed with an unknown key {key}")
        url = sim + request["path"] + (f"?{request['query']}" if request["query"] else "")
        aws = AWSRequest(method=request["method"], url=url, data=request["body"].encode(),
                         headers={name: headers[name] for name in signed.split(";")})
        aws.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(Credentials(key, secrets[key], headers.get("x-amz-security-token")),
                           service, region)
        canonical = signer.canonical_request(aws)
        expected = signer.signature(signer.string_to_sign(aws, canonical), aws)
        if expected != signature or day != headers["x-amz-date"][:8]:
            sys.exit(f"{where}: signature {signature} is not botocore's {expected} for\n{canonical}")
        checked[key] = checked.get(key, 0) + 1
    return checked


def main() -> None:
    lines, create, sim, s3_endpoint, bucket, keys = sys.argv[1:7]
    secrets = json.loads(keys)
    secrets[SDK_KEY] = SDK_SECRET
    request = check_create(create)
    records = check_lines(lines, request["modelId"])
    drive(request, lines, sim, s3_endpoint, bucket, len(records))
    signed = verify_signatures(sim, secrets)
    if set(signed) != set(secrets):
        sys.exit(f"requests signed per key: {signed}; expected some from each of {sorted(secrets)}")
    print(f"checked {len(records)} records against anthropic {anthropic.__version__} and a "
          f"create against botocore {botocore.__version__}'s bedrock model; boto3 drove a job "
          f"through the simulator; botocore recomputed the SigV4 signatures of {signed}")


if __name__ == "__main__":
    main()
