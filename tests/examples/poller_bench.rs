//! Benchmark of one poller replica holding many in-flight batches (run by `scripts/bench`):
//!   poller_bench POLLER_BINARY [BATCHES] [SECONDS]
//! Starts nats-server and the simulator (batches that stay in progress), creates BATCHES
//! batches, publishes one `batches.submitted` each, runs the release `rowsmith-poller` as its
//! own process with a fixed 5 s schedule for SECONDS, and reports how late the status checks
//! came (from the `batch_progress` events) and the poller's CPU.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use bytes::Bytes;
use futures::StreamExt;
use rowsmith_bus::{Bus, EVENTS_STREAM};
use rowsmith_config::{NatsSettings, SimSettings};
use rowsmith_contract::events::Event;
use rowsmith_contract::messages::{BatchSubmitted, ShardKey, subjects};
use rowsmith_contract::records::{JobRecord, JobState, job_key};
use rowsmith_contract::spec::JobSpec;
use rowsmith_providers::{BatchProvider, OpenAiClient};
use rowsmith_tests::NatsServer;
use tokio_util::sync::CancellationToken;

const SCHEDULE: Duration = Duration::from_secs(5);

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the stat line (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let poller_binary = args
        .get(1)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("usage: poller_bench POLLER_BINARY [BATCHES] [SECONDS]"))?;
    let batches: u32 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(60);

    let nats = NatsServer::start();
    let shutdown = CancellationToken::new();
    let sim_settings = SimSettings {
        listen: "127.0.0.1:0".into(),
        rows_per_second: 1e-6,
        validating: Duration::ZERO,
        ..SimSettings::default()
    };
    let (sim, _) = rowsmith_provider_sim::start(sim_settings, shutdown.clone()).await?;
    let base_url = format!("http://{sim}/v1");
    let bus = Bus::connect(
        &NatsSettings {
            url: nats.url(),
            ..NatsSettings::default()
        },
        "poller-bench",
    )
    .await?;
    let spec = JobSpec::builder("inputs/none.csv", "x")
        .with_id("pollbench")
        .with_targets(["d"])
        .with_field_texts(["t:string"])?
        .with_provider("sim", "m");
    let mut record = JobRecord::new(spec);
    record.state = JobState::Running;
    bus.create(&job_key("pollbench"), &record).await?;

    // Create the batches (one uploaded file serves them all).
    let client = OpenAiClient::new("sim", &base_url, None, Duration::from_secs(30))?;
    let first = ShardKey {
        job_id: "pollbench".into(),
        attempt: 1,
        shard: 0,
    };
    let line = Bytes::from_static(b"{\"custom_id\":\"r0\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{}}\n");
    let file_id = client.upload(&first, line.clone().into()).await?;
    let created = Instant::now();
    let ids: Vec<(u32, String)> = futures::stream::iter(0..batches)
        .map(|shard| {
            let (client, file_id, line) = (client.clone(), file_id.clone(), line.clone());
            async move {
                let key = ShardKey {
                    job_id: "pollbench".into(),
                    attempt: 1,
                    shard,
                };
                client
                    .create(&key, "gpt-4o-mini", &file_id, line.into())
                    .await
                    .map(|batch| (shard, batch.id))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    eprintln!(
        "created {batches} batches in {:.1}s",
        created.elapsed().as_secs_f64()
    );
    for (shard, batch_id) in &ids {
        let message = BatchSubmitted {
            key: ShardKey {
                job_id: "pollbench".into(),
                attempt: 1,
                shard: *shard,
            },
            provider: "sim".into(),
            batch_id: batch_id.clone(),
            submitted_at_ms: rowsmith_contract::now_unix_ms(),
        };
        bus.publish(
            subjects::BATCHES_SUBMITTED,
            &format!("submitted.{shard}"),
            &message,
        )
        .await?;
    }

    let events = bus
        .js
        .get_stream(EVENTS_STREAM)
        .await?
        .create_consumer(OrderedConfig {
            filter_subject: "rowsmith.events.pollbench.batch_progress".into(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let mut events = events.messages().await?;
    let mut poller = std::process::Command::new(&poller_binary)
        .env("ROWSMITH_NATS__URL", nats.url())
        .env("ROWSMITH_PROVIDER__SIM__BASE_URL", &base_url)
        .env("ROWSMITH_POLLER__SCHEDULE", "5s")
        .env("ROWSMITH_POLLER__CONCURRENCY", "64")
        .env("ROWSMITH_LOG__LEVEL", "warn")
        .env(
            "ROWSMITH_STORE__URL",
            std::env::temp_dir()
                .join("poller-bench-store")
                .display()
                .to_string(),
        )
        .spawn()?;
    let started = Instant::now();
    let warmup = Duration::from_secs(15);
    let mut cpu_at_warmup = None;
    let mut last_check: HashMap<u32, i64> = HashMap::new();
    let mut lags_ms: Vec<f64> = Vec::new();
    let mut checks = 0u64;
    let end = started + Duration::from_secs(seconds);
    while Instant::now() < end {
        if cpu_at_warmup.is_none() && started.elapsed() >= warmup {
            cpu_at_warmup = Some((Instant::now(), cpu_seconds(poller.id())));
        }
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(1), events.next()).await
        else {
            continue;
        };
        let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
            continue;
        };
        let Some(shard) = event.shard.map(|k| k.shard) else {
            continue;
        };
        checks += 1;
        if let Some(previous) = last_check.insert(shard, event.at_ms)
            && started.elapsed() >= warmup
        {
            lags_ms.push((event.at_ms - previous) as f64 - SCHEDULE.as_millis() as f64);
        }
    }
    let (warm_at, warm_cpu) = cpu_at_warmup.unwrap_or((started, 0.0));
    let cores = (cpu_seconds(poller.id()) - warm_cpu) / warm_at.elapsed().as_secs_f64();
    let _ = poller.kill();
    let _ = poller.wait();
    shutdown.cancel();
    lags_ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "poller batches={batches} checks={checks} lag_p50_ms={:.0} lag_p99_ms={:.0} cpu_cores={cores:.2} seconds={seconds}",
        percentile(&lags_ms, 0.5),
        percentile(&lags_ms, 0.99)
    );
    Ok(())
}
