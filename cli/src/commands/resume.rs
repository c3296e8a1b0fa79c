//! `rowsmith resume`: continue a suspended job once the cause in its error is fixed. Rows
//! already answered are not sent again; batches still at the provider are watched again,
//! never created again.

use std::process::ExitCode;

use rowsmith_bus::lifecycle::request_resume;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub job_id: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let job = super::read_job(&bus, &args.job_id).await?;
    match request_resume(&bus, &args.job_id).await? {
        Ok(_) => {
            eprintln!(
                "job {0}: resume requested (it was suspended: {1}); `rowsmith watch {0}` follows it",
                args.job_id,
                job.error.as_deref().unwrap_or("no reason recorded")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(state) => anyhow::bail!(
            "job {} is {} and not suspended; only a suspended job can be resumed",
            args.job_id,
            serde_json::to_value(state)?.as_str().unwrap_or_default()
        ),
    }
}
