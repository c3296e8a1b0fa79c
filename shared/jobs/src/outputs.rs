//! Writing a job's final outputs (`enriched.csv`, `failures.csv`, the manifest) once, by
//! claim, and its partial outputs when it is suspended.

use std::path::Path;

use serde_json::json;

use rowsmith_bus::Bus;
use rowsmith_bus::Cas;
use rowsmith_bus::step::StepError;
use rowsmith_bus::step::{blocking_failed, require_job};
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::ShardKey;
use rowsmith_contract::records::{JobRecord, JobState, job_key};
use rowsmith_dataplane::table::{self, FinalOutputs};
use rowsmith_store::{Store, layout};

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

/// What writing a job's outputs needs besides the bus: the store, and the settings of the
/// outputs, the result cache and DuckDB (each service passes its own).
#[derive(Debug, Clone, Copy)]
pub struct OutputWriter<'a> {
    pub store: &'a Store,
    pub output: &'a rowsmith_config::OutputSettings,
    pub cache: &'a rowsmith_config::CacheSettings,
    pub duckdb: &'a rowsmith_config::DuckdbLimits,
}

/// Claims writing a job's outputs for the message with work-stream sequence `by`; `false`
/// when the job ended already or another message's handler is writing them (this one is a
/// duplicate). Sequence 0 (unknown) always proceeds.
async fn claim_finalize(bus: &Bus, job_id: &str, by: u64) -> Result<bool, StepError> {
    bus.modify(
        &job_key(job_id),
        |job: &mut JobRecord| -> Result<Cas<bool>, StepError> {
            if job.state.is_terminal() {
                return Ok(Cas::Keep(false));
            }
            match job.finalizing_by {
                _ if by == 0 => Ok(Cas::Keep(true)),
                Some(holder) if holder == by => Ok(Cas::Keep(true)),
                Some(holder) => {
                    tracing::info!(
                        job_id,
                        holder,
                        by,
                        "outputs are being written for another message; nothing to do"
                    );
                    Ok(Cas::Keep(false))
                }
                None => {
                    job.finalizing_by = Some(by);
                    Ok(Cas::Write(true))
                }
            }
        },
    )
    .await
}

/// Joins every merged shard's rows onto the indexed table, writes the outputs and the
/// manifest, and marks the job completed (or cancelled, when that was asked for) — once:
/// `by` is the work-stream sequence of the message that asks (see [`claim_finalize`]).
/// Re-running it rewrites the same files, each renamed into place whole. A suspended job is
/// finalized only by a cancel.
pub async fn finalize_job(
    bus: &Bus,
    writer: OutputWriter<'_>,
    job_id: &str,
    by: u64,
) -> Result<(), StepError> {
    if !claim_finalize(bus, job_id, by).await? {
        return Ok(());
    }
    let job = require_job(bus, job_id).await?;
    if job.state.is_terminal() || (job.state == JobState::Suspended && !job.cancel_requested) {
        return Ok(());
    }
    // A job whose cancel was asked for ends `cancelled`, with what it had done by then.
    let final_state = if job.cancel_requested {
        JobState::Cancelled
    } else {
        JobState::Completed
    };
    let written = write_outputs(writer, &job, final_state).await?;
    record_end(bus, &job, final_state, written).await
}

/// Writes a suspended job's partial outputs: `enriched` holds the rows answered so far,
/// `failures` every other row, as `pending` or with its reason; its answers join the result
/// cache. The job stays suspended. Rewritten when a shard merged meanwhile.
pub async fn write_partial_outputs(
    bus: &Bus,
    writer: OutputWriter<'_>,
    job_id: &str,
) -> Result<(), StepError> {
    loop {
        let job = require_job(bus, job_id).await?;
        if job.state != JobState::Suspended {
            return Ok(());
        }
        let written = write_outputs(writer, &job, JobState::Suspended).await?;
        let merged = job.merged_shards.clone();
        let recorded = bus
            .modify(
                &job_key(job_id),
                |record: &mut JobRecord| -> Result<Cas<bool>, StepError> {
                    if record.state != JobState::Suspended {
                        return Ok(Cas::Keep(true));
                    }
                    if record.merged_shards != merged || record.attempt != job.attempt {
                        return Ok(Cas::Keep(false));
                    }
                    record.outputs = written.outputs.clone();
                    record.updated_at_ms = rowsmith_contract::now_unix_ms();
                    Ok(Cas::Write(true))
                },
            )
            .await?;
        if recorded {
            tracing::info!(
                job_id,
                enriched = written.counts.enriched_rows,
                not_done = written.counts.failed_rows,
                "partial outputs written"
            );
            return Ok(());
        }
    }
}

/// The outputs [`write_outputs`] committed.
struct Written {
    outputs: rowsmith_contract::records::Outputs,
    counts: table::FinalCounts,
}

/// The local inputs of [`table::finalize`] for a job.
struct Answers {
    indexed: std::path::PathBuf,
    rows_files: Vec<std::path::PathBuf>,
    duplicates: Option<std::path::PathBuf>,
    cached: Option<std::path::PathBuf>,
    hashes: Option<std::path::PathBuf>,
    segment_key: Option<String>,
}

/// Fetches what a job has answered: the rows files of every merged shard, plus (for a job
/// that stopped early) a rows file marking the rows of its unmerged shards `unanswered`.
async fn gather_answers(
    store: &Store,
    cache: &rowsmith_config::CacheSettings,
    duckdb: &rowsmith_config::DuckdbLimits,
    job: &JobRecord,
    unanswered: Option<RowFailureText>,
    scratch: &Path,
) -> Result<Answers, StepError> {
    let job_id = job.spec.id();
    let indexed = store.fetch_local(&job.indexed_key(), scratch).await?;
    let mut rows_files = fetch_rows_files(store, job, 1..job.attempt, scratch).await?;
    for shard in &job.merged_shards {
        let key = ShardKey {
            job_id: job_id.to_owned(),
            attempt: job.attempt,
            shard: *shard,
        };
        rows_files.push(store.fetch_local(&layout::rows(&key), scratch).await?);
    }
    if let Some(text) = unanswered.filter(|_| !job.unmerged_shards().is_empty()) {
        rows_files.push(write_unanswered(store, job, text, duckdb, scratch).await?);
    }
    let optional = |key: String| async move {
        Ok::<_, StepError>(match store.exists(&key).await? {
            true => Some(store.fetch_local(&key, scratch).await?),
            false => None,
        })
    };
    let duplicates = optional(layout::duplicates(job_id)).await?;
    let cached = optional(layout::cached_rows(job_id)).await?;
    // The job's answers join the result cache of its request template (when it kept hashes,
    // which it does while the cache is on).
    let hashes = match cache.enabled {
        true => optional(layout::hashes(job_id)).await?,
        false => None,
    };
    let segment_key = match hashes {
        Some(_) => {
            let columns = table::indexed_columns(&indexed, duckdb)?;
            let fingerprint = rowsmith_dataplane::render::RequestTemplate::new(&job.spec, &columns)
                .fingerprint(&job.spec.provider);
            Some(layout::cache_segment(&fingerprint, job_id))
        }
        None => None,
    };
    Ok(Answers {
        indexed,
        rows_files,
        duplicates,
        cached,
        hashes,
        segment_key,
    })
}

/// Reason and message of a row a stopped job did not get answered.
#[derive(Debug, Clone, Copy)]
struct RowFailureText {
    reason: &'static str,
    message: &'static str,
}

/// A rows file (of the current attempt) failing every request of the unmerged shards
/// with `text`, found from their request files.
async fn write_unanswered(
    store: &Store,
    job: &JobRecord,
    text: RowFailureText,
    duckdb: &rowsmith_config::DuckdbLimits,
    scratch: &Path,
) -> Result<std::path::PathBuf, StepError> {
    #[derive(serde::Deserialize)]
    struct RequestId {
        /// Gemini's lines call it `key`, Bedrock's `recordId`.
        #[serde(alias = "key", alias = "recordId")]
        custom_id: String,
    }
    let mut rows = Vec::new();
    for shard in job.unmerged_shards() {
        let key = ShardKey {
            job_id: job.spec.id().to_owned(),
            attempt: job.attempt,
            shard,
        };
        let requests = store.get_bytes(&layout::requests(&key)).await?;
        for line in requests.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let id: RequestId = serde_json::from_slice(line).map_err(|e| {
                StepError::Internal(format!(
                    "request file of shard {} is corrupt: {e}",
                    key.dotted()
                ))
            })?;
            if let Some(row_index) = rowsmith_dataplane::render::row_index_of(&id.custom_id) {
                rows.push(table::RowResult {
                    row_index,
                    failure: Some(table::RowFailure {
                        reason: text.reason.into(),
                        message: text.message.into(),
                        retryable: true,
                    }),
                    values: Vec::new(),
                });
            }
        }
    }
    let path = scratch.join("unanswered.parquet");
    let (path_for_task, fields, attempt) = (path.clone(), job.spec.fields.clone(), job.attempt);
    let duckdb = *duckdb;
    tokio::task::spawn_blocking(move || {
        table::write_rows(&path_for_task, &fields, attempt, &rows, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
    Ok(path)
}

/// Joins a job's answers onto its table and commits the outputs and the manifest, which
/// names `state`. Rows no merged shard answered are `pending` for a suspended job and
/// `cancelled` for a cancelled one.
async fn write_outputs(
    writer: OutputWriter<'_>,
    job: &JobRecord,
    state: JobState,
) -> Result<Written, StepError> {
    let OutputWriter {
        store,
        output,
        cache,
        duckdb,
    } = writer;
    let job_id = job.spec.id();
    let unanswered = match state {
        JobState::Suspended => Some(RowFailureText {
            reason: "pending",
            message: "not answered yet: the job is suspended; `rowsmith resume` sends it",
        }),
        JobState::Cancelled => Some(RowFailureText {
            reason: "cancelled",
            message: "the job was cancelled before this row was answered",
        }),
        _ => None,
    };
    let scratch = rowsmith_store::scratch_dir()?;
    let answers = gather_answers(store, cache, duckdb, job, unanswered, scratch.path()).await?;
    let wants = |format: &str| job.spec.options.output_formats.iter().any(|f| f == format);
    let target =
        |name: &str, wanted: bool| -> Result<Option<(String, std::path::PathBuf)>, StepError> {
            if !wanted {
                return Ok(None);
            }
            let key = layout::output(job_id, name);
            let path = store.local_target(&key, scratch.path())?;
            Ok(Some((key, path)))
        };
    let csv = target("enriched.csv", wants("csv"))?;
    let parquet = target("enriched.parquet", wants("parquet"))?;
    let jsonl = target("enriched.jsonl", wants("jsonl"))?;
    let failures_key = layout::output(job_id, "failures.csv");
    let manifest_key = layout::output(job_id, "manifest.json");
    let segment = match &answers.segment_key {
        Some(key) => Some((key.clone(), store.local_target(key, scratch.path())?)),
        None => None,
    };
    let targets = FinalOutputs {
        enriched_csv: csv.as_ref().map(|(_, path)| path.clone()),
        enriched_parquet: parquet.as_ref().map(|(_, path)| path.clone()),
        enriched_jsonl: jsonl.as_ref().map(|(_, path)| path.clone()),
        failures_csv: store.local_target(&failures_key, scratch.path())?,
        csv_formula_escape: output.csv_formula_escape,
        cache_segment: segment.as_ref().map(|(_, path)| path.clone()),
        cache_last_attempt: match &job.spec.fallback {
            Some(_) => job.spec.options.max_attempts.saturating_sub(1),
            None => u32::MAX,
        },
    };
    let (fields, targets_for_task, duckdb) = (job.spec.fields.clone(), targets.clone(), *duckdb);
    let counts = tokio::task::spawn_blocking(move || {
        table::finalize(
            &answers.indexed,
            &answers.rows_files,
            answers.duplicates.as_deref(),
            answers.cached.as_deref(),
            answers.hashes.as_deref(),
            &fields,
            &targets_for_task,
            &duckdb,
        )
    })
    .await
    .map_err(blocking_failed)??;
    let mut outputs = rowsmith_contract::records::Outputs::default();
    for (written, slot) in [
        (&csv, &mut outputs.enriched_csv),
        (&parquet, &mut outputs.enriched_parquet),
        (&jsonl, &mut outputs.enriched_jsonl),
        (&segment, &mut None),
    ] {
        if let Some((key, path)) = written {
            store.commit_local(key, path).await?;
            *slot = Some(key.clone());
        }
    }
    store
        .commit_local(&failures_key, &targets.failures_csv)
        .await?;
    outputs.failures_csv = Some(failures_key);
    outputs.manifest = Some(manifest_key.clone());
    let manifest = manifest(job, state, &counts, &outputs);
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| StepError::Internal(format!("manifest: {e}")))?;
    store
        .put_bytes(&manifest_key, manifest_bytes.into())
        .await?;
    Ok(Written { outputs, counts })
}

/// `manifest.json`: what the outputs hold and how the job went.
fn manifest(
    job: &JobRecord,
    state: JobState,
    counts: &table::FinalCounts,
    outputs: &rowsmith_contract::records::Outputs,
) -> serde_json::Value {
    let finished_at_ms = rowsmith_contract::now_unix_ms();
    json!({
        "job_id": job.spec.id(),
        "state": state,
        "partial": state == JobState::Suspended,
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
            "indexed": job.indexed_key(),
        },
        "timings": {
            "created_at_ms": job.created_at_ms,
            "finished_at_ms": finished_at_ms,
            "seconds": (finished_at_ms - job.created_at_ms) as f64 / 1000.0,
        },
    })
}

/// Records the end of a finalized job and says so in its events.
async fn record_end(
    bus: &Bus,
    job: &JobRecord,
    final_state: JobState,
    written: Written,
) -> Result<(), StepError> {
    let job_id = job.spec.id();
    let Written { outputs, counts } = written;
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
    let Some(record) = completed else {
        return Ok(());
    };
    // Whatever the job still held back in the quota (shards that never went out).
    if let Err(error) = rowsmith_bus::lifecycle::release_job_quota(bus, &record.spec).await {
        tracing::warn!(job_id, %error, "could not release the job's quota reservations");
    }
    let (final_name, kind) = match final_state {
        JobState::Cancelled => ("cancelled", EventKind::Cancelled),
        _ => ("completed", EventKind::Completed),
    };
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
    bus.emit(&Event::new(job_id, kind, message, record.counts))
        .await;
    Ok(())
}
