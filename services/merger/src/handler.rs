//! Handling one `rowsmith.batches.ended`: merge the shard's rows, and finish the job when it
//! was the last shard. Re-running it over the same files gives the same rows.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use rowsmith_shared::bus::{Bus, Cas, Delivery, Outcome, decode};
use rowsmith_shared::events::{Event, EventKind};
use rowsmith_shared::jobs::{StepError, finalize_job, settle};
use rowsmith_shared::messages::BatchEnded;
use rowsmith_shared::records::{JobRecord, JobState, ShardRecord, ShardState, job_key, shard_key};
use rowsmith_shared::render::row_index_of;
use rowsmith_shared::storage::{StorageError, Store, layout};
use rowsmith_shared::table::{self, RowFailure, RowResult};

use crate::validate::{LineResult, parse_line};

#[derive(Debug, Clone)]
pub struct Merger {
    pub bus: Bus,
    pub store: Store,
}

pub async fn handle(merger: &Merger, delivery: Delivery) -> Outcome {
    let ended: BatchEnded = match decode(&delivery) {
        Ok(message) => message,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let job_id = ended.key.job_id.clone();
    match merge(merger, &ended).await {
        Ok(()) => Outcome::Done,
        Err(error) => settle(&merger.bus, &job_id, &delivery, error).await,
    }
}

async fn merge(merger: &Merger, ended: &BatchEnded) -> Result<(), StepError> {
    let bus = &merger.bus;
    let key = &ended.key;
    let (job, _) = bus
        .read::<JobRecord>(&job_key(&key.job_id))
        .await?
        .ok_or_else(|| StepError::Job(format!("batch {} has no job record", ended.batch_id)))?;
    if job.state.is_terminal() {
        return Ok(());
    }
    let already_merged = job.attempt == key.attempt && job.merged_shards.contains(&key.shard);
    let (succeeded, failed) = if already_merged {
        (0, 0)
    } else {
        merge_shard(merger, &job, ended).await?
    };
    let shard = key.shard;
    let attempt = key.attempt;
    let finalize = bus
        .modify(
            &job_key(&key.job_id),
            |job: &mut JobRecord| -> Result<Cas<bool>, StepError> {
                if job.state.is_terminal() || job.attempt != attempt {
                    return Ok(Cas::Keep(false));
                }
                let mut changed = false;
                if !job.merged_shards.contains(&shard) {
                    job.merged_shards.push(shard);
                    job.counts.succeeded += succeeded;
                    job.counts.failed += failed;
                    job.counts.pending = job.counts.pending.saturating_sub(succeeded + failed);
                    job.counts.shards_ended += 1;
                    changed = true;
                }
                let all_merged = job.merged_shards.len() as u32 >= job.shards_in_attempt();
                if all_merged && job.state == JobState::Running {
                    job.transition(JobState::Merging)
                        .map_err(|e| StepError::Job(e.to_string()))?;
                    changed = true;
                }
                let finalize = all_merged && job.state == JobState::Merging;
                Ok(if changed {
                    Cas::Write(finalize)
                } else {
                    Cas::Keep(finalize)
                })
            },
        )
        .await?;
    if finalize {
        finalize_job(bus, &merger.store, &key.job_id).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct RequestId {
    custom_id: String,
}

/// Validates the shard's result lines into a rows file; returns (succeeded, failed).
async fn merge_shard(
    merger: &Merger,
    job: &JobRecord,
    ended: &BatchEnded,
) -> Result<(u64, u64), StepError> {
    let key = &ended.key;
    let store = &merger.store;
    let requests = store.get_bytes(&layout::requests(key)).await?;
    let mut expected = Vec::new();
    for line in requests.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let id: RequestId = serde_json::from_slice(line).map_err(|e| {
            StepError::Internal(format!(
                "request file of shard {} is corrupt: {e}",
                key.dotted()
            ))
        })?;
        if let Some(row_index) = row_index_of(&id.custom_id) {
            expected.push(row_index);
        }
    }
    let wanted: BTreeSet<i64> = expected.iter().copied().collect();
    let fields = &job.spec.fields;
    let mut results: BTreeMap<i64, LineResult> = BTreeMap::new();
    let mut ignored = 0u64;
    for path in [&ended.output_path, &ended.errors_path]
        .into_iter()
        .flatten()
    {
        let bytes = match store.get_bytes(path).await {
            Ok(bytes) => bytes,
            Err(StorageError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match parse_line(line, fields) {
                Some((row_index, result)) if wanted.contains(&row_index) => {
                    // A duplicated custom_id keeps its first answer.
                    results.entry(row_index).or_insert(result);
                }
                _ => ignored += 1,
            }
        }
    }
    if ignored > 0 {
        tracing::warn!(job_id = %key.job_id, shard = key.shard, ignored, "result lines without a known custom_id were ignored");
    }
    let missing = match (&ended.failure, ended.status.as_str()) {
        (Some(failure), _) => RowFailure {
            reason: "batch_failed".into(),
            message: failure.clone(),
        },
        (None, "expired") => RowFailure {
            reason: "batch_expired".into(),
            message: "the batch expired before this row was done".into(),
        },
        (None, "cancelled") => RowFailure {
            reason: "cancelled".into(),
            message: "the batch was cancelled before this row was done".into(),
        },
        _ => RowFailure {
            reason: "no_result".into(),
            message: "the provider returned no line for this row".into(),
        },
    };
    let mut rows = Vec::with_capacity(expected.len());
    let (mut succeeded, mut failed) = (0u64, 0u64);
    for row_index in expected {
        let row = match results.remove(&row_index) {
            Some(Ok(values)) => {
                succeeded += 1;
                RowResult {
                    row_index,
                    failure: None,
                    values: values.into_iter().map(Some).collect(),
                }
            }
            Some(Err(failure)) => {
                failed += 1;
                RowResult {
                    row_index,
                    failure: Some(failure),
                    values: Vec::new(),
                }
            }
            None => {
                failed += 1;
                RowResult {
                    row_index,
                    failure: Some(missing.clone()),
                    values: Vec::new(),
                }
            }
        };
        rows.push(row);
    }
    let rows_key = layout::rows(key);
    let scratch = tempfile::tempdir()?;
    let target = store.local_target(&rows_key, scratch.path())?;
    let (target_for_task, fields) = (target.clone(), fields.clone());
    tokio::task::spawn_blocking(move || table::write_rows(&target_for_task, &fields, &rows))
        .await??;
    store.commit_local(&rows_key, &target).await?;
    merger
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<Cas<()>, StepError> {
                if shard.state == ShardState::Ended {
                    return Ok(Cas::Keep(()));
                }
                shard
                    .transition(ShardState::Ended)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                shard.rows_path = Some(rows_key.clone());
                shard.succeeded = succeeded;
                shard.failed = failed;
                Ok(Cas::Write(()))
            },
        )
        .await?;
    let message = format!(
        "shard {} of attempt {} ended ({}): {succeeded} rows good, {failed} failed",
        key.shard, key.attempt, ended.status
    );
    let mut counts = job.counts;
    counts.succeeded += succeeded;
    counts.failed += failed;
    counts.pending = counts.pending.saturating_sub(succeeded + failed);
    counts.shards_ended += 1;
    merger
        .bus
        .emit(
            &Event::new(&key.job_id, EventKind::ShardEnded, message, counts)
                .with_shard(key.clone()),
        )
        .await;
    tracing::info!(job_id = %key.job_id, shard = key.shard, succeeded, failed, "shard merged");
    Ok((succeeded, failed))
}
