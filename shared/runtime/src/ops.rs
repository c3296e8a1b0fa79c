//! The operations endpoint of a service process (`ops.listen`): Prometheus `/metrics`,
//! `/healthz` (the process answers) and `/readyz` (NATS and the object store answer).
//!
//! Metric names, all prefixed `rowsmith_`:
//! - `messages_total{consumer, outcome}`: work messages handled (`done`, `retry`, `terminate`);
//! - `handle_seconds{consumer}`: time to handle one;
//! - `consumer_pending{consumer}` / `consumer_ack_pending{consumer}`: the durable's backlog;
//! - `rows_total{outcome}`: rows merged (`succeeded`, `failed`);
//! - `batch_checks_total{state}`, `batches_ended_total{state}`: the poller's status checks;
//! - `provider_requests_total{provider, operation, status}` and
//!   `provider_request_seconds{provider, operation}`: every provider HTTP call.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use rowsmith_config::ProcessSettings;
use rowsmith_store::Store;

/// The process-wide metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // A recorder may already be installed (tests embedding several stacks); the handle
        // then renders this one's view, which is still valid text.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[derive(Clone)]
struct Probe {
    nats: async_nats::Client,
    store: Store,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("store", &self.store.url())
            .finish()
    }
}

/// Serves the endpoint when `ops.listen` is set, until `shutdown`; returns the bound address.
pub async fn serve(
    settings: &ProcessSettings,
    name: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    if settings.ops.listen.trim().is_empty() {
        return Ok(None);
    }
    metrics();
    let nats = rowsmith_bus::probe_client(&settings.nats, &format!("{name}-probe")).await?;
    let probe = Probe {
        nats,
        store: Store::open(&settings.store)?,
    };
    let app = Router::new()
        .route("/metrics", get(|| async { metrics().render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(probe);
    let listener = tokio::net::TcpListener::bind(settings.ops.listen.trim())
        .await
        .map_err(|e| anyhow::anyhow!("ops.listen {}: {e}", settings.ops.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "ops endpoint stopped");
        }
    });
    Ok(Some(address))
}

async fn ready(State(probe): State<Probe>) -> (StatusCode, String) {
    let limit = Duration::from_secs(2);
    let nats = match tokio::time::timeout(limit, probe.nats.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("NATS: {error}")),
        Err(_) => Err("NATS: no answer within 2s".to_owned()),
    };
    let store = match tokio::time::timeout(limit, probe.store.exists("ops/readyz")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("store: {error}")),
        Err(_) => Err("store: no answer within 2s".to_owned()),
    };
    match (nats, store) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready\n".into()),
        (nats, store) => {
            let problems: Vec<String> = [nats.err(), store.err()].into_iter().flatten().collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", problems.join("; ")),
            )
        }
    }
}
