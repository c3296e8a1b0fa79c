//! A rowsmith service process: its `main` (settings, telemetry, signals), the operations
//! endpoint, and the worker shell every service runs.

pub mod ops;

use rowsmith_config as config;
use rowsmith_telemetry as telemetry;
use rowsmith_telemetry::shutdown_on_signals;

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
