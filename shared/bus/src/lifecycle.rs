//! How a job stops and goes on: an error fails it while nothing was sent and suspends it
//! once work may be at the provider (a job that has spent money never ends `failed`); a
//! message whose deliveries ran out stops its job even when its handler never returned; a
//! stopped job gives back its share of the enqueued-token quota; `resume` asks a suspended
//! job to continue.

use crate::{Bus, BusError, Cas, Delivery, Outcome};
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::{JobSuspended, ResumeJob, subjects};
use rowsmith_contract::records::{JobRecord, JobState, QuotaRecord, job_key, quota_key};
use rowsmith_contract::spec::JobSpec;

/// Where [`stop_job`] left the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Nothing had been sent: the job failed.
    Failed,
    /// Work may be at the provider: the job is suspended, its answers kept.
    Suspended,
    /// The job had already stopped (ended, or suspended before); nothing changed.
    Already,
}

/// The user-facing text of a suspension: why, what still happens, and what to do.
pub fn suspension_message(job_id: &str, reason: &str) -> String {
    format!(
        "job suspended: {reason}; nothing new is sent, batches already at the provider are \
         still collected and every answer is kept (partial outputs: `rowsmith result {job_id} \
         --out DIR`); fix the cause, then `rowsmith resume {job_id}` (or `rowsmith cancel \
         {job_id}` to end it with what is done)"
    )
}

/// Stops a job on an error it cannot get past: `failed` while nothing was sent, else
/// `suspended` (see [`JobRecord::may_have_sent`]). Emits the event, releases the job's
/// quota reservations, and for a suspended job asks the merger for its partial outputs.
/// A job without a record still gets the `failed` event, so the user learns why.
pub async fn stop_job(bus: &Bus, job_id: &str, reason: &str) -> Result<Stopped, BusError> {
    let changed = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<Option<JobRecord>>, BusError> {
                if job.state.is_stopped() {
                    return Ok(Cas::Keep(None));
                }
                let now = rowsmith_contract::now_unix_ms();
                if job.may_have_sent() {
                    job.state = JobState::Suspended;
                    job.error = Some(reason.to_owned());
                    // Whoever was writing the outputs stopped; the next finalize may claim it.
                    job.finalizing_by = None;
                } else {
                    job.state = JobState::Failed;
                    job.error = Some(reason.to_owned());
                    job.finished_at_ms = Some(now);
                }
                job.updated_at_ms = now;
                Ok(Cas::Write(Some(job.clone())))
            },
        )
        .await;
    let job = match changed {
        Ok(Some(job)) => job,
        Ok(None) => return Ok(Stopped::Already),
        Err(BusError::NotFound { .. }) => {
            let message = format!("job failed: {reason}");
            bus.emit(&Event::new(
                job_id,
                EventKind::Failed,
                message,
                Default::default(),
            ))
            .await;
            return Ok(Stopped::Failed);
        }
        Err(error) => return Err(error),
    };
    if let Err(error) = release_job_quota(bus, &job.spec).await {
        tracing::warn!(job_id, %error, "could not release the job's quota reservations");
    }
    if job.state == JobState::Failed {
        tracing::warn!(job_id, reason, "job failed");
        let message = format!("job failed: {reason}");
        bus.emit(&Event::new(job_id, EventKind::Failed, message, job.counts))
            .await;
        return Ok(Stopped::Failed);
    }
    tracing::warn!(job_id, reason, "job suspended");
    let message = suspension_message(job_id, reason);
    bus.emit(&Event::new(
        job_id,
        EventKind::Suspended,
        message,
        job.counts,
    ))
    .await;
    let suspended = JobSuspended {
        job_id: job_id.to_owned(),
        reason: reason.to_owned(),
    };
    let msg_id = format!("suspended.{job_id}.{}", job.resumes);
    bus.publish(subjects::JOBS_SUSPENDED, &msg_id, &suspended)
        .await?;
    Ok(Stopped::Suspended)
}

/// Frees every reservation of job `spec` in the enqueued-token quota of its model (and of
/// its fallback's): a stopped job's shards hold none back any more. Batches of a suspended
/// job still running at the provider may then be over-counted by the provider for a while;
/// a refusal for the quota is sent again later, so that costs time, never rows.
pub async fn release_job_quota(bus: &Bus, spec: &JobSpec) -> Result<(), BusError> {
    let mut quotas = vec![quota_key(&spec.provider, &spec.model)];
    if let Some(fallback) = &spec.fallback {
        quotas.push(quota_key(&fallback.provider, &fallback.model));
    }
    let prefix = format!("{}.", spec.id());
    for quota in quotas {
        if bus.read::<QuotaRecord>(&quota).await?.is_none() {
            continue;
        }
        let released = bus
            .modify(
                &quota,
                |record: &mut QuotaRecord| -> Result<Cas<usize>, BusError> {
                    let before = record.reserved.len();
                    record
                        .reserved
                        .retain(|shard, _| !shard.starts_with(&prefix));
                    let released = before - record.reserved.len();
                    Ok(match released {
                        0 => Cas::Keep(0),
                        _ => Cas::Write(released),
                    })
                },
            )
            .await?;
        if released > 0 {
            tracing::info!(
                job_id = spec.id(),
                quota,
                released,
                "quota reservations released"
            );
        }
    }
    Ok(())
}

/// The job a work message is about: its `job_id`, or its shard key's.
fn job_of(delivery: &Delivery) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Names {
        job_id: Option<String>,
        key: Option<rowsmith_contract::messages::ShardKey>,
    }
    let names: Names = serde_json::from_slice(&delivery.payload).ok()?;
    names.job_id.or(names.key.map(|key| key.job_id))
}

/// A dead letter that always lands: a delivery past the configured count (the consumer
/// allows one more than configured) means the handler of the last counted delivery never
/// returned — killed, or out of memory. Such a delivery is not handled again: its job is
/// stopped with the reason and the message terminated. `None` for every other delivery.
pub async fn dead_letter(bus: &Bus, delivery: &Delivery) -> Option<Outcome> {
    if !delivery.exhausted {
        return None;
    }
    let counted = delivery.delivered - 1;
    let reason = format!(
        "a {} message gave up after {counted} deliveries: the handler never finished \
         (killed or out of memory?)",
        delivery.subject
    );
    let Some(job_id) = job_of(delivery) else {
        tracing::error!(subject = %delivery.subject, counted, "dead letter of no job");
        return Some(Outcome::Terminate { reason });
    };
    match stop_job(bus, &job_id, &reason).await {
        Ok(_) => Some(Outcome::Terminate { reason }),
        // Keep the message so that the dead letter is recorded on its next delivery.
        Err(error) => {
            tracing::error!(job_id, %error, "could not record the dead letter");
            Some(Outcome::Retry {
                after: std::time::Duration::from_secs(5),
            })
        }
    }
}

/// Asks the merger to continue a suspended job. `Err` names the state of a job that is
/// not suspended.
pub async fn request_resume(
    bus: &Bus,
    job_id: &str,
) -> Result<Result<JobRecord, JobState>, BusError> {
    let (job, revision) = bus
        .read::<JobRecord>(&job_key(job_id))
        .await?
        .ok_or_else(|| BusError::NotFound {
            key: job_key(job_id),
        })?;
    if job.state != JobState::Suspended {
        return Ok(Err(job.state));
    }
    // One message per suspension: resuming twice in a row is deduplicated.
    let msg_id = format!("resume.{job_id}.{}.{revision}", job.resumes);
    let resume = ResumeJob {
        job_id: job_id.to_owned(),
    };
    bus.publish(subjects::JOBS_RESUME, &msg_id, &resume).await?;
    Ok(Ok(job))
}
/// Asks for a job to be cancelled: no new batches go out, running ones are cancelled at
/// their next status check, finished rows are kept. `Err` names the state of a job that
/// already ended.
pub async fn request_cancel(
    bus: &Bus,
    job_id: &str,
) -> Result<Result<JobRecord, JobState>, BusError> {
    let outcome = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<Result<JobRecord, JobState>>, BusError> {
                if job.state.is_terminal() {
                    return Ok(Cas::Keep(Err(job.state)));
                }
                if job.cancel_requested {
                    return Ok(Cas::Keep(Ok(job.clone())));
                }
                job.cancel_requested = true;
                job.updated_at_ms = rowsmith_contract::now_unix_ms();
                Ok(Cas::Write(Ok(job.clone())))
            },
        )
        .await?;
    if let Ok(job) = &outcome {
        if job.state == JobState::Suspended {
            // A suspended job goes on to end: its batches are cancelled at the provider and
            // its finished rows collected, as for a running job. Should the provider still
            // refuse, the job is suspended again and then ends `cancelled` with what it has.
            // `Err`: resumed meanwhile, and then the cancel flag alone does it.
            let _still_suspended = crate::lifecycle::request_resume(bus, job_id).await?;
        }
        let message =
            "cancel requested: no new batches; running batches are cancelled at their next check";
        bus.emit(&Event::new(
            job_id,
            EventKind::BatchProgress,
            message,
            job.counts,
        ))
        .await;
    }
    Ok(outcome)
}
