//! A local imitation of the OpenAI Files + Batches API for demos and tests: upload, create,
//! retrieve, list, file content, cancel, with the state machine validating → in_progress →
//! finalizing → completed at a configurable pace, output lines in shuffled order, and a
//! deterministic fake model whose answers follow each request's JSON schema and differ per row.
//!
//! State advances lazily: each read of a batch computes where it stands from the time since
//! it was created, so no background task is needed and a paused clock is never required.

mod anthropic;
mod anthropic_state;
mod auth;
mod bedrock;
mod bedrock_signed;
mod bedrock_state;
pub mod faults;
mod gemini;
mod gemini_state;
mod gemini_wire;
mod http_faults;
mod mistral;
mod model;
mod openai;
mod together;
mod together_state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

use rowsmith_config::SimSettings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use model::answer;
use openai::Shared;
pub use openai::SimState;

/// Serves the simulator on `listener` until `shutdown`.
pub async fn serve(
    settings: SimSettings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = Arc::new(Mutex::new(SimState::new(settings)));
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Binds `settings.listen` (port 0 picks a free port) and serves in the background; returns
/// the bound address.
pub async fn start(
    settings: SimSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(&settings.listen).await?;
    let address = listener.local_addr()?;
    let task = tokio::spawn(serve(settings, listener, shutdown));
    Ok((address, task))
}

/// The simulator's HTTP API: OpenAI Files + Batches, Anthropic Message Batches, Mistral batch
/// jobs, Gemini batch mode (Developer API), Bedrock model invocation jobs, Together's Files +
/// Batches (under `/together`, with its presigned upload target), and its own `/sim/stats`
/// and `/sim/faults`, behind the HTTP fault layers.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/v1/files",
            post(openai::upload_file).get(openai::list_files),
        )
        .route(
            "/v1/files/{id}",
            get(openai::get_file).delete(openai::delete_file),
        )
        .route("/v1/files/{id}/content", get(openai::file_content))
        .route(
            "/v1/batches",
            post(openai::create_batch).get(openai::list_batches),
        )
        .route("/v1/batches/{id}", get(openai::get_batch))
        .route("/v1/batches/{id}/cancel", post(openai::cancel_batch))
        .route(
            "/v1/messages/batches",
            post(anthropic::create).get(anthropic::list),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(anthropic::retrieve).delete(anthropic::delete),
        )
        .route("/v1/messages/batches/{id}/cancel", post(anthropic::cancel))
        .route("/v1/messages/batches/{id}/results", get(anthropic::results))
        .route("/v1/batch/jobs", post(mistral::create).get(mistral::list))
        .route("/v1/batch/jobs/{id}", get(mistral::get))
        .route("/v1/batch/jobs/{id}/cancel", post(mistral::cancel))
        .route("/upload/v1beta/files", post(gemini::upload))
        .route("/v1beta/files/{id}", get(gemini::get_file))
        .route("/download/v1beta/files/{action}", get(gemini::download))
        .route("/v1beta/models/{action}", post(gemini::create))
        .route("/v1beta/batches", get(gemini::list))
        .route(
            "/v1beta/batches/{action}",
            get(gemini::get).post(gemini::cancel).delete(gemini::delete),
        )
        .route("/model-invocation-job", post(bedrock::create))
        .route("/model-invocation-job/{id}", get(bedrock::get))
        .route("/model-invocation-job/{id}/stop", post(bedrock::stop))
        .route("/model-invocation-jobs", get(bedrock::list))
        .route(
            "/together/v1/files",
            post(together::announce).get(together::list_files),
        )
        .route(
            "/together/v1/files/{id}",
            get(together::get_file).delete(together::delete_file),
        )
        .route(
            "/together/v1/files/{id}/content",
            get(together::file_content),
        )
        .route(
            "/together/v1/files/{id}/preprocess",
            post(together::preprocess),
        )
        .route("/together/upload/{id}", put(together::put_upload))
        .route(
            "/together/v1/batches",
            post(together::create_batch).get(together::list_batches),
        )
        .route("/together/v1/batches/{id}", get(together::get_batch))
        .route(
            "/together/v1/batches/{id}/cancel",
            post(together::cancel_batch),
        )
        .route("/sim/stats", get(openai::stats))
        .route("/sim/bedrock/requests", get(bedrock_signed::requests))
        .route("/sim/faults", post(openai::set_faults))
        .route("/sim/faults/{job_id}", post(openai::set_job_faults))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bedrock_signed::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http_faults::inject,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http_faults::refuse_status_checks,
        ))
        .layer(axum::middleware::from_fn(auth::require_credentials))
        .layer(DefaultBodyLimit::max(512 * 1024 * 1024))
        .with_state(state)
}
