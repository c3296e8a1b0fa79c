//! `rowsmith submit`: stage the input, publish the JobSpec, print the job id.

use rowsmith_shared::bus::Bus;
use rowsmith_shared::config::Settings;
use rowsmith_shared::messages::subjects;
use rowsmith_shared::storage::Store;
use std::process::ExitCode;
use tracing::Instrument;

use crate::job_args::{JobArgs, stage_input};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub job: JobArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let job_id = submit_job(&bus, &Store::open(&settings.store)?, &settings, &args.job).await?;
    println!("{job_id}");
    Ok(ExitCode::SUCCESS)
}

/// Validates, stages the input and publishes; returns the job id.
pub async fn submit_job(
    bus: &Bus,
    store: &Store,
    settings: &Settings,
    job: &JobArgs,
) -> anyhow::Result<String> {
    let mut spec = job.to_spec()?;
    spec.validate_limits(&settings.limits)?;
    let job_id = spec.id().to_owned();
    spec.input = stage_input(store, &job_id, &spec.input).await?;
    // The job's trace starts here: ingest continues it from the message's traceparent.
    let span = tracing::info_span!("submit", job_id = %job_id);
    bus.publish(subjects::JOBS_SUBMIT, &job_id, &spec)
        .instrument(span)
        .await?;
    eprintln!(
        "submitted job {job_id} ({} via {}, model {})",
        job.input, spec.provider, spec.model
    );
    Ok(job_id)
}
