//! The OpenAI Files + Batches endpoints of the simulator.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::{Value, json};

use rowsmith_config::{SimFaults, SimSettings};

use crate::faults::{Fate, fate, with_room};
use crate::model::Line;

pub(crate) type Shared = Arc<Mutex<SimState>>;

/// Everything the simulator holds: files, batches and counters.
#[derive(Debug)]
pub struct SimState {
    pub(crate) settings: SimSettings,
    pub(crate) anthropic: crate::anthropic_state::AnthropicState,
    pub(crate) gemini: crate::gemini_state::GeminiState,
    pub(crate) bedrock: crate::bedrock_state::BedrockState,
    pub(crate) together: crate::together_state::TogetherState,
    pub(crate) files: HashMap<String, SimFile>,
    pub(crate) batches: HashMap<String, SimBatch>,
    /// Batch ids in creation order.
    pub(crate) batch_order: Vec<String>,
    next_id: u64,
    pub(crate) files_uploaded: u64,
    pub(crate) batches_per_shard: BTreeMap<String, u64>,
    /// Faults set for one job (`POST /sim/faults/<job_id>`).
    job_faults: HashMap<String, SimFaults>,
    /// custom_ids made to fail permanently, per job.
    pub(crate) permanent_failures: BTreeMap<String, BTreeSet<String>>,
    pub(crate) requests_answered: u64,
    token_limit_failures: u64,
    /// API calls seen, for the every-n-th HTTP faults.
    pub(crate) api_calls: u64,
    pub(crate) http_faults_injected: u64,
    /// Batch creations seen and answers of them lost after the batch was made.
    pub(crate) creates_seen: u64,
    pub(crate) create_responses_lost: u64,
    pub(crate) upload_chunks_seen: u64,
    pub(crate) upload_chunks_lost: u64,
    /// Result downloads seen and cut off by a dropped connection.
    pub(crate) downloads_seen: u64,
    pub(crate) downloads_dropped: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct SimFile {
    pub(crate) id: String,
    pub(crate) bytes: Bytes,
    pub(crate) filename: String,
    pub(crate) purpose: String,
    pub(crate) created_at: i64,
}

/// The API a batch was created through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Mistral,
    Gemini,
    Together,
}

#[derive(Debug, Clone)]
pub(crate) struct SimBatch {
    pub(crate) id: String,
    pub(crate) input_file_id: String,
    pub(crate) endpoint: String,
    pub(crate) metadata: Option<Value>,
    pub(crate) created: Instant,
    pub(crate) created_at: i64,
    pub(crate) total: u64,
    /// Set when the input fails validation.
    pub(crate) errors: Option<Vec<Value>>,
    pub(crate) cancel_requested: Option<Instant>,
    /// Terminal state once reached, with its files.
    pub(crate) ended: Option<Ended>,
    /// Input tokens (bytes / 4) the batch holds in the enqueued-token quota.
    pub(crate) tokens: u64,
    /// Whether it passed validation, the quota check included.
    pub(crate) admitted: bool,
    /// Whose API made it (each lists only its own; Mistral lines carry no method or url,
    /// Gemini lines are `{key, request}`, Together's take its own chat parameters), and the
    /// model the job names.
    pub(crate) api: Api,
    pub(crate) model: Option<String>,
    /// Unix seconds of the state changes seen so far.
    pub(crate) in_progress_at: Option<i64>,
    pub(crate) finalizing_at: Option<i64>,
    pub(crate) cancelling_at: Option<i64>,
}

impl SimBatch {
    /// A batch created now of file `input_file_id`; `errors` fail it at validation.
    pub(crate) fn new(
        id: String,
        input_file_id: String,
        endpoint: String,
        metadata: Option<Value>,
        (total, errors): (u64, Option<Vec<Value>>),
        tokens: u64,
    ) -> Self {
        SimBatch {
            id,
            input_file_id,
            endpoint,
            metadata,
            created: Instant::now(),
            created_at: unix_now(),
            total: if errors.is_some() { 0 } else { total },
            errors,
            cancel_requested: None,
            api: Api::OpenAi,
            model: None,
            in_progress_at: None,
            finalizing_at: None,
            cancelling_at: None,
            ended: None,
            tokens,
            admitted: false,
        }
    }

    /// `at` as Unix seconds, on the clock of `created_at`.
    pub(crate) fn unix_at(&self, at: Instant) -> i64 {
        self.created_at + at.saturating_duration_since(self.created).as_secs() as i64
    }

    /// How many of its requests ran (answered or failed), once it ended.
    pub(crate) fn ran(&self) -> Option<u64> {
        self.ended.as_ref().map(|ended| ended.ran)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Ended {
    status: &'static str,
    at: i64,
    completed: u64,
    failed: u64,
    /// Requests that ran before it ended (the rest are failed as not done).
    ran: u64,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
}

/// The batch's API object as OpenAI shows it, in `status` with `completed` requests done
/// unless it ended.
fn batch_object(batch: &SimBatch, status: &str, completed: u64) -> Value {
    let mut object = json!({
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors.as_ref().map(|data| json!({"object": "list", "data": data})),
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": null,
        "error_file_id": null,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.created_at + 86_400,
        "finalizing_at": batch.finalizing_at,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": null,
        "request_counts": {"total": batch.total, "completed": completed, "failed": 0},
        "metadata": batch.metadata,
    });
    if let Some(ended) = &batch.ended {
        object["status"] = json!(ended.status);
        object["output_file_id"] = json!(ended.output_file_id);
        object["error_file_id"] = json!(ended.error_file_id);
        object["request_counts"]["completed"] = json!(ended.completed);
        object["request_counts"]["failed"] = json!(ended.failed);
        let stamp = match ended.status {
            "completed" => "completed_at",
            "failed" => "failed_at",
            "expired" => "expired_at",
            _ => "cancelled_at",
        };
        object[stamp] = json!(ended.at);
    } else if batch.cancel_requested.is_some() {
        object["status"] = json!("cancelling");
    }
    object
}

/// `(job_id, attempt, shard)` from the `rowsmith_shard` metadata, when the batch has it.
fn shard_of(metadata: &Option<Value>) -> Option<(String, u32, u32)> {
    let dotted = metadata.as_ref()?.get("rowsmith_shard")?.as_str()?;
    let mut parts = dotted.rsplitn(3, '.');
    let shard = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    Some((parts.next()?.to_owned(), attempt, shard))
}

pub(crate) fn unix_now() -> i64 {
    rowsmith_contract::now_unix_ms() / 1000
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    (status, Json(body)).into_response()
}

impl SimState {
    pub fn new(settings: SimSettings) -> Self {
        Self {
            settings,
            anthropic: Default::default(),
            gemini: Default::default(),
            bedrock: Default::default(),
            together: Default::default(),
            files: HashMap::new(),
            batches: HashMap::new(),
            batch_order: Vec::new(),
            next_id: 0,
            files_uploaded: 0,
            batches_per_shard: BTreeMap::new(),
            job_faults: HashMap::new(),
            permanent_failures: BTreeMap::new(),
            requests_answered: 0,
            token_limit_failures: 0,
            api_calls: 0,
            http_faults_injected: 0,
            creates_seen: 0,
            create_responses_lost: 0,
            upload_chunks_seen: 0,
            upload_chunks_lost: 0,
            downloads_seen: 0,
            downloads_dropped: 0,
        }
    }

    /// Counts a batch created for the shard its metadata names.
    pub(crate) fn count_for_shard(&mut self, metadata: &Option<Value>) {
        if let Some(shard) = metadata
            .as_ref()
            .and_then(|m| m.get("rowsmith_shard"))
            .and_then(Value::as_str)
        {
            *self.batches_per_shard.entry(shard.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!(
            "{prefix}{:016x}{:08x}",
            nuid_like(self.next_id),
            self.next_id
        )
    }

    fn model_of(&self, batch: &SimBatch) -> String {
        if let Some(model) = &batch.model {
            return model.clone();
        }
        self.files
            .get(&batch.input_file_id)
            .and_then(|f| f.bytes.split(|b| *b == b'\n').next().map(<[u8]>::to_vec))
            .and_then(|line| serde_json::from_slice::<Value>(&line).ok())
            .and_then(|v| {
                v.pointer("/body/model")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    fn faults_for(&self, batch: &SimBatch) -> (SimFaults, String, u32, Option<u32>) {
        match shard_of(&batch.metadata) {
            Some((job_id, attempt, shard)) => {
                let faults = self
                    .job_faults
                    .get(&job_id)
                    .unwrap_or(&self.settings.faults)
                    .clone();
                (faults, job_id, attempt, Some(shard))
            }
            None => (self.settings.faults.clone(), String::new(), 1, None),
        }
    }

    /// The faults of the job a batch's metadata names, else the default faults.
    pub(crate) fn faults_of_metadata(&self, metadata: &Option<Value>) -> SimFaults {
        shard_of(metadata)
            .and_then(|(job_id, _, _)| self.job_faults.get(&job_id))
            .unwrap_or(&self.settings.faults)
            .clone()
    }

    /// The faults of the job whose batch (or a batch's result file) an API path names, else
    /// the default faults.
    pub(crate) fn faults_of_path(&self, path: &str) -> SimFaults {
        let batch_path = path
            .strip_prefix("/v1/batches/")
            .or_else(|| path.strip_prefix("/v1/batch/jobs/"))
            .or_else(|| path.strip_prefix("/v1beta/batches/"));
        let batch = match batch_path {
            Some(rest) => rest
                .split(['/', ':'])
                .next()
                .and_then(|id| self.batches.get(id)),
            None => path
                .strip_prefix("/v1/files/")
                .or_else(|| path.strip_prefix("/download/v1beta/files/"))
                .and_then(|rest| rest.split(['/', ':']).next())
                .and_then(|id| self.files.get(id))
                .and_then(|file| file.filename.rsplit_once('_'))
                .and_then(|(batch_id, _)| self.batches.get(batch_id)),
        };
        match batch {
            Some(batch) => self.faults_of_metadata(&batch.metadata),
            None => self.settings.faults.clone(),
        }
    }

    /// The faults in force for batch `batch_id` (its job's, else the default), if it exists.
    pub(crate) fn faults_of_batch(&self, batch_id: &str) -> Option<SimFaults> {
        self.batches
            .get(batch_id)
            .map(|batch| self.faults_for(batch).0)
    }

    /// Moves a batch along by the clock and returns its API object.
    pub(crate) fn advance(&mut self, batch_id: &str) -> Option<Value> {
        let mut batch = self.batches.get(batch_id)?.clone();
        let validating = self.settings.validating;
        let finalizing = self.settings.finalizing;
        let rate = self.settings.rows_per_second;
        let elapsed = batch.created.elapsed();
        let (created, total) = (batch.created, batch.total);
        let progress_at = |at: Instant| -> u64 {
            let running = at.saturating_duration_since(created + validating);
            ((running.as_secs_f64() * rate) as u64).min(total)
        };
        let (faults, _, attempt, shard) = self.faults_for(&batch);
        let expires_after = (attempt == 1
            && shard.is_some_and(|s| faults.expire_shards.contains(&s)))
        .then(|| (batch.total as f64 * faults.expire_at_fraction.clamp(0.0, 1.0)) as u64);
        let mut status = "validating";
        let mut completed = 0;
        if batch.ended.is_none()
            && !batch.admitted
            && batch.errors.is_none()
            && elapsed >= validating
        {
            self.admit(&mut batch, faults.enqueued_token_quota);
        }
        if batch.admitted && batch.in_progress_at.is_none() {
            batch.in_progress_at = Some(batch.unix_at(created + validating));
        }
        if batch.ended.is_none() {
            if batch.errors.is_some() && elapsed >= validating {
                batch.ended = Some(self.end(&batch, "failed", 0));
            } else if let Some(cancelled) = batch.cancel_requested {
                batch.cancelling_at = Some(batch.unix_at(cancelled));
                // What runs when the cancel comes is done; the rest is not.
                let done = progress_at(cancelled);
                if cancelled.elapsed() >= self.settings.cancelling {
                    batch.ended = Some(self.end(&batch, "cancelled", done));
                } else {
                    (status, completed) = ("cancelling", done);
                }
            } else if elapsed >= validating {
                completed = progress_at(Instant::now());
                status = "in_progress";
                match expires_after {
                    Some(limit) if completed >= limit => {
                        batch.ended = Some(self.end(&batch, "expired", limit));
                    }
                    _ if completed >= batch.total => {
                        let all_done_after =
                            validating + Duration::from_secs_f64(batch.total as f64 / rate);
                        status = "finalizing";
                        batch.finalizing_at = Some(batch.unix_at(created + all_done_after));
                        if elapsed >= all_done_after + finalizing {
                            batch.ended = Some(self.end(&batch, "completed", batch.total));
                        }
                    }
                    _ => {}
                }
            }
        }
        let object = batch_object(&batch, status, completed);
        self.batches.insert(batch.id.clone(), batch);
        Some(object)
    }

    /// Validation passed: the batch runs unless the enqueued-token quota is full, then it
    /// fails with `token_limit_exceeded` as OpenAI's does.
    fn admit(&mut self, batch: &mut SimBatch, quota: Option<u64>) {
        let in_use: u64 = self
            .batches
            .values()
            .filter(|other| other.id != batch.id && other.admitted && other.ended.is_none())
            .map(|other| other.tokens)
            .sum();
        match quota {
            Some(quota) if in_use > 0 && in_use + batch.tokens > quota => {
                self.token_limit_failures += 1;
                let message = format!(
                    "Enqueued token limit reached for {}. Limit: {quota} enqueued tokens. Please try \
                     again once some in_progress batches have been completed.",
                    self.model_of(batch)
                );
                batch.errors = Some(vec![json!({"code": "token_limit_exceeded", "line": null,
                    "param": null, "message": message})]);
            }
            _ => batch.admitted = true,
        }
    }

    /// Ends a batch: the first `done` requests are answered (each by its fate) into the output
    /// and error files, the rest get an expiry or cancellation error line.
    fn end(&mut self, batch: &SimBatch, status: &'static str, done: u64) -> Ended {
        let (faults, job_id, attempt, _) = self.faults_for(batch);
        let input = self
            .files
            .get(&batch.input_file_id)
            .map(|f| f.bytes.clone())
            .unwrap_or_default();
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let gemini = batch.api == Api::Gemini;
        let parameters = match batch.api {
            Api::Together => crate::together_state::CHAT_PARAMETERS,
            _ => CHAT_PARAMETERS,
        };
        // An expired Gemini batch keeps no results at all.
        let done = if gemini && status == "expired" {
            0
        } else {
            done
        };
        let mut inline_failures = 0u64;
        let gemini_error_name = if faults.gemini_errors_as_status {
            "status"
        } else {
            "error"
        };
        if status != "failed" {
            for (index, line) in input
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let request: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
                let id_field = if gemini { "key" } else { "custom_id" };
                let custom_id = request[id_field].as_str().unwrap_or("").to_owned();
                if index as u64 >= done {
                    // Gemini writes nothing for a request it did not get to.
                    if !gemini {
                        errors.push(not_done_line(&batch.id, index, &custom_id, status));
                    }
                    continue;
                }
                let allowed = request["body"]["max_completion_tokens"]
                    .as_u64()
                    .or(request["body"]["max_tokens"].as_u64())
                    .or(request
                        .pointer("/request/generationConfig/maxOutputTokens")
                        .and_then(Value::as_u64));
                let fate = with_room(
                    &faults,
                    allowed,
                    fate(&faults, &job_id, attempt, &batch.id, &custom_id),
                );
                if fate.is_permanent() {
                    self.permanent_failures
                        .entry(job_id.clone())
                        .or_default()
                        .insert(custom_id.clone());
                }
                self.requests_answered += 1;
                if gemini {
                    // One responses file, errors inline.
                    match crate::gemini_wire::answer_line(index, &request, fate, gemini_error_name)
                    {
                        Line::Output(text) => output.push(text),
                        Line::Error(text) => {
                            inline_failures += 1;
                            output.push(text);
                        }
                    }
                    continue;
                }
                match answer_line(&batch.id, index, &request, fate, parameters) {
                    Line::Output(text) => output.push(text),
                    Line::Error(text) => errors.push(text),
                }
            }
        }
        shuffle_lines(&batch.id, &mut output, &mut errors);
        let (completed, failed) = (
            output.len() as u64 - inline_failures,
            errors.len() as u64 + inline_failures,
        );
        let output_file_id = self.store_lines(&batch.id, "output", output);
        let error_file_id = self.store_lines(&batch.id, "error", errors);
        Ended {
            status,
            at: unix_now(),
            completed,
            failed,
            // A failed batch ends with `done` 0.
            ran: done.min(batch.total),
            output_file_id,
            error_file_id,
        }
    }

    fn store_lines(&mut self, batch_id: &str, kind: &str, lines: Vec<String>) -> Option<String> {
        if lines.is_empty() {
            return None;
        }
        let mut bytes = lines.join("\n");
        bytes.push('\n');
        let id = self.new_id("file-");
        let file = SimFile {
            id: id.clone(),
            bytes: Bytes::from(bytes),
            filename: format!("{batch_id}_{kind}.jsonl"),
            purpose: "batch_output".into(),
            created_at: unix_now(),
        };
        self.files.insert(id.clone(), file);
        Some(id)
    }
}

/// Result lines in an order of their own, as the services write them (fixed per batch).
fn shuffle_lines(batch_id: &str, output: &mut [String], errors: &mut [String]) {
    let seed = batch_id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    output.shuffle(&mut rng);
    errors.shuffle(&mut rng);
}

fn nuid_like(n: u64) -> u64 {
    n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (unix_now() as u64)
}

/// The error line of a request the batch did not get to.
fn not_done_line(batch_id: &str, index: usize, custom_id: &str, status: &str) -> String {
    let (code, message) = match status {
        "expired" => (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        _ => (
            "batch_cancelled",
            "This request was not executed because the batch was cancelled.",
        ),
    };
    json!({"id": format!("batch_req_{index}_{batch_id}"), "custom_id": custom_id, "response": null,
           "error": {"code": code, "message": message}})
    .to_string()
}

/// One result line: the fake model's answer to one request, shaped by its fate.
/// The body parameters of a chat completion the API declares; another is refused per request
/// (`Unrecognized request argument supplied`), as the live API does.
const CHAT_PARAMETERS: &[&str] = &[
    "model",
    "messages",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "response_format",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "metadata",
    "reasoning_effort",
    "service_tier",
    "modalities",
    "prediction",
    "audio",
    "stream",
    "stream_options",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "functions",
    "function_call",
];

/// The first body parameter the chat completions API does not declare (`parameters`).
fn unrecognized_parameter<'a>(body: &'a Value, parameters: &[&str]) -> Option<&'a str> {
    body.as_object()?
        .keys()
        .map(String::as_str)
        .find(|key| !parameters.contains(key))
}

/// A result line of request `index` that failed with HTTP `status`.
fn http_error_line(
    batch_id: &str,
    index: usize,
    request: &Value,
    status: u16,
    kind: &str,
    message: &str,
) -> String {
    json!({"id": format!("batch_req_{index}_{batch_id}"), "custom_id": request["custom_id"],
        "response": {"status_code": status, "request_id": format!("req_{index}"),
        "body": {"error": {"message": message, "type": kind, "param": null, "code": null}}},
        "error": null})
    .to_string()
}

/// The error line of a request the service refuses before the model sees it: a parameter
/// the API does not declare (it declares `parameters`), or the fate's HTTP error.
fn refused_line(
    batch_id: &str,
    index: usize,
    request: &Value,
    fate: Fate,
    parameters: &[&str],
) -> Option<Line> {
    let http_error = |status: u16, kind: &str, message: &str| {
        Some(Line::Error(http_error_line(
            batch_id, index, request, status, kind, message,
        )))
    };
    if let Some(parameter) = unrecognized_parameter(&request["body"], parameters) {
        let message = format!("Unrecognized request argument supplied: {parameter}");
        return http_error(400, "invalid_request_error", &message);
    }
    match fate {
        Fate::ServerError => http_error(
            500,
            "server_error",
            "The server had an error while processing your request.",
        ),
        Fate::BadRequest => http_error(
            400,
            "invalid_request_error",
            "Invalid request: the messages could not be processed.",
        ),
        _ => None,
    }
}

fn answer_line(
    batch_id: &str,
    index: usize,
    request: &Value,
    fate: Fate,
    parameters: &[&str],
) -> Line {
    let body = &request["body"];
    let id = format!("batch_req_{index}_{batch_id}");
    if let Some(refused) = refused_line(batch_id, index, request, fate, parameters) {
        return refused;
    }
    let schema = body
        .pointer("/response_format/json_schema/schema")
        .cloned()
        .unwrap_or(json!({}));
    let user = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let mut answer = crate::model::answer(&schema, user);
    let mut finish_reason = "stop";
    let mut refusal = Value::Null;
    let content = match fate {
        Fate::InvalidJson => {
            let text = answer.to_string();
            Value::String(text[..text.len() / 2].to_owned())
        }
        Fate::SchemaViolation => {
            if let Some(object) = answer.as_object_mut() {
                let first = object.keys().next().cloned();
                if let Some(first) = first {
                    object.remove(&first);
                }
            }
            Value::String(answer.to_string())
        }
        Fate::Length => {
            finish_reason = "length";
            let text = answer.to_string();
            Value::String(text[..text.len() / 3].to_owned())
        }
        Fate::Refusal => {
            refusal = json!("I'm sorry, but I can't help with that request.");
            Value::Null
        }
        _ => Value::String(answer.to_string()),
    };
    let content_len = content.as_str().map_or(0, str::len) as u64;
    let prompt_tokens = (request.to_string().len() / 4) as u64;
    let completion_tokens = content_len / 4;
    Line::Output(
        json!({
            "id": id,
            "custom_id": request["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": format!("req_{index}"),
                "body": {
                    "id": format!("chatcmpl-{index}"),
                    "object": "chat.completion",
                    "created": unix_now(),
                    "model": body["model"],
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                        "logprobs": null,
                        "finish_reason": finish_reason,
                    }],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                },
            },
            "error": null,
        })
        .to_string(),
    )
}

pub(crate) fn lock(state: &Shared) -> MutexGuard<'_, SimState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A file as OpenAI shows it, with the two fields Mistral's Files API (the same paths) adds:
/// `sample_type` and `source`; each client reads its own and ignores the rest.
fn file_object(file: &SimFile) -> Value {
    let sample_type = match (file.purpose.as_str(), file.filename.rsplit('_').next()) {
        ("batch_output", Some("error.jsonl")) => "batch_error",
        ("batch_output", _) => "batch_result",
        _ => "batch_request",
    };
    json!({
        "id": file.id, "object": "file", "bytes": file.bytes.len(), "created_at": file.created_at,
        "expires_at": file.created_at + 2_592_000, "filename": file.filename,
        "purpose": file.purpose, "status": "processed", "status_details": null,
        "sample_type": sample_type, "source": "upload",
    })
}

pub(crate) async fn upload_file(State(state): State<Shared>, mut multipart: Multipart) -> Response {
    let (mut purpose, mut content, mut filename) = (None, None, None);
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => match field.name() {
                Some("purpose") => purpose = field.text().await.ok(),
                Some("file") => {
                    filename = field.file_name().map(str::to_owned);
                    content = field.bytes().await.ok();
                }
                _ => {}
            },
            Ok(None) => break,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid multipart body: {e}"),
                );
            }
        }
    }
    let Some(purpose) = purpose else {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'purpose'.",
        );
    };
    let (Some(content), Some(filename)) = (content, filename) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'file'.",
        );
    };
    if purpose == "batch" && !filename.ends_with(".jsonl") {
        return error(
            StatusCode::BAD_REQUEST,
            "Invalid file format for Batch API. Must be .jsonl",
        );
    }
    if purpose == "batch" && content.len() > 200 * 1024 * 1024 {
        return error(StatusCode::BAD_REQUEST, "File is too large.");
    }
    let mut state = lock(&state);
    let id = state.new_id("file-");
    let file = SimFile {
        id: id.clone(),
        bytes: content,
        filename,
        purpose,
        created_at: unix_now(),
    };
    let object = file_object(&file);
    state.files.insert(id, file);
    state.files_uploaded += 1;
    Json(object).into_response()
}

pub(crate) async fn list_files(State(state): State<Shared>) -> Response {
    let state = lock(&state);
    let mut files: Vec<&SimFile> = state.files.values().collect();
    files.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    let data: Vec<Value> = files.iter().map(|f| file_object(f)).collect();
    Json(
        json!({"object": "list", "data": data, "first_id": data.first().map(|f| f["id"].clone()),
                "last_id": data.last().map(|f| f["id"].clone()), "has_more": false}),
    )
    .into_response()
}

pub(crate) async fn get_file(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).files.get(&id) {
        Some(file) => Json(file_object(file)).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("No such File object: {id}")),
    }
}

pub(crate) async fn delete_file(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).files.remove(&id) {
        Some(_) => Json(json!({"id": id, "object": "file", "deleted": true})).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("No such File object: {id}")),
    }
}

pub(crate) async fn file_content(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).files.get(&id) {
        Some(file) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            file.bytes.clone(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("No such File object: {id}")),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Value>,
}

/// Checks a batch file's lines as the service does after creation; `mistral` lines carry no
/// method or url (the job names the endpoint).
pub(crate) fn validate_lines(
    bytes: &[u8],
    endpoint: &str,
    mistral: bool,
) -> (u64, Option<Vec<Value>>) {
    let dialect = if mistral {
        Dialect::Mistral
    } else {
        Dialect::OpenAi
    };
    validate_lines_as(bytes, endpoint, dialect)
}

/// Whose batch lines a file holds: OpenAI's name their method and url; Mistral's carry
/// neither and may leave the model to the job; Together's may carry both (then they must
/// match) and must name the model and the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Mistral,
    Together,
}

/// Checks a batch file's lines of `dialect` as the service does after creation; an error
/// fails the batch.
pub(crate) fn validate_lines_as(
    bytes: &[u8],
    endpoint: &str,
    dialect: Dialect,
) -> (u64, Option<Vec<Value>>) {
    let mistral = dialect == Dialect::Mistral;
    let mut check = LineCheck {
        endpoint,
        dialect,
        model: None,
        seen: std::collections::HashSet::new(),
    };
    let mut total = 0;
    for (number, line) in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        total += 1;
        if let Err((code, message)) = check.line(line) {
            let error =
                json!({"code": code, "message": message, "param": null, "line": number as u64 + 1});
            return (total, Some(vec![error]));
        }
    }
    let file_error = |code: &str, message: &str| {
        Some(vec![
            json!({"code": code, "message": message, "param": null, "line": null}),
        ])
    };
    let cap = if mistral { 1_000_000 } else { 50_000 };
    if total == 0 {
        return (
            0,
            file_error("empty_file", "The batch input file is empty."),
        );
    }
    if total > cap {
        let message = format!("The batch has more than {cap} requests.");
        return (total, file_error("too_many_tasks", &message));
    }
    (total, None)
}

/// The checks of one batch file's lines, with what earlier lines set (ids, the model).
struct LineCheck<'a> {
    endpoint: &'a str,
    dialect: Dialect,
    model: Option<String>,
    seen: std::collections::HashSet<String>,
}

impl LineCheck<'_> {
    /// One line as the service checks it; an `Err((code, message))` fails the batch.
    fn line(&mut self, line: &[u8]) -> Result<(), (&'static str, &'static str)> {
        let request: Value = serde_json::from_slice(line).map_err(|_| {
            (
                "invalid_json_line",
                "This line is not parseable as valid JSON.",
            )
        })?;
        let custom_id = request["custom_id"]
            .as_str()
            .ok_or(("missing_required_parameter", "custom_id is required."))?;
        if !self.seen.insert(custom_id.to_owned()) {
            return Err((
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request.",
            ));
        }
        // Together's lines may leave out the method and url; OpenAI's must name them.
        let names = |key: &str| match self.dialect {
            Dialect::OpenAi => true,
            Dialect::Mistral => false,
            Dialect::Together => request.get(key).is_some(),
        };
        if names("url") && request["url"].as_str() != Some(self.endpoint) {
            return Err((
                "url_mismatch",
                "The provided URL for this request does not match the batch endpoint.",
            ));
        }
        if names("method") && request["method"].as_str() != Some("POST") {
            return Err((
                "invalid_method",
                "The method for this request must be POST.",
            ));
        }
        let line_model = match request["body"]["model"].as_str() {
            Some(line_model) => line_model,
            None if self.dialect == Dialect::Mistral => "",
            None => {
                return Err(("missing_required_parameter", "body.model is required."));
            }
        };
        if self.dialect == Dialect::Together && !request["body"]["messages"].is_array() {
            return Err(("missing_required_parameter", "body.messages is required."));
        }
        match &self.model {
            None => self.model = Some(line_model.to_owned()),
            Some(first) if first != line_model => {
                return Err((
                    "mismatched_model",
                    "All requests in a batch must use the same model.",
                ));
            }
            Some(_) => {}
        }
        if request["body"]["stream"].as_bool() == Some(true) {
            return Err((
                "invalid_request",
                "Streaming is not supported in the Batch API: remove body.stream.",
            ));
        }
        Ok(())
    }
}

pub(crate) async fn create_batch(
    State(state): State<Shared>,
    body: Result<Json<CreateBatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    if request.completion_window != "24h" {
        return error(StatusCode::BAD_REQUEST, "completion_window must be 24h");
    }
    let metadata_ok = |metadata: &serde_json::Map<String, Value>| {
        metadata.len() <= 16
            && metadata
                .iter()
                .all(|(k, v)| k.len() <= 64 && v.as_str().is_some_and(|v| v.len() <= 512))
    };
    if let Some(metadata) = request.metadata.as_ref().and_then(Value::as_object)
        && !metadata_ok(metadata)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "metadata: at most 16 string pairs, keys up to 64 and values up to 512 characters",
        );
    }
    let mut state = lock(&state);
    let Some(file) = state.files.get(&request.input_file_id) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("No such File object: {}", request.input_file_id),
        );
    };
    if file.purpose != "batch" {
        return error(
            StatusCode::BAD_REQUEST,
            "The input file must have purpose batch.",
        );
    }
    let checked = validate_lines(&file.bytes, &request.endpoint, false);
    let tokens = (file.bytes.len() / 4) as u64;
    let id = state.new_id("batch_");
    state.count_for_shard(&request.metadata);
    let batch = SimBatch::new(
        id.clone(),
        request.input_file_id,
        request.endpoint,
        request.metadata,
        checked,
        tokens,
    );
    state.batches.insert(id.clone(), batch);
    state.batch_order.push(id.clone());
    match state.advance(&id) {
        Some(object) => Json(object).into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "batch vanished"),
    }
}

pub(crate) async fn get_batch(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    match lock(&state).advance(&id) {
        Some(object) => Json(object).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("No such Batch object: {id}"),
        ),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

pub(crate) async fn list_batches(
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Response {
    let mut state = lock(&state);
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    // Newest first; `after` is the last id of the previous page.
    let ids: Vec<String> = state
        .batch_order
        .iter()
        .rev()
        .filter(|id| state.batches.get(*id).is_some_and(|b| b.api == Api::OpenAi))
        .cloned()
        .collect();
    let start = match &query.after {
        Some(after) => ids
            .iter()
            .position(|id| id == after)
            .map(|i| i + 1)
            .unwrap_or(ids.len()),
        None => 0,
    };
    let page: Vec<String> = ids.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < ids.len();
    let data: Vec<Value> = page.iter().filter_map(|id| state.advance(id)).collect();
    Json(json!({"object": "list", "data": data, "first_id": page.first(), "last_id": page.last(), "has_more": has_more}))
        .into_response()
}

pub(crate) async fn cancel_batch(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut state = lock(&state);
    let Some(object) = state.advance(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("No such Batch object: {id}"),
        );
    };
    if matches!(
        object["status"].as_str(),
        Some("completed" | "failed" | "expired" | "cancelled")
    ) {
        return error(
            StatusCode::CONFLICT,
            &format!("Cannot cancel a batch with status {}.", object["status"]),
        );
    }
    if let Some(batch) = state.batches.get_mut(&id) {
        let at = *batch.cancel_requested.get_or_insert(Instant::now());
        batch.cancelling_at = Some(batch.unix_at(at));
    }
    let mut object = object;
    object["status"] = json!("cancelling");
    object["cancelling_at"] = json!(state.batches.get(&id).and_then(|b| b.cancelling_at));
    Json(object).into_response()
}

/// Counters for tests: what was uploaded and how many batches each shard key got.
pub(crate) async fn stats(State(state): State<Shared>) -> Response {
    let state = lock(&state);
    Json(json!({
        "files_uploaded": state.files_uploaded,
        "batches_created": state.batch_order.len() + state.anthropic.created()
            + state.bedrock.created(),
        "batches_per_shard": state.batches_per_shard,
        "requests_answered": state.requests_answered,
        "token_limit_failures": state.token_limit_failures,
        "api_calls": state.api_calls,
        "http_faults_injected": state.http_faults_injected,
        "create_responses_lost": state.create_responses_lost,
        "upload_chunks_lost": state.upload_chunks_lost,
        "downloads_dropped": state.downloads_dropped,
        "batches_cancelled": state.batches.values().filter(|b| b.cancel_requested.is_some()).count()
            + state.anthropic.cancelled() + state.bedrock.stopped(),
        "permanent_failures": state.permanent_failures,
        "bedrock_jobs_created": state.bedrock.created(),
        "bedrock_idempotent_replays": state.bedrock.idempotent_replays,
        "together_batches_created": state.together.created(),
        "together_uploads_deduplicated": state.together.uploads_deduplicated,
    }))
    .into_response()
}

/// Sets the faults of every job without faults of its own, while the simulator runs.
pub(crate) async fn set_faults(
    State(state): State<Shared>,
    body: Result<Json<SimFaults>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(faults)) => {
            lock(&state).settings.faults = faults.clone();
            Json(json!({"faults": faults})).into_response()
        }
        Err(rejection) => error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    }
}

/// Sets the faults of one job (by the job id in the batches' metadata).
pub(crate) async fn set_job_faults(
    State(state): State<Shared>,
    Path(job_id): Path<String>,
    body: Result<Json<SimFaults>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(faults)) => {
            lock(&state)
                .job_faults
                .insert(job_id.clone(), faults.clone());
            Json(json!({"job_id": job_id, "faults": faults})).into_response()
        }
        Err(rejection) => error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    }
}
