//! Benchmark of the merge path, run by `scripts/bench`:
//!   merge_bench prepare INPUT.csv DIR   index the table, render its shards, fabricate one
//!                                       answer line per request (not timed)
//!   merge_bench merge DIR               validate every result line into rows files and join
//!                                       them onto the table: enriched.csv, enriched.parquet,
//!                                       failures.csv (timed; run alone so its peak RSS is its own)
//! DuckDB runs with the `duckdb.*` settings of the environment (`ROWSMITH_DUCKDB__MEMORY_LIMIT`).

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use rowsmith_config::{DuckdbLimits, Settings};
use rowsmith_contract::messages::{BatchEnded, ShardKey};
use rowsmith_contract::spec::JobSpec;
use rowsmith_dataplane::table::{self, FinalOutputs, ShardLimits};
use rowsmith_jobs::shards::prepare_shards;
use rowsmith_merger::merge::merge_lines;
use rowsmith_store::Store;

fn spec() -> JobSpec {
    JobSpec::builder(
        "bench.csv",
        "Write an SEO title of at most 60 characters, pick a shelf and 3-5 tags.",
    )
    .with_id("bench")
    .with_targets(["description"])
    .with_field_texts([
        "seo_title:string:SEO title",
        "shelf:enum(toys|tools|garden|kitchen|office)",
        "tags:array",
    ])
    .expect("field")
    .with_provider("openai", "gpt-4o-mini")
}

fn shard_files(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort_by_key(|path| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.trim_start_matches("a1-s")
            .split('.')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    Ok(files)
}

/// One OpenAI output line answering a request line, built without parsing the request.
fn answer_line(request: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let start = request.find("\"custom_id\":\"").context("no custom_id")? + 13;
    let end = start + request[start..].find('"').context("custom_id not closed")?;
    let custom_id = &request[start..end];
    let shelves = ["toys", "tools", "garden", "kitchen", "office"];
    let shelf = shelves[custom_id.len() % shelves.len()];
    let content = format!(
        "{{\"seo_title\":\"Great product {custom_id}\",\"shelf\":\"{shelf}\",\"tags\":[\"sturdy\",\"gift\",\"{custom_id}\"]}}"
    );
    let line = serde_json::json!({"id": format!("batch_req_{custom_id}"), "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": "req", "body": {"choices": [{"index": 0,
            "finish_reason": "stop", "message": {"role": "assistant", "content": content, "refusal": null}}]}},
        "error": null});
    writeln!(out, "{line}")?;
    Ok(())
}

async fn prepare(input: &Path, dir: &Path, duckdb: DuckdbLimits) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("requests"))?;
    let indexed = dir.join("indexed.parquet");
    let info = table::index_input(input, &indexed, &Default::default(), &duckdb)?;
    let store = Store::from_url(&dir.join("requests").to_string_lossy())?;
    let limits = ShardLimits {
        max_requests: 50_000,
        max_bytes: 200 * 1024 * 1024,
        max_cell_bytes: 1024 * 1024,
        min_requests: 1,
    };
    let prepared = prepare_shards(
        &store,
        &spec(),
        &info.columns,
        &indexed,
        limits,
        1,
        None,
        None,
        |key| format!("{}.jsonl", key.file_stem()),
        duckdb,
    )
    .await?;
    for requests in shard_files(&dir.join("requests"), ".jsonl")? {
        let output = PathBuf::from(requests.to_string_lossy().replace(".jsonl", ".output"));
        let mut out = BufWriter::new(std::fs::File::create(output)?);
        for line in std::io::BufReader::new(std::fs::File::open(&requests)?).lines() {
            answer_line(&line?, &mut out)?;
        }
        out.flush()?;
    }
    let stats = prepared.stats;
    eprintln!(
        "prepared {} rows, {} requests in {} shards",
        stats.rows, stats.requests, stats.shards
    );
    Ok(())
}

fn merge(dir: &Path, duckdb: &DuckdbLimits) -> anyhow::Result<()> {
    let started = Instant::now();
    let spec = spec();
    let rows_dir = dir.join("rows");
    std::fs::create_dir_all(&rows_dir)?;
    // Like the merger service (concurrency 2): shards are validated two at a time.
    let shards = shard_files(&dir.join("requests"), ".jsonl")?;
    let merged = std::sync::atomic::AtomicU64::new(0);
    let merge_shard = |shard: usize, requests_path: &PathBuf| -> anyhow::Result<PathBuf> {
        let requests = std::fs::read(requests_path)?;
        let output = std::fs::read(requests_path.to_string_lossy().replace(".jsonl", ".output"))?;
        let ended = BatchEnded {
            key: ShardKey {
                job_id: "bench".into(),
                attempt: 1,
                shard: shard as u32,
            },
            provider: "openai".into(),
            batch_id: "bench".into(),
            status: "completed".into(),
            output_path: None,
            errors_path: None,
            failure: None,
        };
        let shard_rows = merge_lines(&requests, &[&output], &ended, &spec.fields)?;
        merged.fetch_add(
            shard_rows.tally.succeeded + shard_rows.tally.failed,
            std::sync::atomic::Ordering::Relaxed,
        );
        let rows_file = rows_dir.join(format!("a1-s{shard}.parquet"));
        table::write_rows(&rows_file, &spec.fields, 1, &shard_rows.rows, duckdb)?;
        Ok(rows_file)
    };
    let mut rows_files: Vec<PathBuf> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let shards = &shards;
                let merge_shard = &merge_shard;
                scope.spawn(move || -> anyhow::Result<Vec<PathBuf>> {
                    shards
                        .iter()
                        .enumerate()
                        .filter(|(shard, _)| shard % 2 == worker)
                        .map(|(shard, path)| merge_shard(shard, path))
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
            .collect::<anyhow::Result<Vec<Vec<PathBuf>>>>()
            .map(|lists| lists.into_iter().flatten().collect())
    })?;
    rows_files.sort();
    let merged = merged.into_inner();
    let validated = started.elapsed().as_secs_f64();
    let outputs = FinalOutputs {
        enriched_csv: Some(dir.join("enriched.csv")),
        enriched_parquet: Some(dir.join("enriched.parquet")),
        enriched_jsonl: None,
        failures_csv: dir.join("failures.csv"),
        csv_formula_escape: true,
        cache_segment: None,
        cache_last_attempt: u32::MAX,
    };
    let counts = table::finalize(
        &dir.join("indexed.parquet"),
        &rows_files,
        None,
        None,
        None,
        &spec.fields,
        &outputs,
        duckdb,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "merge rows={merged} enriched={} failed={} seconds={seconds:.2} validate_seconds={validated:.2} rows_per_s={:.0}",
        counts.enriched_rows,
        counts.failed_rows,
        merged as f64 / seconds
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let duckdb = Settings::from_env()?.duckdb.limits();
    match args.get(1).map(String::as_str) {
        Some("prepare") if args.len() == 4 => {
            prepare(Path::new(&args[2]), Path::new(&args[3]), duckdb).await
        }
        Some("merge") if args.len() == 3 => merge(Path::new(&args[2]), &duckdb),
        _ => anyhow::bail!("usage: merge_bench prepare INPUT.csv DIR | merge_bench merge DIR"),
    }
}
