//! Handling one `rowsmith.shards.ready`.
//!
//! Exactly once: the uploaded file id is recorded (state `uploading`) before the batch is
//! created; creating is claimed, reconciled and recorded as [`crate::creation`] says.

use std::time::Duration;

use rowsmith_bus::step::{StepError, settle};
use rowsmith_bus::{Cas, Delivery, Outcome, decode};
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::{BatchEnded, BatchSubmitted, ShardReady, subjects};
use rowsmith_contract::records::{
    JobRecord, JobState, QuotaRecord, ShardRecord, ShardState, job_key, quota_key, shard_key,
};
use rowsmith_providers::{BatchProvider, Provider, ShardLines};

use crate::Submitter;
use crate::creation::{Creation, ensure_batch};

pub async fn handle(submitter: &Submitter, delivery: Delivery) -> Outcome {
    let ready: ShardReady = match decode(&delivery) {
        Ok(ready) => ready,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let job_id = ready.key.job_id.clone();
    match submit(submitter, &ready).await {
        Ok(Submitted::Done) => Outcome::Done,
        Ok(Submitted::Later(after)) => Outcome::Retry { after },
        Err(error) => settle(&submitter.bus, &job_id, &delivery, error).await,
    }
}

/// Whether the shard went out.
enum Submitted {
    Done,
    /// Held back (the model's enqueued-token quota is in use, or the provider refused it
    /// moments ago): ask again after this long.
    Later(Duration),
}

/// Reserves the shard's tokens in its model's quota; `false` while the quota is in use.
async fn reserve_quota(
    submitter: &Submitter,
    ready: &ShardReady,
    model: &str,
    tokens: u64,
) -> Result<bool, StepError> {
    let Some(&quota) = submitter.quota.enqueued_tokens.get(model) else {
        return Ok(true);
    };
    let key = quota_key(&ready.provider, model);
    if submitter.bus.read::<QuotaRecord>(&key).await?.is_none() {
        submitter.bus.create(&key, &QuotaRecord::default()).await?;
    }
    let shard = ready.key.dotted();
    submitter
        .bus
        .modify(
            &key,
            |record: &mut QuotaRecord| -> Result<Cas<bool>, StepError> {
                if record.reserved.contains_key(&shard) {
                    return Ok(Cas::Keep(true));
                }
                // A shard larger than the whole quota goes alone rather than never.
                if record.in_use() > 0 && record.in_use() + tokens > quota {
                    return Ok(Cas::Keep(false));
                }
                record.reserved.insert(shard.clone(), tokens);
                Ok(Cas::Write(true))
            },
        )
        .await
}

async fn submit(submitter: &Submitter, ready: &ShardReady) -> Result<Submitted, StepError> {
    let bus = &submitter.bus;
    let key = &ready.key;
    let record_key = shard_key(key);
    let job = match bus.read::<JobRecord>(&job_key(&key.job_id)).await? {
        Some((job, _)) if job.state.is_terminal() => {
            tracing::info!(job_id = %key.job_id, shard = key.shard, "job already ended, shard not submitted");
            return Ok(Submitted::Done);
        }
        // Nothing new goes out while suspended; `rowsmith resume` announces the shard again.
        Some((job, _)) if job.state == JobState::Suspended => {
            tracing::info!(job_id = %key.job_id, shard = key.shard, "job suspended, shard not submitted");
            return Ok(Submitted::Done);
        }
        Some((job, _)) => job,
        None => {
            return Err(StepError::Job(format!(
                "shard {} has no job record",
                key.dotted()
            )));
        }
    };
    let (mut record, _) = bus
        .read::<ShardRecord>(&record_key)
        .await?
        .ok_or_else(|| StepError::Job(format!("shard {} has no record", key.dotted())))?;
    let provider = submitter.providers.get(&ready.provider)?;
    // The attempt's model: a fallback attempt names its own.
    let model = job.spec.for_attempt(key.attempt).model;
    // One name per delivery: a claim of this name is this delivery's own.
    let owner = format!("{}-{}", key.dotted(), nuid::next());
    if job.cancel_requested && record.provider_batch_id.is_none() {
        // Cancelled before it went out, unless an earlier delivery's create took effect.
        let found = match &record.creating {
            None => Creation::NoneExists,
            Some(_) => ensure_batch(submitter, provider, &model, &record, &owner, false).await?,
        };
        match found {
            Creation::Recorded(batch_id) => {
                // The poller cancels it at its first check and keeps what it finished.
                return announce_submitted(submitter, ready, &record, &batch_id).await;
            }
            Creation::Later(after) => return Ok(Submitted::Later(after)),
            Creation::NoneExists => {
                publish_cancelled(submitter, ready).await?;
                return Ok(Submitted::Done);
            }
        }
    }
    if record.provider_batch_id.is_none() {
        let now = rowsmith_contract::now_unix_ms();
        if let Some(not_before) = record.not_before_ms.filter(|t| *t > now) {
            return Ok(Submitted::Later(Duration::from_millis(
                (not_before - now) as u64,
            )));
        }
        if !reserve_quota(submitter, ready, &model, record.estimated_tokens()).await? {
            tracing::info!(job_id = %key.job_id, shard = key.shard, %model, "enqueued-token quota in use, holding the shard back");
            return Ok(Submitted::Later(submitter.quota.wait));
        }
    }

    if record.provider_file_id.is_none() && record.provider_batch_id.is_none() {
        record = upload(submitter, provider, &record).await?;
    }

    let batch_id = match &record.provider_batch_id {
        Some(batch_id) => batch_id.clone(),
        None => match ensure_batch(submitter, provider, &model, &record, &owner, true).await? {
            Creation::Recorded(batch_id) => batch_id,
            Creation::Later(after) => return Ok(Submitted::Later(after)),
            Creation::NoneExists => {
                return Err(StepError::Internal(format!(
                    "shard {} has no batch after creating one",
                    key.dotted()
                )));
            }
        },
    };
    announce_submitted(submitter, ready, &record, &batch_id).await
}

/// Uploads the shard's request lines and records the file; another delivery's file, when it
/// recorded one first. Returns the shard record as it now stands.
async fn upload(
    submitter: &Submitter,
    provider: &Provider,
    record: &ShardRecord,
) -> Result<ShardRecord, StepError> {
    // The record's path, never the message's: a message names no file to send. Read as it
    // is sent, never whole.
    let lines = ShardLines::object(&submitter.store, &record.requests_path).await?;
    let file_id = provider.upload(&record.key, lines).await?;
    submitter
        .bus
        .modify(
            &shard_key(&record.key),
            |shard: &mut ShardRecord| -> Result<Cas<ShardRecord>, StepError> {
                if shard.provider_file_id.is_some() {
                    // Another delivery uploaded first; use its file.
                    return Ok(Cas::Keep(shard.clone()));
                }
                // Uploading already when an earlier file expired before its create.
                if shard.state != ShardState::Uploading {
                    shard
                        .transition(ShardState::Uploading)
                        .map_err(|e| StepError::Job(e.to_string()))?;
                }
                shard.provider_file_id = Some(file_id.clone());
                Ok(Cas::Write(shard.clone()))
            },
        )
        .await
}

/// A shard cancelled before any batch existed: its rows end as cancelled.
async fn publish_cancelled(submitter: &Submitter, ready: &ShardReady) -> Result<(), StepError> {
    let key = &ready.key;
    let ended = BatchEnded {
        key: key.clone(),
        provider: ready.provider.clone(),
        batch_id: String::new(),
        status: "cancelled".into(),
        output_path: None,
        errors_path: None,
        failure: None,
    };
    submitter
        .bus
        .publish(
            subjects::BATCHES_ENDED,
            &format!("ended.{}.cancelled", key.dotted()),
            &ended,
        )
        .await?;
    Ok(())
}

/// Hands the recorded batch to the poller and says so on the job's events.
async fn announce_submitted(
    submitter: &Submitter,
    ready: &ShardReady,
    record: &ShardRecord,
    batch_id: &str,
) -> Result<Submitted, StepError> {
    let bus = &submitter.bus;
    let key = &ready.key;
    let submitted = BatchSubmitted {
        key: key.clone(),
        provider: ready.provider.clone(),
        batch_id: batch_id.to_owned(),
        submitted_at_ms: rowsmith_contract::now_unix_ms(),
    };
    bus.publish(
        subjects::BATCHES_SUBMITTED,
        &format!("submitted.{}.{batch_id}", key.dotted()),
        &submitted,
    )
    .await?;
    tracing::info!(job_id = %key.job_id, attempt = key.attempt, shard = key.shard, %batch_id, "batch submitted");
    let counts = bus
        .read::<JobRecord>(&job_key(&key.job_id))
        .await?
        .map(|(j, _)| j.counts)
        .unwrap_or_default();
    let message = format!(
        "shard {} of attempt {} submitted as batch {batch_id} ({} requests)",
        key.shard, key.attempt, record.request_count
    );
    bus.emit(
        &Event::new(&key.job_id, EventKind::ShardSubmitted, message, counts)
            .with_shard(key.clone()),
    )
    .await;
    Ok(Submitted::Done)
}
