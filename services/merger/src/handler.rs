//! Handling one `rowsmith.batches.ended`: merge the shard's rows, and finish the job when it
//! was the last shard. Re-running it over the same files gives the same rows.

use rowsmith_bus::lifecycle::dead_letter;
use rowsmith_bus::step::{StepError, blocking_failed, require_job, settle};
use rowsmith_bus::{Bus, Cas, Delivery, Outcome, decode};
use rowsmith_config::{CacheSettings, DuckdbLimits, LimitsSettings, OutputSettings};
use rowsmith_contract::events::{Counts, Event, EventKind};
use rowsmith_contract::messages::BatchEnded;
use rowsmith_contract::providers::batch_limits;
use rowsmith_contract::records::{
    JobRecord, JobState, ShardRecord, ShardState, job_key, shard_key,
};
use rowsmith_contract::spec::JobSpec;
use rowsmith_dataplane::table;
use rowsmith_jobs::outputs::{OutputWriter, fetch_rows_files, finalize_job, write_partial_outputs};
use rowsmith_jobs::shards::{announce_shards, create_shard_records, prepare_shards, shard_limits};
use rowsmith_store::{StorageError, Store, layout};

use crate::merge::ShardTally;

#[derive(Debug, Clone)]
pub struct Merger {
    pub bus: Bus,
    pub store: Store,
    pub limits: LimitsSettings,
    pub output: OutputSettings,
    pub cache: CacheSettings,
    /// `duckdb.*`: the memory and threads of each table operation.
    pub duckdb: DuckdbLimits,
}

impl Merger {
    /// What writing a job's outputs takes, from this merger's settings.
    pub fn writer(&self) -> OutputWriter<'_> {
        OutputWriter {
            store: &self.store,
            output: &self.output,
            cache: &self.cache,
            duckdb: &self.duckdb,
        }
    }
}

pub async fn handle(merger: &Merger, delivery: Delivery) -> Outcome {
    // A delivery past the last counted one is a dead letter, not handled again.
    if let Some(outcome) = dead_letter(&merger.bus, &delivery).await {
        return outcome;
    }
    let ended: BatchEnded = match decode(&delivery) {
        Ok(message) => message,
        Err(reason) => return Outcome::Terminate { reason },
    };
    let job_id = ended.key.job_id.clone();
    match merge(merger, &ended, delivery.stream_sequence).await {
        Ok(()) => Outcome::Done,
        Err(error) => settle(&merger.bus, &job_id, &delivery, error).await,
    }
}

/// What to do once a shard's rows are counted into the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// The job is suspended: rewrite its partial outputs with the new rows.
    Partial,
    /// Other shards of the attempt are still out.
    Wait,
    /// Every shard ended and retryable rows remain: start the next attempt.
    Retry,
    /// Every shard ended: write the outputs.
    Finalize,
    /// Every shard ended, and the rows left to retry are fewer than the next attempt's
    /// provider takes in a batch: say so, and write the outputs (the rows keep their reasons).
    FinalizeBelowMinimum {
        rows: u64,
        provider: String,
        min: u64,
    },
    /// The job already moved to a later attempt: make sure its shards are announced.
    Announce,
}

async fn merge(merger: &Merger, ended: &BatchEnded, sequence: u64) -> Result<(), StepError> {
    let bus = &merger.bus;
    let key = &ended.key;
    let (job, _) = bus
        .read::<JobRecord>(&job_key(&key.job_id))
        .await?
        .ok_or_else(|| StepError::Job(format!("batch {} has no job record", ended.batch_id)))?;
    if job.state.is_terminal() {
        return Ok(());
    }
    let current = job.attempt == key.attempt;
    let tally = if current && !job.merged_shards.contains(&key.shard) {
        let tally = merge_shard(merger, &job, ended).await?;
        metrics::counter!("rowsmith_rows_total", "outcome" => "succeeded")
            .increment(tally.succeeded);
        metrics::counter!("rowsmith_rows_total", "outcome" => "failed").increment(tally.failed);
        tally
    } else {
        ShardTally::default()
    };
    let (shard, attempt) = (key.shard, key.attempt);
    let next = bus
        .modify(
            &job_key(&key.job_id),
            |job: &mut JobRecord| -> Result<Cas<Next>, StepError> {
                if job.state.is_terminal() {
                    return Ok(Cas::Keep(Next::Wait));
                }
                if job.attempt == attempt + 1 && job.state == JobState::Running {
                    return Ok(Cas::Keep(Next::Announce));
                }
                if job.attempt != attempt {
                    return Ok(Cas::Keep(Next::Wait));
                }
                let mut changed = false;
                if !job.merged_shards.contains(&shard) {
                    job.merged_shards.push(shard);
                    job.counts.succeeded += tally.succeeded;
                    job.counts.failed += tally.failed;
                    job.counts.pending = job
                        .counts
                        .pending
                        .saturating_sub(tally.succeeded + tally.failed);
                    job.counts.shards_ended += 1;
                    job.retryable_failed += tally.retryable;
                    changed = true;
                }
                if job.state == JobState::Suspended {
                    // Collected while suspended: the partial outputs get the new rows; what
                    // comes next is decided on resume.
                    return Ok(match changed {
                        true => Cas::Write(Next::Partial),
                        false => Cas::Keep(Next::Wait),
                    });
                }
                let (moved, next) = after_shard(job)?;
                Ok(if changed || moved {
                    Cas::Write(next)
                } else {
                    Cas::Keep(next)
                })
            },
        )
        .await?;
    run_next(merger, &key.job_id, attempt, next, sequence).await
}

/// Decides what follows a merged shard: with every shard of the attempt merged, moves a
/// running job to merging and picks retry or finalize. Returns whether the record changed.
pub(crate) fn after_shard(job: &mut JobRecord) -> Result<(bool, Next), StepError> {
    let all_merged = job.merged_shards.len() as u32 >= job.shards_in_attempt();
    let mut moved = false;
    if all_merged && job.state == JobState::Running {
        job.transition(JobState::Merging)
            .map_err(|e| StepError::Job(e.to_string()))?;
        moved = true;
    }
    let next = match (
        all_merged && job.state == JobState::Merging,
        job.retryable_failed,
    ) {
        (false, _) => Next::Wait,
        (true, _) if job.cancel_requested => Next::Finalize,
        (true, 0) => Next::Finalize,
        (true, rows) if job.attempt < job.spec.options.max_attempts => {
            let provider = job.spec.for_attempt(job.attempt + 1).provider;
            let min = batch_limits(&provider).map_or(1, |limits| limits.min_requests);
            match rows < min {
                true => Next::FinalizeBelowMinimum {
                    rows,
                    provider,
                    min,
                },
                false => Next::Retry,
            }
        }
        (true, _) => Next::Finalize,
    };
    Ok((moved, next))
}

/// Carries out `next` for job `job_id` after a shard of `attempt`.
/// `sequence` is the work-stream sequence of the message being handled (the finalize claim).
pub(crate) async fn run_next(
    merger: &Merger,
    job_id: &str,
    attempt: u32,
    next: Next,
    sequence: u64,
) -> Result<(), StepError> {
    let bus = &merger.bus;
    match next {
        Next::Wait => Ok(()),
        Next::Partial => write_partial_outputs(bus, merger.writer(), job_id).await,
        Next::Finalize => finalize_job(bus, merger.writer(), job_id, sequence).await,
        Next::FinalizeBelowMinimum {
            rows,
            provider,
            min,
        } => {
            let job = require_job(bus, job_id).await?;
            let message = format!(
                "{rows} rows that failed in attempt {attempt} are not retried: {provider} takes \
                 at least {min} requests per batch job; they are in the failures with their \
                 reasons (a fallback to another provider, --fallback PROVIDER:MODEL, retries \
                 such a rest there)"
            );
            tracing::warn!(job_id, attempt, rows, %provider, "rows left below the provider's minimum, not retried");
            bus.emit(&Event::new(job_id, EventKind::Warning, message, job.counts))
                .await;
            finalize_job(bus, merger.writer(), job_id, sequence).await
        }
        Next::Retry => {
            let job = require_job(bus, job_id).await?;
            start_retry(merger, &job.spec, attempt).await
        }
        Next::Announce => {
            let job = require_job(bus, job_id).await?;
            let spec = job.spec.for_attempt(job.attempt);
            announce_shards(bus, &spec, job.attempt, job.shards_in_attempt()).await
        }
    }
}

/// Renders the retryable failures of attempt `attempt` into the shards of the next attempt,
/// moves the job to it and announces the shards. Re-running it rewrites the same shards.
async fn start_retry(merger: &Merger, spec: &JobSpec, attempt: u32) -> Result<(), StepError> {
    let bus = &merger.bus;
    let store = &merger.store;
    let job_id = spec.id();
    let job = require_job(bus, job_id).await?;
    let scratch = rowsmith_store::scratch_dir()?;
    let indexed = store
        .fetch_local(&job.indexed_key(), scratch.path())
        .await?;
    let rows_files = fetch_rows_files(store, &job, attempt..=attempt, scratch.path()).await?;
    let (indexed_for_task, duckdb) = (indexed.clone(), merger.duckdb);
    let columns =
        tokio::task::spawn_blocking(move || table::indexed_columns(&indexed_for_task, &duckdb))
            .await
            .map_err(blocking_failed)??;
    let next_attempt = attempt + 1;
    // The last attempt may go to the fallback provider and model.
    let mut attempt_spec = spec.for_attempt(next_attempt);
    // Truncated answers get more room on each retry.
    attempt_spec.options.max_output_tokens =
        attempt_spec.output_tokens_for_attempt(next_attempt, merger.limits.max_output_tokens);
    let spec = &attempt_spec;
    let limits = shard_limits(spec, &merger.limits)?;
    let prepared = prepare_shards(
        store,
        spec,
        &columns,
        &indexed,
        limits,
        next_attempt,
        Some(rows_files),
        None,
        layout::requests,
        merger.duckdb,
    )
    .await?;
    let (stats, sizes) = (prepared.stats, prepared.sizes);
    create_shard_records(bus, spec, next_attempt, &sizes).await?;
    let moved = bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<Option<Counts>>, StepError> {
                if job.attempt != attempt || job.state != JobState::Merging {
                    return Ok(Cas::Keep(None));
                }
                job.shards_per_attempt.truncate(attempt as usize);
                job.shards_per_attempt.push(stats.shards);
                job.attempt = next_attempt;
                job.merged_shards.clear();
                job.counts.failed = job.counts.failed.saturating_sub(job.retryable_failed);
                job.counts.pending += stats.requests;
                job.counts.shards_total += u64::from(stats.shards);
                job.retryable_failed = 0;
                job.transition(JobState::Running)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                Ok(Cas::Write(Some(job.counts)))
            },
        )
        .await?;
    announce_shards(bus, spec, next_attempt, stats.shards).await?;
    if let Some(counts) = moved {
        let message = format!(
            "retrying {} rows that failed in attempt {attempt} as attempt {next_attempt} ({} shards, {} {})",
            stats.requests, stats.shards, spec.provider, spec.model
        );
        tracing::info!(
            job_id,
            attempt = next_attempt,
            rows = stats.requests,
            "retrying failed rows"
        );
        bus.emit(&Event::new(job_id, EventKind::Retrying, message, counts))
            .await;
    }
    Ok(())
}

/// The contents of the named result files that exist (a batch without errors has no error
/// file).
async fn read_present(store: &Store, paths: Vec<String>) -> Result<Vec<bytes::Bytes>, StepError> {
    let mut files = Vec::new();
    for path in paths {
        match store.get_bytes(&path).await {
            Ok(bytes) => files.push(bytes),
            Err(StorageError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Ok(files)
}

/// Fills the shard's failed rows from what its own orphan batches answered (the poller
/// downloaded their files into the shard record). Returns how many rows were filled.
async fn fill_from_orphans(
    merger: &Merger,
    job: &JobRecord,
    ended: &BatchEnded,
    outcome: &mut crate::merge::MergedShard,
) -> Result<u64, StepError> {
    let store = &merger.store;
    let Some((shard, _)) = merger
        .bus
        .read::<ShardRecord>(&shard_key(&ended.key))
        .await?
    else {
        return Ok(0);
    };
    let paths = shard
        .orphan_results
        .iter()
        .flat_map(|results| [results.output_path.clone(), results.errors_path.clone()])
        .flatten()
        .collect();
    let orphan_files = read_present(store, paths).await?;
    let files: Vec<&[u8]> = orphan_files.iter().map(|b| b.as_ref()).collect();
    let filled =
        crate::merge::fill_from_orphans(outcome, &files, &ended.provider, &job.spec.fields);
    if filled > 0 {
        metrics::counter!("rowsmith_orphan_rows_used_total").increment(filled);
        tracing::info!(job_id = %ended.key.job_id, shard = ended.key.shard, filled, "rows filled from orphan batches");
    }
    Ok(filled)
}

/// Validates the shard's result lines into a rows file; returns (succeeded, failed).
async fn merge_shard(
    merger: &Merger,
    job: &JobRecord,
    ended: &BatchEnded,
) -> Result<ShardTally, StepError> {
    let key = &ended.key;
    let store = &merger.store;
    let requests = store.get_bytes(&layout::requests(key)).await?;
    let result_files = read_present(
        store,
        [&ended.output_path, &ended.errors_path]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
    )
    .await?;
    let files: Vec<&[u8]> = result_files.iter().map(|b| b.as_ref()).collect();
    let mut outcome = crate::merge::merge_lines(&requests, &files, ended, &job.spec.fields)
        .map_err(|e| {
            StepError::Internal(format!(
                "request file of shard {} is corrupt: {e}",
                key.dotted()
            ))
        })?;
    let from_orphans = fill_from_orphans(merger, job, ended, &mut outcome).await?;
    if !outcome.anomalies.is_empty() {
        let message = format!(
            "shard {} (batch {}): {}",
            key.dotted(),
            ended.batch_id,
            outcome.anomalies.describe()
        );
        tracing::warn!(job_id = %key.job_id, %message, "odd result lines");
        merger
            .bus
            .emit(
                &Event::new(&key.job_id, EventKind::Warning, message, job.counts)
                    .with_shard(key.clone()),
            )
            .await;
    }
    let (rows, tally) = (outcome.rows, outcome.tally);
    let ShardTally {
        succeeded, failed, ..
    } = tally;
    let rows_key = layout::rows(key);
    let attempt = key.attempt;
    let scratch = rowsmith_store::scratch_dir()?;
    let target = store.local_target(&rows_key, scratch.path())?;
    let (target_for_task, fields, duckdb) =
        (target.clone(), job.spec.fields.clone(), merger.duckdb);
    tokio::task::spawn_blocking(move || {
        table::write_rows(&target_for_task, &fields, attempt, &rows, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
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
    let orphans_part = match from_orphans {
        0 => String::new(),
        n => format!(" ({n} of the good ones answered by an orphan batch)"),
    };
    let message = format!(
        "shard {} of attempt {} ended ({}): {succeeded} rows good, {failed} failed{orphans_part}",
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
    Ok(tally)
}
