//! `rowsmith cancel`: stop a job. Batches not yet sent are not sent, running ones are
//! cancelled at the provider at their next status check, finished rows are kept; the job ends
//! `cancelled` with its outputs, rows not done listed as `cancelled` in failures.csv.

use std::process::ExitCode;

use rowsmith_bus::lifecycle::request_cancel;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub job_id: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    super::read_job(&bus, &args.job_id).await?;
    match request_cancel(&bus, &args.job_id).await? {
        Ok(_) => {
            eprintln!(
                "job {0}: cancel requested; running batches are cancelled at their next check \
                 (`rowsmith watch {0}` shows the job end)",
                args.job_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(state) => anyhow::bail!(
            "job {} already ended ({state:?}); nothing to cancel",
            args.job_id
        ),
    }
}
