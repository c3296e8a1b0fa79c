//! `rowsmith render`: the exact request shards ingest would send, written offline by the
//! same code as the ingest service.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use rowsmith_config::Settings;
use rowsmith_contract::spec::JobSpec;
use rowsmith_dataplane::render::RequestTemplate;
use rowsmith_dataplane::table;
use rowsmith_jobs::shards::{CacheUse, PreparedShards, load_cache, prepare_shards, shard_limits};
use rowsmith_store::Store;

use crate::job_args::JobArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub job: JobArgs,
    /// Where the shard files go (a1-s0.jsonl, a1-s1.jsonl, …).
    #[arg(long)]
    pub out_dir: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let spec = args.job.to_spec()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let out_dir = std::fs::canonicalize(&args.out_dir)
        .with_context(|| format!("cannot resolve {}", args.out_dir.display()))?;
    let started = std::time::Instant::now();
    // The exact shards of a first ingest, with no result cache consulted.
    let (prepared, indexed_seconds) = render_offline(&settings, &spec, &out_dir, None).await?;
    // The store's staging directory is empty once every shard is renamed into place; leave
    // the shards alone in the directory the user named.
    let _ = std::fs::remove_dir(out_dir.join(".staging"));
    let stats = prepared.stats;
    let seconds = started.elapsed().as_secs_f64();
    for shard in 0..stats.shards {
        println!("{}", out_dir.join(format!("a1-s{shard}.jsonl")).display());
    }
    eprintln!(
        "rendered {} rows ({} skipped, {} duplicates of another row's request) into {} requests, {} shards, {} bytes in {:.2}s ({:.0} rows/s; indexing took {:.2}s)",
        stats.rows,
        stats.skipped,
        stats.duplicates,
        stats.requests,
        stats.shards,
        stats.bytes,
        seconds,
        stats.rows as f64 / seconds.max(1e-9),
        indexed_seconds
    );
    Ok(ExitCode::SUCCESS)
}

/// Indexes a local input and renders its request shards into `out_dir` with the ingest
/// service's code; returns them and how long indexing took.
pub async fn render_offline(
    settings: &Settings,
    spec: &JobSpec,
    out_dir: &Path,
    cache: Option<&Store>,
) -> anyhow::Result<(PreparedShards, f64)> {
    spec.validate_limits(&settings.limits)?;
    let input = PathBuf::from(spec.input.strip_prefix("file://").unwrap_or(&spec.input));
    anyhow::ensure!(input.is_file(), "input {} is not a file", input.display());
    let scratch = tempfile::tempdir()?;
    let indexed = scratch.path().join("input.indexed.parquet");
    let (input_for_task, indexed_for_task) = (input.clone(), indexed.clone());
    let started = std::time::Instant::now();
    let (input_limits, duckdb) = (settings.limits.clone(), settings.duckdb.limits());
    let info = tokio::task::spawn_blocking(move || {
        table::index_input(&input_for_task, &indexed_for_task, &input_limits, &duckdb)
    })
    .await??;
    let indexed_seconds = started.elapsed().as_secs_f64();
    spec.validate_columns(&info.columns)?;
    let limits = shard_limits(spec, &settings.limits)?;
    let cache = match cache {
        Some(cache_store) => {
            let fingerprint = RequestTemplate::new(spec, &info.columns).fingerprint(&spec.provider);
            load_cache(cache_store, &fingerprint, scratch.path(), duckdb)
                .await?
                .map(|(keys, _)| CacheUse {
                    keys,
                    hits: scratch.path().join("hits.csv"),
                })
        }
        None => None,
    };
    let store = Store::from_url(&out_dir.to_string_lossy())?;
    let prepared = prepare_shards(
        &store,
        spec,
        &info.columns,
        &indexed,
        limits,
        1,
        None,
        cache,
        |key| format!("{}.jsonl", key.file_stem()),
        duckdb,
    )
    .await?;
    Ok((prepared, indexed_seconds))
}
