//! The Bedrock control-plane requests as they arrived (method, path, query, headers, body),
//! kept so that a check outside the simulator can recompute their SigV4 signatures with
//! code we did not write (botocore, in `tests/sdk/check_bedrock.py`): the simulator itself
//! only checks the `Authorization` header's shape.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::openai::{Shared, lock};

/// The most requests kept (the oldest go first).
const KEPT: usize = 200;
/// A control-plane body is a few KB; one larger is not kept whole.
const BODY_LIMIT: usize = 1 << 20;

/// Keeps a copy of each request to a Bedrock path, then hands it on unchanged.
pub async fn record(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/model-invocation-job") {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return crate::bedrock::error(
            axum::http::StatusCode::BAD_REQUEST,
            "ValidationException",
            "the request body is too large",
        );
    };
    let headers: Map<String, Value> = parts
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), json!(value.to_str().ok()?))))
        .collect();
    let seen = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "body": String::from_utf8_lossy(&bytes),
    });
    {
        let mut state = lock(&state);
        let kept = &mut state.bedrock.requests;
        if kept.len() == KEPT {
            kept.remove(0);
        }
        kept.push(seen);
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `GET /sim/bedrock/requests`: the kept requests, oldest first.
pub async fn requests(State(state): State<Shared>) -> Response {
    Json(Value::Array(lock(&state).bedrock.requests.clone())).into_response()
}
