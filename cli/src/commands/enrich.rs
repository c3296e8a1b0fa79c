//! `rowsmith enrich`: submit, watch, and write the result, in one command.

use std::path::PathBuf;
use std::process::ExitCode;

use rowsmith_contract::records::JobState;
use rowsmith_store::Store;

use crate::job_args::JobArgs;

/// How long `enrich` waits for a suspended job's partial outputs.
const PARTIAL_OUTPUTS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub job: JobArgs,
    /// A .csv or .parquet file for the enriched table, or a directory for every output.
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let store = Store::open(&settings.store)?;
    let job_id = super::submit::submit_job(&bus, &store, &settings, &args.job).await?;
    let code = super::watch::watch_job(&bus, &job_id).await?;
    let mut job = super::read_job(&bus, &job_id).await?;
    // The merger writes a suspended job's partial outputs just after the suspension.
    let deadline = std::time::Instant::now() + PARTIAL_OUTPUTS_PATIENCE;
    while job.state == JobState::Suspended
        && job.outputs.failures_csv.is_none()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        job = super::read_job(&bus, &job_id).await?;
    }
    eprintln!("{}", crate::output::summary(&job));
    // A cancelled or suspended job's partial outputs are written too; the exit stays 1.
    let partial = matches!(job.state, JobState::Cancelled | JobState::Suspended);
    if code != ExitCode::SUCCESS && !partial {
        return Ok(code);
    }
    for path in super::result::write_result(&store, &job, &args.out).await? {
        println!("{}", path.display());
    }
    Ok(code)
}
