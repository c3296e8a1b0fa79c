//! Together AI's Batch API, served under `/together/v1/…` (its paths are OpenAI's) over the
//! same batch machinery as the other APIs. A file is uploaded in three steps as the official
//! SDK does it: `POST /files` (a multipart form of `purpose`, `file_name`, `file_type` and the
//! content's SHA-256 `checksum`) answers 302 with the presigned upload URL in `Location` and
//! the new id in `X-Together-File-Id` — or 409 `{"file_id"}` when a preprocessed file of the
//! same checksum and purpose exists; the bytes are `PUT` to that URL (no API key: its
//! signature is the credential; storage errors are S3's XML); `POST /files/{id}/preprocess`
//! finishes it (until then it shows 0 bytes, `PENDING`). A batch names its file and endpoint
//! (`POST /batches`, unknown members refused), answers 201 `{job, warning}`, shows upper-case
//! statuses, a progress percentage, ISO 8601 times and no request counts; a listing is a bare
//! array. Lines are OpenAI's (`{custom_id, method, url, body}`) or `{custom_id, body}`, their
//! bodies Together's chat parameters (`max_tokens`, not `max_completion_tokens`). Result files
//! are OpenAI's (an inference: Together's SDK does not parse them). Batch endpoints answer
//! errors as `{"error": "<message>"}`, the others as `{"error": {message, type, param, code}}`,
//! as Together's API reference says. Batches carry no metadata: the shard (for the job's
//! faults and the attempt `fate` draws for) is the one the name its file was last announced
//! under (`rowsmith-<job>.<attempt>.<shard>.jsonl`) gives.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use rowsmith_config::SimFaults;

use crate::openai::{
    Api, Dialect, Shared, SimBatch, SimFile, SimState, lock, unix_now, validate_lines_as,
};
use crate::together_state::{TogetherBatch, TogetherFile, shard_of_file_name};

/// The purposes a file may be uploaded for (the SDK's `FilePurpose`).
const PURPOSES: &[&str] = &["fine-tune", "calibration", "eval", "batch-api"];
const FILE_TYPES: &[&str] = &["jsonl", "csv", "parquet"];
/// The endpoints a batch may name (the SDK's `BatchCreateParams.endpoint`).
const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
];
/// The largest batch input file: 100 MB.
const MAX_BATCH_FILE_BYTES: usize = 100 * 1000 * 1000;
const USER_ID: &str = "user_sim";

/// An error of Together's batch endpoints: `{"error": "<message>"}` (`BatchErrorResponse`).
pub(crate) fn batch_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// An error of its other endpoints: `{"error": {message, type, param, code}}` (`ErrorData`).
fn api_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn file_error(status: StatusCode, message: &str) -> Response {
    api_error(status, "invalid_request_error", None, message)
}

/// An error in the shape of the endpoint `path` names.
pub(crate) fn error_for(path: &str, status: StatusCode, kind: &str, message: &str) -> Response {
    if path.starts_with("/together/v1/batches") {
        batch_error(status, message)
    } else {
        api_error(status, kind, None, message)
    }
}

/// A call without an API key (`Authorization: Bearer`), as Together refuses it.
pub(crate) fn unauthorized(path: &str) -> Response {
    let message = "Invalid API key provided. You can find your API key at \
                   https://api.together.xyz/settings/api-keys.";
    if path.starts_with("/together/v1/batches") {
        return batch_error(StatusCode::UNAUTHORIZED, message);
    }
    api_error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_api_key"),
        message,
    )
}

/// An error of the presigned upload target, in S3's XML.
fn storage_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The signature of file `id`'s presigned upload URL.
fn signature(id: &str) -> String {
    sha256_hex(format!("rowsmith-sim together upload {id}").as_bytes())[..32].to_owned()
}

/// A UUID-shaped id derived from `seed` (a fresh `SimState::new_id`).
fn uuid_like(seed: &str) -> String {
    let h = hex(&Sha256::digest(seed.as_bytes())[..16]);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn iso(unix_seconds: Option<i64>) -> Value {
    unix_seconds
        .and_then(|at| time::OffsetDateTime::from_unix_timestamp(at).ok())
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

fn host(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
}

/// A `FileResponse`, with the `Processed` flag the API reference lists beside the SDK's
/// `processing_status`.
fn file_object(id: &str, file: &TogetherFile, bytes: usize) -> Value {
    json!({
        "id": id, "object": "file", "created_at": file.created_at, "filename": file.filename,
        "bytes": bytes, "purpose": file.purpose, "FileType": file.file_type,
        "Processed": file.processed,
        "processing_status": if file.processed { "COMPLETED" } else { "PENDING" },
    })
}

/// A result file of a Together batch (named `<batch id>_<kind>.jsonl` by the machinery).
fn result_file<'a>(state: &'a SimState, id: &str) -> Option<&'a SimFile> {
    let file = state
        .files
        .get(id)
        .filter(|f| f.purpose == "batch_output")?;
    let (batch_id, _) = file.filename.rsplit_once('_')?;
    state
        .together
        .batches
        .contains_key(batch_id)
        .then_some(file)
}

/// A file as Together shows it: one announced through it, or a result file of its batches
/// (purpose `batch-generated`).
fn shown_file(state: &SimState, id: &str) -> Option<Value> {
    if let Some(file) = state.together.files.get(id) {
        let bytes = match file.processed {
            true => state.files.get(id).map_or(0, |f| f.bytes.len()),
            false => 0,
        };
        return Some(file_object(id, file, bytes));
    }
    let file = result_file(state, id)?;
    let shown = TogetherFile {
        filename: file.filename.clone(),
        announced_as: file.filename.clone(),
        purpose: "batch-generated".into(),
        file_type: "jsonl".into(),
        checksum: None,
        created_at: file.created_at,
        uploaded: None,
        processed: true,
    };
    Some(file_object(id, &shown, file.bytes.len()))
}

/// The file an announcement describes, or why it is refused.
fn announced(fields: &std::collections::HashMap<String, String>) -> Result<TogetherFile, String> {
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let purpose = field("purpose").ok_or("Missing required field: 'purpose'.")?;
    if !PURPOSES.contains(&purpose) {
        return Err(format!(
            "Invalid purpose '{purpose}'. Must be one of: {}",
            PURPOSES.join(", ")
        ));
    }
    let filename = field("file_name").ok_or("Missing required field: 'file_name'.")?;
    let file_type = field("file_type").unwrap_or("jsonl");
    if !FILE_TYPES.contains(&file_type) {
        return Err(format!(
            "Invalid file_type '{file_type}'. Must be one of: {}",
            FILE_TYPES.join(", ")
        ));
    }
    let checksum = field("checksum").map(str::to_ascii_lowercase);
    if let Some(checksum) = &checksum
        && (checksum.len() != 64 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err("Invalid checksum: a SHA-256 in 64 hexadecimal digits.".into());
    }
    Ok(TogetherFile {
        filename: filename.to_owned(),
        announced_as: filename.to_owned(),
        purpose: purpose.to_owned(),
        file_type: file_type.to_owned(),
        checksum,
        created_at: unix_now(),
        uploaded: None,
        processed: false,
    })
}

/// The oldest preprocessed file of the same checksum and purpose, if any.
fn existing_file(state: &SimState, file: &TogetherFile) -> Option<String> {
    let checksum = file.checksum.as_ref()?;
    state
        .together
        .files
        .iter()
        .filter(|(_, f)| f.processed && f.purpose == file.purpose)
        .filter(|(_, f)| f.checksum.as_ref() == Some(checksum))
        .min_by(|(a_id, a), (b_id, b)| a.created_at.cmp(&b.created_at).then(a_id.cmp(b_id)))
        .map(|(id, _)| id.clone())
}

/// `POST /together/v1/files`: announces a file; 302 to its presigned upload URL, or 409
/// with the id of the file already holding those bytes.
pub(crate) async fn announce(
    State(state): State<Shared>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let mut form = match form {
        Ok(form) => form,
        Err(rejection) => {
            let message = format!(
                "Expected a multipart/form-data body: {}",
                rejection.body_text()
            );
            return file_error(StatusCode::BAD_REQUEST, &message);
        }
    };
    let mut fields = std::collections::HashMap::new();
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or("").to_owned();
                let value = field.text().await.unwrap_or_default();
                fields.insert(name, value);
            }
            Ok(None) => break,
            Err(e) => {
                let message = format!("Invalid multipart body: {e}");
                return file_error(StatusCode::BAD_REQUEST, &message);
            }
        }
    }
    let file = match announced(&fields) {
        Ok(file) => file,
        Err(message) => return file_error(StatusCode::BAD_REQUEST, &message),
    };
    let mut state = lock(&state);
    if let Some(existing) = existing_file(&state, &file) {
        state.together.uploads_deduplicated += 1;
        if let Some(held) = state.together.files.get_mut(&existing) {
            held.announced_as = file.filename;
        }
        return (StatusCode::CONFLICT, Json(json!({"file_id": existing}))).into_response();
    }
    let seed = state.new_id("");
    let id = format!("file-{}", uuid_like(&seed));
    state.together.files.insert(id.clone(), file);
    let location = format!(
        "http://{}/together/upload/{id}?signature={}",
        host(&headers),
        signature(&id)
    );
    let headers = [
        (header::LOCATION.as_str(), location),
        ("x-together-file-id", id),
    ];
    (StatusCode::FOUND, headers).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    signature: Option<String>,
}

/// `PUT /together/upload/{id}?signature=…`: the presigned target of an announced file. No
/// API key; the bytes must match the announced checksum; once preprocessed the URL is spent.
pub(crate) async fn put_upload(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Response {
    match query.signature {
        None => {
            let message = "Query-string authentication requires the Signature parameter.";
            return storage_error(StatusCode::FORBIDDEN, "AccessDenied", message);
        }
        Some(given) if given != signature(&id) => {
            let message = "The request signature we calculated does not match the signature \
                           you provided.";
            return storage_error(StatusCode::FORBIDDEN, "SignatureDoesNotMatch", message);
        }
        Some(_) => {}
    }
    let mut state = lock(&state);
    let Some(file) = state.together.files.get_mut(&id) else {
        let message = "The specified upload does not exist.";
        return storage_error(StatusCode::NOT_FOUND, "NoSuchUpload", message);
    };
    if file.processed {
        return storage_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired.",
        );
    }
    let digest = sha256_hex(&body);
    if file.checksum.as_ref().is_some_and(|c| *c != digest) {
        let message = "The SHA-256 you specified did not match the calculated checksum.";
        return storage_error(StatusCode::BAD_REQUEST, "BadDigest", message);
    }
    file.uploaded = Some(body);
    let etag = format!("\"{}\"", &digest[..32]);
    (StatusCode::OK, [(header::ETAG, etag)]).into_response()
}

/// `POST /together/v1/files/{id}/preprocess`: finishes an upload whose bytes arrived.
pub(crate) async fn preprocess(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    let Some(file) = state.together.files.get(&id).cloned() else {
        return file_error(StatusCode::NOT_FOUND, &format!("File {id} not found"));
    };
    if !file.processed {
        let Some(bytes) = file.uploaded else {
            let message =
                format!("File {id} upload did not finish: PUT its content to the upload URL first");
            return file_error(StatusCode::BAD_REQUEST, &message);
        };
        let stored = SimFile {
            id: id.clone(),
            bytes,
            filename: file.filename,
            purpose: file.purpose,
            created_at: file.created_at,
        };
        state.files.insert(id.clone(), stored);
        state.files_uploaded += 1;
        if let Some(file) = state.together.files.get_mut(&id) {
            file.processed = true;
            file.uploaded = None;
        }
    }
    match shown_file(&state, &id) {
        Some(object) => Json(object).into_response(),
        None => file_error(StatusCode::NOT_FOUND, &format!("File {id} not found")),
    }
}

/// `GET /together/v1/files`: `{"data": [FileResponse]}`, newest first.
pub(crate) async fn list_files(State(state): State<Shared>) -> Response {
    let state = lock(&state);
    let results = state
        .files
        .keys()
        .filter(|id| result_file(&state, id).is_some());
    let mut ids: Vec<&String> = state.together.files.keys().chain(results).collect();
    let created = |id: &String| shown_file(&state, id).and_then(|f| f["created_at"].as_i64());
    ids.sort_by(|a, b| created(b).cmp(&created(a)).then(b.cmp(a)));
    let data: Vec<Value> = ids.iter().filter_map(|id| shown_file(&state, id)).collect();
    Json(json!({"data": data})).into_response()
}

pub(crate) async fn get_file(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match shown_file(&lock(&state), &id) {
        Some(object) => Json(object).into_response(),
        None => file_error(StatusCode::NOT_FOUND, &format!("File {id} not found")),
    }
}

pub(crate) async fn delete_file(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    let together = state.together.files.remove(&id).is_some();
    if !together && result_file(&state, &id).is_none() {
        return file_error(StatusCode::NOT_FOUND, &format!("File {id} not found"));
    }
    state.files.remove(&id);
    Json(json!({"id": id, "deleted": true})).into_response()
}

/// `GET /together/v1/files/{id}/content`: the raw bytes (`text/plain`, as the reference says).
pub(crate) async fn file_content(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let state = lock(&state);
    let pending = state.together.files.get(&id).is_some_and(|f| !f.processed);
    if pending {
        let message = format!("File {id} upload did not finish: it has no content yet");
        return file_error(StatusCode::BAD_REQUEST, &message);
    }
    let known = state.together.files.contains_key(&id) || result_file(&state, &id).is_some();
    match state.files.get(&id).filter(|_| known) {
        Some(file) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            file.bytes.clone(),
        )
            .into_response(),
        None => file_error(StatusCode::NOT_FOUND, &format!("File {id} not found")),
    }
}

/// `BatchCreateParams`; any other member is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBatch {
    endpoint: String,
    input_file_id: String,
    #[serde(default)]
    completion_window: Option<String>,
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default, rename = "priority")]
    _priority: Option<i64>,
}

/// The bytes of a batch's input file and the name they were last announced under, or
/// Together's refusal of the file.
fn batch_input(state: &SimState, id: &str) -> Result<(Bytes, String), (StatusCode, String)> {
    let refuse = |message: String| Err((StatusCode::BAD_REQUEST, message));
    let Some(file) = state.together.files.get(id) else {
        return Err((StatusCode::NOT_FOUND, format!("file {id} not found")));
    };
    if !file.processed {
        return refuse(format!(
            "file {id} has not been preprocessed: its upload did not finish"
        ));
    }
    if file.purpose != "batch-api" {
        return refuse(format!(
            "file {id} has purpose {}: a batch takes a batch-api file",
            file.purpose
        ));
    }
    if file.file_type != "jsonl" {
        return refuse(format!(
            "file {id} is {}: a batch takes jsonl",
            file.file_type
        ));
    }
    let bytes = state
        .files
        .get(id)
        .map(|f| f.bytes.clone())
        .unwrap_or_default();
    if bytes.len() > MAX_BATCH_FILE_BYTES {
        return refuse(format!("file {id} is larger than 100 MB"));
    }
    Ok((bytes, file.announced_as.clone()))
}

/// The model the first line's body names.
fn first_line_model(bytes: &[u8]) -> Option<String> {
    let line = bytes.split(|b| *b == b'\n').find(|l| !l.is_empty())?;
    let request: Value = serde_json::from_slice(line).ok()?;
    request
        .pointer("/body/model")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// What a create asks for that Together refuses before looking at the file.
fn create_refusal(request: &CreateBatch) -> Option<Response> {
    let refuse = |message: &str| Some(batch_error(StatusCode::BAD_REQUEST, message));
    if !ENDPOINTS.contains(&request.endpoint.as_str()) {
        return refuse(&format!(
            "endpoint must be one of: {}",
            ENDPOINTS.join(", ")
        ));
    }
    if request.endpoint != "/v1/chat/completions" {
        return refuse("the simulator runs /v1/chat/completions batches only");
    }
    if request
        .completion_window
        .as_ref()
        .is_some_and(|window| window != "24h")
    {
        return refuse("completion_window: only 24h is offered");
    }
    None
}

/// `POST /together/v1/batches`: 201 `{"job": BatchJob, "warning": null}`.
pub(crate) async fn create_batch(
    State(state): State<Shared>,
    body: Result<Json<CreateBatch>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => return batch_error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    if let Some(refusal) = create_refusal(&request) {
        return refusal;
    }
    let mut state = lock(&state);
    let (bytes, announced_as) = match batch_input(&state, &request.input_file_id) {
        Ok(input) => input,
        Err((status, message)) => return batch_error(status, &message),
    };
    let checked = validate_lines_as(&bytes, &request.endpoint, Dialect::Together);
    let model = request
        .model_id
        .filter(|m| !m.is_empty())
        .or_else(|| first_line_model(&bytes))
        .unwrap_or_default();
    let seed = state.new_id("");
    let id = uuid_like(&seed);
    let metadata = shard_of_file_name(&announced_as).map(|shard| json!({"rowsmith_shard": shard}));
    state.count_for_shard(&metadata);
    let tokens = (bytes.len() / 4) as u64;
    let mut batch = SimBatch::new(
        id.clone(),
        request.input_file_id,
        request.endpoint,
        metadata,
        checked,
        tokens,
    );
    batch.api = Api::Together;
    batch.model = Some(model.clone());
    state.batches.insert(id.clone(), batch);
    state.batch_order.push(id.clone());
    let file_size = bytes.len() as u64;
    let shown = TogetherBatch { model, file_size };
    state.together.batches.insert(id.clone(), shown);
    match job_of(&mut state, &id) {
        Some(job) => (
            StatusCode::CREATED,
            Json(json!({"job": job, "warning": null})),
        )
            .into_response(),
        None => batch_error(StatusCode::INTERNAL_SERVER_ERROR, "batch job vanished"),
    }
}

/// Together's status for the machinery's.
fn status_of(object: &Value) -> &str {
    match object["status"].as_str().unwrap_or("") {
        "validating" => "VALIDATING",
        "in_progress" | "finalizing" => "IN_PROGRESS",
        // Together shows no cancelling state: the batch runs on until it is cancelled.
        "cancelling" if object["in_progress_at"].is_null() => "VALIDATING",
        "cancelling" => "IN_PROGRESS",
        "completed" => "COMPLETED",
        "failed" => "FAILED",
        "expired" => "EXPIRED",
        "cancelled" => "CANCELLED",
        other => other,
    }
}

/// The validation errors of a failed batch as one message.
fn error_of(object: &Value) -> Option<String> {
    let errors = object["errors"]["data"].as_array()?;
    let messages: Vec<String> = errors
        .iter()
        .map(|e| {
            let message = e["message"].as_str().unwrap_or("invalid input");
            match e["line"].as_u64() {
                Some(line) => format!("line {line}: {message}"),
                None => message.to_owned(),
            }
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

/// A `BatchJob` from the machinery's view of the batch; `ran` is how many requests ran
/// before it ended, if it did.
fn job_object(object: &Value, shown: &TogetherBatch, ran: Option<u64>) -> Value {
    let status = status_of(object);
    let counts = &object["request_counts"];
    let count = |name: &str| counts[name].as_u64().unwrap_or(0);
    let total = count("total");
    let done = ran.unwrap_or_else(|| count("completed") + count("failed"));
    let progress = match (status, total) {
        ("COMPLETED", _) => 100.0,
        (_, 0) => 0.0,
        _ => (done as f64 * 1000.0 / total as f64).round() / 10.0,
    };
    let ended_at = ["completed_at", "failed_at", "expired_at", "cancelled_at"]
        .iter()
        .find_map(|k| object[*k].as_i64());
    json!({
        "id": object["id"],
        "user_id": USER_ID,
        "input_file_id": object["input_file_id"],
        "file_size_bytes": shown.file_size,
        "status": status,
        "job_deadline": iso(object["expires_at"].as_i64()),
        "created_at": iso(object["created_at"].as_i64()),
        "endpoint": object["endpoint"],
        "progress": progress,
        "model_id": shown.model,
        "output_file_id": object["output_file_id"],
        "error_file_id": object["error_file_id"],
        "error": if status == "FAILED" { error_of(object) } else { None },
        "completed_at": iso(ended_at),
    })
}

/// Batch `id` moved along by the clock, as Together shows it, if it is Together's.
fn job_of(state: &mut SimState, id: &str) -> Option<Value> {
    let shown = state.together.batches.get(id)?.clone();
    let object = state.advance(id)?;
    let ran = state.batches.get(id).and_then(SimBatch::ran);
    Some(job_object(&object, &shown, ran))
}

fn no_such_batch(id: &str) -> Response {
    batch_error(StatusCode::NOT_FOUND, &format!("batch job {id} not found"))
}

pub(crate) async fn get_batch(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match job_of(&mut lock(&state), &id) {
        Some(job) => Json(job).into_response(),
        None => no_such_batch(&id),
    }
}

/// `GET /together/v1/batches`: a bare array of `BatchJob`, newest first.
pub(crate) async fn list_batches(State(state): State<Shared>) -> Response {
    let mut state = lock(&state);
    let ids: Vec<String> = state
        .batch_order
        .iter()
        .rev()
        .filter(|id| state.together.batches.contains_key(*id))
        .cloned()
        .collect();
    let jobs: Vec<Value> = ids.iter().filter_map(|id| job_of(&mut state, id)).collect();
    Json(Value::Array(jobs)).into_response()
}

/// `POST /together/v1/batches/{id}/cancel`: the job as it stands; it ends `CANCELLED` once
/// the cancellation has gone through. An ended batch cannot be cancelled (400).
pub(crate) async fn cancel_batch(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    let Some(job) = job_of(&mut state, &id) else {
        return no_such_batch(&id);
    };
    let status = job["status"].as_str().unwrap_or("");
    if matches!(status, "COMPLETED" | "FAILED" | "EXPIRED" | "CANCELLED") {
        let message = format!("batch job {id} is already {status} and cannot be cancelled");
        return batch_error(StatusCode::BAD_REQUEST, &message);
    }
    if let Some(batch) = state.batches.get_mut(&id) {
        let at = *batch.cancel_requested.get_or_insert(Instant::now());
        batch.cancelling_at = Some(batch.unix_at(at));
    }
    match job_of(&mut state, &id) {
        Some(job) => Json(job).into_response(),
        None => no_such_batch(&id),
    }
}

/// The `rowsmith_shard` metadata of the job whose file `id` is: an uploaded shard (by its
/// name) or a result file of a batch made from one.
fn shard_metadata_of_file(state: &SimState, id: &str) -> Option<Value> {
    if let Some(file) = state.together.files.get(id) {
        let shard = shard_of_file_name(&file.announced_as)?;
        return Some(json!({"rowsmith_shard": shard}));
    }
    let file = result_file(state, id)?;
    let (batch_id, _) = file.filename.rsplit_once('_')?;
    state.batches.get(batch_id)?.metadata.clone()
}

/// The value of the `file_name` field of a multipart form.
fn file_name_in_form(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let rest = &text[text.find("name=\"file_name\"")?..];
    let rest = &rest[rest.find("\r\n\r\n")? + 4..];
    Some(rest[..rest.find("\r\n")?].to_owned())
}

/// The `rowsmith_shard` metadata a Together call's body names: a create's input file, an
/// announcement's file name.
pub(crate) fn metadata_of_body(state: &SimState, path: &str, body: &[u8]) -> Option<Value> {
    match path {
        "/together/v1/batches" => {
            let body: Value = serde_json::from_slice(body).ok()?;
            shard_metadata_of_file(state, body["input_file_id"].as_str()?)
        }
        "/together/v1/files" => {
            let shard = shard_of_file_name(&file_name_in_form(body)?)?;
            Some(json!({"rowsmith_shard": shard}))
        }
        _ => None,
    }
}

/// The faults of the job a Together path names (its batch, its file), else the default
/// faults; `None` for a path that is not Together's.
pub(crate) fn faults_of_path(state: &SimState, path: &str) -> Option<SimFaults> {
    let rest = path.strip_prefix("/together/")?;
    let metadata = if let Some(rest) = rest.strip_prefix("v1/batches/") {
        let id = rest.split('/').next().unwrap_or("");
        state.batches.get(id).and_then(|b| b.metadata.clone())
    } else {
        rest.strip_prefix("v1/files/")
            .or_else(|| rest.strip_prefix("upload/"))
            .and_then(|rest| rest.split('/').next())
            .and_then(|id| shard_metadata_of_file(state, id))
    };
    Some(state.faults_of_metadata(&metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_shaped_and_signatures_differ_per_file() {
        let id = uuid_like("seed");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert_ne!(signature("file-a"), signature("file-b"));
        assert_eq!(iso(Some(0)), json!("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn the_file_name_is_read_from_a_multipart_announcement() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch-api\r\n\
                     --b\r\nContent-Disposition: form-data; name=\"file_name\"\r\n\r\n\
                     rowsmith-j.1.2.jsonl\r\n--b--\r\n";
        assert_eq!(
            file_name_in_form(body).as_deref(),
            Some("rowsmith-j.1.2.jsonl")
        );
        assert_eq!(file_name_in_form(b"--b--"), None);
    }
}
