//! Cutting an attempt's requests into shards and announcing them: shared by ingest (attempt
//! 1), the merger (retry attempts) and the CLI's offline `render`.

use std::path::{Path, PathBuf};

use rowsmith_bus::Bus;
use rowsmith_bus::step::{StepError, blocking_failed};
use rowsmith_config::{DuckdbLimits, LimitsSettings};
use rowsmith_contract::messages::{ShardKey, ShardReady, subjects};
use rowsmith_contract::providers::{Limits, batch_limits};
use rowsmith_contract::records::{ShardRecord, ShardState, shard_key};
use rowsmith_contract::spec::JobSpec;
use rowsmith_dataplane::estimate::Sampler;
use rowsmith_dataplane::render::RequestTemplate;
use rowsmith_dataplane::table::{self, RenderStats, ShardLimits};
use rowsmith_dataplane::tail::BalancedTail;
use rowsmith_store::{Store, layout};

/// Requests and bytes of one rendered shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSize {
    pub requests: u64,
    pub bytes: u64,
}

/// The job's own caps, never above its provider's.
pub fn shard_limits(spec: &JobSpec, limits: &LimitsSettings) -> Result<ShardLimits, StepError> {
    let provider: Limits = batch_limits(&spec.provider)
        .ok_or_else(|| StepError::Job(format!("unknown provider {:?}", spec.provider)))?;
    Ok(ShardLimits {
        max_requests: spec
            .options
            .max_requests_per_batch
            .min(provider.max_requests),
        max_bytes: spec.options.max_batch_bytes.min(provider.max_bytes),
        max_cell_bytes: limits.max_cell_bytes,
        min_requests: provider.min_requests,
    })
}

/// `table::render_shards`, with a provider's minimum per batch kept: no short last shard
/// (see `rowsmith_dataplane::tail`).
fn render(
    indexed: &Path,
    template: &RequestTemplate,
    limits: ShardLimits,
    retry_of: Option<&[PathBuf]>,
    keys: Option<&table::CacheKeys>,
    sink: &mut impl table::ShardSink,
    duckdb: &DuckdbLimits,
) -> Result<table::Rendered, table::TableError> {
    if limits.min_requests <= 1 {
        return table::render_shards(indexed, template, limits, retry_of, keys, sink, duckdb);
    }
    let mut balanced = BalancedTail::new(sink, limits);
    let rendered = table::render_shards(
        indexed,
        template,
        limits,
        retry_of,
        keys,
        &mut balanced,
        duckdb,
    )?;
    balanced.close()?;
    Ok(rendered)
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
    cache: Option<CacheUse>,
    shard_path: impl Fn(&ShardKey) -> String + Send + 'static,
    duckdb: DuckdbLimits,
) -> Result<PreparedShards, StepError> {
    let job_id = spec.id().to_owned();
    let scratch = tempfile::tempdir().map_err(StepError::from)?;
    // The render thread writes each shard straight to a local file (the object itself on a
    // file store) and hands finished ones over to be stored; memory stays flat.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<FinishedShard>(2);
    let template = RequestTemplate::new(spec, columns);
    let indexed = indexed.to_owned();
    let store_for_sink = store.clone();
    let scratch_path = scratch.path().to_owned();
    let shard_key_of = {
        let job_id = job_id.clone();
        move |number: u32| ShardKey {
            job_id: job_id.clone(),
            attempt,
            shard: number,
        }
    };
    let render = tokio::task::spawn_blocking(move || {
        let (keys, hits) = match cache {
            Some(cache) => {
                use std::io::Write;
                let file = std::fs::File::create(&cache.hits)
                    .map_err(table::TableError::writing(&cache.hits))?;
                let mut writer = std::io::BufWriter::new(file);
                writeln!(writer, "{},h_hi,h_lo", table::ROW_INDEX).map_err(FileShardSink::io)?;
                (Some(cache.keys), Some(writer))
            }
            None => (None, None),
        };
        let mut sink = FileShardSink {
            store: store_for_sink,
            scratch: scratch_path,
            object_key: Box::new(move |number| shard_path(&shard_key_of(number))),
            open: None,
            sender,
            duplicates: Vec::new(),
            sample: Sampler::default(),
            hits,
        };
        let rendered = render(
            &indexed,
            &template,
            limits,
            retry_of.as_deref(),
            keys.as_deref(),
            &mut sink,
            &duckdb,
        )?;
        if let Some(mut hits) = sink.hits.take() {
            use std::io::Write;
            hits.flush().map_err(FileShardSink::io)?;
        }
        Ok::<_, table::TableError>((rendered, sink.duplicates, sink.sample))
    });
    let mut sizes = Vec::new();
    while let Some(finished) = receiver.recv().await {
        store
            .commit_local(&finished.object_key, &finished.path)
            .await?;
        sizes.push(ShardSize {
            requests: finished.requests,
            bytes: finished.bytes,
        });
    }
    let (rendered, duplicates, sample) = render.await.map_err(blocking_failed)??;
    drop(scratch);
    Ok(PreparedShards {
        stats: rendered.stats,
        sizes,
        duplicates,
        sample,
        first_with_body: rendered.first_with_body,
    })
}

/// What rendering an attempt produced.
#[derive(Debug)]
pub struct PreparedShards {
    pub stats: RenderStats,
    pub sizes: Vec<ShardSize>,
    /// `(row, first row with the same request)` for rows not sent.
    pub duplicates: Vec<(i64, i64)>,
    /// A uniform sample of the request lines, for the cost estimate.
    pub sample: Sampler,
    /// Each distinct request's body hash and first row.
    pub first_with_body: std::collections::HashMap<u128, i64>,
}

/// The result cache while rendering: the body hashes it can answer, and the local CSV file
/// where the rows it answers are listed (`_row_index,h_hi,h_lo`).
#[derive(Debug, Clone)]
pub struct CacheUse {
    pub keys: std::sync::Arc<table::CacheKeys>,
    pub hits: PathBuf,
}

/// The result cache of one request template: its segments fetched into `scratch` and the
/// body hashes they answer; `None` when there is none yet.
pub async fn load_cache(
    store: &Store,
    fingerprint: &str,
    scratch: &Path,
    duckdb: DuckdbLimits,
) -> Result<Option<(std::sync::Arc<table::CacheKeys>, Vec<PathBuf>)>, StepError> {
    let segments = store.list(&layout::cache_dir(fingerprint)).await?;
    if segments.is_empty() {
        return Ok(None);
    }
    let mut files = Vec::with_capacity(segments.len());
    for key in &segments {
        files.push(store.fetch_local(key, scratch).await?);
    }
    let files_for_task = files.clone();
    let keys =
        tokio::task::spawn_blocking(move || table::read_cache_keys(&files_for_task, &duckdb))
            .await
            .map_err(blocking_failed)??;
    Ok(Some((std::sync::Arc::new(keys), files)))
}

/// Stores each distinct request's `(row, body hash)` of a job, from which its answers join
/// the result cache when it completes.
pub async fn store_hashes(
    store: &Store,
    job_id: &str,
    first_with_body: std::collections::HashMap<u128, i64>,
    duckdb: DuckdbLimits,
) -> Result<(), StepError> {
    let key = layout::hashes(job_id);
    let scratch = rowsmith_store::scratch_dir()?;
    let target = store.local_target(&key, scratch.path())?;
    let target_for_task = target.clone();
    tokio::task::spawn_blocking(move || {
        table::write_hashes(&target_for_task, &first_with_body, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
    store.commit_local(&key, &target).await?;
    Ok(())
}

/// Stores the duplicate rows of a job (read again when the outputs are written).
pub async fn store_duplicates(
    store: &Store,
    job_id: &str,
    duplicates: Vec<(i64, i64)>,
    duckdb: DuckdbLimits,
) -> Result<(), StepError> {
    let key = layout::duplicates(job_id);
    let scratch = rowsmith_store::scratch_dir()?;
    let target = store.local_target(&key, scratch.path())?;
    let target_for_task = target.clone();
    tokio::task::spawn_blocking(move || {
        table::write_duplicates(&target_for_task, &duplicates, &duckdb)
    })
    .await
    .map_err(blocking_failed)??;
    store.commit_local(&key, &target).await?;
    Ok(())
}

/// A shard file the render thread has closed.
#[derive(Debug)]
struct FinishedShard {
    object_key: String,
    path: PathBuf,
    requests: u64,
    bytes: u64,
}

/// A file written by its own thread: the render loop hands over filled 4 MiB buffers and
/// goes on rendering while the kernel copies the previous ones (on two cores this overlaps
/// the request lines' page-cache writes with their rendering).
struct BackgroundWriter {
    buffer: Vec<u8>,
    sender: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

const WRITE_CHUNK: usize = 4 << 20;

impl BackgroundWriter {
    fn new(mut file: std::fs::File) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            for chunk in receiver {
                file.write_all(&chunk)?;
            }
            file.flush()
        });
        Self {
            buffer: Vec::with_capacity(WRITE_CHUNK),
            sender: Some(sender),
            thread: Some(thread),
        }
    }

    fn hand_over(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(WRITE_CHUNK));
        let sent = self.sender.as_ref().map(|sender| sender.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped: its error is what `finish` reports.
            _ => self.finish(),
        }
    }

    /// Writes what is left and waits for the file to be complete.
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() && self.sender.is_some() {
            let chunk = std::mem::take(&mut self.buffer);
            if let Some(sender) = &self.sender {
                let _ = sender.send(chunk);
            }
        }
        self.sender = None;
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| std::io::Error::other("the shard writer thread panicked"))?,
            None => Err(std::io::Error::other("the shard writer already stopped")),
        }
    }
}

impl std::io::Write for BackgroundWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= WRITE_CHUNK {
            self.hand_over()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_over()
    }
}

/// Writes shards to local files: the objects themselves on a file store, else scratch files
/// that the async side uploads.
struct FileShardSink {
    store: Store,
    scratch: PathBuf,
    object_key: Box<dyn Fn(u32) -> String + Send>,
    open: Option<(u32, String, PathBuf, BackgroundWriter)>,
    sender: tokio::sync::mpsc::Sender<FinishedShard>,
    duplicates: Vec<(i64, i64)>,
    sample: Sampler,
    hits: Option<std::io::BufWriter<std::fs::File>>,
}

impl FileShardSink {
    fn io(error: impl std::fmt::Display) -> table::TableError {
        table::TableError::Duckdb {
            what: "write shard",
            message: error.to_string(),
        }
    }
}

impl table::ShardSink for FileShardSink {
    fn write_line(&mut self, shard: u32, line: &[u8]) -> Result<(), table::TableError> {
        use std::io::Write;
        if self.open.as_ref().is_none_or(|(open, ..)| *open != shard) {
            let object_key = (self.object_key)(shard);
            let path = self
                .store
                .local_target(&object_key, &self.scratch)
                .map_err(Self::io)?;
            let file = std::fs::File::create(&path).map_err(table::TableError::writing(&path))?;
            self.open = Some((shard, object_key, path, BackgroundWriter::new(file)));
        }
        let (_, _, path, writer) = self
            .open
            .as_mut()
            .ok_or_else(|| Self::io("no shard open"))?;
        self.sample.offer(line);
        writer
            .write_all(line)
            .map_err(table::TableError::writing(path))
    }

    fn finish(&mut self, shard: u32, requests: u64, bytes: u64) -> Result<(), table::TableError> {
        use std::io::Write;
        let Some((open, object_key, path, mut writer)) = self.open.take() else {
            return Err(Self::io(format!("shard {shard} was never opened")));
        };
        debug_assert_eq!(open, shard);
        writer.flush().map_err(table::TableError::writing(&path))?;
        writer.finish().map_err(table::TableError::writing(&path))?;
        self.sender
            .blocking_send(FinishedShard {
                object_key,
                path,
                requests,
                bytes,
            })
            .map_err(|_| Self::io("the shard uploader stopped"))
    }

    fn duplicate(&mut self, row_index: i64, first: i64) -> Result<(), table::TableError> {
        self.duplicates.push((row_index, first));
        Ok(())
    }

    fn cached(&mut self, row_index: i64, hash: u128) -> Result<(), table::TableError> {
        use std::io::Write;
        let Some(hits) = self.hits.as_mut() else {
            return Err(Self::io("a cache hit without a cache"));
        };
        let (hi, lo) = table::halves(hash);
        writeln!(hits, "{row_index},{hi},{lo}").map_err(Self::io)
    }
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
            creating: None,
            orphan_batches: Vec::new(),
            own_orphans: Vec::new(),
            orphan_results: Vec::new(),
            batch_ended_at_ms: None,
            updated_at_ms: rowsmith_contract::now_unix_ms(),
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
