//! A local imitation of the OpenAI Files + Batches API for demos and tests: upload, create,
//! retrieve, list, file content, cancel, with the state machine validating → in_progress →
//! finalizing → completed at a configurable pace, output lines in shuffled order, and a
//! deterministic fake model whose answers follow each request's JSON schema and differ per row.
//!
//! State advances lazily: each read of a batch computes where it stands from the time since
//! it was created, so no background task is needed and a paused clock is never required.

mod anthropic;
mod faults;
mod http_faults;
mod model;
mod openai;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rowsmith_config::SimSettings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use model::answer;
pub use openai::{SimState, router};

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
