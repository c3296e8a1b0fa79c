//! `rowsmith status`: a job's record, for people or (`--json`) scripts.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub job_id: String,
    /// Print the whole record as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let job = super::read_job(&bus, &args.job_id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!("{}", crate::output::summary(&job));
    }
    Ok(ExitCode::SUCCESS)
}
