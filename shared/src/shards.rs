//! Cutting an attempt's requests into shards and announcing them: shared by ingest (attempt
//! 1), the merger (retry attempts) and the CLI's offline `render`.

use std::path::{Path, PathBuf};

use crate::bus::Bus;
use crate::jobs::StepError;
use crate::messages::{ShardKey, ShardReady, subjects};
use crate::providers::Limits;
use crate::records::{ShardRecord, ShardState, shard_key};
use crate::render::RequestTemplate;
use crate::spec::JobSpec;
use crate::storage::{Store, layout};
use crate::table::{self, RenderStats, Shard, ShardLimits};

/// Requests and bytes of one rendered shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSize {
    pub requests: u64,
    pub bytes: u64,
}

/// The job's own caps, never above the provider's.
pub fn shard_limits(spec: &JobSpec, provider: Limits) -> ShardLimits {
    ShardLimits {
        max_requests: spec
            .options
            .max_requests_per_batch
            .min(provider.max_requests),
        max_bytes: spec.options.max_batch_bytes.min(provider.max_bytes),
    }
}

/// Renders one attempt's request shards into the store at `shard_path(key)`; returns the
/// totals and each shard's size. `retry_of` limits the rows to the retryable failures in
/// those rows files.
#[allow(clippy::too_many_arguments)]
pub async fn prepare_shards(
    store: &Store,
    spec: &JobSpec,
    columns: &[String],
    indexed: &Path,
    limits: ShardLimits,
    attempt: u32,
    retry_of: Option<Vec<PathBuf>>,
    shard_path: impl Fn(&ShardKey) -> String,
) -> Result<(RenderStats, Vec<ShardSize>), StepError> {
    let job_id = spec.id().to_owned();
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Shard>(1);
    let template = RequestTemplate::new(spec, columns);
    let indexed = indexed.to_owned();
    let render = tokio::task::spawn_blocking(move || {
        table::render_shards(&indexed, &template, limits, retry_of.as_deref(), |shard| {
            sender
                .blocking_send(shard)
                .map_err(|_| table::TableError::Duckdb {
                    what: "render",
                    message: "the shard writer stopped".into(),
                })
        })
    });
    let mut sizes = Vec::new();
    while let Some(shard) = receiver.recv().await {
        let key = ShardKey {
            job_id: job_id.clone(),
            attempt,
            shard: shard.number,
        };
        sizes.push(ShardSize {
            requests: shard.requests,
            bytes: shard.lines.len() as u64,
        });
        store
            .put_bytes(&shard_path(&key), shard.lines.into())
            .await?;
    }
    let stats = render.await??;
    Ok((stats, sizes))
}

/// Creates the `ready` records of an attempt's shards (existing ones are kept).
pub async fn create_shard_records(
    bus: &Bus,
    spec: &JobSpec,
    attempt: u32,
    sizes: &[ShardSize],
) -> Result<(), StepError> {
    for (shard, size) in (0u32..).zip(sizes) {
        let key = ShardKey {
            job_id: spec.id().to_owned(),
            attempt,
            shard,
        };
        let record = ShardRecord {
            key: key.clone(),
            state: ShardState::Ready,
            provider: spec.provider.clone(),
            requests_path: layout::requests(&key),
            request_count: size.requests,
            bytes: size.bytes,
            provider_file_id: None,
            provider_batch_id: None,
            batch_status: None,
            output_path: None,
            errors_path: None,
            rows_path: None,
            succeeded: 0,
            failed: 0,
            resubmissions: 0,
            not_before_ms: None,
            updated_at_ms: crate::now_unix_ms(),
        };
        bus.create(&shard_key(&key), &record).await?;
    }
    Ok(())
}

/// Publishes `rowsmith.shards.ready` for each shard of an attempt (deduplicated by id).
pub async fn announce_shards(
    bus: &Bus,
    spec: &JobSpec,
    attempt: u32,
    shards: u32,
) -> Result<(), StepError> {
    for shard in 0..shards {
        let key = ShardKey {
            job_id: spec.id().to_owned(),
            attempt,
            shard,
        };
        let (record, _) = bus
            .read::<ShardRecord>(&shard_key(&key))
            .await?
            .ok_or_else(|| {
                StepError::Internal(format!("shard record {} vanished", key.dotted()))
            })?;
        let ready = ShardReady {
            key: key.clone(),
            provider: spec.provider.clone(),
            requests_path: record.requests_path,
            request_count: record.request_count,
            bytes: record.bytes,
        };
        bus.publish(
            subjects::SHARDS_READY,
            &format!("ready.{}", key.dotted()),
            &ready,
        )
        .await?;
    }
    Ok(())
}
