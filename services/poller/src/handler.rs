//! Handling one `rowsmith.batches.submitted` delivery: one status check.

use std::time::Duration;

use rowsmith_bus::lifecycle::stop_job;
use rowsmith_bus::step::StepError;
use rowsmith_bus::{Bus, Cas, Delivery, Outcome, decode};
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::{BatchEnded, BatchSubmitted, ShardKey, ShardReady, subjects};
use rowsmith_contract::records::{
    JobRecord, OrphanResults, QuotaRecord, ShardRecord, ShardState, job_key, quota_key, shard_key,
};
use rowsmith_providers::{
    BatchProvider, BatchRef, BatchState, BatchStatus, Provider, ProviderError, Providers,
};
use rowsmith_store::Store;
use rowsmith_store::layout::ResultPaths;

#[derive(Debug, Clone)]
pub struct Poller {
    pub bus: Bus,
    pub store: Store,
    pub providers: Providers,
    /// Delay before the n-th next check; the last entry repeats.
    pub schedule: Vec<Duration>,
    /// How long a shard refused for the token quota waits before it is sent again.
    pub quota_wait: Duration,
    /// A batch running longer than this (completion window plus grace) is treated as expired.
    pub give_up_after: Duration,
}

/// How long an overdue batch's cancel may take to end before its rows are sent again without
/// what it finished.
pub const CANCEL_PATIENCE: Duration = Duration::from_secs(3600);

/// How long after a shard's batch ended its own orphans (second batches rowsmith made for the
/// same shard attempt, cancelled) are waited for; past it the shard is merged without them.
pub const ORPHAN_PATIENCE: Duration = Duration::from_secs(15 * 60);

/// The delay before the next check: the schedule's, but never past the batch's deadline
/// (and at least a second).
pub fn capped_delay(
    schedule_delay: Duration,
    submitted_at_ms: i64,
    now_ms: i64,
    give_up_after: Duration,
) -> Duration {
    let deadline_ms = submitted_at_ms.saturating_add(give_up_after.as_millis() as i64);
    let until_deadline = Duration::from_millis(deadline_ms.saturating_sub(now_ms).max(0) as u64);
    schedule_delay
        .min(until_deadline)
        .max(Duration::from_secs(1).min(schedule_delay))
}

/// Whether a batch submitted at `submitted_at_ms` is past its completion window plus grace.
pub fn overdue(submitted_at_ms: i64, now_ms: i64, give_up_after: Duration) -> bool {
    now_ms.saturating_sub(submitted_at_ms) >= give_up_after.as_millis() as i64
}

/// The delay after the `delivered`-th check (1-based).
pub fn next_delay(schedule: &[Duration], delivered: i64) -> Duration {
    let index = usize::try_from(delivered.max(1) - 1).unwrap_or(0);
    schedule
        .get(index)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(30))
}

pub async fn handle(poller: &Poller, delivery: Delivery) -> Outcome {
    let submitted: BatchSubmitted = match decode(&delivery) {
        Ok(message) => message,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let now = rowsmith_contract::now_unix_ms();
    let schedule_delay = next_delay(&poller.schedule, delivery.delivered);
    // Past the deadline the batch is being cancelled: check at the schedule's pace again.
    let delay = match overdue(submitted.submitted_at_ms, now, poller.give_up_after) {
        true => schedule_delay,
        false => capped_delay(
            schedule_delay,
            submitted.submitted_at_ms,
            now,
            poller.give_up_after,
        ),
    };
    match check(poller, &submitted).await {
        Ok(Check::Ended) | Ok(Check::JobOver) => Outcome::Done,
        Ok(Check::Running) => Outcome::Retry { after: delay },
        Err(error) if error.is_retryable() => {
            tracing::warn!(job_id = %submitted.key.job_id, batch_id = %submitted.batch_id, %error, "status check failed, will check again");
            Outcome::Retry { after: delay }
        }
        // The job is suspended (it has batches out, so it never fails here); the batch is in
        // its shard record, and `rowsmith resume` watches it again once the cause is fixed.
        Err(error) => {
            let advice = error
                .cause::<ProviderError>()
                .and_then(ProviderError::what_to_do);
            let reason = format!(
                "status check of batch {} (shard {}) failed: {error}{}",
                submitted.batch_id,
                submitted.key.dotted(),
                advice.map(|a| format!("; {a}")).unwrap_or_default()
            );
            match stop_job(&poller.bus, &submitted.key.job_id, &reason).await {
                Ok(_) => Outcome::Terminate { reason },
                Err(_) => Outcome::Retry { after: delay },
            }
        }
    }
}

enum Check {
    Running,
    Ended,
    JobOver,
}

/// One status check of a batch: cancel it when asked or overdue, report its progress, or
/// collect what it answered once it ended.
async fn check(poller: &Poller, submitted: &BatchSubmitted) -> Result<Check, StepError> {
    let Some(job) = watched_job(poller, submitted).await? else {
        return Ok(Check::JobOver);
    };
    let provider = poller.providers.get(&submitted.provider)?;
    let batch = BatchRef {
        id: submitted.batch_id.clone(),
    };
    let status = provider.status(&batch).await?;
    let key = &submitted.key;
    if job.cancel_requested && !status.state.is_terminal() && status.state != BatchState::Cancelling
    {
        provider.cancel(&batch).await?;
        tracing::info!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, "batch cancelled on request");
    }
    let now = rowsmith_contract::now_unix_ms();
    let overdue_now = !status.state.is_terminal()
        && overdue(submitted.submitted_at_ms, now, poller.give_up_after);
    let hopeless = overdue_now
        && overdue(
            submitted.submitted_at_ms,
            now,
            poller.give_up_after + CANCEL_PATIENCE,
        );
    if hopeless {
        return give_up(poller, submitted, provider, &job).await;
    }
    if overdue_now {
        cancel_overdue(poller, submitted, provider, &job, &status).await;
        return Ok(Check::Running);
    }
    metrics::counter!("rowsmith_batch_checks_total", "state" => status.state.as_str().to_owned())
        .increment(1);
    if !status.state.is_terminal() {
        report_progress(poller, submitted, &job, &status).await;
        return Ok(Check::Running);
    }
    release_quota(&poller.bus, &submitted.provider, &job.spec.model, key).await?;
    if status.state == BatchState::Failed
        && status
            .errors
            .iter()
            .any(|e| e.starts_with("token_limit_exceeded"))
    {
        resubmit_later(poller, submitted, &job).await?;
        return Ok(Check::Ended);
    }
    if !collect_orphans(poller, submitted, provider, &job).await? {
        return Ok(Check::Running);
    }
    collect(poller, submitted, provider, &job, &status).await?;
    Ok(Check::Ended)
}

/// The job of a batch, while it is not over; a suspended job's batches are still watched:
/// what they bought is kept.
async fn watched_job(
    poller: &Poller,
    submitted: &BatchSubmitted,
) -> Result<Option<JobRecord>, StepError> {
    match poller
        .bus
        .read::<JobRecord>(&job_key(&submitted.key.job_id))
        .await?
    {
        Some((job, _)) if job.state.is_terminal() => Ok(None),
        Some((job, _)) => Ok(Some(job)),
        None => Err(StepError::Job(format!(
            "batch {} has no job record",
            submitted.batch_id
        ))),
    }
}

/// The provider should have ended the batch by now: cancel it, and keep checking until it
/// has, so that the rows it finished (and billed) are collected; only the rest go into the
/// next attempt.
async fn cancel_overdue(
    poller: &Poller,
    submitted: &BatchSubmitted,
    provider: &Provider,
    job: &JobRecord,
    status: &BatchStatus,
) {
    if status.state == BatchState::Cancelling || job.cancel_requested {
        return;
    }
    let key = &submitted.key;
    let batch = BatchRef {
        id: submitted.batch_id.clone(),
    };
    match provider.cancel(&batch).await {
        Ok(()) => {
            let message = format!(
                "batch {} of shard {} is past its completion window: cancelled; its {} \
                 finished rows are kept once it ends, the rest are sent again",
                batch.id, key.shard, status.completed
            );
            tracing::warn!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, "batch overdue, cancelled to collect what it finished");
            shard_warning(&poller.bus, key, job, message).await;
        }
        Err(error) => {
            tracing::warn!(batch_id = %batch.id, %error, "could not cancel an overdue batch")
        }
    }
}

/// Cancelled long ago and still not ended: stop waiting and retry its rows.
async fn give_up(
    poller: &Poller,
    submitted: &BatchSubmitted,
    provider: &Provider,
    job: &JobRecord,
) -> Result<Check, StepError> {
    let key = &submitted.key;
    let batch = BatchRef {
        id: submitted.batch_id.clone(),
    };
    if let Err(error) = provider.cancel(&batch).await {
        tracing::warn!(batch_id = %batch.id, %error, "could not cancel an overdue batch");
    }
    release_quota(&poller.bus, &submitted.provider, &job.spec.model, key).await?;
    let ended = BatchEnded {
        key: key.clone(),
        provider: submitted.provider.clone(),
        batch_id: batch.id.clone(),
        status: "expired".into(),
        output_path: None,
        errors_path: None,
        failure: None,
    };
    poller
        .bus
        .publish(
            subjects::BATCHES_ENDED,
            &ended_msg_id(key, &batch.id, job),
            &ended,
        )
        .await?;
    tracing::warn!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, "batch overdue and its cancel never ended, treated as expired");
    Ok(Check::Ended)
}

async fn report_progress(
    poller: &Poller,
    submitted: &BatchSubmitted,
    job: &JobRecord,
    status: &BatchStatus,
) {
    let key = &submitted.key;
    let message = format!(
        "batch {} of shard {} is {}: {}/{} done, {} failed",
        submitted.batch_id,
        key.shard,
        status.state.as_str(),
        status.completed,
        status.total,
        status.failed
    );
    poller
        .bus
        .emit(
            &Event::new(&key.job_id, EventKind::BatchProgress, message, job.counts)
                .with_shard(key.clone()),
        )
        .await;
}

/// Downloads the result files of the shard's own orphans that ended, so that the merger can
/// fill the rows the recorded batch failed with what they answered (it was paid for). False
/// while one is still being cancelled, for at most `ORPHAN_PATIENCE` after the recorded batch
/// ended; one that takes longer is left out, with a warning.
async fn collect_orphans(
    poller: &Poller,
    submitted: &BatchSubmitted,
    provider: &Provider,
    job: &JobRecord,
) -> Result<bool, StepError> {
    let key = &submitted.key;
    let Some((shard, _)) = poller.bus.read::<ShardRecord>(&shard_key(key)).await? else {
        return Ok(true);
    };
    let pending: Vec<String> = shard
        .own_orphans
        .iter()
        .filter(|id| !shard.orphan_results.iter().any(|r| &r.batch_id == *id))
        .cloned()
        .collect();
    if pending.is_empty() {
        return Ok(true);
    }
    let patient = within_orphan_patience(&poller.bus, key, &shard).await?;
    let mut waiting = false;
    for batch_id in pending {
        let batch = BatchRef { id: batch_id };
        match provider.status(&batch).await {
            Ok(status) if status.state.is_terminal() => {
                download_orphan(poller, key, provider, &batch, &status).await?;
            }
            Ok(status) if patient => {
                if status.state != BatchState::Cancelling
                    && let Err(error) = provider.cancel(&batch).await
                {
                    tracing::warn!(batch_id = %batch.id, %error, "could not cancel an orphan batch");
                }
                waiting = true;
            }
            Err(error) if patient && error.is_retryable() => {
                tracing::warn!(batch_id = %batch.id, %error, "status check of an orphan batch failed, will check again");
                waiting = true;
            }
            other => {
                let why = match other {
                    Ok(status) => format!("is still {}", status.state.as_str()),
                    Err(error) => format!("cannot be checked ({error})"),
                };
                leave_out_orphan(poller, key, job, &batch, &why).await;
            }
        }
    }
    Ok(!waiting)
}

/// Whether the shard's batch ended less than `ORPHAN_PATIENCE` ago (noting when it ended, at
/// the first look).
async fn within_orphan_patience(
    bus: &Bus,
    key: &ShardKey,
    shard: &ShardRecord,
) -> Result<bool, StepError> {
    let now = rowsmith_contract::now_unix_ms();
    let ended_at_ms = match shard.batch_ended_at_ms {
        Some(at) => at,
        None => {
            bus.modify(
                &shard_key(key),
                |shard: &mut ShardRecord| -> Result<Cas<i64>, StepError> {
                    Ok(match shard.batch_ended_at_ms {
                        Some(at) => Cas::Keep(at),
                        None => {
                            shard.batch_ended_at_ms = Some(now);
                            Cas::Write(now)
                        }
                    })
                },
            )
            .await?
        }
    };
    Ok(now.saturating_sub(ended_at_ms) < ORPHAN_PATIENCE.as_millis() as i64)
}

/// Stores an ended orphan's files next to the shard's and notes them in the shard record.
async fn download_orphan(
    poller: &Poller,
    key: &ShardKey,
    provider: &Provider,
    batch: &BatchRef,
    status: &BatchStatus,
) -> Result<(), StepError> {
    let into = ResultPaths::of_orphan(key, &batch.id);
    let files = provider.download(status, &poller.store, &into).await?;
    let results = OrphanResults {
        batch_id: batch.id.clone(),
        status: status.state.as_str().to_owned(),
        output_path: files.output_path,
        errors_path: files.errors_path,
    };
    poller
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<()>, StepError> {
                if shard
                    .orphan_results
                    .iter()
                    .any(|r| r.batch_id == results.batch_id)
                {
                    return Ok(Cas::Keep(()));
                }
                shard.orphan_results.push(results.clone());
                Ok(Cas::Write(()))
            },
        )
        .await?;
    tracing::info!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, status = %results.status, "orphan batch collected");
    Ok(())
}

/// Past `ORPHAN_PATIENCE`: the shard is merged without the orphan, and the job says so.
async fn leave_out_orphan(
    poller: &Poller,
    key: &ShardKey,
    job: &JobRecord,
    batch: &BatchRef,
    why: &str,
) {
    let message = format!(
        "orphan batch {} of shard {} {why} {} minutes after the shard's batch ended: the shard \
         is merged without its answers",
        batch.id,
        key.shard,
        ORPHAN_PATIENCE.as_secs() / 60
    );
    tracing::warn!(job_id = %key.job_id, shard = key.shard, batch_id = %batch.id, "orphan batch left out");
    shard_warning(&poller.bus, key, job, message).await;
}

/// A warning event about shard `key` of `job`.
async fn shard_warning(bus: &Bus, key: &ShardKey, job: &JobRecord, message: String) {
    bus.emit(
        &Event::new(&key.job_id, EventKind::Warning, message, job.counts).with_shard(key.clone()),
    )
    .await;
}

/// Downloads an ended batch's files into the store, records them in the shard and announces
/// the end to the merger.
async fn collect(
    poller: &Poller,
    submitted: &BatchSubmitted,
    provider: &Provider,
    job: &JobRecord,
    status: &BatchStatus,
) -> Result<(), StepError> {
    let (bus, key) = (&poller.bus, &submitted.key);
    metrics::counter!("rowsmith_batches_ended_total", "state" => status.state.as_str().to_owned())
        .increment(1);
    let files = provider
        .download(status, &poller.store, &ResultPaths::of_shard(key))
        .await?;
    let batch_status = status.state.as_str().to_owned();
    bus.modify(
        &shard_key(key),
        |shard: &mut ShardRecord| -> Result<Cas<()>, StepError> {
            if shard.output_path == files.output_path
                && shard.errors_path == files.errors_path
                && shard.batch_status.as_deref() == Some(batch_status.as_str())
            {
                return Ok(Cas::Keep(()));
            }
            shard.batch_status = Some(batch_status.clone());
            shard.output_path = files.output_path.clone();
            shard.errors_path = files.errors_path.clone();
            shard.updated_at_ms = rowsmith_contract::now_unix_ms();
            Ok(Cas::Write(()))
        },
    )
    .await?;
    let ended = BatchEnded {
        key: key.clone(),
        provider: submitted.provider.clone(),
        batch_id: submitted.batch_id.clone(),
        status: batch_status,
        output_path: files.output_path,
        errors_path: files.errors_path,
        failure: batch_failure(status),
    };
    bus.publish(
        subjects::BATCHES_ENDED,
        &ended_msg_id(key, &submitted.batch_id, job),
        &ended,
    )
    .await?;
    tracing::info!(job_id = %key.job_id, shard = key.shard, batch_id = %submitted.batch_id, status = %ended.status, "batch ended");
    Ok(())
}

/// The message id of a batch's end: after a resume it is new, so the stream's duplicate
/// window does not drop the end of a batch re-attached by that resume.
fn ended_msg_id(key: &ShardKey, batch_id: &str, job: &JobRecord) -> String {
    match job.resumes {
        0 => format!("ended.{}.{batch_id}", key.dotted()),
        resumes => format!("ended.{}.{batch_id}.resume{resumes}", key.dotted()),
    }
}

fn batch_failure(status: &BatchStatus) -> Option<String> {
    (!status.errors.is_empty()).then(|| status.errors.join("; "))
}

/// Frees the shard's tokens in its model's enqueued-token quota (when one is kept).
async fn release_quota(
    bus: &Bus,
    provider: &str,
    model: &str,
    key: &ShardKey,
) -> Result<(), StepError> {
    let quota = quota_key(provider, model);
    if bus.read::<QuotaRecord>(&quota).await?.is_none() {
        return Ok(());
    }
    let shard = key.dotted();
    bus.modify(
        &quota,
        |record: &mut QuotaRecord| -> Result<Cas<()>, StepError> {
            Ok(match record.reserved.remove(&shard) {
                Some(_) => Cas::Write(()),
                None => Cas::Keep(()),
            })
        },
    )
    .await
}

/// The provider refused the batch for its enqueued-token quota: not the rows' fault. The
/// shard goes back to the submitter, to be sent again after `quota_wait`.
async fn resubmit_later(
    poller: &Poller,
    submitted: &BatchSubmitted,
    job: &JobRecord,
) -> Result<(), StepError> {
    let bus = &poller.bus;
    let key = &submitted.key;
    let failed_batch = submitted.batch_id.clone();
    let not_before = rowsmith_contract::now_unix_ms() + poller.quota_wait.as_millis() as i64;
    let record = bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<ShardRecord>, StepError> {
                if shard.provider_batch_id.as_deref() != Some(failed_batch.as_str()) {
                    return Ok(Cas::Keep(shard.clone()));
                }
                shard
                    .transition(ShardState::Uploading)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                shard.provider_batch_id = None;
                shard.resubmissions += 1;
                shard.not_before_ms = Some(not_before);
                Ok(Cas::Write(shard.clone()))
            },
        )
        .await?;
    let ready = ShardReady {
        key: key.clone(),
        provider: submitted.provider.clone(),
        requests_path: record.requests_path.clone(),
        request_count: record.request_count,
        bytes: record.bytes,
    };
    let msg_id = format!("ready.{}.resubmit{}", key.dotted(), record.resubmissions);
    bus.publish(subjects::SHARDS_READY, &msg_id, &ready).await?;
    let message = format!(
        "batch {failed_batch} of shard {} was refused for the enqueued-token quota of {}; sending it again in {}s",
        key.shard,
        job.spec.model,
        poller.quota_wait.as_secs()
    );
    tracing::info!(job_id = %key.job_id, shard = key.shard, batch_id = %failed_batch, "token quota refusal, shard resubmitted");
    bus.emit(
        &Event::new(&key.job_id, EventKind::BatchProgress, message, job.counts)
            .with_shard(key.clone()),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_never_wait_past_the_deadline_and_overdue_batches_are_given_up() {
        let hour = Duration::from_secs(3600);
        let five_minutes = Duration::from_secs(300);
        // Submitted 24h58m ago with a 25h deadline: the next check comes in 2 minutes.
        let submitted = 0;
        let now = (24 * 3600 + 58 * 60) * 1000;
        assert_eq!(
            capped_delay(five_minutes, submitted, now, 25 * hour),
            Duration::from_secs(120)
        );
        assert_eq!(
            capped_delay(five_minutes, submitted, 0, 25 * hour),
            five_minutes
        );
        assert!(!overdue(submitted, now, 25 * hour));
        assert!(overdue(submitted, 25 * 3600 * 1000, 25 * hour));
        // At the deadline the check is not delayed for nothing, but not a busy loop either.
        assert_eq!(
            capped_delay(five_minutes, submitted, 25 * 3600 * 1000, 25 * hour),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn delay_follows_the_schedule_then_repeats_the_last() {
        let schedule = [30, 60, 120, 300].map(Duration::from_secs);
        let delays: Vec<u64> = (1..=6)
            .map(|n| next_delay(&schedule, n).as_secs())
            .collect();
        assert_eq!(delays, [30, 60, 120, 300, 300, 300]);
    }
}
