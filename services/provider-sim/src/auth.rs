//! Credentials, checked before anything else as the real APIs do: OpenAI wants
//! `Authorization: Bearer <key>` (or Azure's `api-key`), Anthropic `x-api-key` (its SDK from
//! 0.7x sends the key as `Authorization: Bearer`, also accepted) and `anthropic-version`. Any non-empty key is accepted; a call without one gets the provider's
//! own refusal; Gemini wants `x-goog-api-key` (or `?key=`). The simulator's own `/sim/…`
//! endpoints need none.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub async fn require_credentials(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if is_gemini(path) {
        return match gemini_refusal(&request) {
            Some(response) => response,
            None => next.run(request).await,
        };
    }
    if !path.starts_with("/v1/") {
        return next.run(request).await;
    }
    let refusal = match path.starts_with("/v1/messages") {
        true => anthropic_refusal(request.headers()),
        false => openai_refusal(request.headers()),
    };
    match refusal {
        Some(response) => response,
        None => next.run(request).await,
    }
}

/// Whether a path is Gemini's (the Developer API's `v1beta` surfaces).
pub fn is_gemini(path: &str) -> bool {
    ["/v1beta/", "/upload/v1beta/", "/download/v1beta/"]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// Gemini takes the key as `x-goog-api-key` or `?key=`; without one it answers 403. An upload
/// session's URL (its `upload_id`) is its own credential: the SDK sends chunks without a key.
fn gemini_refusal(request: &Request) -> Option<Response> {
    let query_has = |name: &str| {
        request.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|pair| pair.strip_prefix(name).is_some_and(|v| !v.is_empty()))
        })
    };
    let session = request.uri().path() == "/upload/v1beta/files" && query_has("upload_id=");
    if session || query_has("key=") || header(request.headers(), "x-goog-api-key").is_some() {
        return None;
    }
    Some(crate::gemini::google_error(
        StatusCode::FORBIDDEN,
        "Method doesn't allow unregistered callers (callers without established identity). \
         Please use API Key or other form of API consumer identity to call this API.",
    ))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    header(headers, "authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .filter(|key| !key.trim().is_empty())
}

fn openai_refusal(headers: &HeaderMap) -> Option<Response> {
    if bearer(headers).is_some() || header(headers, "api-key").is_some() {
        return None;
    }
    let body = json!({"error": {
        "message": "You didn't provide an API key. You need to provide your API key in an \
                    Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "type": "invalid_request_error", "param": null, "code": null,
    }});
    Some((StatusCode::UNAUTHORIZED, Json(body)).into_response())
}

fn anthropic_refusal(headers: &HeaderMap) -> Option<Response> {
    let (status, kind, message) =
        if header(headers, "x-api-key").is_none() && bearer(headers).is_none() {
            (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "x-api-key header is required",
            )
        } else if header(headers, "anthropic-version").is_none() {
            (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "anthropic-version: header is required",
            )
        } else {
            return None;
        };
    Some(anthropic_error(status, kind, message))
}

/// An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`.
pub fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}
