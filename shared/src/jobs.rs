//! Steps on a job that several services take: the error type of a handler step, marking a
//! job failed (the readable dead letter), and writing the final outputs.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::bus::{Bus, BusError, Cas, Delivery, Outcome, retry_delay};
use crate::events::{Event, EventKind};
use crate::messages::ShardKey;
use crate::providers::ProviderError;
use crate::records::{JobRecord, JobState, job_key};
use crate::storage::{StorageError, Store, layout};
use crate::table::{self, FinalOutputs, TableError};

/// Why a handler step did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The job cannot go on; the message says what to fix.
    #[error("{0}")]
    Job(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl StepError {
    /// Whether running the step again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StepError::Bus(BusError::Decode { .. }) => false,
            StepError::Bus(_) | StepError::Storage(_) | StepError::Internal(_) => true,
            StepError::Provider(error) => error.is_retryable(),
            StepError::Table(TableError::Duckdb { .. }) => true,
            StepError::Table(_) | StepError::Job(_) => false,
        }
    }
}

impl From<tokio::task::JoinError> for StepError {
    fn from(error: tokio::task::JoinError) -> Self {
        StepError::Internal(format!("blocking task failed: {error}"))
    }
}

impl From<std::io::Error> for StepError {
    fn from(error: std::io::Error) -> Self {
        StepError::Internal(format!("local file: {error}"))
    }
}

/// Turns a step's error into the message's fate: retry later when it may pass and
/// deliveries remain, else mark the job failed with the reason and terminate the message.
pub async fn settle(bus: &Bus, job_id: &str, delivery: &Delivery, error: StepError) -> Outcome {
    if error.is_retryable() && !delivery.last {
        let after = retry_delay(delivery.delivered);
        tracing::warn!(job_id, delivered = delivery.delivered, %error, ?after, "step failed, will retry");
        return Outcome::Retry { after };
    }
    let reason = if error.is_retryable() {
        format!("{error} (gave up after {} deliveries)", delivery.delivered)
    } else {
        error.to_string()
    };
    match fail_job(bus, job_id, &reason).await {
        Ok(()) => Outcome::Terminate { reason },
        // The failure could not be recorded: keep the message so that it is not lost.
        Err(record_error) => {
            tracing::error!(job_id, %record_error, %reason, "could not mark the job failed");
            Outcome::Retry {
                after: Duration::from_secs(5),
            }
        }
    }
}

/// Marks a job failed with `reason` and emits the `failed` event.
pub async fn fail_job(bus: &Bus, job_id: &str, reason: &str) -> Result<(), BusError> {
    let changed = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<Option<JobRecord>>, BusError> {
                if job.state.is_terminal() {
                    return Ok(Cas::Keep(None));
                }
                job.state = JobState::Failed;
                job.error = Some(reason.to_owned());
                job.updated_at_ms = crate::now_unix_ms();
                job.finished_at_ms = Some(job.updated_at_ms);
                Ok(Cas::Write(Some(job.clone())))
            },
        )
        .await;
    let counts = match changed {
        Ok(Some(job)) => job.counts,
        Ok(None) => return Ok(()),
        // No record (the spec never got that far): the event still tells the user.
        Err(BusError::NotFound { .. }) => Default::default(),
        Err(error) => return Err(error),
    };
    tracing::warn!(job_id, reason, "job failed");
    bus.emit(&Event::new(
        job_id,
        EventKind::Failed,
        format!("job failed: {reason}"),
        counts,
    ))
    .await;
    Ok(())
}

/// Reads a job's record; a job without one is an error of the step.
pub async fn require_job(bus: &Bus, job_id: &str) -> Result<JobRecord, StepError> {
    match bus.read::<JobRecord>(&job_key(job_id)).await? {
        Some((job, _)) => Ok(job),
        None => Err(StepError::Job(format!("job {job_id} has no record"))),
    }
}

/// Local copies of the merged rows files of every shard of `attempts`.
pub async fn fetch_rows_files(
    store: &Store,
    job: &JobRecord,
    attempts: impl Iterator<Item = u32>,
    scratch: &Path,
) -> Result<Vec<std::path::PathBuf>, StepError> {
    let mut files = Vec::new();
    for attempt in attempts {
        let shards = job
            .shards_per_attempt
            .get(attempt as usize - 1)
            .copied()
            .unwrap_or(0);
        for shard in 0..shards {
            let key = ShardKey {
                job_id: job.spec.id().to_owned(),
                attempt,
                shard,
            };
            files.push(store.fetch_local(&layout::rows(&key), scratch).await?);
        }
    }
    Ok(files)
}

/// Joins every merged shard's rows onto the indexed table, writes the outputs and the
/// manifest, and marks the job completed. Re-running it rewrites the same files.
pub async fn finalize_job(
    bus: &Bus,
    store: &Store,
    output: &crate::config::OutputSettings,
    cache: &crate::config::CacheSettings,
    duckdb: &crate::config::DuckdbLimits,
    job_id: &str,
) -> Result<(), StepError> {
    let job = require_job(bus, job_id).await?;
    if job.state.is_terminal() {
        return Ok(());
    }
    // A job whose cancel was asked for ends `cancelled`, with what it had done by then.
    let final_state = if job.cancel_requested {
        JobState::Cancelled
    } else {
        JobState::Completed
    };
    let final_name = if job.cancel_requested {
        "cancelled"
    } else {
        "completed"
    };
    let scratch = tempfile::tempdir()?;
    let indexed_key = job.indexed_key();
    let indexed = store.fetch_local(&indexed_key, scratch.path()).await?;
    let all_attempts = 1..=job.shards_per_attempt.len() as u32;
    let rows_files = fetch_rows_files(store, &job, all_attempts, scratch.path()).await?;
    let duplicates_key = layout::duplicates(job_id);
    let duplicates = match store.exists(&duplicates_key).await? {
        true => Some(store.fetch_local(&duplicates_key, scratch.path()).await?),
        false => None,
    };
    let cached_key = layout::cached_rows(job_id);
    let cached = match store.exists(&cached_key).await? {
        true => Some(store.fetch_local(&cached_key, scratch.path()).await?),
        false => None,
    };
    // The job's answers join the result cache of its request template (when it kept hashes,
    // which it does while the cache is on).
    let hashes_key = layout::hashes(job_id);
    let hashes = match cache.enabled && store.exists(&hashes_key).await? {
        true => Some(store.fetch_local(&hashes_key, scratch.path()).await?),
        false => None,
    };
    let segment_key = match hashes {
        Some(_) => {
            let columns = table::indexed_columns(&indexed, duckdb)?;
            let fingerprint = crate::render::RequestTemplate::new(&job.spec, &columns)
                .fingerprint(&job.spec.provider);
            Some(layout::cache_segment(&fingerprint, job_id))
        }
        None => None,
    };
    let wants = |format: &str| job.spec.options.output_formats.iter().any(|f| f == format);
    let csv_key = layout::output(job_id, "enriched.csv");
    let parquet_key = layout::output(job_id, "enriched.parquet");
    let jsonl_key = layout::output(job_id, "enriched.jsonl");
    let failures_key = layout::output(job_id, "failures.csv");
    let manifest_key = layout::output(job_id, "manifest.json");
    let targets = FinalOutputs {
        enriched_csv: wants("csv")
            .then(|| store.local_target(&csv_key, scratch.path()))
            .transpose()?,
        enriched_parquet: wants("parquet")
            .then(|| store.local_target(&parquet_key, scratch.path()))
            .transpose()?,
        enriched_jsonl: wants("jsonl")
            .then(|| store.local_target(&jsonl_key, scratch.path()))
            .transpose()?,
        failures_csv: store.local_target(&failures_key, scratch.path())?,
        csv_formula_escape: output.csv_formula_escape,
        cache_segment: segment_key
            .as_ref()
            .map(|key| store.local_target(key, scratch.path()))
            .transpose()?,
        cache_last_attempt: match &job.spec.fallback {
            Some(_) => job.spec.options.max_attempts.saturating_sub(1),
            None => u32::MAX,
        },
    };
    let fields = job.spec.fields.clone();
    let (indexed_for_task, targets_for_task, duckdb) = (indexed.clone(), targets.clone(), *duckdb);
    let counts = tokio::task::spawn_blocking(move || {
        table::finalize(
            &indexed_for_task,
            &rows_files,
            duplicates.as_deref(),
            cached.as_deref(),
            hashes.as_deref(),
            &fields,
            &targets_for_task,
            &duckdb,
        )
    })
    .await??;
    let mut outputs = crate::records::Outputs::default();
    if let Some(path) = &targets.enriched_csv {
        store.commit_local(&csv_key, path).await?;
        outputs.enriched_csv = Some(csv_key.clone());
    }
    if let Some(path) = &targets.enriched_parquet {
        store.commit_local(&parquet_key, path).await?;
        outputs.enriched_parquet = Some(parquet_key.clone());
    }
    if let Some(path) = &targets.enriched_jsonl {
        store.commit_local(&jsonl_key, path).await?;
        outputs.enriched_jsonl = Some(jsonl_key.clone());
    }
    store
        .commit_local(&failures_key, &targets.failures_csv)
        .await?;
    if let (Some(key), Some(path)) = (&segment_key, &targets.cache_segment) {
        store.commit_local(key, path).await?;
    }
    outputs.failures_csv = Some(failures_key.clone());
    outputs.manifest = Some(manifest_key.clone());
    let finished_at_ms = crate::now_unix_ms();
    let manifest = json!({
        "job_id": job_id,
        "state": final_name,
        "rows": {
            "total": job.counts.rows_total,
            "skipped": job.counts.rows_skipped,
            "deduplicated": job.counts.rows_deduplicated,
            "succeeded": job.counts.succeeded,
            "failed": counts.failed_rows,
            "in_enriched": counts.enriched_rows,
        },
        "attempts": job.attempt,
        "shards_per_attempt": job.shards_per_attempt,
        "provider": job.spec.provider,
        "model": job.spec.model,
        "files": {
            "enriched_csv": outputs.enriched_csv,
            "enriched_parquet": outputs.enriched_parquet,
            "enriched_jsonl": outputs.enriched_jsonl,
            "failures_csv": outputs.failures_csv,
            "indexed": indexed_key,
        },
        "timings": {
            "created_at_ms": job.created_at_ms,
            "finished_at_ms": finished_at_ms,
            "seconds": (finished_at_ms - job.created_at_ms) as f64 / 1000.0,
        },
    });
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| StepError::Internal(format!("manifest: {e}")))?;
    store
        .put_bytes(&manifest_key, manifest_bytes.into())
        .await?;
    let completed = bus
        .modify(
            &job_key(job_id),
            |record: &mut JobRecord| -> Result<Cas<Option<JobRecord>>, StepError> {
                if record.state.is_terminal() {
                    return Ok(Cas::Keep(None));
                }
                record
                    .transition(final_state)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                record.outputs = outputs.clone();
                record.counts.failed = counts.failed_rows;
                // Every row sent or answered alike: all but the skipped and the failed.
                record.counts.succeeded = record
                    .counts
                    .rows_total
                    .saturating_sub(record.counts.rows_skipped + counts.failed_rows);
                record.counts.pending = 0;
                Ok(Cas::Write(Some(record.clone())))
            },
        )
        .await?;
    if let Some(record) = completed {
        let message = format!(
            "job {final_name}: {} rows enriched, {} failed; outputs under {}",
            record.counts.succeeded,
            record.counts.failed,
            layout::output(job_id, "")
        );
        tracing::info!(
            job_id,
            succeeded = record.counts.succeeded,
            failed = record.counts.failed,
            "job {final_name}"
        );
        let kind = if job.cancel_requested {
            EventKind::Cancelled
        } else {
            EventKind::Completed
        };
        bus.emit(&Event::new(job_id, kind, message, record.counts))
            .await;
    }
    Ok(())
}

/// Resolves a job's input to a local file: `file://` paths as they are, store keys through
/// the store.
pub async fn local_input(
    store: &Store,
    input: &str,
    allowed: &[String],
    scratch: &Path,
) -> Result<std::path::PathBuf, StepError> {
    check_input_allowed(input, allowed)?;
    if let Some(path) = input.strip_prefix("file://") {
        let path = std::path::PathBuf::from(path);
        if !path.is_file() {
            return Err(StepError::Job(format!(
                "input {input} does not exist or is not a file"
            )));
        }
        return Ok(path);
    }
    if input.contains("://") {
        return Err(StepError::Job(format!(
            "input {input:?} is not supported: give file:///path or a key in the store (inputs/…)"
        )));
    }
    match store.fetch_local(input, scratch).await {
        Err(StorageError::NotFound { .. }) => Err(StepError::Job(format!(
            "input {input:?} is not in the store; upload it first (rowsmith submit does)"
        ))),
        other => Ok(other?),
    }
}

/// Refuses an input outside `store.allowed_inputs` (or one that climbs out with `..`)
/// before anything is read.
pub fn check_input_allowed(input: &str, allowed: &[String]) -> Result<(), StepError> {
    let climbs = input.split(['/', '\\']).any(|segment| segment == "..");
    if !climbs
        && allowed
            .iter()
            .any(|prefix| !prefix.is_empty() && input.starts_with(prefix.as_str()))
    {
        return Ok(());
    }
    Err(StepError::Job(format!(
        "input {input:?} is not allowed: inputs must be under one of {} (store.allowed_inputs); \
         submit a local file with `rowsmith submit`, which uploads it, or allow its directory",
        allowed.join(", ")
    )))
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
                job.updated_at_ms = crate::now_unix_ms();
                Ok(Cas::Write(Ok(job.clone())))
            },
        )
        .await?;
    if let Ok(job) = &outcome {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_outside_the_allow_list_or_climbing_out_are_refused() {
        let allowed = vec!["inputs/".to_owned(), "file:///data/".to_owned()];
        assert!(check_input_allowed("inputs/job-1/products.csv", &allowed).is_ok());
        assert!(check_input_allowed("file:///data/products.csv", &allowed).is_ok());
        for refused in [
            "file:///etc/passwd",
            "jobs/other/input.indexed.parquet",
            "file:///data/../etc/passwd",
            "inputs/../jobs/x",
        ] {
            let error = check_input_allowed(refused, &allowed)
                .unwrap_err()
                .to_string();
            assert!(error.contains("store.allowed_inputs"), "{refused}: {error}");
        }
    }
}
