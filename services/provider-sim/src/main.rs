//! `rowsmith-provider-sim`: the provider simulator as its own process.

use clap::Parser;

/// A local imitation of the OpenAI Files + Batches API (see the README).
#[derive(Debug, Parser)]
#[command(name = "rowsmith-provider-sim", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one); default from `sim.listen`.
    #[arg(long)]
    listen: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut settings = rowsmith_config::Settings::from_env()?;
    let _telemetry =
        rowsmith_telemetry::init(&settings.log, &settings.telemetry, "rowsmith-provider-sim");
    if let Some(listen) = args.listen {
        settings.sim.listen = listen;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(rowsmith_telemetry::shutdown_on_signals(shutdown.clone()));
        let listener = tokio::net::TcpListener::bind(&settings.sim.listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        rowsmith_provider_sim::serve(settings.sim, listener, shutdown).await
    })
}
