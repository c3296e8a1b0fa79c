//! `rowsmith setup`: create or update the JetStream streams and the KV bucket once, as a NATS
//! user allowed to, so that the services can run with `nats.ensure_topology = false` and no
//! right to change them.

use std::process::ExitCode;

use rowsmith_bus::{EVENTS_STREAM, WORK_STREAM};
use rowsmith_contract::records::BUCKET;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    super::connect_and_set_up(&settings).await?;
    println!(
        "streams {WORK_STREAM} and {EVENTS_STREAM} and KV bucket {BUCKET} are in place ({} replica(s))",
        settings.nats.replicas.max(1)
    );
    Ok(ExitCode::SUCCESS)
}
