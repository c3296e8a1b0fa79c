//! Gemini batch mode as the Developer API serves it, over the same batch machinery as the
//! other APIs: the resumable Files API (`/upload/v1beta/files`, start then chunks at their
//! offsets, the last one finalizing), batches created by `models/{model}:batchGenerateContent`
//! from an uploaded JSONL file of `{key, request}` lines, long-running operations with
//! `BATCH_STATE_*` and string counts, results as one generated file (errors inline, in any
//! order) that only generated files may be downloaded from, and Google's error shape
//! (`{"error": {code, message, status}}`). Requests are checked as the proto-JSON parser does:
//! an unknown field, a `responseSchema` outside its dialect, or both schema kinds at once is
//! refused per line; a malformed file fails the batch.

use std::collections::HashMap;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::faults::Fate;
use crate::openai::{Api, Line, Shared, SimBatch, SimFile, SimState, lock, unix_now};

/// The largest file the Files API takes: 2 GB.
const MAX_FILE_BYTES: u64 = 2 * 1000 * 1000 * 1000;

/// Upload sessions and what Gemini shows of its batches beyond the shared machinery.
#[derive(Debug, Default)]
pub(crate) struct GeminiState {
    uploads: HashMap<String, Upload>,
    /// Batch id → (display name, model).
    batches: HashMap<String, (String, String)>,
}

#[derive(Debug)]
struct Upload {
    display_name: String,
    declared: u64,
    bytes: Vec<u8>,
}

/// An error in Google's shape, with the canonical status name of the HTTP code.
pub(crate) fn google_error(status: StatusCode, message: &str) -> Response {
    let name = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ALREADY_EXISTS",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": name}});
    (status, Json(body)).into_response()
}

fn rfc3339(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A proto-JSON field name in lowerCamelCase (the parser takes both spellings).
fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The first field of `object` not among `known` (lowerCamelCase names).
fn unknown_field<'a>(object: &'a Map<String, Value>, known: &[&str]) -> Option<&'a str> {
    object
        .keys()
        .find(|key| !known.contains(&camel(key).as_str()))
        .map(String::as_str)
}

fn unknown_name(field: &str, at: &str) -> String {
    format!("Invalid JSON payload received. Unknown name \"{field}\" at '{at}': Cannot find field.")
}

fn field<'a>(object: &'a Value, camel_name: &str) -> Option<&'a Value> {
    let object = object.as_object()?;
    object
        .iter()
        .find(|(key, _)| camel(key) == camel_name)
        .map(|(_, value)| value)
}

const REQUEST_FIELDS: &[&str] = &[
    "model",
    "contents",
    "systemInstruction",
    "generationConfig",
    "safetySettings",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
];

const GENERATION_CONFIG_FIELDS: &[&str] = &[
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "mediaResolution",
];

/// `responseSchema`'s dialect: the OpenAPI 3.0 subset of Gemini's `Schema` message.
const SCHEMA_FIELDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
    "additionalProperties",
];

const SCHEMA_TYPES: &[&str] = &[
    "TYPE_UNSPECIFIED",
    "STRING",
    "NUMBER",
    "INTEGER",
    "BOOLEAN",
    "ARRAY",
    "OBJECT",
    "NULL",
];

fn check_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Some(object) = schema.as_object() else {
        return Err(format!("{at}: a schema is an object"));
    };
    if let Some(name) = unknown_field(object, SCHEMA_FIELDS) {
        return Err(unknown_name(name, at));
    }
    if let Some(kind) = field(schema, "type") {
        let known = kind.as_str().is_some_and(|k| SCHEMA_TYPES.contains(&k));
        if !known {
            return Err(format!(
                "Invalid value at '{at}.type' ({}), expected one of {}",
                kind,
                SCHEMA_TYPES.join(", ")
            ));
        }
    }
    let properties = field(schema, "properties").and_then(Value::as_object);
    if let Some(properties) = properties {
        for (name, property) in properties {
            check_schema(property, &format!("{at}.properties[{name}]"))?;
        }
    }
    if let Some(ordering) = field(schema, "propertyOrdering").and_then(Value::as_array) {
        let named = |name: &Value| {
            name.as_str()
                .is_some_and(|n| properties.is_some_and(|p| p.contains_key(n)))
        };
        if !ordering.iter().all(named) {
            return Err(format!(
                "{at}.property_ordering: every name must be a property of the schema"
            ));
        }
    }
    if let Some(items) = field(schema, "items") {
        check_schema(items, &format!("{at}.items"))?;
    }
    Ok(())
}

/// A GenerateContentRequest as the service parses it; `Err` is the per-request 400.
fn check_request(request: &Value) -> Result<(), String> {
    let Some(object) = request.as_object() else {
        return Err("request: a GenerateContentRequest object is required".into());
    };
    if let Some(name) = unknown_field(object, REQUEST_FIELDS) {
        return Err(unknown_name(name, "request"));
    }
    let contents = field(request, "contents").and_then(Value::as_array);
    if contents.is_none_or(Vec::is_empty) {
        return Err("* GenerateContentRequest.contents: contents is not specified".into());
    }
    for content in contents.into_iter().flatten() {
        let parts = field(content, "parts").and_then(Value::as_array);
        if parts.is_none_or(Vec::is_empty) {
            return Err(
                "* GenerateContentRequest.contents.parts: contents.parts must not be empty".into(),
            );
        }
        if let Some(role) = field(content, "role").and_then(Value::as_str)
            && !matches!(role, "user" | "model")
        {
            return Err(format!(
                "Please use a valid role: user, model (not {role:?})."
            ));
        }
    }
    let Some(config) = field(request, "generationConfig") else {
        return Ok(());
    };
    let Some(config_object) = config.as_object() else {
        return Err("request.generation_config: an object is required".into());
    };
    if let Some(name) = unknown_field(config_object, GENERATION_CONFIG_FIELDS) {
        return Err(unknown_name(name, "request.generation_config"));
    }
    let schema = field(config, "responseSchema");
    if schema.is_some() && field(config, "responseJsonSchema").is_some() {
        return Err("response_schema and response_json_schema cannot both be set".into());
    }
    if let Some(schema) = schema {
        let mime = field(config, "responseMimeType").and_then(Value::as_str);
        if !matches!(mime, Some("application/json" | "text/x.enum")) {
            return Err(
                "response_mime_type must be application/json or text/x.enum when response_schema is set".into(),
            );
        }
        check_schema(schema, "request.generation_config.response_schema")?;
    }
    if let Some(t) = field(config, "temperature").and_then(Value::as_f64)
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("temperature must be in [0, 2], got {t}"));
    }
    Ok(())
}

/// A `responseSchema` with its types in lower case: the JSON schema the fake model reads.
fn as_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value) {
                        ("type", Value::String(kind)) => Value::String(kind.to_lowercase()),
                        _ => as_json_schema(value),
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(as_json_schema).collect()),
        other => other.clone(),
    }
}

/// The result line of one `{key, request}` line, shaped by its fate: `{key, response}` with
/// the fake model's JSON answer, or `{key, error}` (a `google.rpc.Status`).
pub(crate) fn answer_line(index: usize, line: &Value, fate: Fate) -> Line {
    let key = &line["key"];
    let request = &line["request"];
    let error = |code: u16, status: &str, message: &str| {
        Line::Error(
            json!({"key": key, "error": {"code": code, "message": message, "status": status}})
                .to_string(),
        )
    };
    if let Err(message) = check_request(request) {
        return error(400, "INVALID_ARGUMENT", &message);
    }
    match fate {
        Fate::ServerError => {
            return error(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in \
                 https://developers.generativeai.google/guide/troubleshooting",
            );
        }
        Fate::BadRequest => {
            return error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            );
        }
        _ => {}
    }
    let schema = field(request, "generationConfig")
        .and_then(|config| field(config, "responseSchema"))
        .map(as_json_schema)
        .unwrap_or(json!({}));
    let user: String = field(request, "contents")
        .and_then(Value::as_array)
        .and_then(|contents| {
            contents
                .iter()
                .rev()
                .find(|c| field(c, "role").and_then(Value::as_str) != Some("model"))
        })
        .and_then(|content| field(content, "parts"))
        .and_then(Value::as_array)
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default();
    let mut answer = crate::model::answer(&schema, &user);
    let prompt_tokens = (request.to_string().len() / 4) as u64;
    let full = answer.to_string();
    let (text, finish) = match fate {
        Fate::InvalidJson => (full[..full.len() / 2].to_owned(), "STOP"),
        Fate::SchemaViolation => {
            if let Some(object) = answer.as_object_mut() {
                let first = object.keys().next().cloned();
                if let Some(first) = first {
                    object.remove(&first);
                }
            }
            (answer.to_string(), "STOP")
        }
        Fate::Length => (full[..full.len() / 3].to_owned(), "MAX_TOKENS"),
        Fate::Refusal => {
            return Line::Output(
                json!({"key": key, "response": {
                    "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}],
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "responseId": format!("resp-{index}")}})
                .to_string(),
            );
        }
        _ => (full, "STOP"),
    };
    let candidates_tokens = (text.len() / 4) as u64;
    Line::Output(
        json!({"key": key, "response": {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                            "finishReason": finish, "index": 0}],
            "usageMetadata": {"promptTokenCount": prompt_tokens,
                              "candidatesTokenCount": candidates_tokens,
                              "totalTokenCount": prompt_tokens + candidates_tokens},
            "responseId": format!("resp-{index}")}})
        .to_string(),
    )
}

/// Checks a batch file as the service does before running it: every line a JSON object of
/// `key` (a string, unique) and `request` (an object), nothing else. A failure fails the batch.
fn validate_file(bytes: &[u8]) -> (u64, Option<Vec<Value>>) {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let fail = |line: u64, message: String| {
        Some(vec![
            json!({"code": "INVALID_ARGUMENT", "message": message, "line": line}),
        ])
    };
    for (number, line) in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .enumerate()
    {
        total += 1;
        let at = number as u64 + 1;
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(line) else {
            return (total, fail(at, format!("line {at} is not a JSON object")));
        };
        if let Some(name) = unknown_field(&object, &["key", "request"]) {
            return (total, fail(at, unknown_name(name, "line")));
        }
        let Some(key) = object.get("key").and_then(Value::as_str) else {
            return (total, fail(at, format!("line {at} has no string key")));
        };
        if !seen.insert(key.to_owned()) {
            return (
                total,
                fail(at, format!("line {at}: key {key:?} is used twice")),
            );
        }
        if !object.get("request").is_some_and(Value::is_object) {
            return (total, fail(at, format!("line {at} has no request object")));
        }
    }
    if total == 0 {
        return (0, fail(0, "the input file is empty".into()));
    }
    (total, None)
}

fn file_resource(file: &SimFile, host: &str) -> Value {
    let generated = file.purpose == "batch_output";
    let mut resource = json!({
        "name": format!("files/{}", file.id),
        "displayName": file.filename,
        "mimeType": if generated { "application/jsonl" } else { "jsonl" },
        "sizeBytes": file.bytes.len().to_string(),
        "createTime": rfc3339(file.created_at),
        "updateTime": rfc3339(file.created_at),
        "expirationTime": rfc3339(file.created_at + 48 * 3600),
        "uri": format!("http://{host}/v1beta/files/{}", file.id),
        "state": "ACTIVE",
        "source": if generated { "GENERATED" } else { "UPLOADED" },
    });
    if generated {
        resource["downloadUri"] = json!(format!(
            "http://{host}/download/v1beta/files/{}:download?alt=media",
            file.id
        ));
    }
    resource
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_owned()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    upload_id: Option<String>,
}

/// `POST /upload/v1beta/files`: a resumable upload's start, or (with `upload_id`) a chunk.
pub(crate) async fn upload(
    State(state): State<Shared>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let command = header(&headers, "x-goog-upload-command").unwrap_or("");
    let mut state = lock(&state);
    let Some(upload_id) = query.upload_id else {
        if header(&headers, "x-goog-upload-protocol") != Some("resumable") || command != "start" {
            return google_error(
                StatusCode::BAD_REQUEST,
                "the simulator takes resumable uploads: X-Goog-Upload-Protocol: resumable, \
                 X-Goog-Upload-Command: start",
            );
        }
        let Some(declared) =
            header(&headers, "x-goog-upload-header-content-length").and_then(|v| v.parse().ok())
        else {
            return google_error(
                StatusCode::BAD_REQUEST,
                "X-Goog-Upload-Header-Content-Length is required",
            );
        };
        if declared > MAX_FILE_BYTES {
            return google_error(StatusCode::BAD_REQUEST, "File size exceeds the 2 GB limit.");
        }
        let metadata: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let display_name = metadata
            .get("file")
            .and_then(|f| field(f, "displayName"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let id = state.new_id("up");
        state.gemini.uploads.insert(
            id.clone(),
            Upload {
                display_name,
                declared,
                bytes: Vec::new(),
            },
        );
        let url = format!(
            "http://{}/upload/v1beta/files?upload_id={id}&upload_protocol=resumable",
            host(&headers)
        );
        let mut response = StatusCode::OK.into_response();
        let headers_out = response.headers_mut();
        if let Ok(url) = HeaderValue::from_str(&url) {
            headers_out.insert("x-goog-upload-url", url);
        }
        headers_out.insert("x-goog-upload-status", HeaderValue::from_static("active"));
        headers_out.insert(
            "x-goog-upload-chunk-granularity",
            HeaderValue::from_static("262144"),
        );
        return response;
    };
    let Some(upload) = state.gemini.uploads.get_mut(&upload_id) else {
        return google_error(StatusCode::NOT_FOUND, "no such upload session");
    };
    if !command.contains("upload") {
        return google_error(
            StatusCode::BAD_REQUEST,
            "X-Goog-Upload-Command: upload expected",
        );
    }
    let offset: Option<usize> =
        header(&headers, "x-goog-upload-offset").and_then(|v| v.parse().ok());
    if offset != Some(upload.bytes.len()) {
        return google_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "X-Goog-Upload-Offset must be {} (the bytes received so far)",
                upload.bytes.len()
            ),
        );
    }
    upload.bytes.extend_from_slice(&body);
    if upload.bytes.len() as u64 > upload.declared {
        return google_error(
            StatusCode::BAD_REQUEST,
            "more bytes than the declared length",
        );
    }
    if !command.contains("finalize") {
        let mut response = StatusCode::OK.into_response();
        response
            .headers_mut()
            .insert("x-goog-upload-status", HeaderValue::from_static("active"));
        return response;
    }
    if upload.bytes.len() as u64 != upload.declared {
        return google_error(
            StatusCode::BAD_REQUEST,
            "the upload was finalized before all declared bytes arrived",
        );
    }
    let Some(upload) = state.gemini.uploads.remove(&upload_id) else {
        return google_error(StatusCode::NOT_FOUND, "no such upload session");
    };
    let id = state.new_id("");
    let file = SimFile {
        id: id.clone(),
        bytes: Bytes::from(upload.bytes),
        filename: upload.display_name,
        purpose: "batch".into(),
        created_at: unix_now(),
    };
    let resource = file_resource(&file, &host(&headers));
    state.files.insert(id, file);
    let mut response = Json(json!({"file": resource})).into_response();
    response
        .headers_mut()
        .insert("x-goog-upload-status", HeaderValue::from_static("final"));
    response
}

/// `GET /v1beta/files/{id}`, or `{id}:download?alt=media` (the path google-genai 3.x uses).
pub(crate) async fn get_file(
    State(state): State<Shared>,
    Path(id): Path<String>,
    query: Query<DownloadQuery>,
    headers: HeaderMap,
) -> Response {
    if id.ends_with(":download") {
        return download(State(state), Path(id), query).await;
    }
    match lock(&state).files.get(&id) {
        Some(file) => Json(file_resource(file, &host(&headers))).into_response(),
        None => google_error(StatusCode::NOT_FOUND, &format!("File files/{id} not found")),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct DownloadQuery {
    alt: Option<String>,
}

/// `GET /download/v1beta/files/{id}:download?alt=media` (and the same under `/v1beta/files/`):
/// generated files only.
pub(crate) async fn download(
    State(state): State<Shared>,
    Path(action): Path<String>,
    Query(query): Query<DownloadQuery>,
) -> Response {
    let Some(id) = action.strip_suffix(":download") else {
        return google_error(StatusCode::NOT_FOUND, "unknown method");
    };
    if query.alt.as_deref() != Some("media") {
        return google_error(StatusCode::BAD_REQUEST, "alt=media is required");
    }
    let state = lock(&state);
    let Some(file) = state.files.get(id) else {
        return google_error(StatusCode::NOT_FOUND, &format!("File files/{id} not found"));
    };
    if file.purpose != "batch_output" {
        return google_error(
            StatusCode::BAD_REQUEST,
            "Only generated files can be downloaded; uploaded files cannot.",
        );
    }
    (
        StatusCode::OK,
        [("content-type", "application/octet-stream")],
        file.bytes.clone(),
    )
        .into_response()
}

/// The batch's long-running operation, from the shared machinery's view of it.
fn operation(state: &mut SimState, id: &str) -> Option<Value> {
    let (display_name, model) = state.gemini.batches.get(id)?.clone();
    let object = state.advance(id)?;
    let batch_state = match object["status"].as_str().unwrap_or("") {
        "validating" => "BATCH_STATE_PENDING",
        "in_progress" | "finalizing" | "cancelling" => "BATCH_STATE_RUNNING",
        "completed" => "BATCH_STATE_SUCCEEDED",
        "failed" => "BATCH_STATE_FAILED",
        "expired" => "BATCH_STATE_EXPIRED",
        "cancelled" => "BATCH_STATE_CANCELLED",
        _ => "BATCH_STATE_UNSPECIFIED",
    };
    let counts = &object["request_counts"];
    let total = counts["total"].as_u64().unwrap_or(0);
    let (succeeded, failed) = (
        counts["completed"].as_u64().unwrap_or(0),
        counts["failed"].as_u64().unwrap_or(0),
    );
    let ended = ["completed_at", "failed_at", "expired_at", "cancelled_at"]
        .iter()
        .find_map(|k| object[*k].as_i64());
    let name = format!("batches/{id}");
    let mut metadata = json!({
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "name": name,
        "model": format!("models/{model}"),
        "displayName": display_name,
        "createTime": rfc3339(object["created_at"].as_i64().unwrap_or(0)),
        "updateTime": rfc3339(ended.unwrap_or_else(unix_now)),
        "batchStats": {
            "requestCount": total.to_string(),
            "successfulRequestCount": succeeded.to_string(),
            "failedRequestCount": failed.to_string(),
            "pendingRequestCount": total.saturating_sub(succeeded + failed).to_string(),
        },
        "state": batch_state,
    });
    let mut operation = json!({"name": name, "metadata": metadata.clone()});
    if let Some(ended) = ended {
        metadata["endTime"] = json!(rfc3339(ended));
        let output = object["output_file_id"]
            .as_str()
            .map(|file| json!({"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
                               "responsesFile": format!("files/{file}")}));
        if let Some(output) = &output {
            metadata["output"] = json!({"responsesFile": output["responsesFile"]});
        }
        operation["metadata"] = metadata;
        operation["done"] = json!(true);
        if batch_state == "BATCH_STATE_FAILED" {
            let message = object["errors"]["data"]
                .as_array()
                .map(|errors| {
                    errors
                        .iter()
                        .filter_map(|e| e["message"].as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            operation["error"] = json!({"code": 3, "message": message});
        } else if let Some(output) = output {
            operation["response"] = output;
        }
    }
    Some(operation)
}

/// `POST /v1beta/models/{model}:batchGenerateContent`.
pub(crate) async fn create(
    State(state): State<Shared>,
    Path(action): Path<String>,
    body: Bytes,
) -> Response {
    let Some(model) = action.strip_suffix(":batchGenerateContent") else {
        return google_error(
            StatusCode::NOT_FOUND,
            "the simulator serves batchGenerateContent only",
        );
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return google_error(StatusCode::BAD_REQUEST, "Invalid JSON payload received.");
    };
    let Some(top) = body.as_object() else {
        return google_error(StatusCode::BAD_REQUEST, "Invalid JSON payload received.");
    };
    if let Some(name) = unknown_field(top, &["batch"]) {
        return google_error(StatusCode::BAD_REQUEST, &unknown_name(name, ""));
    }
    let Some(batch) = top.get("batch").and_then(Value::as_object) else {
        return google_error(StatusCode::BAD_REQUEST, "batch is required");
    };
    let known = [
        "model",
        "displayName",
        "inputConfig",
        "priority",
        "webhookConfig",
    ];
    if let Some(name) = unknown_field(batch, &known) {
        return google_error(StatusCode::BAD_REQUEST, &unknown_name(name, "batch"));
    }
    let batch = Value::Object(batch.clone());
    let display_name = field(&batch, "displayName")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty());
    let Some(display_name) = display_name.map(str::to_owned) else {
        return google_error(StatusCode::BAD_REQUEST, "batch.display_name is required");
    };
    let input = field(&batch, "inputConfig").cloned().unwrap_or(Value::Null);
    let file_name = field(&input, "fileName").and_then(Value::as_str);
    let Some(file_name) = file_name else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "batch.input_config: the simulator takes file_name (an uploaded JSONL file)",
        );
    };
    let file_id = file_name
        .strip_prefix("files/")
        .unwrap_or(file_name)
        .to_owned();
    let mut state = lock(&state);
    let Some(file) = state.files.get(&file_id) else {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("File {file_name} not found"),
        );
    };
    let checked = validate_file(&file.bytes);
    let tokens = (file.bytes.len() / 4) as u64;
    let id = state.new_id("");
    // The shard a display name names, where the other APIs keep it in metadata: the faults
    // of its job apply.
    let metadata = display_name
        .strip_prefix("rowsmith-")
        .map(|shard| json!({"rowsmith_shard": shard}));
    state.count_for_shard(&metadata);
    let mut sim_batch = SimBatch::new(
        id.clone(),
        file_id,
        "batchGenerateContent".into(),
        metadata,
        checked,
        tokens,
    );
    sim_batch.api = Api::Gemini;
    sim_batch.model = Some(model.to_owned());
    state.batches.insert(id.clone(), sim_batch);
    state.batch_order.push(id.clone());
    state
        .gemini
        .batches
        .insert(id.clone(), (display_name, model.to_owned()));
    match operation(&mut state, &id) {
        Some(operation) => Json(operation).into_response(),
        None => google_error(StatusCode::INTERNAL_SERVER_ERROR, "batch vanished"),
    }
}

/// `GET /v1beta/batches/{id}`.
pub(crate) async fn get(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match operation(&mut lock(&state), &id) {
        Some(operation) => Json(operation).into_response(),
        None => google_error(
            StatusCode::NOT_FOUND,
            &format!("Batch batches/{id} not found"),
        ),
    }
}

/// `POST /v1beta/batches/{id}:cancel`: the batch ends as cancelled (no interim state shows).
pub(crate) async fn cancel(State(state): State<Shared>, Path(action): Path<String>) -> Response {
    let Some(id) = action.strip_suffix(":cancel") else {
        return google_error(StatusCode::NOT_FOUND, "unknown method");
    };
    let mut state = lock(&state);
    let Some(current) = operation(&mut state, id) else {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("Batch batches/{id} not found"),
        );
    };
    if current["done"] == json!(true) {
        return google_error(
            StatusCode::BAD_REQUEST,
            "FAILED_PRECONDITION: the batch has already ended",
        );
    }
    if let Some(batch) = state.batches.get_mut(id) {
        let at = *batch.cancel_requested.get_or_insert(Instant::now());
        batch.cancelling_at = Some(batch.unix_at(at));
    }
    Json(json!({})).into_response()
}

/// `DELETE /v1beta/batches/{id}`.
pub(crate) async fn delete(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    if state.gemini.batches.remove(&id).is_none() {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("Batch batches/{id} not found"),
        );
    }
    state.batches.remove(&id);
    Json(json!({})).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListQuery {
    page_size: Option<usize>,
    page_token: Option<String>,
}

/// `GET /v1beta/batches`: newest first, `operations` and a `nextPageToken` while more remain.
pub(crate) async fn list(State(state): State<Shared>, Query(query): Query<ListQuery>) -> Response {
    let mut state = lock(&state);
    let size = query.page_size.unwrap_or(50).clamp(1, 1000);
    let start: usize = match query.page_token.as_deref().map(str::parse) {
        None => 0,
        Some(Ok(start)) => start,
        Some(Err(_)) => return google_error(StatusCode::BAD_REQUEST, "invalid page token"),
    };
    let ids: Vec<String> = state
        .batch_order
        .iter()
        .rev()
        .filter(|id| state.gemini.batches.contains_key(*id))
        .cloned()
        .collect();
    let operations: Vec<Value> = ids
        .iter()
        .skip(start)
        .take(size)
        .filter_map(|id| operation(&mut state, id))
        .collect();
    let mut page = json!({"operations": operations});
    if start + size < ids.len() {
        page["nextPageToken"] = json!((start + size).to_string());
    }
    Json(page).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(request: Value) -> Value {
        json!({"key": "r1", "request": request})
    }

    fn refused(request: Value) -> String {
        match answer_line(0, &line(request), Fate::Answer) {
            Line::Error(text) => {
                let line: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(line["error"]["code"], 400, "{text}");
                line["error"]["message"]
                    .as_str()
                    .expect("message")
                    .to_owned()
            }
            Line::Output(text) => panic!("answered: {text}"),
        }
    }

    #[test]
    fn requests_outside_the_proto_are_refused_per_line() {
        let contents =
            json!([{"role": "user", "parts": [{"text": "Row data to enhance:\ntitle: a ball"}]}]);
        let schema = json!({"type": "OBJECT", "properties": {"title": {"type": "STRING"}},
                            "required": ["title"], "propertyOrdering": ["title"]});
        let good = json!({"contents": contents, "generationConfig": {
            "responseMimeType": "application/json", "responseSchema": schema}});
        let Line::Output(text) = answer_line(0, &line(good.clone()), Fate::Answer) else {
            panic!("refused a good request");
        };
        let answer: Value = serde_json::from_str(&text).expect("json");
        let inner = answer
            .pointer("/response/candidates/0/content/parts/0/text")
            .and_then(Value::as_str)
            .expect("text");
        assert_eq!(
            serde_json::from_str::<Value>(inner).expect("json")["title"],
            "a ball"
        );
        let mut unknown = good.clone();
        unknown["temperature"] = json!(0);
        assert!(refused(unknown).contains("Unknown name \"temperature\""));
        let mut lower = good.clone();
        lower["generationConfig"]["responseSchema"]["type"] = json!("object");
        assert!(refused(lower).contains(".type"));
        let mut extra = good.clone();
        extra["generationConfig"]["responseSchema"]["patternProperties"] = json!({});
        assert!(refused(extra).contains("patternProperties"));
        let mut both = good.clone();
        both["generationConfig"]["responseJsonSchema"] = json!({"type": "object"});
        assert!(refused(both).contains("cannot both"));
        let mut no_mime = good.clone();
        no_mime["generationConfig"]
            .as_object_mut()
            .expect("config")
            .remove("responseMimeType");
        assert!(refused(no_mime).contains("response_mime_type"));
        assert!(refused(json!({"contents": []})).contains("contents is not specified"));
        // Snake case is the proto's own spelling, and is taken.
        let snake = json!({"contents": contents, "generation_config": {"max_output_tokens": 5}});
        assert!(matches!(
            answer_line(0, &line(snake), Fate::Answer),
            Line::Output(_)
        ));
    }

    #[test]
    fn a_malformed_file_fails_the_batch() {
        assert!(
            validate_file(b"{\"key\":\"r1\",\"request\":{}}\n")
                .1
                .is_none()
        );
        for bad in [
            &b"not json\n"[..],
            b"{\"request\":{}}\n",
            b"{\"key\":\"r1\",\"request\":{}}\n{\"key\":\"r1\",\"request\":{}}\n",
            b"{\"key\":\"r1\",\"request\":{},\"custom_id\":\"x\"}\n",
            b"",
        ] {
            assert!(
                validate_file(bad).1.is_some(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
