//! HTTP-level faults on the API endpoints (not `/sim/…`): every n-th call answered 429 with
//! `retry-after-ms` or 500 with `x-should-retry`, and batch creation refused for
//! `insufficient_quota` — all *before* the request is handled, so nothing happened. And the
//! faults that come *after* the effect: a create carried out whose answer is then lost (a
//! 500, a dropped connection, or an answer later than the client waits), a download cut off
//! half-way, a delay on every answer. Rate-limit headers are set on every answer.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use rowsmith_config::LostResponse;

use crate::openai::{Shared, lock};

enum Fault {
    RateLimited,
    ServerError,
    InsufficientQuota,
}

pub async fn inject(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with("/sim/") {
        return next.run(request).await;
    }
    let creates = request.method() == Method::POST
        && matches!(request.uri().path(), "/v1/batches" | "/v1/messages/batches");
    let downloads = request.method() == Method::GET
        && (request.uri().path().ends_with("/content")
            || request.uri().path().ends_with("/results"));
    let delay = lock(&state).settings.faults.response_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fault = {
        let mut state = lock(&state);
        state.api_calls += 1;
        let call = state.api_calls;
        let faults = &state.settings.faults;
        let every = |n: Option<u64>| n.is_some_and(|n| n > 0 && call.is_multiple_of(n));
        let fault = if creates && faults.insufficient_quota {
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
    };
    let error = |status: StatusCode, kind: &str, code: &str, message: &str| {
        (
            status,
            Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
        )
            .into_response()
    };
    let mut response = match fault {
        None => {
            let response = next.run(request).await;
            if creates && response.status().is_success() {
                lose_create_answer(&state, response).await
            } else if downloads && response.status().is_success() {
                cut_download(&state, response).await
            } else {
                response
            }
        }
        Some(Fault::RateLimited) => {
            let mut response = error(
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
                .insert("retry-after", HeaderValue::from_static("0.02"));
            response
        }
        Some(Fault::ServerError) => {
            let mut response = error(
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
        Some(Fault::InsufficientQuota) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
    };
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
    response
}

/// After a create was carried out: every n-th answer is lost as the faults say.
async fn lose_create_answer(state: &Shared, response: Response) -> Response {
    let (lost_as, slow) = {
        let mut state = lock(state);
        state.creates_seen += 1;
        let faults = &state.settings.faults;
        let lose = faults
            .create_response_lost_every
            .is_some_and(|n| n > 0 && state.creates_seen.is_multiple_of(n));
        if !lose {
            return response;
        }
        let how = (faults.create_response_lost_as, faults.slow_create);
        state.create_responses_lost += 1;
        how
    };
    tracing::info!(
        ?lost_as,
        "simulated fault: the batch was created, its answer is lost"
    );
    match lost_as {
        LostResponse::ServerError => {
            let mut response = (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"message": "The server had an error while processing your request.",
                    "type": "server_error", "param": null, "code": "server_error"}})),
            )
                .into_response();
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("true"));
            response
        }
        LostResponse::Dropped => dropped_after(response, 0).await,
        LostResponse::Slow => {
            tokio::time::sleep(slow).await;
            response
        }
    }
}

/// Every n-th download is cut off half-way.
async fn cut_download(state: &Shared, response: Response) -> Response {
    {
        let mut state = lock(state);
        state.downloads_seen += 1;
        let cut = state
            .settings
            .faults
            .download_dropped_every
            .is_some_and(|n| n > 0 && state.downloads_seen.is_multiple_of(n));
        if !cut {
            return response;
        }
        state.downloads_dropped += 1;
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
/// OpenAI's `invalid_api_key` error, as after the key was rotated. Other calls pass.
pub async fn refuse_status_checks(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let batch_id = match (
        request.method(),
        request.uri().path().strip_prefix("/v1/batches/"),
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
    let body = json!({"error": {
        "message": "Incorrect API key provided: sk-sim-****. You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
    }});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}
