//! Mistral batch jobs (`/v1/batch/jobs`) over the same files and batch machinery as the
//! OpenAI API: a job names its input files, endpoint and model, its lines are
//! `{custom_id, body}`, and it shows Mistral's upper-case statuses and request counts.

use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::openai::{Api, Shared, SimBatch, error, lock, validate_lines};

#[derive(Debug, Deserialize)]
pub(crate) struct CreateJob {
    input_files: Vec<String>,
    endpoint: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    timeout_hours: Option<u64>,
}

/// Mistral's view of a batch: its status names and counts.
fn job_object(object: &Value, model: &str) -> Value {
    let status = match object["status"].as_str().unwrap_or("") {
        "validating" => "QUEUED",
        "in_progress" | "finalizing" => "RUNNING",
        "completed" => "SUCCESS",
        "failed" => "FAILED",
        "expired" => "TIMEOUT_EXCEEDED",
        "cancelling" => "CANCELLATION_REQUESTED",
        "cancelled" => "CANCELLED",
        other => other,
    };
    let counts = &object["request_counts"];
    let (succeeded, failed) = (
        counts["completed"].as_u64().unwrap_or(0),
        counts["failed"].as_u64().unwrap_or(0),
    );
    let errors: Vec<Value> = object["errors"]["data"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| json!({"message": format!("{}: {}", e["code"].as_str().unwrap_or("error"), e["message"].as_str().unwrap_or("")), "count": 1}))
                .collect()
        })
        .unwrap_or_default();
    let completed_at = ["completed_at", "failed_at", "expired_at", "cancelled_at"]
        .iter()
        .find_map(|k| object[*k].as_i64());
    json!({
        "id": object["id"],
        "object": "batch",
        "input_files": [object["input_file_id"]],
        "metadata": object["metadata"],
        "endpoint": object["endpoint"],
        "model": model,
        "output_file": object["output_file_id"],
        "error_file": object["error_file_id"],
        "errors": errors,
        "status": status,
        "created_at": object["created_at"],
        "total_requests": counts["total"],
        "completed_requests": succeeded + failed,
        "succeeded_requests": succeeded,
        "failed_requests": failed,
        "started_at": object["in_progress_at"],
        "completed_at": completed_at,
    })
}

pub(crate) async fn create(
    State(state): State<Shared>,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::UNPROCESSABLE_ENTITY, &rejection.body_text()),
    };
    if request.endpoint != "/v1/chat/completions" {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "endpoint: the simulator runs /v1/chat/completions jobs only",
        );
    }
    let Some(model) = request.model.filter(|m| !m.is_empty()) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "model: a job names its model",
        );
    };
    let [file_id] = request.input_files.as_slice() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "input_files: the simulator takes exactly one file",
        );
    };
    if request.timeout_hours.is_some_and(|h| h == 0 || h > 168) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "timeout_hours: 1 to 168");
    }
    let mut state = lock(&state);
    let Some(file) = state.files.get(file_id) else {
        return error(StatusCode::NOT_FOUND, &format!("File {file_id} not found"));
    };
    let checked = validate_lines(&file.bytes, &request.endpoint, true);
    let tokens = (file.bytes.len() / 4) as u64;
    let id = state.new_id("job_");
    state.count_for_shard(&request.metadata);
    let mut batch = SimBatch::new(
        id.clone(),
        file_id.clone(),
        request.endpoint,
        request.metadata,
        checked,
        tokens,
    );
    batch.api = Api::Mistral;
    batch.model = Some(model.clone());
    state.batches.insert(id.clone(), batch);
    state.batch_order.push(id.clone());
    match state.advance(&id) {
        Some(object) => Json(job_object(&object, &model)).into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "job vanished"),
    }
}

fn job_of(state: &mut crate::openai::SimState, id: &str) -> Option<Value> {
    let model = state
        .batches
        .get(id)
        .filter(|b| b.api == Api::Mistral)?
        .model
        .clone()
        .unwrap_or_default();
    let object = state.advance(id)?;
    Some(job_object(&object, &model))
}

pub(crate) async fn get(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match job_of(&mut lock(&state), &id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("Batch job {id} not found")),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    page: Option<usize>,
    page_size: Option<usize>,
}

/// Newest first, by page number.
pub(crate) async fn list(State(state): State<Shared>, Query(query): Query<ListQuery>) -> Response {
    let mut state = lock(&state);
    let size = query.page_size.unwrap_or(100).clamp(1, 1000);
    let ids: Vec<String> = state
        .batch_order
        .iter()
        .rev()
        .filter(|id| {
            state
                .batches
                .get(*id)
                .is_some_and(|b| b.api == Api::Mistral)
        })
        .cloned()
        .collect();
    let total = ids.len();
    let data: Vec<Value> = ids
        .iter()
        .skip(query.page.unwrap_or(0) * size)
        .take(size)
        .filter_map(|id| job_of(&mut state, id))
        .collect();
    Json(json!({"object": "list", "data": data, "total": total})).into_response()
}

pub(crate) async fn cancel(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    let Some(job) = job_of(&mut state, &id) else {
        return error(StatusCode::NOT_FOUND, &format!("Batch job {id} not found"));
    };
    if matches!(
        job["status"].as_str(),
        Some("SUCCESS" | "FAILED" | "TIMEOUT_EXCEEDED" | "CANCELLED")
    ) {
        return Json(job).into_response();
    }
    if let Some(batch) = state.batches.get_mut(&id) {
        let at = *batch.cancel_requested.get_or_insert(Instant::now());
        batch.cancelling_at = Some(batch.unix_at(at));
    }
    match job_of(&mut state, &id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("Batch job {id} not found")),
    }
}
