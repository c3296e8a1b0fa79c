//! AWS Bedrock batch inference (model invocation jobs) as its control plane serves it:
//! REST-JSON on `/model-invocation-job[s]` (create, get, list, stop), errors as
//! `x-amzn-ErrorType` plus `{"message"}`, and the job's files in S3 (an S3-compatible server,
//! `sim.bedrock_s3`), not behind the simulator: the input JSONL is read at create, and on
//! ending the job writes `{output}/{jobId}/{input file}.out` and `manifest.json.out`.
//!
//! Create checks the request as the service model does (patterns, ranges, unknown members),
//! replays a repeated `clientRequestToken`, refuses a reused `jobName` (ConflictException) and
//! more running jobs than `bedrock_max_jobs` (ServiceQuotaExceededException, 400). What is
//! wrong with the input file fails the job after Validating, with a `message`, as Bedrock
//! validates asynchronously; what is wrong with a record's `modelInput` is only that record's
//! error line, the job still Completed. The state advances lazily from the elapsed time:
//! Submitted, Validating, Scheduled, InProgress, then Completed (or Expired,
//! PartiallyCompleted for `expire_shards`; Stopping, Stopped after a stop).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use rowsmith_config::{S3Settings, SimFaults, SimSettings, StoreSettings};
use rowsmith_store::{StorageError, Store};

use crate::bedrock_state::{BedrockState, Counts, Ended, Job, Record, S3Location};
use crate::faults::{Fate, fate, with_room};
use crate::openai::{Shared, SimState, lock};

/// The account every job ARN names.
const ACCOUNT: &str = "123456789012";
/// The region of a job created without a SigV4 credential scope (a Bedrock API key).
const DEFAULT_REGION: &str = "us-east-1";
/// How long a validated job stays Scheduled before it starts.
const SCHEDULED: Duration = Duration::from_millis(5);
/// Bedrock's "Records per batch inference job" quota.
const MAX_RECORDS: usize = 50_000;
/// The tag naming the job's rowsmith shard, `<job>.<attempt>.<shard>`.
const SHARD_TAG: &str = "rowsmith-shard";
/// The label of jobs without a shard tag (permanent failures in `/sim/stats`, fates).
const STATS_JOB: &str = "bedrock";
/// The one `anthropic_version` Claude on Bedrock takes.
const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";
/// The keys of a Claude InvokeModel body (Bedrock's Messages parameters).
const MODEL_INPUT_KEYS: &[&str] = &[
    "anthropic_version",
    "anthropic_beta",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "metadata",
    "output_config",
];
const CREATE_MEMBERS: &[&str] = &[
    "jobName",
    "roleArn",
    "clientRequestToken",
    "modelId",
    "inputDataConfig",
    "outputDataConfig",
    "vpcConfig",
    "timeoutDurationInHours",
    "tags",
    "modelInvocationType",
];
const STATUSES: &[&str] = &[
    "Submitted",
    "InProgress",
    "Completed",
    "Failed",
    "Stopping",
    "Stopped",
    "PartiallyCompleted",
    "Expired",
    "Validating",
    "Scheduled",
];
const JOB_NAME_PATTERN: &str = r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}";
const TOKEN_PATTERN: &str = "[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}";
const IDENTIFIER_PATTERN: &str =
    "((arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?[a-z0-9]{12})";
/// Prefix of the opaque `nextToken` of a list page.
const PAGE_TOKEN_PREFIX: &str = "bdrk1-";

/// An error as Bedrock answers it: the type in `x-amzn-ErrorType`, `{"message"}` as body.
pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let mut response = (status, Json(json!({"message": message}))).into_response();
    if let Ok(value) = HeaderValue::from_str(kind) {
        response.headers_mut().insert("x-amzn-errortype", value);
    }
    response
}

fn validation(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

fn not_found(identifier: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        &format!("The batch inference job {identifier} could not be found."),
    )
}

/// The message of a member that fails a constraint, worded as the service words it.
fn invalid(member: &str, value: &str, constraint: &str) -> String {
    format!(
        "1 validation error detected: Value '{value}' at '{member}' failed to satisfy \
         constraint: Member must {constraint}"
    )
}

fn pattern(member: &str, value: &str, pattern: &str) -> String {
    invalid(
        member,
        value,
        &format!("satisfy regular expression pattern: {pattern}"),
    )
}

/// The region of the call's SigV4 credential scope (`Credential=<key>/<day>/<region>/…`);
/// `us-east-1` for a Bedrock API key.
fn region_of(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split("Credential=").nth(1))
        .and_then(|scope| scope.split(['/', ',']).nth(2))
        .filter(|region| !region.is_empty())
        .unwrap_or(DEFAULT_REGION)
        .to_owned()
}

/// The `rowsmith-shard` tag of a create body, if it has one.
pub(crate) fn shard_tag(body: &Value) -> Option<String> {
    body.get("tags")?
        .as_array()?
        .iter()
        .find(|tag| tag.get("key").and_then(Value::as_str) == Some(SHARD_TAG))?
        .get("value")?
        .as_str()
        .map(str::to_owned)
}

/// `(job_id, attempt, shard)` of a `<job>.<attempt>.<shard>` tag value.
fn shard_parts(dotted: &str) -> Option<(String, u32, u32)> {
    let mut parts = dotted.rsplitn(3, '.');
    let shard = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let job = parts.next().filter(|job| !job.is_empty())?;
    Some((job.to_owned(), attempt, shard))
}

/// `%XX` escapes decoded (the job identifier of an HTTP path, as the fault layer sees it).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes
            .get(index + 1..index + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[index], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The faults of the job whose Bedrock job a get or stop path names (its shard tag), if it
/// names one the simulator holds.
pub(crate) fn faults_of_path(state: &SimState, path: &str) -> Option<SimFaults> {
    let identifier = path
        .strip_prefix("/model-invocation-job/")?
        .split('/')
        .next()?;
    let identifier = percent_decode(identifier);
    let id = identifier.rsplit('/').next()?;
    let job = state.bedrock.jobs.get(id)?;
    Some(state.faults_of_metadata(&job.metadata))
}

fn bucket_ok(bucket: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&bucket.len())
        && edge(bucket.chars().next())
        && edge(bucket.chars().last())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// An `s3://bucket[/key]` URI as the service model's `S3Uri` pattern allows it.
fn s3_location(uri: &str) -> Option<S3Location> {
    let rest = uri.strip_prefix("s3://").filter(|_| uri.len() <= 1024)?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let key = key.strip_suffix('/').unwrap_or(key);
    let segment_ok = |segment: &str| {
        !segment.is_empty()
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-!_*'().".contains(c))
    };
    let key_ok = key.is_empty() || key.split('/').all(segment_ok);
    (bucket_ok(bucket) && key_ok).then(|| S3Location {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    })
}

fn job_name_ok(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn token_ok(token: &str) -> bool {
    (1..=256).contains(&token.len())
        && token.starts_with(|c: char| c.is_ascii_alphanumeric())
        && token.ends_with(|c: char| c.is_ascii_alphanumeric())
        && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// `arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+`.
fn role_arn_ok(arn: &str) -> bool {
    let Some(rest) = arn.strip_prefix("arn:aws") else {
        return false;
    };
    let Some((partition, rest)) = rest.split_once(":iam::") else {
        return false;
    };
    let partition_ok = partition.is_empty()
        || (partition.len() > 1 && partition.starts_with('-') && !partition.contains(':'));
    let Some((account, role)) = rest.split_once(":role/") else {
        return false;
    };
    let account_ok =
        account.is_empty() || (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()));
    arn.len() <= 2048 && partition_ok && account_ok && !role.is_empty()
}

/// A model id, inference profile or model ARN, loosely: the characters the pattern allows.
fn model_id_ok(model: &str) -> bool {
    (1..=2048).contains(&model.len())
        && model
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

fn account_ok(account: &str) -> bool {
    account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())
}

/// `[a-zA-Z0-9\s._:/=+@-]*`, the pattern of tag keys and values.
fn tag_text_ok(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || c.is_whitespace() || "._:/=+@-".contains(c))
}

/// What a create asks for, checked.
#[derive(Debug)]
struct CreateRequest {
    name: String,
    role_arn: String,
    model_id: String,
    token: Option<String>,
    input_config: Value,
    output_config: Value,
    input: S3Location,
    input_uri: String,
    output: S3Location,
    timeout_hours: i64,
    invocation_type: String,
    vpc_config: Option<Value>,
    shard: Option<String>,
}

/// A member's value, `None` when absent or null.
fn member<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).filter(|value| !value.is_null())
}

fn string_member(object: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match member(object, name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(invalid(name, &other.to_string(), "be a string")),
    }
}

fn required_string(object: &Map<String, Value>, name: &str) -> Result<String, String> {
    string_member(object, name)?.ok_or_else(|| {
        format!(
            "1 validation error detected: Value null at '{name}' failed to satisfy constraint: \
             Member must not be null"
        )
    })
}

/// The members of `object` (at `path`) outside `known`: the first is refused.
fn unknown_member(object: &Map<String, Value>, known: &[&str], path: &str) -> Result<(), String> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(format!(
            "1 validation error detected: '{path}{key}' is not a member of the request: \
             unknown members are not accepted"
        )),
        None => Ok(()),
    }
}

/// A data config union (`inputDataConfig`, `outputDataConfig`): its one `s3…DataConfig`
/// member, its members checked, and where `s3Uri` points.
fn data_config(
    object: &Map<String, Value>,
    name: &str,
    inner: &str,
    known: &[&str],
) -> Result<(Value, S3Location, String), String> {
    let config = member(object, name).ok_or_else(|| {
        format!("1 validation error detected: Value null at '{name}' failed to satisfy constraint: Member must not be null")
    })?;
    let config_object = config
        .as_object()
        .ok_or_else(|| invalid(name, &config.to_string(), "be a structure"))?;
    unknown_member(config_object, &[inner], &format!("{name}."))?;
    let path = format!("{name}.{inner}");
    let s3 = member(config_object, inner)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("1 validation error detected: Value null at '{path}' failed to satisfy constraint: Member must not be null"))?;
    unknown_member(s3, known, &format!("{path}."))?;
    let uri = required_string(s3, "s3Uri")
        .map_err(|m| m.replace("'s3Uri'", &format!("'{path}.s3Uri'")))?;
    let location = s3_location(&uri).ok_or_else(|| {
        pattern(
            &format!("{path}.s3Uri"),
            &uri,
            "s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?",
        )
    })?;
    if let Some(owner) = string_member(s3, "s3BucketOwner")?
        && !account_ok(&owner)
    {
        return Err(pattern(
            &format!("{path}.s3BucketOwner"),
            &owner,
            "[0-9]{12}",
        ));
    }
    if let Some(format) = string_member(s3, "s3InputFormat")?
        && format != "JSONL"
    {
        return Err(invalid(
            &format!("{path}.s3InputFormat"),
            &format,
            "satisfy enum value set: [JSONL]",
        ));
    }
    Ok((config.clone(), location, uri))
}

/// The `tags` list checked; the `rowsmith-shard` tag's value.
fn tags(object: &Map<String, Value>) -> Result<Option<String>, String> {
    let Some(tags) = member(object, "tags") else {
        return Ok(None);
    };
    let list = tags
        .as_array()
        .ok_or_else(|| invalid("tags", &tags.to_string(), "be a list"))?;
    if list.len() > 200 {
        return Err(invalid(
            "tags",
            &list.len().to_string(),
            "have length less than or equal to 200",
        ));
    }
    let mut shard = None;
    for (index, tag) in list.iter().enumerate() {
        let path = format!("tags.{}", index + 1);
        let tag = tag
            .as_object()
            .ok_or_else(|| invalid(&path, &tag.to_string(), "be a structure"))?;
        unknown_member(tag, &["key", "value"], &format!("{path}."))?;
        let key = required_string(tag, "key")?;
        let value = required_string(tag, "value")?;
        if !(1..=128).contains(&key.len()) || !tag_text_ok(&key) {
            return Err(pattern(
                &format!("{path}.member.key"),
                &key,
                r"[a-zA-Z0-9\s._:/=+@-]*",
            ));
        }
        if value.len() > 256 || !tag_text_ok(&value) {
            return Err(pattern(
                &format!("{path}.member.value"),
                &value,
                r"[a-zA-Z0-9\s._:/=+@-]*",
            ));
        }
        if key == SHARD_TAG {
            shard = Some(value);
        }
    }
    Ok(shard)
}

/// `vpcConfig`: `subnetIds` (1 to 16) and `securityGroupIds` (1 to 5), lists of strings.
fn vpc_config(object: &Map<String, Value>) -> Result<Option<Value>, String> {
    let Some(vpc) = member(object, "vpcConfig") else {
        return Ok(None);
    };
    let vpc_object = vpc
        .as_object()
        .ok_or_else(|| invalid("vpcConfig", &vpc.to_string(), "be a structure"))?;
    unknown_member(vpc_object, &["subnetIds", "securityGroupIds"], "vpcConfig.")?;
    for (name, most) in [("subnetIds", 16), ("securityGroupIds", 5)] {
        let ids = member(vpc_object, name).and_then(Value::as_array);
        let ok = ids
            .is_some_and(|ids| (1..=most).contains(&ids.len()) && ids.iter().all(Value::is_string));
        if !ok {
            return Err(invalid(
                &format!("vpcConfig.{name}"),
                &vpc_object
                    .get(name)
                    .map(Value::to_string)
                    .unwrap_or_default(),
                &format!("be a list of 1 to {most} strings"),
            ));
        }
    }
    Ok(Some(vpc.clone()))
}

/// A create body checked as the service model's `CreateModelInvocationJobRequest`.
fn parse_create(body: &Value) -> Result<CreateRequest, String> {
    let object = body
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    unknown_member(object, CREATE_MEMBERS, "")?;
    let name = required_string(object, "jobName")?;
    if !job_name_ok(&name) {
        return Err(pattern("jobName", &name, JOB_NAME_PATTERN));
    }
    let role_arn = required_string(object, "roleArn")?;
    if !role_arn_ok(&role_arn) {
        return Err(pattern(
            "roleArn",
            &role_arn,
            "arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+",
        ));
    }
    let model_id = required_string(object, "modelId")?;
    if !model_id_ok(&model_id) {
        return Err(invalid(
            "modelId",
            &model_id,
            "be a model id, inference profile or model ARN",
        ));
    }
    let token = string_member(object, "clientRequestToken")?;
    if let Some(token) = token.as_deref().filter(|token| !token_ok(token)) {
        return Err(pattern("clientRequestToken", token, TOKEN_PATTERN));
    }
    let (input_config, input, input_uri) = data_config(
        object,
        "inputDataConfig",
        "s3InputDataConfig",
        &["s3InputFormat", "s3Uri", "s3BucketOwner"],
    )?;
    let (output_config, output, _) = data_config(
        object,
        "outputDataConfig",
        "s3OutputDataConfig",
        &["s3Uri", "s3EncryptionKeyId", "s3BucketOwner"],
    )?;
    let timeout_hours = match member(object, "timeoutDurationInHours") {
        None => 24,
        Some(value) => match value.as_i64() {
            Some(hours) if (24..=168).contains(&hours) => hours,
            _ => {
                return Err(invalid(
                    "timeoutDurationInHours",
                    &value.to_string(),
                    "have value between 24 and 168",
                ));
            }
        },
    };
    let invocation_type =
        string_member(object, "modelInvocationType")?.unwrap_or_else(|| "InvokeModel".into());
    if !matches!(invocation_type.as_str(), "InvokeModel" | "Converse") {
        return Err(invalid(
            "modelInvocationType",
            &invocation_type,
            "satisfy enum value set: [InvokeModel, Converse]",
        ));
    }
    Ok(CreateRequest {
        name,
        role_arn,
        model_id,
        token,
        input_config,
        output_config,
        input,
        input_uri,
        output,
        timeout_hours,
        invocation_type,
        vpc_config: vpc_config(object)?,
        shard: tags(object)?,
    })
}

fn open_store(s3: &S3Settings, bucket: &str) -> Result<Store, StorageError> {
    Store::open(&StoreSettings {
        url: format!("s3://{bucket}"),
        s3: s3.clone(),
        allowed_inputs: vec![],
    })
}

/// The input file's records, or why validation fails the job.
async fn read_records(
    s3: &S3Settings,
    request: &CreateRequest,
    min: u64,
) -> Result<Vec<Record>, String> {
    let uri = &request.input_uri;
    let file = request.input.key.rsplit('/').next().unwrap_or_default();
    if !file.ends_with(".jsonl") {
        return Err(format!(
            "The input {uri} is not a .jsonl file: batch inference reads JSONL files only."
        ));
    }
    let store = open_store(s3, &request.input.bucket)
        .map_err(|e| format!("Unable to access the input S3 location {uri}: {e}"))?;
    let bytes = match store.get_bytes(&request.input.key).await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound { .. }) => {
            return Err(format!(
                "Unable to read the input {uri}: s3 object not found."
            ));
        }
        Err(e) => return Err(format!("Unable to read the input {uri}: {e}")),
    };
    parse_records(&bytes, file, min)
}

/// An input file's lines as records: each a JSON object with a unique `recordId` and a
/// `modelInput`, `min` to 50,000 of them.
fn parse_records(bytes: &[u8], file: &str, min: u64) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for (number, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let number = number + 1;
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(line) else {
            return Err(format!(
                "Line {number} of {file} is not a valid JSON object: each record must be one."
            ));
        };
        let Some(record_id) = object
            .get("recordId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return Err(format!(
                "Line {number} of {file} has no recordId (a string)."
            ));
        };
        let Some(model_input) = object.remove("modelInput") else {
            return Err(format!("Line {number} of {file} has no modelInput."));
        };
        if !seen.insert(record_id.clone()) {
            return Err(format!(
                "Line {number} of {file}: the recordId {record_id} is a duplicate of an earlier \
                 record's."
            ));
        }
        records.push(Record {
            record_id,
            model_input,
        });
    }
    let count = records.len();
    if (count as u64) < min {
        return Err(format!(
            "The number of records ({count}) in the input is less than the minimum of {min} \
             records per batch inference job."
        ));
    }
    if count > MAX_RECORDS {
        return Err(format!(
            "The number of records ({count}) in the input exceeds the maximum of {MAX_RECORDS} \
             records per batch inference job."
        ));
    }
    Ok(records)
}

/// The answer to a create that an earlier one settles: the same token replays its job, the
/// same name with another token is a conflict.
fn earlier_job(state: &mut SimState, request: &CreateRequest) -> Option<Response> {
    let bedrock = &mut state.bedrock;
    let replayed = request
        .token
        .as_ref()
        .and_then(|token| bedrock.tokens.get(token))
        .and_then(|id| bedrock.jobs.get(id))
        .map(|job| job.arn.clone());
    if let Some(arn) = replayed {
        bedrock.idempotent_replays += 1;
        return Some(Json(json!({"jobArn": arn})).into_response());
    }
    if bedrock.jobs.values().any(|job| job.name == request.name) {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "ConflictException",
            &format!(
                "A batch inference job named {} already exists in this account and region.",
                request.name
            ),
        ));
    }
    None
}

/// ServiceQuotaExceededException (400) when `bedrock_max_jobs` jobs are submitted or running.
fn over_quota(state: &SimState) -> Option<Response> {
    let now = Instant::now();
    let running = state
        .bedrock
        .jobs
        .values()
        .filter(|job| matches!(phase(job, &state.settings, now), Phase::Running { .. }))
        .count();
    let quota = state.settings.bedrock_max_jobs;
    (running >= quota).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "ServiceQuotaExceededException",
            &format!(
                "You have reached the quota of {quota} submitted and in-progress batch inference \
                 jobs ({running} now). Wait for some to end, or request a quota increase."
            ),
        )
    })
}

fn new_job_id(bedrock: &BedrockState) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    loop {
        let id: String = (0..12)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        if !bedrock.jobs.contains_key(&id) {
            return id;
        }
    }
}

/// Makes the job a create asks for; its ARN.
fn add_job(
    state: &mut SimState,
    request: CreateRequest,
    records: Result<Vec<Record>, String>,
    region: &str,
) -> String {
    let id = new_job_id(&state.bedrock);
    let arn = format!("arn:aws:bedrock:{region}:{ACCOUNT}:model-invocation-job/{id}");
    let metadata = request
        .shard
        .as_ref()
        .map(|shard| json!({"rowsmith_shard": shard}));
    let (job_label, attempt) = match request.shard.as_deref().and_then(shard_parts) {
        Some((job, attempt, _)) => (job, attempt),
        None => (STATS_JOB.to_owned(), 1),
    };
    let faults = state.faults_of_metadata(&metadata);
    let mut expires_after = None;
    if attempt == 1 {
        let ordinal = state.bedrock.first_attempt_jobs;
        state.bedrock.first_attempt_jobs += 1;
        if faults.expire_shards.contains(&ordinal) {
            let total = records.as_ref().map_or(0, Vec::len);
            let fraction = faults.expire_at_fraction.clamp(0.0, 1.0);
            // Any fraction above 0 starts the job: it processes at least one record.
            expires_after = Some(if fraction <= 0.0 {
                0
            } else {
                ((total as f64 * fraction) as usize).max(1)
            });
        }
    }
    state.count_for_shard(&metadata);
    let file = request.input.key.rsplit('/').next().unwrap_or_default();
    tracing::debug!(job = %id, name = %request.name, file, "bedrock job created");
    let job = Job {
        id: id.clone(),
        arn: arn.clone(),
        name: request.name,
        model_id: request.model_id,
        token: request.token.clone(),
        role_arn: request.role_arn,
        input_config: request.input_config,
        output_config: request.output_config,
        vpc_config: request.vpc_config,
        timeout_hours: request.timeout_hours,
        invocation_type: request.invocation_type,
        input: request.input,
        output: request.output,
        records: records.map(Arc::new),
        metadata,
        job_label,
        attempt,
        created: Instant::now(),
        submit_time: OffsetDateTime::now_utc(),
        expires_after,
        stop: None,
        finishing: false,
        ended: None,
    };
    state.bedrock.jobs.insert(id.clone(), job);
    state.bedrock.order.push(id.clone());
    if let Some(token) = request.token {
        state.bedrock.tokens.insert(token, id);
    }
    arn
}

/// `POST /model-invocation-job`: CreateModelInvocationJob. The input is read before the
/// state is locked; what it holds decides the job's validation.
pub(crate) async fn create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("The request body is not valid JSON: {e}"))
        .and_then(|body| parse_create(&body));
    let request = match parsed {
        Ok(request) => request,
        Err(message) => return validation(&message),
    };
    let (s3, min) = {
        let mut state = lock(&state);
        if let Some(answer) = earlier_job(&mut state, &request) {
            return answer;
        }
        (
            state.settings.bedrock_s3.clone(),
            state.settings.bedrock_min_records,
        )
    };
    let records = read_records(&s3, &request, min).await;
    let mut state = lock(&state);
    if let Some(answer) = earlier_job(&mut state, &request) {
        return answer;
    }
    if let Some(refusal) = over_quota(&state) {
        return refusal;
    }
    let arn = add_job(&mut state, request, records, &region_of(&headers));
    Json(json!({"jobArn": arn})).into_response()
}

/// Where a job stands at some instant, by the clock alone.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Not ended: its status, since when, and the records done so far.
    Running {
        status: &'static str,
        since: Instant,
        done: usize,
    },
    /// A terminal state reached at `at` with `done` records processed, not yet recorded.
    Ending {
        status: &'static str,
        at: Instant,
        done: usize,
    },
    /// Its ending recorded (`Job::ended`).
    Ended,
}

/// The job's phase at `now`: Submitted for the first half of `validating`, Validating for
/// the rest (then Failed if its input was bad), Scheduled briefly, InProgress at
/// `rows_per_second`, Completed `finalizing` after the last record; an expiring job ends
/// Expired instead of starting or PartiallyCompleted part-way, a stopped one Stopped
/// `cancelling` after the stop.
fn phase(job: &Job, settings: &SimSettings, now: Instant) -> Phase {
    if job.ended.is_some() {
        return Phase::Ended;
    }
    let validated = job.created + settings.validating;
    let start = validated + SCHEDULED;
    let total = job.records.as_ref().map_or(0, |records| records.len());
    let rate = settings.rows_per_second.max(1e-9);
    let done_at = |at: Instant| -> usize {
        ((at.saturating_duration_since(start).as_secs_f64() * rate) as usize).min(total)
    };
    if job.records.is_err() && now >= validated {
        return Phase::Ending {
            status: "Failed",
            at: validated,
            done: 0,
        };
    }
    let limit = job.expires_after.map(|limit| limit.min(total));
    let (natural, natural_at, natural_done) = match limit {
        Some(0) => ("Expired", start, 0),
        Some(limit) => (
            "PartiallyCompleted",
            start + Duration::from_secs_f64(limit as f64 / rate),
            limit,
        ),
        None => (
            "Completed",
            start + Duration::from_secs_f64(total as f64 / rate) + settings.finalizing,
            total,
        ),
    };
    if let Some(stop) = job.stop {
        let done = done_at(stop).min(natural_done);
        let at = stop + settings.cancelling;
        return match now >= at {
            true => Phase::Ending {
                status: "Stopped",
                at,
                done,
            },
            false => Phase::Running {
                status: "Stopping",
                since: stop,
                done,
            },
        };
    }
    if now >= natural_at {
        return Phase::Ending {
            status: natural,
            at: natural_at,
            done: natural_done,
        };
    }
    let (status, since) = if now < job.created + settings.validating / 2 {
        ("Submitted", job.created)
    } else if now < validated {
        ("Validating", job.created + settings.validating / 2)
    } else if now < start {
        ("Scheduled", validated)
    } else {
        ("InProgress", start)
    };
    let done = match status {
        "InProgress" => done_at(now).min(natural_done),
        _ => 0,
    };
    Phase::Running {
        status,
        since,
        done,
    }
}

/// `at` on the wall clock of the job's `submitTime`.
fn wall(job: &Job, at: Instant) -> OffsetDateTime {
    job.submit_time + at.saturating_duration_since(job.created)
}

fn iso(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

/// The fate of a record as the job's faults decide it, cut off when `max_tokens` leaves too
/// little room.
fn record_fate(faults: &SimFaults, job: &Job, record: &Record) -> Fate {
    with_room(
        faults,
        record.model_input.get("max_tokens").and_then(Value::as_u64),
        fate(
            faults,
            &job.job_label,
            job.attempt,
            &job.id,
            &record.record_id,
        ),
    )
}

/// Why a `modelInput` is not a Claude InvokeModel body: a missing required key, another
/// `anthropic_version`, or a key the body does not declare (`model`, `stream`, …).
fn model_input_refusal(input: &Value) -> Option<String> {
    let Some(object) = input.as_object() else {
        return Some("modelInput: Input should be a valid dictionary".into());
    };
    for required in ["anthropic_version", "max_tokens", "messages"] {
        if !object.contains_key(required) {
            return Some(format!("{required}: Field required"));
        }
    }
    if object["anthropic_version"] != ANTHROPIC_VERSION {
        return Some(format!(
            "anthropic_version: Input should be '{ANTHROPIC_VERSION}'"
        ));
    }
    if let Some(extra) = object
        .keys()
        .find(|key| !MODEL_INPUT_KEYS.contains(&key.as_str()))
    {
        return Some(format!("{extra}: Extra inputs are not permitted"));
    }
    if object["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Some("max_tokens: Input should be a positive integer".into());
    }
    if object["messages"].as_array().is_none_or(Vec::is_empty) {
        return Some("messages: Input should be a non-empty list".into());
    }
    None
}

/// Why a record gets an error line instead of a `modelOutput`: `(errorCode, errorMessage)`.
fn record_error(job: &Job, model_input: &Value, fate: Fate) -> Option<(u16, String)> {
    if job.invocation_type == "Converse" {
        return Some((
            400,
            "The simulator answers the InvokeModel invocation type only (Claude Messages \
             bodies); Converse records are not simulated."
                .into(),
        ));
    }
    if let Some(message) = model_input_refusal(model_input) {
        return Some((400, message));
    }
    match fate {
        Fate::ServerError => Some((
            500,
            "The system encountered an unexpected error during processing. Try your request \
             again."
                .into(),
        )),
        Fate::BadRequest => Some((
            400,
            "Malformed input request: messages: the request is invalid, please reformat your \
             input and try again."
                .into(),
        )),
        _ => None,
    }
}

/// The counters of a running job that has done its first `done` records.
fn running_counts(state: &SimState, job: &Job, done: usize) -> Counts {
    let Ok(records) = &job.records else {
        return Counts::default();
    };
    let faults = state.faults_of_metadata(&job.metadata);
    let error = records
        .iter()
        .take(done)
        .filter(|record| {
            record_error(job, &record.model_input, record_fate(&faults, job, record)).is_some()
        })
        .count() as u64;
    Counts {
        total: records.len() as u64,
        processed: done as u64,
        success: done as u64 - error,
        error,
    }
}

/// How a job shows: status, when it last changed, its end, counters and failure message.
#[derive(Debug)]
struct Shown {
    status: &'static str,
    last_modified: OffsetDateTime,
    end: Option<OffsetDateTime>,
    counts: Counts,
    message: Option<String>,
}

fn shown(state: &SimState, job: &Job, phase: Phase) -> Shown {
    let running = |status: &'static str, since: Instant, done: usize| {
        let counts = match status {
            "InProgress" | "Stopping" => running_counts(state, job, done),
            _ => Counts::default(),
        };
        Shown {
            status,
            last_modified: wall(job, since),
            end: None,
            counts,
            message: None,
        }
    };
    match (phase, &job.ended) {
        (_, Some(ended)) => Shown {
            status: ended.status,
            last_modified: ended.at,
            end: Some(ended.at),
            counts: ended.counts,
            message: ended.message.clone(),
        },
        (
            Phase::Running {
                status,
                since,
                done,
            },
            None,
        ) => running(status, since, done),
        // Ending while another call writes its files: still running until they are there.
        (Phase::Ending { status, done, .. }, None) => {
            let start = job.created + state.settings.validating + SCHEDULED;
            match (status, job.stop) {
                ("Stopped", Some(stop)) => running("Stopping", stop, done),
                ("Expired", _) => running("Scheduled", start - SCHEDULED, 0),
                _ => running("InProgress", start, done),
            }
        }
        (Phase::Ended, None) => running("InProgress", job.created, 0),
    }
}

/// The job as GetModelInvocationJob (and a list summary) shows it.
fn job_object(job: &Job, shown: &Shown) -> Value {
    let mut object = json!({
        "jobArn": job.arn,
        "jobName": job.name,
        "modelId": job.model_id,
        "roleArn": job.role_arn,
        "status": shown.status,
        "submitTime": iso(job.submit_time),
        "lastModifiedTime": iso(shown.last_modified),
        "inputDataConfig": job.input_config,
        "outputDataConfig": job.output_config,
        "timeoutDurationInHours": job.timeout_hours,
        "jobExpirationTime": iso(job.submit_time + time::Duration::hours(job.timeout_hours)),
        "modelInvocationType": job.invocation_type,
        "totalRecordCount": shown.counts.total,
        "processedRecordCount": shown.counts.processed,
        "successRecordCount": shown.counts.success,
        "errorRecordCount": shown.counts.error,
    });
    if let Some(token) = &job.token {
        object["clientRequestToken"] = json!(token);
    }
    if let Some(message) = &shown.message {
        object["message"] = json!(message);
    }
    if let Some(end) = shown.end {
        object["endTime"] = json!(iso(end));
    }
    if let Some(vpc) = &job.vpc_config {
        object["vpcConfig"] = vpc.clone();
    }
    object
}

/// An ending's files, to be written before the ending is recorded.
#[derive(Debug)]
struct Finish {
    id: String,
    output: S3Location,
    /// The input file's name (`input.jsonl`): the output is `input.jsonl.out`.
    file: String,
    /// Expired jobs write the manifest only.
    lines: Option<Vec<String>>,
    manifest: Value,
    ended: Ended,
}

/// Answers the first `done` records of job `id` for its ending as `status` at `at`: each
/// by its fate (permanent failures and answers counted), the lines shuffled.
fn finish(
    state: &mut SimState,
    id: &str,
    status: &'static str,
    at: Instant,
    done: usize,
) -> Option<Finish> {
    let job = state.bedrock.jobs.get(id)?.clone();
    let faults = state.faults_of_metadata(&job.metadata);
    let records = job.records.clone().unwrap_or_default();
    let mut counts = Counts {
        total: records.len() as u64,
        processed: done as u64,
        ..Counts::default()
    };
    let (mut input_tokens, mut output_tokens) = (0u64, 0u64);
    let mut lines = Vec::with_capacity(done);
    for (index, record) in records.iter().take(done).enumerate() {
        let fate = record_fate(&faults, &job, record);
        if fate.is_permanent() {
            state
                .permanent_failures
                .entry(job.job_label.clone())
                .or_default()
                .insert(record.record_id.clone());
        }
        state.requests_answered += 1;
        let line = match record_error(&job, &record.model_input, fate) {
            Some((code, message)) => {
                counts.error += 1;
                json!({"recordId": record.record_id, "modelInput": record.model_input,
                       "error": {"errorCode": code, "errorMessage": message}})
            }
            None => {
                counts.success += 1;
                let message_id = format!("msg_bdrk_{index}_{}", job.id);
                let model = json!(job.model_id);
                let output = crate::anthropic::message(
                    &message_id,
                    index,
                    &record.model_input,
                    &model,
                    fate,
                );
                input_tokens += output["usage"]["input_tokens"].as_u64().unwrap_or(0);
                output_tokens += output["usage"]["output_tokens"].as_u64().unwrap_or(0);
                json!({"recordId": record.record_id, "modelInput": record.model_input,
                       "modelOutput": output})
            }
        };
        lines.push(line.to_string());
    }
    let seed = job
        .id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let manifest = json!({
        "totalRecordCount": counts.total,
        "processedRecordCount": counts.processed,
        "successRecordCount": counts.success,
        "errorRecordCount": counts.error,
        "inputTokenCount": input_tokens,
        "outputTokenCount": output_tokens,
    });
    Some(Finish {
        id: job.id.clone(),
        output: job.output.clone(),
        file: job
            .input
            .key
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned(),
        lines: (status != "Expired").then_some(lines),
        manifest,
        ended: Ended {
            status,
            at: wall(&job, at),
            counts,
            message: None,
        },
    })
}

/// Writes an ending's files to `{output}/{jobId}/`.
async fn put_outputs(s3: &S3Settings, finish: &Finish) -> Result<(), StorageError> {
    let store = open_store(s3, &finish.output.bucket)?;
    let dir = match finish.output.key.as_str() {
        "" => finish.id.clone(),
        prefix => format!("{prefix}/{}", finish.id),
    };
    if let Some(lines) = &finish.lines {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let key = format!("{dir}/{}.out", finish.file);
        store.put_bytes(&key, Bytes::from(text)).await?;
    }
    let manifest = Bytes::from(finish.manifest.to_string());
    store
        .put_bytes(&format!("{dir}/manifest.json.out"), manifest)
        .await
}

/// Writes an ending's files, then records the ending; a job whose output cannot be written
/// fails, as Bedrock's does without access to its output location.
async fn write_and_end(state: Shared, finish: Finish) {
    let s3 = lock(&state).settings.bedrock_s3.clone();
    let written = put_outputs(&s3, &finish).await;
    let mut state = lock(&state);
    let Some(job) = state.bedrock.jobs.get_mut(&finish.id) else {
        return;
    };
    job.finishing = false;
    job.ended = Some(match written {
        Ok(()) => finish.ended,
        Err(e) => {
            tracing::warn!(job = %finish.id, error = %e, "bedrock: the job's output could not be written");
            Ended {
                status: "Failed",
                message: Some(format!(
                    "Unable to write the output to s3://{}/{}: {e}",
                    finish.output.bucket, finish.output.key
                )),
                ..finish.ended
            }
        }
    });
}

/// The job's API object as it stands now. An ending it has reached is recorded first — its
/// files written outside the lock, by a task a dropped call cannot cut short — so that a
/// caller who sees it ended finds them.
async fn refresh(state: &Shared, id: &str) -> Option<Value> {
    loop {
        let finishing = {
            let mut guard = lock(state);
            let state = &mut *guard;
            let job = state.bedrock.jobs.get(id)?;
            match phase(job, &state.settings, Instant::now()) {
                Phase::Ending {
                    status: "Failed",
                    at,
                    ..
                } => {
                    let ended = Ended {
                        status: "Failed",
                        at: wall(job, at),
                        counts: Counts::default(),
                        message: job.records.as_ref().err().cloned(),
                    };
                    let job = state.bedrock.jobs.get_mut(id)?;
                    job.ended = Some(ended);
                    continue;
                }
                Phase::Ending { status, at, done } if !job.finishing => {
                    let finish = finish(state, id, status, at, done)?;
                    state.bedrock.jobs.get_mut(id)?.finishing = true;
                    finish
                }
                phase => return Some(job_object(job, &shown(state, job, phase))),
            }
        };
        if tokio::spawn(write_and_end(state.clone(), finishing))
            .await
            .is_err()
        {
            return None;
        }
    }
}

/// Why a job identifier names no job.
#[derive(Debug)]
enum Unresolved {
    /// Not of an identifier's shape (400 ValidationException, with this message).
    Invalid(String),
    /// No such job (404).
    NotFound,
}

impl Unresolved {
    fn response(self, identifier: &str) -> Response {
        match self {
            Unresolved::Invalid(message) => validation(&message),
            Unresolved::NotFound => not_found(identifier),
        }
    }
}

/// The id of the job an identifier (the ARN or the bare id) names.
fn resolve(state: &SimState, identifier: &str) -> Result<String, Unresolved> {
    let (arn, id) = match identifier.rsplit_once("model-invocation-job/") {
        Some((_, id)) => (Some(identifier), id),
        None => (None, identifier),
    };
    let id_ok = id.len() == 12
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let arn_ok = arn.is_none_or(|arn| arn.starts_with("arn:aws") && arn.contains(":bedrock:"));
    if !id_ok || !arn_ok {
        return Err(Unresolved::Invalid(pattern(
            "jobIdentifier",
            identifier,
            IDENTIFIER_PATTERN,
        )));
    }
    match state.bedrock.jobs.get(id) {
        Some(job) if arn.is_none_or(|arn| arn == job.arn) => Ok(id.to_owned()),
        _ => Err(Unresolved::NotFound),
    }
}

/// `GET /model-invocation-job/{jobIdentifier}`: GetModelInvocationJob.
pub(crate) async fn get(State(state): State<Shared>, Path(identifier): Path<String>) -> Response {
    let resolved = resolve(&lock(&state), &identifier);
    let id = match resolved {
        Ok(id) => id,
        Err(unresolved) => return unresolved.response(&identifier),
    };
    match refresh(&state, &id).await {
        Some(object) => Json(object).into_response(),
        None => not_found(&identifier),
    }
}

/// `POST /model-invocation-job/{jobIdentifier}/stop`: StopModelInvocationJob. A running job
/// shows Stopping, then Stopped with what it had done; an ended one cannot be stopped.
pub(crate) async fn stop(State(state): State<Shared>, Path(identifier): Path<String>) -> Response {
    let resolved = resolve(&lock(&state), &identifier);
    let id = match resolved {
        Ok(id) => id,
        Err(unresolved) => return unresolved.response(&identifier),
    };
    if refresh(&state, &id).await.is_none() {
        return not_found(&identifier);
    }
    let mut guard = lock(&state);
    let state = &mut *guard;
    let now = Instant::now();
    let Some(job) = state.bedrock.jobs.get_mut(&id) else {
        return not_found(&identifier);
    };
    let status = match phase(job, &state.settings, now) {
        Phase::Running {
            status: "Stopping", ..
        } => return Json(json!({})).into_response(),
        Phase::Running { .. } => {
            job.stop = Some(now);
            return Json(json!({})).into_response();
        }
        Phase::Ending { status, .. } => status,
        Phase::Ended => job.ended.as_ref().map_or("ended", |ended| ended.status),
    };
    validation(&format!(
        "The batch inference job {} is {status}: only a job that has not ended can be stopped.",
        job.arn
    ))
}

/// What ListModelInvocationJobs filters and pages by.
#[derive(Debug)]
struct ListFilter {
    name_contains: Option<String>,
    status: Option<String>,
    after: Option<OffsetDateTime>,
    before: Option<OffsetDateTime>,
    max_results: usize,
    /// The creation index of the last job of the previous page.
    after_seq: Option<usize>,
    ascending: bool,
}

fn timestamp(
    query: &HashMap<String, String>,
    name: &str,
) -> Result<Option<OffsetDateTime>, String> {
    query
        .get(name)
        .map(|text| {
            OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|_| invalid(name, text, "be an ISO 8601 timestamp"))
        })
        .transpose()
}

impl ListFilter {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| query.get(name).map(String::as_str);
        if let Some(name) = get("nameContains").filter(|name| !job_name_ok(name)) {
            return Err(pattern("nameContains", name, JOB_NAME_PATTERN));
        }
        if let Some(status) = get("statusEquals").filter(|s| !STATUSES.contains(s)) {
            return Err(invalid(
                "statusEquals",
                status,
                &format!("satisfy enum value set: [{}]", STATUSES.join(", ")),
            ));
        }
        let max_results = match get("maxResults") {
            None => 1000,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    return Err(invalid("maxResults", text, "have value between 1 and 1000"));
                }
            },
        };
        if let Some(sort_by) = get("sortBy").filter(|s| *s != "CreationTime") {
            return Err(invalid(
                "sortBy",
                sort_by,
                "satisfy enum value set: [CreationTime]",
            ));
        }
        let ascending = match get("sortOrder") {
            None | Some("Descending") => false,
            Some("Ascending") => true,
            Some(other) => {
                return Err(invalid(
                    "sortOrder",
                    other,
                    "satisfy enum value set: [Ascending, Descending]",
                ));
            }
        };
        let after_seq = match get("nextToken") {
            None => None,
            Some(token) => Some(
                token
                    .strip_prefix(PAGE_TOKEN_PREFIX)
                    .and_then(|seq| seq.parse().ok())
                    .ok_or_else(|| format!("Invalid pagination token: {token}"))?,
            ),
        };
        Ok(Self {
            name_contains: get("nameContains").map(str::to_owned),
            status: get("statusEquals").map(str::to_owned),
            after: timestamp(query, "submitTimeAfter")?,
            before: timestamp(query, "submitTimeBefore")?,
            max_results,
            after_seq,
            ascending,
        })
    }

    /// The ids of the jobs the name and time filters keep, in the page order, after the
    /// previous page.
    fn candidates(&self, state: &SimState) -> Vec<(usize, String)> {
        let mut ids: Vec<(usize, String)> = state
            .bedrock
            .order
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                state.bedrock.jobs.get(*id).is_some_and(|job| {
                    self.name_contains
                        .as_ref()
                        .is_none_or(|part| job.name.contains(part.as_str()))
                        && self.after.is_none_or(|after| job.submit_time > after)
                        && self.before.is_none_or(|before| job.submit_time < before)
                })
            })
            .map(|(seq, id)| (seq, id.clone()))
            .collect();
        if !self.ascending {
            ids.reverse();
        }
        if let Some(last) = self.after_seq {
            ids.retain(|(seq, _)| {
                if self.ascending {
                    *seq > last
                } else {
                    *seq < last
                }
            });
        }
        ids
    }
}

/// `GET /model-invocation-jobs`: ListModelInvocationJobs, newest first unless
/// `sortOrder=Ascending`, `nextToken` while more remain.
pub(crate) async fn list(
    State(state): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let filter = match ListFilter::parse(&query) {
        Ok(filter) => filter,
        Err(message) => return validation(&message),
    };
    let candidates = filter.candidates(&lock(&state));
    let mut page = Vec::new();
    let mut last_seq = None;
    let mut more = false;
    for (seq, id) in candidates {
        let Some(object) = refresh(&state, &id).await else {
            continue;
        };
        if filter
            .status
            .as_ref()
            .is_some_and(|status| object["status"] != status.as_str())
        {
            continue;
        }
        if page.len() == filter.max_results {
            more = true;
            break;
        }
        page.push(object);
        last_seq = Some(seq);
    }
    let mut body = json!({"invocationJobSummaries": page});
    if let (true, Some(seq)) = (more, last_seq) {
        body["nextToken"] = json!(format!("{PAGE_TOKEN_PREFIX}{seq}"));
    }
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_the_service_model() {
        assert!(job_name_ok("rowsmith-job1.0.3"));
        assert!(!job_name_ok("-leading"));
        assert!(!job_name_ok(&"a".repeat(64)));
        assert!(token_ok("abc-123"));
        assert!(!token_ok("abc-"));
        assert!(role_arn_ok("arn:aws:iam::123456789012:role/BedrockBatch"));
        assert!(!role_arn_ok("arn:aws:iam::123:role/x"));
        assert_eq!(
            s3_location("s3://my-bucket/in/put.jsonl"),
            Some(S3Location {
                bucket: "my-bucket".into(),
                key: "in/put.jsonl".into()
            })
        );
        assert!(s3_location("s3://My_Bucket/x").is_none());
        assert_eq!(
            percent_decode("arn%3Aaws%3Abedrock%2Fabc"),
            "arn:aws:bedrock/abc"
        );
        assert_eq!(shard_parts("job-1.2.3"), Some(("job-1".into(), 2, 3)));
    }

    #[test]
    fn model_input_must_be_a_bedrock_claude_body() {
        let good = json!({"anthropic_version": ANTHROPIC_VERSION, "max_tokens": 10,
                          "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(model_input_refusal(&good), None);
        let mut with_model = good.clone();
        with_model["model"] = json!("claude");
        assert_eq!(
            model_input_refusal(&with_model).as_deref(),
            Some("model: Extra inputs are not permitted")
        );
        let mut without_version = good;
        without_version
            .as_object_mut()
            .map(|o| o.remove("anthropic_version"));
        assert_eq!(
            model_input_refusal(&without_version).as_deref(),
            Some("anthropic_version: Field required")
        );
    }
}
