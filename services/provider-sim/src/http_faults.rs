//! HTTP-level faults on the API endpoints (not `/sim/…`): every n-th call answered 429 with
//! `retry-after-ms` or 500 with `x-should-retry`, and batch creation refused for
//! `insufficient_quota`. Rate-limit headers are set on every answer.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
        None => next.run(request).await,
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
