//! `rowsmith events [JOB]`: a job's events (or every job's), oldest first, like
//! `nats sub 'rowsmith.events.>'` with history; `--follow` keeps waiting for new ones.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;

use rowsmith_bus::EVENTS_STREAM;
use rowsmith_contract::events::Event;
use rowsmith_contract::messages::subjects;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this job's events.
    pub job_id: Option<String>,
    /// Keep printing new events until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// One JSON event per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let bus = super::connect(&settings).await?;
    let filter = match &args.job_id {
        Some(job_id) => format!("{}.{job_id}.>", subjects::EVENTS_PREFIX),
        None => format!("{}.>", subjects::EVENTS_PREFIX),
    };
    let consumer = bus
        .js
        .get_stream(EVENTS_STREAM)
        .await?
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        // Without --follow, stop once the history is read (nothing more within a moment).
        let next = if args.follow {
            messages.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(next) = next else { break };
        let message = match next {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%error, "event stream error");
                continue;
            }
        };
        let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
            continue;
        };
        if args.json {
            println!("{}", serde_json::to_string(&event)?);
        } else {
            let at = time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(event.at_ms) * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
            println!(
                "{at} {} {:<15} {}",
                event.job_id,
                event.kind.as_str(),
                event.message
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
