//! `rowsmith watch`: a progress bar from the job's events until it ends.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use rowsmith_bus::{Bus, EVENTS_STREAM};
use rowsmith_contract::events::Event;
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::{JobRecord, JobState, job_key};

/// How long `watch` waits for a job's record to appear before saying there is no such job.
const NO_RECORD_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    pub job_id: String,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    watch_job(&bus, &args.job_id).await
}

/// Follows the job's events (from its first) until a final one or `suspended`; exit 0 only
/// on completed.
pub async fn watch_job(bus: &Bus, job_id: &str) -> anyhow::Result<ExitCode> {
    let stream = bus.js.get_stream(EVENTS_STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.{job_id}.>", subjects::EVENTS_PREFIX),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut events = consumer.messages().await?;
    let interactive = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows  eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut check = tokio::time::interval(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let mut attempt = 1;
    loop {
        tokio::select! {
            next = events.next() => {
                let Some(next) = next else { break };
                let message = match next {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::debug!(%error, "event stream error");
                        continue;
                    }
                };
                let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else { continue };
                let counts = event.counts;
                bar.set_length(counts.rows_total.saturating_sub(counts.rows_skipped).max(1));
                bar.set_position(counts.succeeded + counts.failed);
                if let Some(shard) = &event.shard {
                    attempt = attempt.max(shard.attempt);
                }
                bar.set_message(format!(
                    "ok {} failed {} pending {} | batches {} running, {} ended | attempt {attempt} | {}",
                    counts.succeeded,
                    counts.failed,
                    counts.pending,
                    counts.shards_total.saturating_sub(counts.shards_ended),
                    counts.shards_ended,
                    event.kind.as_str()
                ));
                if interactive {
                    bar.println(format!("{}: {}", event.kind.as_str(), event.message));
                } else {
                    eprintln!("{}: {}", event.kind.as_str(), event.message);
                }
                // A `suspended` of a job resumed since is history: the record says whether the
                // job is still stopped.
                if event.kind.stops_the_job() && still_stopped(bus, job_id).await? {
                    bar.finish_and_clear();
                    return Ok(ended(bus, job_id).await);
                }
            }
            _ = check.tick() => {
                // The record is the truth should an event have been lost. A job just
                // submitted has no record until ingest accepts it.
                match bus.read::<JobRecord>(&job_key(job_id)).await? {
                    Some((job, _)) if job.state.is_stopped() => {
                        bar.finish_and_clear();
                        eprintln!("{}", crate::output::summary(&job));
                        return Ok(exit_code(&job));
                    }
                    Some(_) => {}
                    None if started.elapsed() > NO_RECORD_GRACE => {
                        bar.finish_and_clear();
                        anyhow::bail!(
                            "no job {job_id:?} after {}s: is ingest running? (`rowsmith list` shows the jobs)",
                            NO_RECORD_GRACE.as_secs()
                        );
                    }
                    None => {}
                }
            }
        }
    }
    anyhow::bail!("the event stream of job {job_id} ended unexpectedly")
}

/// Whether the job's record says it is stopped (ended, or suspended and not resumed since).
async fn still_stopped(bus: &Bus, job_id: &str) -> anyhow::Result<bool> {
    Ok(match bus.read::<JobRecord>(&job_key(job_id)).await? {
        Some((job, _)) => job.state.is_stopped(),
        None => true,
    })
}

/// Exit 0 only for a completed job. A suspended job (an end for `watch`: nothing more
/// happens until the user acts) exits 1 like a failed or cancelled one.
fn exit_code(job: &JobRecord) -> ExitCode {
    match job.state {
        JobState::Completed => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// The exit of `watch` after a job's last event; a suspended job says why and what to do.
async fn ended(bus: &Bus, job_id: &str) -> ExitCode {
    match bus.read::<JobRecord>(&job_key(job_id)).await {
        Ok(Some((job, _))) => {
            if job.state == JobState::Suspended {
                eprintln!("{}", crate::output::summary(&job));
            }
            exit_code(&job)
        }
        _ => ExitCode::from(1),
    }
}
