//! `rowsmith submit`: stage the input, publish the JobSpec, print the job id.

use anyhow::bail;
use rowsmith_bus::Bus;
use rowsmith_config::Settings;
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::{JobRecord, job_key};
use rowsmith_store::Store;
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
    let staged = stage_input(store, &job_id, &spec.input).await?;
    spec.input = staged.key.clone();
    // A job of this id exists: the same spec is followed, another is refused before anything
    // is uploaded over the first's input.
    if let Some((existing, _)) = bus.read::<JobRecord>(&job_key(&job_id)).await? {
        if existing.spec != spec {
            bail!(
                "job id {job_id} is taken by a job with a different spec (state {:?}); submit \
                 with another --job-id, or `rowsmith result {job_id}` for that job's outputs",
                existing.state
            );
        }
        eprintln!("job {job_id} was submitted before with this spec; following it");
        return Ok(job_id);
    }
    staged.upload(store).await?;
    // The job's trace starts here: ingest continues it from the message's traceparent.
    let span = tracing::info_span!("submit", job_id = %job_id);
    let stored = bus
        .publish_once(subjects::JOBS_SUBMIT, &job_id, &spec)
        .instrument(span)
        .await?;
    if !stored {
        // Another submission of this id is minutes old and not ingested yet.
        bail!(
            "job id {job_id} was submitted moments ago by another command; submit with another \
             --job-id, or `rowsmith watch {job_id}`"
        );
    }
    eprintln!(
        "submitted job {job_id} ({} via {}, model {})",
        job.input, spec.provider, spec.model
    );
    Ok(job_id)
}
