//! `rowsmith result`: copy a job's outputs out of the store: a completed job's, or the
//! partial outputs of a cancelled or suspended one (said so on stderr).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use rowsmith_contract::records::{JobRecord, JobState};
use rowsmith_store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub job_id: String,
    /// A .csv or .parquet file for the enriched table, or a directory for every output.
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let job = super::read_job(&bus, &args.job_id).await?;
    let store = Store::open(&settings.store)?;
    for path in write_result(&store, &job, &args.out).await? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the outputs; returns the files written.
pub async fn write_result(
    store: &Store,
    job: &JobRecord,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let outputs = &job.outputs;
    let partial = matches!(job.state, JobState::Cancelled | JobState::Suspended);
    if !(job.state == JobState::Completed || partial) || outputs.failures_csv.is_none() {
        let later = match job.state {
            JobState::Suspended => "; its partial outputs are being written, try again shortly",
            _ => "",
        };
        bail!(
            "job {} is {} and has no result{later}{}",
            job.spec.id(),
            crate::output::state_name(job),
            job.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    if partial {
        eprintln!(
            "job {} is {}: these outputs are partial; rows not done are in failures.csv \
             (`{}`)",
            job.spec.id(),
            crate::output::state_name(job),
            match job.state {
                JobState::Suspended => "pending",
                _ => "cancelled",
            }
        );
    }
    let extension = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let single = match extension {
        "csv" => Some(
            outputs
                .enriched_csv
                .as_ref()
                .context("the job wrote no CSV (see options.output_formats)")?,
        ),
        "parquet" => Some(
            outputs
                .enriched_parquet
                .as_ref()
                .context("the job wrote no Parquet (see options.output_formats)")?,
        ),
        "jsonl" => Some(
            outputs
                .enriched_jsonl
                .as_ref()
                .context("the job wrote no JSONL (see options.output_formats)")?,
        ),
        _ => None,
    };
    let mut written = Vec::new();
    if let Some(key) = single {
        copy_out(store, key, out).await?;
        written.push(out.to_owned());
        return Ok(written);
    }
    tokio::fs::create_dir_all(out)
        .await
        .with_context(|| format!("cannot create {}", out.display()))?;
    let all = [
        &outputs.enriched_csv,
        &outputs.enriched_parquet,
        &outputs.enriched_jsonl,
        &outputs.failures_csv,
        &outputs.manifest,
    ];
    for key in all.into_iter().flatten() {
        let name = key.rsplit('/').next().unwrap_or(key);
        let path = out.join(name);
        copy_out(store, key, &path).await?;
        written.push(path);
    }
    Ok(written)
}

/// Streams one output to `path` (never whole in memory).
async fn copy_out(store: &Store, key: &str, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await?;
    }
    store
        .download(key, path)
        .await
        .with_context(|| format!("cannot write {}", path.display()))
}
