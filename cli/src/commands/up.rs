//! `rowsmith up`: every service in one process (laptop mode), with the simulator on --sim.

use rowsmith_runtime::ServiceSettings;
use std::process::ExitCode;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also run the provider simulator, and send `provider: sim` jobs to it.
    #[arg(long)]
    pub sim: bool,
    /// Where the simulator listens (port 0 picks a free one); default `sim.listen`.
    #[arg(long)]
    pub sim_listen: Option<String>,
}

/// A service's future, ending with its name.
async fn named(
    name: &'static str,
    service: impl std::future::Future<Output = anyhow::Result<()>>,
) -> (&'static str, anyhow::Result<()>) {
    (name, service.await)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut settings = super::settings()?;
    let _telemetry = rowsmith_telemetry::init(&settings.log, &settings.telemetry, "rowsmith");
    let shutdown = CancellationToken::new();
    tokio::spawn(rowsmith_telemetry::shutdown_on_signals(shutdown.clone()));
    let mut services = JoinSet::new();
    if args.sim {
        if let Some(listen) = args.sim_listen {
            settings.sim.listen = listen;
        }
        let (address, task) = rowsmith_provider_sim::start(settings.sim.clone(), shutdown.clone())
            .await
            .with_context(|| format!("the simulator cannot listen on {}", settings.sim.listen))?;
        settings.provider.sim.base_url = format!("http://{address}/v1");
        eprintln!("provider simulator listening on http://{address}");
        services.spawn(named("provider-sim", async move { task.await? }));
    }
    if let Some(address) = rowsmith_runtime::ops::serve(
        &rowsmith_config::ProcessSettings::of(&settings),
        "rowsmith",
        shutdown.clone(),
    )
    .await?
    {
        eprintln!("metrics and health on http://{address} (/metrics, /healthz, /readyz)");
    }
    // Connect once first so that a missing NATS is one clear error, not four.
    super::connect_and_set_up(&settings).await?;
    let (s, c) = (&settings, &shutdown);
    services.spawn(named(
        "ingest",
        rowsmith_ingest::run(rowsmith_ingest::Config::from_settings(s.clone()), c.clone()),
    ));
    services.spawn(named(
        "submitter",
        rowsmith_submitter::run(
            rowsmith_submitter::Config::from_settings(s.clone()),
            c.clone(),
        ),
    ));
    services.spawn(named(
        "poller",
        rowsmith_poller::run(rowsmith_poller::Config::from_settings(s.clone()), c.clone()),
    ));
    services.spawn(named(
        "merger",
        rowsmith_merger::run(rowsmith_merger::Config::from_settings(s.clone()), c.clone()),
    ));
    eprintln!(
        "rowsmith up: ingest, submitter, poller, merger running (NATS {}, store {}); Ctrl-C stops",
        settings.nats.url, settings.store.url
    );
    let mut failed = false;
    while let Some(joined) = services.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(service = name, "stopped"),
            Ok((name, Err(error))) => {
                eprintln!("error: service {name} stopped: {error:#}");
                failed = true;
                shutdown.cancel();
            }
            Err(error) => {
                eprintln!("error: a service panicked: {error}");
                failed = true;
                shutdown.cancel();
            }
        }
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
