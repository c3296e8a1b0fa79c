//! Gemini batch mode as the Developer API serves it, over the same batch machinery as the
//! other APIs: the resumable Files API (`/upload/v1beta/files`, start then chunks at their
//! offsets, the last one finalizing), batches created by `models/{model}:batchGenerateContent`
//! from an uploaded JSONL file of `{key, request}` lines or inline requests (answers then in the
//! operation; the whole call under 20 MB), long-running operations with
//! `BATCH_STATE_*` and string counts, results as one generated file (errors inline, in any
//! order) that only generated files may be downloaded from, and Google's error shape
//! (`{"error": {code, message, status}}`). Requests are checked as the proto-JSON parser does:
//! an unknown field, a `responseSchema` outside its dialect, or both schema kinds at once is
//! refused per line; a malformed file fails the batch.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::gemini_state::{GeminiBatch, Upload};
use crate::gemini_wire::{field, unknown_field, unknown_name, validate_file};
use crate::openai::{Api, Shared, SimBatch, SimFile, SimState, lock, unix_now};

/// The largest file the Files API takes: 2 GB.
const MAX_FILE_BYTES: u64 = 2 * 1000 * 1000 * 1000;

/// Batches one project may have running at once.
const MAX_CONCURRENT_BATCHES: usize = 100;

/// The largest create call Gemini takes (inline requests included): 20 MB.
const MAX_CREATE_BYTES: usize = 20 * 1000 * 1000;

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

/// The uploaded file `id`, unless it is gone: Gemini deletes a file `gemini_file_ttl` (48 h)
/// after its upload.
fn live_file<'a>(state: &'a mut SimState, id: &str) -> Option<&'a SimFile> {
    let ttl = state.settings.gemini_file_ttl.as_secs() as i64;
    let expired = state
        .files
        .get(id)
        .is_some_and(|file| file.purpose == "batch" && file.created_at + ttl <= unix_now());
    if expired {
        tracing::info!(
            file_id = id,
            "the uploaded file is older than its TTL: deleted"
        );
        state.files.remove(id);
    }
    state.files.get(id)
}

fn file_resource(file: &SimFile, host: &str, ttl_seconds: i64) -> Value {
    let generated = file.purpose == "batch_output";
    let mut resource = json!({
        "name": format!("files/{}", file.id),
        "displayName": file.filename,
        "mimeType": if generated { "application/jsonl" } else { "jsonl" },
        "sizeBytes": file.bytes.len().to_string(),
        "createTime": rfc3339(file.created_at),
        "updateTime": rfc3339(file.created_at),
        "expirationTime": rfc3339(file.created_at + ttl_seconds),
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
    match query.upload_id {
        None => start_upload(&mut state, &headers, command, &body),
        Some(upload_id) if command == "query" => query_upload(&state, &upload_id, &headers),
        Some(upload_id) => upload_chunk(&mut state, &upload_id, &headers, command, &body),
    }
}

/// `X-Goog-Upload-Command: query`: how many bytes the session holds (`active`), or the file
/// it made (`final`): what a client asks after a chunk whose answer it did not get.
fn query_upload(state: &SimState, upload_id: &str, headers: &HeaderMap) -> Response {
    if let Some(upload) = state.gemini.uploads.get(upload_id) {
        let mut response = StatusCode::OK.into_response();
        let headers_out = response.headers_mut();
        headers_out.insert("x-goog-upload-status", HeaderValue::from_static("active"));
        headers_out.insert(
            "x-goog-upload-size-received",
            HeaderValue::from(upload.bytes.len()),
        );
        return response;
    }
    let Some(file) = state
        .gemini
        .finalized
        .get(upload_id)
        .and_then(|id| state.files.get(id))
    else {
        return google_error(StatusCode::NOT_FOUND, "no such upload session");
    };
    let ttl = state.settings.gemini_file_ttl.as_secs() as i64;
    let mut response =
        Json(json!({"file": file_resource(file, &host(headers), ttl)})).into_response();
    let headers_out = response.headers_mut();
    headers_out.insert("x-goog-upload-status", HeaderValue::from_static("final"));
    headers_out.insert(
        "x-goog-upload-size-received",
        HeaderValue::from(file.bytes.len()),
    );
    response
}

/// A resumable upload's start: the declared size and the file's display name; answers with
/// the session URL.
fn start_upload(state: &mut SimState, headers: &HeaderMap, command: &str, body: &[u8]) -> Response {
    if header(headers, "x-goog-upload-protocol") != Some("resumable") || command != "start" {
        return google_error(
            StatusCode::BAD_REQUEST,
            "the simulator takes resumable uploads: X-Goog-Upload-Protocol: resumable, \
             X-Goog-Upload-Command: start",
        );
    }
    let Some(declared) =
        header(headers, "x-goog-upload-header-content-length").and_then(|v| v.parse().ok())
    else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "X-Goog-Upload-Header-Content-Length is required",
        );
    };
    if declared > MAX_FILE_BYTES {
        return google_error(StatusCode::BAD_REQUEST, "File size exceeds the 2 GB limit.");
    }
    let metadata: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
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
        host(headers)
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
    response
}

/// A chunk of a resumable upload at its offset; the last one (`finalize`) makes the file.
fn upload_chunk(
    state: &mut SimState,
    upload_id: &str,
    headers: &HeaderMap,
    command: &str,
    body: &[u8],
) -> Response {
    let Some(upload) = state.gemini.uploads.get_mut(upload_id) else {
        return google_error(StatusCode::NOT_FOUND, "no such upload session");
    };
    if !command.contains("upload") {
        return google_error(
            StatusCode::BAD_REQUEST,
            "X-Goog-Upload-Command: upload expected",
        );
    }
    let offset: Option<usize> =
        header(headers, "x-goog-upload-offset").and_then(|v| v.parse().ok());
    if offset != Some(upload.bytes.len()) {
        return google_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "X-Goog-Upload-Offset must be {} (the bytes received so far)",
                upload.bytes.len()
            ),
        );
    }
    upload.bytes.extend_from_slice(body);
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
    let Some(upload) = state.gemini.uploads.remove(upload_id) else {
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
    let ttl = state.settings.gemini_file_ttl.as_secs() as i64;
    let resource = file_resource(&file, &host(headers), ttl);
    state
        .gemini
        .finalized
        .insert(upload_id.to_owned(), id.clone());
    state.files.insert(id, file);
    state.files_uploaded += 1;
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
    let mut state = lock(&state);
    let ttl = state.settings.gemini_file_ttl.as_secs() as i64;
    match live_file(&mut state, &id) {
        Some(file) => Json(file_resource(file, &host(&headers), ttl)).into_response(),
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

/// The answers of an inline batch as the operation shows them: `{response | error,
/// metadata: {key}}` per request, from the output lines the machinery wrote.
fn inlined(state: &SimState, file_id: &str) -> Vec<Value> {
    let Some(file) = state.files.get(file_id) else {
        return Vec::new();
    };
    file.bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .map(|mut line| {
            let key = line.get("key").cloned().unwrap_or(Value::Null);
            if let Some(object) = line.as_object_mut() {
                object.remove("key");
                object.insert("metadata".into(), json!({"key": key}));
            }
            line
        })
        .collect()
}

/// An inline `inputConfig.requests` as the lines of a batch file (`{key, request}`), or the
/// 400 it gets.
fn inline_lines(requests: &Value) -> Result<Vec<u8>, String> {
    let items = field(requests, "requests")
        .and_then(Value::as_array)
        .ok_or("batch.input_config.requests.requests is required")?;
    let mut lines = Vec::new();
    for item in items {
        let object = item.as_object().ok_or("an inlined request is an object")?;
        if let Some(name) = unknown_field(object, &["request", "metadata"]) {
            return Err(unknown_name(name, "batch.input_config.requests.requests[]"));
        }
        let key = field(item, "metadata")
            .and_then(|m| m.get("key"))
            .cloned()
            .unwrap_or(Value::Null);
        let request = field(item, "request").cloned().unwrap_or(Value::Null);
        serde_json::to_writer(&mut lines, &json!({"key": key, "request": request}))
            .map_err(|e| e.to_string())?;
        lines.push(b'\n');
    }
    Ok(lines)
}

/// The batch's long-running operation, from the shared machinery's view of it.
fn operation(state: &mut SimState, id: &str) -> Option<Value> {
    let GeminiBatch {
        display_name,
        model,
        inline,
    } = state.gemini.batches.get(id)?.clone();
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
        let output = object["output_file_id"].as_str().map(|file| {
            let mut output = json!({"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"});
            match inline {
                true => output["inlinedResponses"] = json!({"inlinedResponses": inlined(state, file)}),
                false => output["responsesFile"] = json!(format!("files/{file}")),
            }
            output
        });
        if let Some(output) = &output {
            let mut shown = output.clone();
            if let Some(object) = shown.as_object_mut() {
                object.remove("@type");
            }
            metadata["output"] = shown;
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
/// The file a create names, or the file its inline requests make; the refusal's status and
/// message otherwise.
fn input_file(
    state: &mut SimState,
    file_name: Option<&str>,
    inline: Option<&Value>,
    display_name: &str,
) -> Result<String, (StatusCode, String)> {
    match (file_name, inline) {
        (Some(file_name), None) => Ok(file_name
            .strip_prefix("files/")
            .unwrap_or(file_name)
            .to_owned()),
        (None, Some(requests)) => {
            let lines = match inline_lines(requests) {
                Ok(lines) => lines,
                Err(message) => return Err((StatusCode::BAD_REQUEST, message)),
            };
            // Kept as a file the batch machinery reads; no client can name it.
            let id = state.new_id("inline-");
            let file = SimFile {
                id: id.clone(),
                bytes: Bytes::from(lines),
                filename: display_name.to_owned(),
                purpose: "batch".into(),
                created_at: unix_now(),
            };
            state.files.insert(id.clone(), file);
            Ok(id)
        }
        _ => Err((
            StatusCode::BAD_REQUEST,
            "batch.input_config: exactly one of file_name and requests".into(),
        )),
    }
}

/// Gemini refuses at create what it cannot hold: 100 batches at once, and the model's
/// enqueued-token quota (429 `RESOURCE_EXHAUSTED`).
fn over_capacity(state: &SimState, metadata: &Option<Value>, tokens: u64) -> Option<Response> {
    let running: Vec<u64> = state
        .batches
        .values()
        .filter(|b| b.api == Api::Gemini && b.ended.is_none())
        .map(|b| b.tokens)
        .collect();
    let quota = state.faults_of_metadata(metadata).enqueued_token_quota;
    let in_use: u64 = running.iter().sum();
    if running.len() >= MAX_CONCURRENT_BATCHES
        || quota.is_some_and(|quota| in_use > 0 && in_use + tokens > quota)
    {
        return Some(google_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Resource has been exhausted (e.g. check quota): too many batch jobs or enqueued \
             tokens in progress.",
        ));
    }
    None
}

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
    if body.len() > MAX_CREATE_BYTES {
        return google_error(
            StatusCode::BAD_REQUEST,
            "Request payload size exceeds the limit: 20971520 bytes.",
        );
    }
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
    let inline = field(&input, "requests");
    let mut state = lock(&state);
    let file_id = match input_file(&mut state, file_name, inline, &display_name) {
        Ok(file_id) => file_id,
        Err((status, message)) => return google_error(status, &message),
    };
    let Some(file) = live_file(&mut state, &file_id) else {
        return google_error(
            StatusCode::NOT_FOUND,
            &format!("File files/{file_id} not found"),
        );
    };
    let checked = validate_file(&file.bytes);
    let tokens = (file.bytes.len() / 4) as u64;
    // The shard a display name names, where the other APIs keep it in metadata: the faults
    // of its job apply.
    let metadata = display_name
        .strip_prefix("rowsmith-")
        .map(|shard| json!({"rowsmith_shard": shard}));
    if let Some(refusal) = over_capacity(&state, &metadata, tokens) {
        return refusal;
    }
    let id = state.new_id("");
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
    // Admitted at create (the quota was checked there), never failed for it later.
    sim_batch.admitted = sim_batch.errors.is_none();
    sim_batch.model = Some(model.to_owned());
    state.batches.insert(id.clone(), sim_batch);
    state.batch_order.push(id.clone());
    let shown = GeminiBatch {
        display_name,
        model: model.to_owned(),
        inline: inline.is_some(),
    };
    state.gemini.batches.insert(id.clone(), shown);
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
