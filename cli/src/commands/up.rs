//! `rowsmith up`: every service in one process (laptop mode), with the simulator on --sim.

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

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut settings = super::settings()?;
    rowsmith_shared::telemetry::init(&settings.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(rowsmith_shared::shutdown_on_signals(shutdown.clone()));
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
        services.spawn(async move {
            (
                "provider-sim",
                task.await.map_err(anyhow::Error::from).and_then(|r| r),
            )
        });
    }
    // Connect once first so that a missing NATS is one clear error, not four.
    super::connect(&settings).await?;
    let service_list: [(&str, fn(_, _) -> _); 4] = [
        ("ingest", |s, c| {
            Box::pin(rowsmith_ingest::run(s, c))
                as futures::future::BoxFuture<'static, anyhow::Result<()>>
        }),
        ("submitter", |s, c| Box::pin(rowsmith_submitter::run(s, c))),
        ("poller", |s, c| Box::pin(rowsmith_poller::run(s, c))),
        ("merger", |s, c| Box::pin(rowsmith_merger::run(s, c))),
    ];
    for (name, start) in service_list {
        let future = start(settings.clone(), shutdown.clone());
        services.spawn(async move { (name, future.await) });
    }
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
