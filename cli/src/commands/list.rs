//! `rowsmith list`: every job, newest first.

use std::process::ExitCode;

use rowsmith_contract::records::JobRecord;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON lines, one job record each.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let mut jobs = Vec::new();
    for key in bus.keys_with_prefix("job.").await? {
        if let Some((job, _)) = bus.read::<JobRecord>(&key).await? {
            jobs.push(job);
        }
    }
    jobs.sort_by_key(|job| std::cmp::Reverse(job.created_at_ms));
    if args.json {
        for job in &jobs {
            println!("{}", serde_json::to_string(job)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<10} {:>9} {:>9} {:>7} {:>8}",
        "JOB", "STATE", "ROWS", "DONE", "FAILED", "AGE"
    );
    let now = rowsmith_contract::now_unix_ms();
    for job in &jobs {
        let age_s = (now - job.created_at_ms).max(0) / 1000;
        let age = if age_s < 120 {
            format!("{age_s}s")
        } else if age_s < 7200 {
            format!("{}m", age_s / 60)
        } else {
            format!("{}h", age_s / 3600)
        };
        println!(
            "{:<28} {:<10} {:>9} {:>9} {:>7} {:>8}",
            job.spec.id(),
            crate::output::state_name(job),
            job.counts.rows_total,
            job.counts.succeeded,
            job.counts.failed,
            age
        );
    }
    Ok(ExitCode::SUCCESS)
}
