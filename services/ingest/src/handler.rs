//! Handling one JobSpec.

use std::path::{Path, PathBuf};

use crate::input::local_input;
use rowsmith_bus::lifecycle::{dead_letter, stop_job};
use rowsmith_bus::step::{StepError, blocking_failed, require_job, settle};
use rowsmith_bus::{Bus, Cas, Delivery, Outcome, decode};
use rowsmith_config::{
    CacheSettings, DuckdbLimits, LimitsSettings, OutputSettings, Price, find_price,
};
use rowsmith_contract::events::{Counts, Event, EventKind};
use rowsmith_contract::records::{JobRecord, JobState, job_key};
use rowsmith_contract::records::{SUBMITTER_CAPABILITY_KEY, SubmitterCapability};
use rowsmith_contract::spec::JobSpec;
use rowsmith_dataplane::estimate::{Estimate, dollars};
use rowsmith_dataplane::render::RequestTemplate;
use rowsmith_dataplane::table::{self, RenderStats, TableInfo};
use rowsmith_jobs::outputs::{OutputWriter, finalize_job};
use rowsmith_jobs::shards::{
    CacheUse, ShardSize, announce_shards, create_shard_records, load_cache, prepare_shards,
    shard_limits, store_duplicates, store_hashes,
};
use rowsmith_store::{Store, layout};

/// What the ingest step needs.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub bus: Bus,
    pub store: Store,
    /// `store.allowed_inputs`.
    pub allowed_inputs: Vec<String>,
    pub limits: LimitsSettings,
    pub output: OutputSettings,
    pub prices: std::collections::BTreeMap<String, Price>,
    pub cache: CacheSettings,
    /// `duckdb.*`: the memory and threads of each table operation.
    pub duckdb: DuckdbLimits,
}

impl Ingest {
    /// What writing a job's outputs takes (for a job with nothing to send).
    pub fn writer(&self) -> OutputWriter<'_> {
        OutputWriter {
            store: &self.store,
            output: &self.output,
            cache: &self.cache,
            duckdb: &self.duckdb,
        }
    }
}

/// Handles one message of `rowsmith.jobs.submit`.
pub async fn handle(ingest: &Ingest, delivery: Delivery) -> Outcome {
    // A delivery past the last counted one is a dead letter, not handled again.
    if let Some(outcome) = dead_letter(&ingest.bus, &delivery).await {
        return outcome;
    }
    let mut spec: JobSpec = match decode(&delivery) {
        Ok(spec) => spec,
        Err(reason) => return refuse_undecodable(ingest, &delivery, reason).await,
    };
    if spec.job_id.is_none() {
        spec.job_id = Some(derived_job_id(&delivery));
    }
    // A spec that names no model gets its provider's default.
    let spec = spec.with_default_model();
    if let Err(error) = spec
        .validate()
        .and_then(|()| spec.validate_limits(&ingest.limits))
    {
        let job_id = spec.id().to_owned();
        if !rowsmith_contract::spec::is_valid_job_id(&job_id) {
            return Outcome::Terminate {
                reason: format!("refused job: {error}"),
            };
        }
        return refuse(ingest, &job_id, &error.to_string()).await;
    }
    let job_id = spec.id().to_owned();
    if let Some(reason) = keyless_provider(ingest, &spec).await {
        return refuse(ingest, &job_id, &reason).await;
    }
    match accept(ingest, &spec).await {
        Ok(Accepted::New | Accepted::Resume) => {}
        Ok(Accepted::AlreadyDone) => return Outcome::Done,
        Ok(Accepted::Announce { shards }) => {
            // Publishing again is deduplicated by message id and the submitter is idempotent.
            return match announce_shards(&ingest.bus, &spec, 1, shards).await {
                Ok(()) => Outcome::Done,
                Err(error) => settle(&ingest.bus, &job_id, &delivery, error).await,
            };
        }
        Ok(Accepted::Finalize) => {
            let finalized = finalize_job(
                &ingest.bus,
                ingest.writer(),
                &job_id,
                delivery.stream_sequence,
            );
            return match finalized.await {
                Ok(()) => Outcome::Done,
                Err(error) => settle(&ingest.bus, &job_id, &delivery, error).await,
            };
        }
        Ok(Accepted::Conflict) => {
            let message = format!(
                "job id {job_id} is already taken by a job with a different spec; \
                 submit with another --job-id"
            );
            ingest
                .bus
                .emit(&Event::new(
                    &job_id,
                    EventKind::Refused,
                    message.clone(),
                    Counts::default(),
                ))
                .await;
            return Outcome::Terminate { reason: message };
        }
        Err(error) => return settle(&ingest.bus, &job_id, &delivery, error).await,
    }
    match run_ingest(ingest, &spec, delivery.stream_sequence).await {
        Ok(()) => Outcome::Done,
        Err(error) => settle(&ingest.bus, &job_id, &delivery, error).await,
    }
}

/// Why no submitter could send this job: its provider (or its fallback's) is missing from
/// the providers the submitters announced a key for. None when they all are, or when no
/// submitter announced anything (an older one, or none started yet).
async fn keyless_provider(ingest: &Ingest, spec: &JobSpec) -> Option<String> {
    let (capability, _) = match ingest
        .bus
        .read::<SubmitterCapability>(SUBMITTER_CAPABILITY_KEY)
        .await
    {
        Ok(Some(found)) => found,
        Ok(None) => return None,
        Err(error) => {
            tracing::debug!(%error, "cannot read the submitters' providers; accepting");
            return None;
        }
    };
    let fallback = spec.fallback.as_ref().map(|f| f.provider.as_str());
    let missing = std::iter::once(spec.provider.as_str())
        .chain(fallback)
        .find(|provider| !capability.providers.contains(*provider))?;
    let variable = rowsmith_contract::providers::api_key_source(missing);
    Some(format!(
        "job refused: no API key for {missing} at any submitter: set {variable} for the \
         submitter and the poller, restart them, and submit again; nothing was read or sent"
    ))
}

/// A message that is not a JobSpec: say why on the job's events when it names a valid job id.
async fn refuse_undecodable(ingest: &Ingest, delivery: &Delivery, reason: String) -> Outcome {
    let job_id = serde_json::from_slice::<serde_json::Value>(&delivery.payload)
        .ok()
        .and_then(|v| {
            v.get("job_id")
                .and_then(|id| id.as_str())
                .map(str::to_owned)
        })
        .filter(|id| rowsmith_contract::spec::is_valid_job_id(id));
    if let Some(job_id) = job_id {
        // Recorded as a failed job, so `status` and `watch` say why.
        let message = format!(
            "job refused: the JobSpec is invalid: {reason}; fix it (proto/job-spec.schema.json \
             describes every field) and submit again"
        );
        refuse(ingest, &job_id, &message).await;
    }
    Outcome::Terminate { reason }
}

/// The id of a JobSpec that names none: the same on every delivery of the message (its stream
/// sequence and a hash of its body), so one message never becomes two jobs.
fn derived_job_id(delivery: &Delivery) -> String {
    let digest = xxhash_rust::xxh3::xxh3_64(&delivery.payload);
    match delivery.stream_sequence {
        0 => format!("job-{digest:016x}"),
        sequence => format!("job-{sequence}-{:08x}", digest >> 32),
    }
}

/// A spec that cannot run. A job of that id that does not exist yet is recorded as failed, so
/// `status` and `watch` show why; an existing job is never touched by another message: the
/// refusal is only an event on its subject.
async fn refuse(ingest: &Ingest, job_id: &str, message: &str) -> Outcome {
    let outcome = Outcome::Terminate {
        reason: message.to_owned(),
    };
    let created = ingest
        .bus
        .create(&job_key(job_id), &JobRecord::new(placeholder_spec(job_id)))
        .await;
    match created {
        Ok(true) => {
            if let Err(error) = stop_job(&ingest.bus, job_id, message).await {
                tracing::error!(job_id, %error, "could not record the refused job");
            }
        }
        Ok(false) => {
            let message = format!(
                "a message for job {job_id} was refused and did not change the job: {message}"
            );
            tracing::warn!(job_id, %message, "refused a message for an existing job");
            ingest
                .bus
                .emit(&Event::new(
                    job_id,
                    EventKind::Refused,
                    message,
                    Counts::default(),
                ))
                .await;
        }
        Err(error) => {
            tracing::error!(job_id, %error, "could not record the refused job");
            return Outcome::Retry {
                after: std::time::Duration::from_secs(5),
            };
        }
    }
    outcome
}

fn placeholder_spec(job_id: &str) -> JobSpec {
    JobSpec::builder("", "")
        .with_id(job_id)
        .with_provider("", "")
}

enum Accepted {
    New,
    Resume,
    /// Ingested before a crash: make sure its shards were announced.
    Announce {
        shards: u32,
    },
    /// Ingested with nothing to send before a crash: finish it.
    Finalize,
    AlreadyDone,
    Conflict,
}

async fn accept(ingest: &Ingest, spec: &JobSpec) -> Result<Accepted, StepError> {
    let job_id = spec.id();
    if ingest
        .bus
        .create(&job_key(job_id), &JobRecord::new(spec.clone()))
        .await?
    {
        let message = format!(
            "job accepted: {} via {} ({})",
            spec.input, spec.provider, spec.model
        );
        ingest
            .bus
            .emit(&Event::new(
                job_id,
                EventKind::Accepted,
                message,
                Counts::default(),
            ))
            .await;
        return Ok(Accepted::New);
    }
    let existing = require_job(&ingest.bus, job_id).await?;
    if existing.spec != *spec {
        return Ok(Accepted::Conflict);
    }
    Ok(match existing.state {
        JobState::Accepted | JobState::Ingesting => Accepted::Resume,
        JobState::Running if existing.attempt == 1 => Accepted::Announce {
            shards: existing.shards_in_attempt(),
        },
        JobState::Merging if existing.shards_in_attempt() == 0 => Accepted::Finalize,
        _ => Accepted::AlreadyDone,
    })
}

/// Refuses, before anything is sent, a job whose only shard holds fewer requests than its
/// provider takes in a batch (Bedrock: 100 records per job); more shards are balanced by the
/// cutter so that none is short.
fn check_minimum(spec: &JobSpec, min: u64, sizes: &[ShardSize]) -> Result<(), StepError> {
    match sizes {
        [only] if only.requests < min => Err(StepError::Job(format!(
            "{} takes at least {min} requests per batch job; this job has {} to send (after \
             empty and repeated rows, and rows the result cache answers); use another \
             provider for so few rows, e.g. --provider anthropic",
            spec.provider, only.requests
        ))),
        _ => Ok(()),
    }
}

/// `sequence` is the JobSpec message's, for the finalize claim of a job with nothing to send.
async fn run_ingest(ingest: &Ingest, spec: &JobSpec, sequence: u64) -> Result<(), StepError> {
    let job_id = spec.id();
    set_state(&ingest.bus, job_id, JobState::Ingesting).await?;
    let scratch = rowsmith_store::scratch_dir()?;
    let (info, indexed) = index(ingest, spec, scratch.path()).await?;

    let limits = shard_limits(spec, &ingest.limits)?;
    let fingerprint = RequestTemplate::new(spec, &info.columns).fingerprint(&spec.provider);
    let cache = match ingest.cache.enabled {
        true => load_cache(&ingest.store, &fingerprint, scratch.path(), ingest.duckdb).await?,
        false => None,
    };
    let hits = scratch.path().join("cache-hits.csv");
    let prepared = prepare_shards(
        &ingest.store,
        spec,
        &info.columns,
        &indexed,
        limits,
        1,
        None,
        cache.as_ref().map(|(keys, _)| CacheUse {
            keys: keys.clone(),
            hits: hits.clone(),
        }),
        layout::requests,
        ingest.duckdb,
    )
    .await?;
    let (stats, sizes) = (prepared.stats, prepared.sizes);
    check_minimum(spec, limits.min_requests, &sizes)?;
    if ingest.cache.enabled {
        store_hashes(
            &ingest.store,
            job_id,
            prepared.first_with_body,
            ingest.duckdb,
        )
        .await?;
    }
    if let Some((_, segments)) = cache.filter(|_| stats.cached > 0) {
        store_cached_rows(ingest, spec, &hits, segments, scratch.path()).await?;
    }
    let estimate = Estimate::new(
        spec,
        &stats,
        &prepared.sample,
        find_price(&ingest.prices, &spec.model),
    );
    // Refused before any batch is created: nothing has been sent to the provider.
    check_budget(spec, &estimate)?;
    if !prepared.duplicates.is_empty() {
        store_duplicates(&ingest.store, job_id, prepared.duplicates, ingest.duckdb).await?;
    }
    create_shard_records(&ingest.bus, spec, 1, &sizes).await?;
    record_ingested(ingest, job_id, &stats, &estimate).await?;
    if stats.shards == 0 {
        // Nothing to send: the outputs are the table as it is.
        set_state(&ingest.bus, job_id, JobState::Merging).await?;
        return finalize_job(&ingest.bus, ingest.writer(), job_id, sequence).await;
    }
    announce_shards(&ingest.bus, spec, 1, stats.shards).await?;
    Ok(())
}

/// Fetches the job's input and indexes it into the store (`layout::indexed`); returns its
/// columns and the local copy of the indexed table.
async fn index(
    ingest: &Ingest,
    spec: &JobSpec,
    scratch: &Path,
) -> Result<(TableInfo, PathBuf), StepError> {
    let input = local_input(&ingest.store, &spec.input, &ingest.allowed_inputs, scratch).await?;
    let indexed_key = layout::indexed(spec.id());
    let indexed = ingest.store.local_target(&indexed_key, scratch)?;
    let (input_for_task, indexed_for_task) = (input.clone(), indexed.clone());
    let (limits, duckdb) = (ingest.limits.clone(), ingest.duckdb);
    let info: TableInfo = tokio::task::spawn_blocking(move || {
        table::index_input(&input_for_task, &indexed_for_task, &limits, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
    let indexed = ingest.store.commit_local(&indexed_key, &indexed).await?;
    spec.validate_columns(&info.columns)
        .map_err(|e| StepError::Job(e.to_string()))?;
    Ok((info, indexed))
}

/// The rows the result cache answered, as the job's rows file of attempt 0.
async fn store_cached_rows(
    ingest: &Ingest,
    spec: &JobSpec,
    hits: &Path,
    segments: Vec<PathBuf>,
    scratch: &Path,
) -> Result<(), StepError> {
    let key = layout::cached_rows(spec.id());
    let target = ingest.store.local_target(&key, scratch)?;
    let (target_for_task, fields, duckdb) = (target.clone(), spec.fields.clone(), ingest.duckdb);
    let hits = hits.to_path_buf();
    tokio::task::spawn_blocking(move || {
        table::write_cached_rows(&hits, &segments, &fields, &target_for_task, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
    ingest.store.commit_local(&key, &target).await?;
    Ok(())
}

/// Refuses a job whose estimate is over its `options.budget_usd`, or that has a budget and
/// no price to hold it to.
fn check_budget(spec: &JobSpec, estimate: &Estimate) -> Result<(), StepError> {
    let Some(budget) = spec.options.budget_usd else {
        return Ok(());
    };
    let over = match estimate.cost_batch_usd {
        Some(cost) if cost > budget => Some(format!(
            "the estimated cost {} is over options.budget_usd ({}): {}; \
             raise the budget, or send fewer rows or fields",
            dollars(cost),
            dollars(budget),
            estimate.summary()
        )),
        Some(_) => None,
        None => Some(format!(
            "options.budget_usd is set but model {:?} has no price; add [prices.\"{}\"] \
             to the configuration",
            spec.model, spec.model
        )),
    };
    match over {
        Some(message) => Err(StepError::Job(message)),
        None => Ok(()),
    }
}

/// Records the first attempt's counts and shards in the job (now `running`) and says so.
async fn record_ingested(
    ingest: &Ingest,
    job_id: &str,
    stats: &RenderStats,
    estimate: &Estimate,
) -> Result<(), StepError> {
    let counts = Counts {
        rows_total: stats.rows,
        rows_skipped: stats.skipped,
        rows_deduplicated: stats.duplicates,
        rows_cached: stats.cached,
        succeeded: stats.cached,
        pending: stats.requests,
        shards_total: u64::from(stats.shards),
        ..Counts::default()
    };
    let (shards, indexed_key) = (stats.shards, layout::indexed(job_id));
    ingest
        .bus
        .modify(
            &job_key(job_id),
            |job: &mut JobRecord| -> Result<Cas<()>, StepError> {
                if job.state != JobState::Ingesting {
                    return Ok(Cas::Keep(()));
                }
                job.counts = counts;
                job.shards_per_attempt = vec![shards];
                job.indexed_path = Some(indexed_key.clone());
                job.transition(JobState::Running)
                    .map_err(|e| StepError::Job(e.to_string()))?;
                Ok(Cas::Write(()))
            },
        )
        .await?;
    let message = format!(
        "ingested {} rows ({} skipped: empty targets; {} repeat another row's request; {} answered from the result cache) into {} requests in {} shards; estimate: {}",
        stats.rows,
        stats.skipped,
        stats.duplicates,
        stats.cached,
        stats.requests,
        stats.shards,
        estimate.summary()
    );
    tracing::info!(
        job_id,
        rows = stats.rows,
        skipped = stats.skipped,
        shards = stats.shards,
        "job ingested"
    );
    ingest
        .bus
        .emit(&Event::new(job_id, EventKind::Ingested, message, counts))
        .await;
    Ok(())
}

async fn set_state(bus: &Bus, job_id: &str, next: JobState) -> Result<(), StepError> {
    bus.modify(
        &job_key(job_id),
        |job: &mut JobRecord| -> Result<Cas<()>, StepError> {
            if job.state == next {
                return Ok(Cas::Keep(()));
            }
            job.transition(next)
                .map_err(|e| StepError::Job(format!("job {job_id}: {e}")))?;
            Ok(Cas::Write(()))
        },
    )
    .await
}
