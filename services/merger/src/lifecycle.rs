//! Handling `rowsmith.jobs.suspended` (write a suspended job's partial outputs, or end it
//! `cancelled` when that was asked for) and `rowsmith.jobs.resume` (continue it).
//!
//! The merger owns these because it already owns every end-of-attempt decision (retry,
//! finalize, announce): resuming is that decision taken again, and partial outputs are a
//! finalize that leaves the job as it is.

use rowsmith_bus::lifecycle::dead_letter;
use rowsmith_bus::step::{StepError, require_job, settle};
use rowsmith_bus::{Cas, Delivery, Outcome, decode};
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::{
    BatchSubmitted, JobSuspended, ResumeJob, ShardKey, ShardReady, subjects,
};
use rowsmith_contract::records::{JobRecord, JobState, ShardRecord, job_key, shard_key};
use rowsmith_jobs::outputs::{finalize_job, write_partial_outputs};

use crate::handler::{Merger, after_shard, run_next};

/// Handles one `rowsmith.jobs.suspended`.
pub async fn handle_suspended(merger: &Merger, delivery: Delivery) -> Outcome {
    // A delivery past the last counted one is a dead letter, not handled again.
    if let Some(outcome) = dead_letter(&merger.bus, &delivery).await {
        return outcome;
    }
    let suspended: JobSuspended = match decode(&delivery) {
        Ok(message) => message,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let job_id = suspended.job_id.clone();
    match outputs_of_suspended(merger, &job_id, delivery.stream_sequence).await {
        Ok(()) => Outcome::Done,
        Err(error) => settle(&merger.bus, &job_id, &delivery, error).await,
    }
}

async fn outputs_of_suspended(
    merger: &Merger,
    job_id: &str,
    sequence: u64,
) -> Result<(), StepError> {
    let job = require_job(&merger.bus, job_id).await?;
    if job.state != JobState::Suspended {
        return Ok(());
    }
    if job.cancel_requested {
        // Cancelled, and the provider could not be reached to finish that: end with what
        // is done; the rows not answered are listed as cancelled.
        return finalize_job(&merger.bus, merger.writer(), job_id, sequence).await;
    }
    write_partial_outputs(&merger.bus, merger.writer(), job_id).await
}

/// Handles one `rowsmith.jobs.resume`.
pub async fn handle_resume(merger: &Merger, delivery: Delivery) -> Outcome {
    // A delivery past the last counted one is a dead letter, not handled again.
    if let Some(outcome) = dead_letter(&merger.bus, &delivery).await {
        return outcome;
    }
    let resume: ResumeJob = match decode(&delivery) {
        Ok(message) => message,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let job_id = resume.job_id.clone();
    match resume_job(merger, &job_id, delivery.stream_sequence).await {
        Ok(()) => Outcome::Done,
        Err(error) => settle(&merger.bus, &job_id, &delivery, error).await,
    }
}

/// Moves a suspended job back to running and sends on what it had not finished: every
/// unmerged shard of the current attempt goes back to the poller when it has a batch (the
/// batch is watched again, never created again) and to the submitter when it has none.
/// Rows already answered are in merged shards and are not sent. The redelivery of the same
/// resume message (`sequence`) finishes it instead of being ignored.
async fn resume_job(merger: &Merger, job_id: &str, sequence: u64) -> Result<(), StepError> {
    let bus = &merger.bus;
    let resumed = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<Option<JobRecord>>, StepError> {
                if job.state == JobState::Suspended {
                    job.transition(JobState::Running)
                        .map_err(|e| StepError::Job(e.to_string()))?;
                    job.error = None;
                    job.resumes += 1;
                    job.resumed_by = Some(sequence);
                    return Ok(Cas::Write(Some(job.clone())));
                }
                let redelivered = sequence != 0 && job.resumed_by == Some(sequence);
                Ok(Cas::Keep(
                    (redelivered && !job.state.is_stopped()).then(|| job.clone()),
                ))
            },
        )
        .await?;
    let Some(job) = resumed else {
        tracing::info!(
            job_id,
            "resume of a job that is not suspended: nothing to do"
        );
        return Ok(());
    };
    let unmerged = job.unmerged_shards();
    let message = format!(
        "job resumed (resume {}): {} shards of attempt {} still to collect or send; rows \
         already answered are not sent again",
        job.resumes,
        unmerged.len(),
        job.attempt
    );
    tracing::info!(
        job_id,
        resumes = job.resumes,
        shards = unmerged.len(),
        "job resumed"
    );
    bus.emit(&Event::new(job_id, EventKind::Resumed, message, job.counts))
        .await;
    for shard in &unmerged {
        let key = ShardKey {
            job_id: job_id.to_owned(),
            attempt: job.attempt,
            shard: *shard,
        };
        send_on(merger, &key, job.resumes).await?;
    }
    if !unmerged.is_empty() {
        return Ok(());
    }
    // Everything was collected while suspended: take the end-of-attempt decision now.
    let next = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<_>, StepError> {
                if job.state != JobState::Running {
                    return Ok(Cas::Keep(crate::handler::Next::Wait));
                }
                let (moved, next) = after_shard(job)?;
                Ok(if moved {
                    Cas::Write(next)
                } else {
                    Cas::Keep(next)
                })
            },
        )
        .await?;
    run_next(merger, job_id, job.attempt, next, sequence).await
}

/// Re-attaches one unmerged shard: `batches.submitted` when it has a batch, else
/// `shards.ready`. The message ids carry the resume count, so the stream's duplicate window
/// does not drop them as repeats of the first publish.
async fn send_on(merger: &Merger, key: &ShardKey, resumes: u32) -> Result<(), StepError> {
    let bus = &merger.bus;
    let (record, _) = bus
        .read::<ShardRecord>(&shard_key(key))
        .await?
        .ok_or_else(|| StepError::Job(format!("shard {} has no record", key.dotted())))?;
    match &record.provider_batch_id {
        Some(batch_id) => {
            let submitted = BatchSubmitted {
                key: key.clone(),
                provider: record.provider.clone(),
                batch_id: batch_id.clone(),
                submitted_at_ms: rowsmith_contract::now_unix_ms(),
            };
            let msg_id = format!("submitted.{}.{batch_id}.resume{resumes}", key.dotted());
            bus.publish(subjects::BATCHES_SUBMITTED, &msg_id, &submitted)
                .await?;
            tracing::info!(job_id = %key.job_id, shard = key.shard, %batch_id, "batch re-attached");
        }
        None => {
            let ready = ShardReady {
                key: key.clone(),
                provider: record.provider.clone(),
                requests_path: record.requests_path.clone(),
                request_count: record.request_count,
                bytes: record.bytes,
            };
            let msg_id = format!("ready.{}.resume{resumes}", key.dotted());
            bus.publish(subjects::SHARDS_READY, &msg_id, &ready).await?;
        }
    }
    Ok(())
}
