//! A rowsmith service process: its `main` (settings, telemetry, signals), the operations
//! endpoint, and the worker shell every service runs.

pub mod ops;

use std::future::Future;
use std::sync::Arc;

use rowsmith_bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, Delivery, Outcome, run_worker};
use rowsmith_config::{self as config, ProcessSettings, Settings};
use rowsmith_telemetry as telemetry;
use rowsmith_telemetry::shutdown_on_signals;
use tokio_util::sync::CancellationToken;

/// A service's own settings: taken from the whole file's, keeping only the sections it uses.
pub trait ServiceSettings: Sized {
    fn from_settings(settings: Settings) -> Self;
    fn process(&self) -> &ProcessSettings;
}

/// Connects to NATS as `name`, waiting for it up to [`CONNECT_PATIENCE`] (or `shutdown`).
pub async fn connect(
    process: &ProcessSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Bus> {
    Ok(Bus::connect_retrying(&process.nats, name, shutdown, CONNECT_PATIENCE).await?)
}

/// The loop of one durable consumer: runs `handler` on each delivery of `spec`, up to
/// `concurrency` at once, until `shutdown` (messages in flight finish first).
pub async fn run_service<S, H, Fut>(
    bus: &Bus,
    spec: ConsumerSpec,
    concurrency: usize,
    shutdown: CancellationToken,
    state: Arc<S>,
    handler: H,
) -> anyhow::Result<()>
where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let consumer = bus.work_consumer(&spec).await?;
    run_worker(consumer, spec, concurrency, shutdown, move |delivery| {
        handler(state.clone(), delivery)
    })
    .await?;
    Ok(())
}

/// The whole `main` of a service binary: load config, start telemetry, run until SIGINT or
/// SIGTERM (a second signal exits at once), report how it ended.
pub fn service_main<C, F, Fut>(name: &str, run: F) -> anyhow::Result<()>
where
    C: ServiceSettings,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!(
            "{name}: a rowsmith service. Configure with rowsmith.toml (or ROWSMITH_CONFIG) and \
             ROWSMITH_<SECTION>__<KEY> variables; see the README."
        );
        return Ok(());
    }
    let settings = C::from_settings(config::Settings::from_env()?);
    let process = settings.process().clone();
    let _telemetry = telemetry::init(&process.log, &process.telemetry, name);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signals(shutdown.clone()));
        tracing::info!(service = name, "starting");
        ops::serve(&process, name, shutdown.clone()).await?;
        let result = run(settings, shutdown).await;
        match &result {
            Ok(()) => tracing::info!(service = name, "stopped"),
            Err(error) => tracing::error!(
                service = name,
                error = format!("{error:#}"),
                "stopped with an error"
            ),
        }
        result
    })
}
