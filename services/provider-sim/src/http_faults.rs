//! HTTP-level faults on the API endpoints (not `/sim/…`): every n-th call answered 429 with
//! `retry-after-ms` or 500 with `x-should-retry`, and batch creation refused for
//! `insufficient_quota` — all *before* the request is handled, so nothing happened. And the
//! faults that come *after* the effect: a create carried out whose answer is then lost (a
//! 500, a dropped connection, or an answer later than the client waits), a download cut off
//! half-way, a delay on every answer. Rate-limit headers are set on every answer. Each call
//! meets the faults of its job where it names one (a batch, its files, an OpenAI create's
//! metadata, a Bedrock create's `rowsmith-shard` tag or the Bedrock job it names, a Together
//! create's input file or announced file name), else the default faults. Each API answers a
//! fault in its own error shape. Together's presigned upload target is storage, not its API:
//! no API faults there.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use rowsmith_config::{LostResponse, SimFaults};

use crate::openai::{Shared, lock};

enum Fault {
    RateLimited,
    ServerError,
    InsufficientQuota,
}

/// What kind of API call a request is, for the faults that apply to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Download,
    /// A chunk of a Gemini resumable upload (not its start, nor a query).
    UploadChunk,
    Other,
}

impl Call {
    fn of(request: &Request) -> Call {
        let path = request.uri().path();
        match *request.method() {
            Method::POST
                if matches!(
                    path,
                    "/v1/batches"
                        | "/v1/messages/batches"
                        | "/v1/batch/jobs"
                        | "/model-invocation-job"
                        | "/together/v1/batches"
                ) =>
            {
                Call::Create
            }
            Method::POST if is_gemini_create(path) => Call::Create,
            Method::POST
                if path == "/upload/v1beta/files"
                    && request
                        .uri()
                        .query()
                        .is_some_and(|q| q.contains("upload_id="))
                    && request
                        .headers()
                        .get("x-goog-upload-command")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|command| command.contains("upload")) =>
            {
                Call::UploadChunk
            }
            Method::GET
                if path.ends_with("/content")
                    || path.ends_with("/results")
                    || path.starts_with("/download/") =>
            {
                Call::Download
            }
            _ => Call::Other,
        }
    }
}

/// Whether a path is Bedrock's control plane (`/model-invocation-job[s]`).
fn is_bedrock(path: &str) -> bool {
    path.starts_with("/model-invocation-job")
}

fn is_gemini_create(path: &str) -> bool {
    path.starts_with("/v1beta/models/") && path.ends_with(":batchGenerateContent")
}

/// The largest create body read to find its job (an OpenAI create is a few hundred bytes; an
/// Anthropic create holds its requests and names no job, so it is not read; a Gemini create
/// names its shard but may hold its requests).
const CREATE_BODY_LIMIT: usize = 1 << 20;
const GEMINI_CREATE_BODY_LIMIT: usize = 64 << 20;

pub async fn inject(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path.starts_with("/sim/") || path.starts_with("/together/upload/") {
        return next.run(request).await;
    }
    let call = Call::of(&request);
    let anthropic = path.starts_with("/v1/messages");
    let gemini = crate::auth::is_gemini(&path);
    let bedrock = is_bedrock(&path);
    let together = path.starts_with("/together/");
    let (request, faults) = faults_of_request(&state, request).await;
    if !faults.response_delay.is_zero() {
        tokio::time::sleep(faults.response_delay).await;
    }
    let mut response = match before_effect(&state, &faults, call) {
        Some(fault) if anthropic => anthropic_fault_response(fault),
        Some(fault) if gemini => gemini_fault_response(fault),
        Some(fault) if bedrock => bedrock_fault_response(fault),
        Some(fault) if together => together_fault_response(fault, &path),
        Some(fault) => fault_response(fault),
        None => {
            let response = next.run(request).await;
            match call {
                _ if !response.status().is_success() => response,
                Call::Create => {
                    let lost_as_500 = match (bedrock, together) {
                        (true, _) => bedrock_server_error,
                        (_, true) => together_server_error,
                        _ => server_error,
                    };
                    lose_create_answer(&state, &faults, response, lost_as_500).await
                }
                Call::Download => cut_download(&state, &faults, response).await,
                Call::UploadChunk => lose_chunk_answer(&state, &faults, response).await,
                Call::Other => response,
            }
        }
    };
    with_rate_limit_headers(&mut response);
    response
}

/// The faults in force for the request's job (`POST /sim/faults/<job_id>`), found from the
/// batch or file it names, an OpenAI create's metadata, a Bedrock create's shard tag or the
/// Bedrock job a path names, a Together create's input file or announced file name; the
/// default faults when it names no job (Anthropic's API carries none).
async fn faults_of_request(state: &Shared, request: Request) -> (Request, SimFaults) {
    let path = request.uri().path().to_owned();
    let reads_body = matches!(
        path.as_str(),
        "/v1/batches"
            | "/v1/batch/jobs"
            | "/model-invocation-job"
            | "/together/v1/batches"
            | "/together/v1/files"
    ) || is_gemini_create(&path);
    if request.method() == Method::POST && reads_body {
        let (parts, body) = request.into_parts();
        // A Gemini create may carry its requests inline (up to 20 MB; more is refused by the
        // handler, which must see it whole to say so).
        let limit = if is_gemini_create(&path) {
            GEMINI_CREATE_BODY_LIMIT
        } else {
            CREATE_BODY_LIMIT
        };
        let bytes = axum::body::to_bytes(body, limit).await.unwrap_or_default();
        if path.starts_with("/together/") {
            let faults = {
                let state = lock(state);
                let metadata = crate::together::metadata_of_body(&state, &path, &bytes);
                state.faults_of_metadata(&metadata)
            };
            return (Request::from_parts(parts, Body::from(bytes)), faults);
        }
        let body = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
        // Gemini names the shard in the batch's display name, Bedrock in a tag.
        let metadata = body.and_then(|body| {
            body.get("metadata").cloned().or_else(|| {
                body.pointer("/batch/displayName")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|name| name.strip_prefix("rowsmith-"))
                    .map(str::to_owned)
                    .or_else(|| crate::bedrock::shard_tag(&body))
                    .map(|shard| json!({"rowsmith_shard": shard}))
            })
        });
        let faults = lock(state).faults_of_metadata(&metadata);
        return (Request::from_parts(parts, Body::from(bytes)), faults);
    }
    let faults = {
        let state = lock(state);
        crate::bedrock::faults_of_path(&state, &path)
            .or_else(|| crate::together::faults_of_path(&state, &path))
            .unwrap_or_else(|| state.faults_of_path(&path))
    };
    (request, faults)
}

/// A fault that answers in place of the API, before anything happens.
fn before_effect(state: &Shared, faults: &SimFaults, call: Call) -> Option<Fault> {
    let mut state = lock(state);
    state.api_calls += 1;
    let every = |n: Option<u64>| n.is_some_and(|n| n > 0 && state.api_calls.is_multiple_of(n));
    let fault = if call == Call::Create && faults.insufficient_quota {
        Some(Fault::InsufficientQuota)
    } else if every(faults.http_429_every) {
        Some(Fault::RateLimited)
    } else if every(faults.http_500_every) {
        Some(Fault::ServerError)
    } else {
        None
    };
    if fault.is_some() {
        state.http_faults_injected += 1;
    }
    fault
}

fn error_response(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::RateLimited => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached for requests per min (RPM). Please try again in 20ms.",
            );
            response
                .headers_mut()
                .insert("retry-after-ms", HeaderValue::from_static("20"));
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            response
        }
        Fault::ServerError => server_error(),
        Fault::InsufficientQuota => error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
    }
}

/// The same faults as Anthropic answers them: its error shape, `retry-after` in whole
/// seconds, `x-should-retry` on overload.
fn anthropic_fault_response(fault: Fault) -> Response {
    match fault {
        Fault::RateLimited => {
            let mut response = crate::auth::anthropic_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit.",
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            response
        }
        Fault::ServerError => {
            let mut response = crate::auth::anthropic_error(
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
                "Overloaded",
            );
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("true"));
            response
        }
        Fault::InsufficientQuota => crate::auth::anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
        ),
    }
}

/// The same faults as Google answers them: `RESOURCE_EXHAUSTED` (429) for rate and quota,
/// `UNAVAILABLE` (503) for an overloaded server.
fn gemini_fault_response(fault: Fault) -> Response {
    match fault {
        Fault::RateLimited | Fault::InsufficientQuota => crate::gemini::google_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Resource has been exhausted (e.g. check quota).",
        ),
        Fault::ServerError => crate::gemini::google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The model is overloaded. Please try again later.",
        ),
    }
}

/// The same faults as Bedrock answers them: `ThrottlingException` (429),
/// `InternalServerException` (500), `ServiceQuotaExceededException` (400, not 429).
fn bedrock_fault_response(fault: Fault) -> Response {
    match fault {
        Fault::RateLimited => crate::bedrock::error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        Fault::ServerError => bedrock_server_error(),
        Fault::InsufficientQuota => crate::bedrock::error(
            StatusCode::BAD_REQUEST,
            "ServiceQuotaExceededException",
            "You have exceeded the quota of batch inference jobs for this account.",
        ),
    }
}

/// The same faults as Together answers them (its error codes page): 429, 500, and 402
/// Payment Required when the credits are spent; in each endpoint's error shape.
fn together_fault_response(fault: Fault, path: &str) -> Response {
    let error = |status, kind, message| crate::together::error_for(path, status, kind, message);
    match fault {
        Fault::RateLimited => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit",
                "Rate limit exceeded: too many requests in a short period of time.",
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            response
        }
        Fault::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "Internal server error. Please try again.",
        ),
        Fault::InsufficientQuota => error(
            StatusCode::PAYMENT_REQUIRED,
            "credit_limit",
            "Credit limit exceeded: the account has run out of credits. Add credits to \
             resume service.",
        ),
    }
}

/// A lost Together create answered 500 (its batch endpoints' shape).
fn together_server_error() -> Response {
    crate::together::batch_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error. Please try again.",
    )
}

fn bedrock_server_error() -> Response {
    crate::bedrock::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalServerException",
        "The server encountered an internal error while processing the request.",
    )
}

fn server_error() -> Response {
    let mut response = error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "server_error",
        "The server had an error while processing your request.",
    );
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("true"));
    response
}

fn with_rate_limit_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from_static("10000"),
    );
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("9999"),
    );
    headers.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("6ms"),
    );
    headers.insert("x-request-id", HeaderValue::from_static("req_sim"));
}

/// After a create was carried out: every n-th answer is lost as the faults say (a lost 500
/// as `lost_as_500` shapes it).
async fn lose_create_answer(
    state: &Shared,
    faults: &SimFaults,
    response: Response,
    lost_as_500: fn() -> Response,
) -> Response {
    let lost = counted_every(state, faults.create_response_lost_every, |state| {
        (&mut state.creates_seen, &mut state.create_responses_lost)
    });
    if !lost {
        return response;
    }
    tracing::info!(lost_as = ?faults.create_response_lost_as, "simulated fault: the batch was created, its answer is lost");
    lose(
        faults,
        faults.create_response_lost_as,
        response,
        lost_as_500,
    )
    .await
}

/// After a chunk was stored: every n-th answer is lost as the faults say.
async fn lose_chunk_answer(state: &Shared, faults: &SimFaults, response: Response) -> Response {
    let lost = counted_every(state, faults.upload_chunk_lost_every, |state| {
        (&mut state.upload_chunks_seen, &mut state.upload_chunks_lost)
    });
    if !lost {
        return response;
    }
    tracing::info!(lost_as = ?faults.create_response_lost_as, "simulated fault: an upload chunk was stored, its answer is lost");
    lose(
        faults,
        faults.create_response_lost_as,
        response,
        server_error,
    )
    .await
}

/// Counts one more call in the `(seen, hit)` counters `counters` picks; whether it is an n-th
/// one (`every`), counted as hit.
fn counted_every(
    state: &Shared,
    every: Option<u64>,
    counters: impl FnOnce(&mut crate::openai::SimState) -> (&mut u64, &mut u64),
) -> bool {
    let mut state = lock(state);
    let (seen, hit) = counters(&mut state);
    *seen += 1;
    let is_nth = every.is_some_and(|n| n > 0 && seen.is_multiple_of(n));
    if is_nth {
        *hit += 1;
    }
    is_nth
}

/// A response lost as `lost_as` says; a 500 is `server_error`'s.
async fn lose(
    faults: &SimFaults,
    lost_as: LostResponse,
    response: Response,
    server_error: fn() -> Response,
) -> Response {
    match lost_as {
        LostResponse::ServerError => server_error(),
        LostResponse::Dropped => dropped_after(response, 0).await,
        LostResponse::Slow => {
            tokio::time::sleep(faults.slow_create).await;
            response
        }
    }
}

/// Every n-th download is cut off half-way.
async fn cut_download(state: &Shared, faults: &SimFaults, response: Response) -> Response {
    let cut = counted_every(state, faults.download_dropped_every, |state| {
        (&mut state.downloads_seen, &mut state.downloads_dropped)
    });
    if !cut {
        return response;
    }
    tracing::info!("simulated fault: a download is cut off half-way");
    dropped_after(response, 2).await
}

/// The response's status and headers, then `1/divisor` of its body (none for 0), then the
/// connection drops: the client sees a transport error while reading the body.
async fn dropped_after(response: Response, divisor: usize) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let keep = match divisor {
        0 => 0,
        n => bytes.len() / n,
    };
    let head = bytes.slice(..keep);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
        Ok(head),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated dropped connection",
        )),
    ];
    // The full length is announced, so the client knows the body was cut short.
    parts.headers.insert(
        axum::http::header::CONTENT_LENGTH,
        HeaderValue::from(bytes.len().max(1)),
    );
    Response::from_parts(parts, Body::from_stream(futures::stream::iter(chunks)))
}

/// `status_unauthorized`: a status check of a batch of such a job is answered 401 with
/// OpenAI's `invalid_api_key` error (Together's own refusal on its path), as after the key
/// was rotated. Other calls pass.
pub async fn refuse_status_checks(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let together = path.starts_with("/together/");
    let batch_id = match (
        request.method(),
        path.strip_prefix("/v1/batches/")
            .or_else(|| path.strip_prefix("/together/v1/batches/")),
    ) {
        (&Method::GET, Some(id)) if !id.contains('/') => id.to_owned(),
        _ => return next.run(request).await,
    };
    let refused = lock(&state)
        .faults_of_batch(&batch_id)
        .is_some_and(|faults| faults.status_unauthorized);
    if !refused {
        return next.run(request).await;
    }
    if together {
        return crate::together::unauthorized("/together/v1/batches");
    }
    let body = json!({"error": {
        "message": "Incorrect API key provided: sk-sim-****. You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
    }});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}
