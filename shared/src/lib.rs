//! rowsmith's shared library: the contract between the services (messages, KV records,
//! subjects), configuration, the JetStream bus, the object store, the provider clients, and
//! the table code (DuckDB) that ingest, merger and the CLI's offline `render` share.

pub mod bus;
pub mod config;
pub mod estimate;
pub mod events;
pub mod jobs;
pub mod lifecycle;
pub mod messages;
pub mod ops;
pub mod proto;
pub mod providers;
pub mod records;
pub mod render;
pub mod shards;
pub mod spec;
pub mod storage;
pub mod table;
pub mod telemetry;

/// Milliseconds since the Unix epoch, the timestamp unit of every record and event.
pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// The whole `main` of a service binary: load config, start telemetry, run until SIGINT or
/// SIGTERM (a second signal exits at once), report how it ended.
pub fn service_main<F, Fut>(name: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(config::Settings, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!(
            "{name}: a rowsmith service. Configure with rowsmith.toml (or ROWSMITH_CONFIG) and \
             ROWSMITH_<SECTION>__<KEY> variables; see the README."
        );
        return Ok(());
    }
    let settings = config::Settings::from_env()?;
    let _telemetry = telemetry::init(&settings.log, &settings.telemetry, name);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(shutdown_on_signals(shutdown.clone()));
        tracing::info!(service = name, "starting");
        ops::serve(&settings, name, shutdown.clone()).await?;
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

/// Cancels `shutdown` on the first SIGINT or SIGTERM and exits the process on the second.
pub async fn shutdown_on_signals(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("signal handlers could not be installed");
        return;
    };
    for count in 0..2 {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        if count == 0 {
            tracing::info!(
                "shutting down: finishing messages in flight (signal again to exit now)"
            );
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}
