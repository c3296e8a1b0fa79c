//! The Anthropic Message Batches endpoints of the simulator: create (requests inline,
//! envelope validated at once, params only as `errored` results), retrieve, list (newest
//! first, `after_id` / `before_id`), cancel, delete (only once ended) and results (unordered
//! JSONL, errors nested twice). Counters other than `processing` stay 0 until the batch ends.
//!
//! Anthropic batches carry no metadata, so the simulator tells attempts apart by how often it
//! has seen the same request, and counts expiring shards by batch order.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::anthropic_state::{Batch, Ended};
use crate::faults::{Fate, fate, with_room};
use crate::openai::{Shared, lock};

/// The label under which permanent failures of Anthropic requests are counted in `/sim/stats`.
pub const STATS_JOB: &str = "anthropic";

fn rfc3339_now() -> String {
    rfc3339_at(time::OffsetDateTime::now_utc())
}

fn rfc3339_at(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Deserialize)]
pub struct CreateBody {
    requests: Vec<Value>,
}

pub async fn create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &rejection.body_text(),
            );
        }
    };
    if body.requests.is_empty() || body.requests.len() > 100_000 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "requests: must hold 1 to 100,000 items",
        );
    }
    let mut ids = std::collections::HashSet::new();
    for request in &body.requests {
        let id = request["custom_id"].as_str().unwrap_or("");
        if !valid_custom_id(id) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("custom_id {id:?} must match ^[a-zA-Z0-9_-]{{1,64}}$"),
            );
        }
        if !ids.insert(id.to_owned()) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("custom_id {id:?} is not unique in the batch"),
            );
        }
    }
    let mut state = lock(&state);
    let state = &mut *state;
    let attempts: Vec<u32> = body
        .requests
        .iter()
        .map(|request| {
            // A retry may give the request more output tokens; it is the same request.
            let mut same = request.clone();
            if let Some(params) = same.get_mut("params").and_then(Value::as_object_mut) {
                params.remove("max_tokens");
            }
            let digest: [u8; 32] = Sha256::digest(same.to_string().as_bytes()).into();
            let seen = state.anthropic.seen.entry(digest).or_default();
            *seen += 1;
            *seen
        })
        .collect();
    let first_attempt = attempts.iter().all(|a| *a == 1);
    let mut expires_after = None;
    if first_attempt {
        let ordinal = state.anthropic.first_attempt_batches;
        state.anthropic.first_attempt_batches += 1;
        let faults = &state.settings.faults;
        if faults.expire_shards.contains(&ordinal) {
            expires_after = Some(
                (body.requests.len() as f64 * faults.expire_at_fraction.clamp(0.0, 1.0)) as usize,
            );
        }
    }
    let id = state.new_id("msgbatch_");
    let now = time::OffsetDateTime::now_utc();
    let batch = Batch {
        id: id.clone(),
        requests: body.requests,
        attempts,
        created: Instant::now(),
        created_at: rfc3339_at(now),
        // Anthropic's batches expire 24 hours after creation.
        expires_at: rfc3339_at(now + time::Duration::hours(24)),
        expires_after,
        cancel_requested: None,
        ended: None,
    };
    state.anthropic.batches.insert(id.clone(), batch);
    state.anthropic.order.push(id.clone());
    match advance(state, &id, &host(&headers)) {
        Some(object) => Json(object).into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "batch vanished",
        ),
    }
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

/// Moves a batch along by the clock and returns its API object.
fn advance(state: &mut crate::openai::SimState, id: &str, host: &str) -> Option<Value> {
    let mut batch = state.anthropic.batches.get(id)?.clone();
    let rate = state.settings.rows_per_second;
    let startup = state.settings.validating;
    let total = batch.requests.len();
    let done_at = |at: Instant| -> usize {
        let running = at.saturating_duration_since(batch.created + startup);
        ((running.as_secs_f64() * rate) as usize).min(total)
    };
    if batch.ended.is_none() {
        let now_done = done_at(Instant::now());
        if let Some((at, _)) = &batch.cancel_requested {
            if at.elapsed() >= state.settings.cancelling {
                batch.ended = Some(end(state, &batch, done_at(*at), "canceled"));
            }
        } else if let Some(limit) = batch.expires_after.filter(|limit| now_done >= *limit) {
            batch.ended = Some(end(state, &batch, limit, "expired"));
        } else if now_done >= total
            && batch.created.elapsed() >= startup + Duration::from_secs_f64(total as f64 / rate)
        {
            // Every request done: `not_done` applies to none.
            batch.ended = Some(end(state, &batch, total, "expired"));
        }
    }
    let processing_status = match (&batch.ended, &batch.cancel_requested) {
        (Some(_), _) => "ended",
        (None, Some(_)) => "canceling",
        (None, None) => "in_progress",
    };
    let counts = match &batch.ended {
        Some(ended) => ended.counts.clone(),
        None => {
            json!({"processing": total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
        }
    };
    let object = json!({
        "id": batch.id,
        "type": "message_batch",
        "processing_status": processing_status,
        "request_counts": counts,
        "ended_at": batch.ended.as_ref().map(|e| e.at.clone()),
        "created_at": batch.created_at,
        "expires_at": batch.expires_at,
        "archived_at": null,
        "cancel_initiated_at": batch.cancel_requested.as_ref().map(|(_, at)| at.clone()),
        "results_url": batch.ended.as_ref().map(|_| format!("http://{host}/v1/messages/batches/{}/results", batch.id)),
    });
    state.anthropic.batches.insert(batch.id.clone(), batch);
    Some(object)
}

/// Ends a batch: the first `done` requests answered by their fate, the rest `not_done`
/// (`canceled` or `expired`).
fn end(state: &mut crate::openai::SimState, batch: &Batch, done: usize, not_done: &str) -> Ended {
    let faults = state.settings.faults.clone();
    let mut lines = Vec::with_capacity(batch.requests.len());
    let mut counts =
        json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    for (index, request) in batch.requests.iter().enumerate() {
        let custom_id = request["custom_id"].as_str().unwrap_or("").to_owned();
        let (kind, result) = if index >= done {
            (not_done, json!({"type": not_done}))
        } else {
            let attempt = batch.attempts[index];
            let row_fate = with_room(
                &faults,
                request["params"]["max_tokens"].as_u64(),
                fate(&faults, STATS_JOB, attempt, &batch.id, &custom_id),
            );
            if row_fate.is_permanent() {
                state
                    .permanent_failures
                    .entry(STATS_JOB.to_owned())
                    .or_default()
                    .insert(custom_id.clone());
            }
            state.requests_answered += 1;
            answer(&batch.id, index, &request["params"], row_fate)
        };
        counts[kind] = json!(counts[kind].as_u64().unwrap_or(0) + 1);
        lines.push(json!({"custom_id": custom_id, "result": result}).to_string());
    }
    let seed = batch
        .id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut results = lines.join("\n");
    results.push('\n');
    Ended {
        at: rfc3339_now(),
        counts,
        results: Bytes::from(results),
    }
}

/// The parameters of a batch request's `params` that the Messages API declares: the
/// official SDK's `MessageCreateParamsNonStreaming` (anthropic 2.14.0, as pinned).
const MESSAGE_PARAMETERS: &[&str] = &[
    "max_tokens",
    "messages",
    "model",
    "cache_control",
    "container",
    "diagnostics",
    "inference_geo",
    "metadata",
    "output_config",
    "service_tier",
    "speed",
    "stop_sequences",
    "system",
    "thinking",
    "tool_choice",
    "tools",
    "user_profile_id",
    "workspace_id",
    "stream",
];

/// Why the API would refuse these `params`: a missing required one, one it does not declare,
/// or streaming.
fn params_refusal(params: &Value) -> Option<String> {
    let Some(object) = params.as_object() else {
        return Some("params: Input should be an object".into());
    };
    for required in ["model", "max_tokens", "messages"] {
        if !object.contains_key(required) {
            return Some(format!("params.{required}: Field required"));
        }
    }
    if let Some(extra) = object
        .keys()
        .find(|key| !MESSAGE_PARAMETERS.contains(&key.as_str()))
    {
        return Some(format!("params.{extra}: Extra inputs are not permitted"));
    }
    if object.get("stream").and_then(Value::as_bool) == Some(true) {
        return Some("params.stream: batch requests cannot stream".into());
    }
    None
}

/// One request's result, shaped by its fate: `(count kind, result object)`.
fn answer(batch_id: &str, index: usize, params: &Value, row_fate: Fate) -> (&'static str, Value) {
    let errored = |kind: &str, message: &str| {
        (
            "errored",
            json!({"type": "errored", "error": {"type": "error",
            "error": {"type": kind, "message": message}, "request_id": format!("req_{index}")}}),
        )
    };
    // Anthropic checks `params` when it runs the request: a bad one is an errored result.
    if let Some(message) = params_refusal(params) {
        return errored("invalid_request_error", &message);
    }
    match row_fate {
        Fate::ServerError => return errored("api_error", "Internal server error"),
        Fate::BadRequest => {
            return errored("invalid_request_error", "messages: the request is invalid");
        }
        _ => {}
    }
    let message = message(
        &format!("msg_{index}_{batch_id}"),
        index,
        params,
        &params["model"],
        row_fate,
    );
    (
        "succeeded",
        json!({"type": "succeeded", "message": message}),
    )
}

/// The fake model's Claude message (`id`, naming `model`) answering the Messages request
/// `params` (request `index` of its batch), shaped by its fate: a forced `tool_use` whose
/// input follows the first tool's `input_schema`, or the cut-off, broken or refused answer
/// the fate asks for. Bedrock's `modelOutput` is the same message.
pub(crate) fn message(
    id: &str,
    index: usize,
    params: &Value,
    model: &Value,
    row_fate: Fate,
) -> Value {
    let tool = params.pointer("/tools/0").cloned().unwrap_or(Value::Null);
    let schema = tool.get("input_schema").cloned().unwrap_or(json!({}));
    let user = params
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let mut input = crate::model::answer(&schema, user);
    let tool_use = |input: Value| json!({"type": "tool_use", "id": format!("toolu_{index}"), "name": tool["name"], "input": input});
    let (content, stop_reason) = match row_fate {
        Fate::InvalidJson => {
            let text = input.to_string();
            (
                json!([{"type": "text", "text": &text[..text.len() / 2]}]),
                "end_turn",
            )
        }
        Fate::SchemaViolation => {
            if let Some(object) = input.as_object_mut() {
                let first = object.keys().next().cloned();
                if let Some(first) = first {
                    object.remove(&first);
                }
            }
            (json!([tool_use(input)]), "tool_use")
        }
        Fate::Length => (
            json!([{"type": "text", "text": "{\"partial\": "}]),
            "max_tokens",
        ),
        Fate::Refusal => (
            json!([{"type": "text", "text": "I can't help with that."}]),
            "refusal",
        ),
        _ => (json!([tool_use(input)]), "tool_use"),
    };
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": user.len() / 4, "output_tokens": 20},
    })
}

pub async fn retrieve(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut state = lock(&state);
    match advance(&mut state, &id, &host(&headers)) {
        Some(object) => Json(object).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("batch {id} not found"),
        ),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    after_id: Option<String>,
    before_id: Option<String>,
}

pub async fn list(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let mut state = lock(&state);
    let limit = query.limit.unwrap_or(20).clamp(1, 1000);
    let newest_first: Vec<String> = state.anthropic.order.iter().rev().cloned().collect();
    let (start, end) = match (&query.after_id, &query.before_id) {
        (Some(after), _) => {
            let start = newest_first
                .iter()
                .position(|id| id == after)
                .map_or(newest_first.len(), |i| i + 1);
            (start, (start + limit).min(newest_first.len()))
        }
        (None, Some(before)) => {
            let end = newest_first.iter().position(|id| id == before).unwrap_or(0);
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, limit.min(newest_first.len())),
    };
    let page = &newest_first[start..end];
    let host = host(&headers);
    let data: Vec<Value> = page
        .iter()
        .filter_map(|id| advance(&mut state, id, &host))
        .collect();
    Json(json!({"data": data, "has_more": end < newest_first.len(), "first_id": page.first(), "last_id": page.last()}))
        .into_response()
}

pub async fn cancel(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut state = lock(&state);
    let Some(batch) = state.anthropic.batches.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("batch {id} not found"),
        );
    };
    if batch.ended.is_none() && batch.cancel_requested.is_none() {
        batch.cancel_requested = Some((Instant::now(), rfc3339_now()));
    }
    let host = host(&headers);
    let mut object = advance(&mut state, &id, &host).unwrap_or(Value::Null);
    if object["processing_status"] == "ended" {
        return Json(object).into_response();
    }
    object["processing_status"] = json!("canceling");
    Json(object).into_response()
}

pub async fn delete(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut state = lock(&state);
    let Some(object) = advance(&mut state, &id, &host(&headers)) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("batch {id} not found"),
        );
    };
    if object["processing_status"] != "ended" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "a batch can be deleted only once it has ended; cancel it first",
        );
    }
    state.anthropic.batches.remove(&id);
    state.anthropic.order.retain(|b| b != &id);
    Json(json!({"id": id, "type": "message_batch_deleted"})).into_response()
}

pub async fn results(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut state = lock(&state);
    if advance(&mut state, &id, &host(&headers)).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("batch {id} not found"),
        );
    }
    match state
        .anthropic
        .batches
        .get(&id)
        .and_then(|b| b.ended.clone())
    {
        Some(ended) => (
            StatusCode::OK,
            [("content-type", "application/binary")],
            ended.results,
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "results are available once the batch has ended",
        ),
    }
}
