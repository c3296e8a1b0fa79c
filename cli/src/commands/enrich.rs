//! `rowsmith enrich`: submit, watch, and write the result, in one command.

use std::path::PathBuf;
use std::process::ExitCode;

use rowsmith_shared::storage::Store;

use crate::job_args::JobArgs;

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
    let job = super::read_job(&bus, &job_id).await?;
    eprintln!("{}", crate::output::summary(&job));
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    for path in super::result::write_result(&store, &job, &args.out).await? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
