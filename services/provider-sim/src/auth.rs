//! Credentials, checked before anything else as the real APIs do: OpenAI wants
//! `Authorization: Bearer <key>` (or Azure's `api-key`), Anthropic `x-api-key` (its SDK from
//! 0.7x sends the key as `Authorization: Bearer`, also accepted) and `anthropic-version`. Any non-empty key is accepted; a call without one gets the provider's
//! own refusal; Gemini wants `x-goog-api-key` (or `?key=`); Bedrock a SigV4 `Authorization`
//! scoped to service `bedrock` with its `X-Amz-Date` (the signature is not checked), or a
//! Bedrock API key as `Bearer`; Together (`/together/v1/…`) `Authorization: Bearer`, but not
//! its presigned upload target (`/together/upload/…`, whose signature is the credential).
//! The simulator's own `/sim/…` endpoints need none.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub async fn require_credentials(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/model-invocation-job") {
        return match bedrock_refusal(request.headers()) {
            Some(response) => response,
            None => next.run(request).await,
        };
    }
    if path.starts_with("/together/") {
        let free = path.starts_with("/together/upload/") || bearer(request.headers()).is_some();
        return match free {
            true => next.run(request).await,
            false => crate::together::unauthorized(path),
        };
    }
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

/// Bedrock's refusal of a call without a credential (403 `MissingAuthenticationTokenException`)
/// or with a SigV4 `Authorization` of the wrong shape or scope; a Bedrock API key (`Bearer`)
/// passes.
fn bedrock_refusal(headers: &HeaderMap) -> Option<Response> {
    let Some(authorization) = header(headers, "authorization") else {
        return Some(crate::bedrock::error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    if bearer(headers).is_some() {
        return None;
    }
    let (kind, message) = sigv4_problem(authorization, header(headers, "x-amz-date"))?;
    Some(crate::bedrock::error(StatusCode::FORBIDDEN, kind, &message))
}

/// What is wrong with a SigV4 `Authorization` header (`AWS4-HMAC-SHA256 Credential=<key>/
/// <yyyymmdd>/<region>/bedrock/aws4_request, SignedHeaders=<…>, Signature=<64 hex>`) and its
/// `X-Amz-Date`, as `(error type, message)`; the signature itself is not verified.
fn sigv4_problem(authorization: &str, date: Option<&str>) -> Option<(&'static str, String)> {
    let incomplete = |message: String| Some(("IncompleteSignatureException", message));
    let Some(rest) = authorization.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return incomplete(format!(
            "Authorization header requires 'Credential' parameter. Authorization header requires \
             'Signature' parameter. Authorization header requires 'SignedHeaders' parameter. \
             Authorization={authorization}"
        ));
    };
    let parameters: std::collections::HashMap<&str, &str> = rest
        .split(',')
        .filter_map(|pair| pair.trim().split_once('='))
        .collect();
    let missing: Vec<String> = ["Credential", "Signature", "SignedHeaders"]
        .iter()
        .filter(|name| parameters.get(*name).is_none_or(|v| v.is_empty()))
        .map(|name| format!("Authorization header requires '{name}' parameter."))
        .collect();
    if !missing.is_empty() {
        return incomplete(missing.join(" "));
    }
    let scope: Vec<&str> = parameters["Credential"].split('/').collect();
    let [key_id, day, region, service, terminator] = scope[..] else {
        return incomplete(format!(
            "Credential should be scoped to a valid region, and a valid terminator: \
             'aws4_request'. Credential={}",
            parameters["Credential"]
        ));
    };
    let invalid = |message: String| Some(("InvalidSignatureException", message));
    let region_ok = (1..=20).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if key_id.is_empty() || !region_ok {
        return invalid("Credential should be scoped to a valid region.".into());
    }
    if service != "bedrock" {
        return invalid(format!(
            "Credential should be scoped to correct service: 'bedrock'. (the scope names \
             '{service}')"
        ));
    }
    if terminator != "aws4_request" {
        return invalid(format!(
            "Credential should be scoped with a valid terminator: 'aws4_request', not \
             '{terminator}'."
        ));
    }
    let signature = parameters["Signature"];
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid(
            "The request signature we calculated does not match the signature you \
                        provided: a signature is 64 hexadecimal digits."
                .into(),
        );
    }
    let Some(date) = date else {
        return incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' \
             header."
                .into(),
        );
    };
    let date_ok = date.len() == 16
        && date.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    if !date_ok || day.len() != 8 || &date[..8] != day {
        return invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date \
             from HTTP: '{day}' != '{}', from '{date}'.",
            date.get(..8).unwrap_or(date)
        ));
    }
    None
}
