//! The merger loops: durable consumers on `rowsmith.batches.ended`, `rowsmith.jobs.suspended`
//! and `rowsmith.jobs.resume`, each a worker of its own.

use std::sync::Arc;

use rowsmith_bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, run_worker};
use rowsmith_config::Settings;
use rowsmith_contract::messages::subjects;
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Merger, handle};
use crate::lifecycle::{handle_resume, handle_suspended};

pub fn consumer_spec(settings: &Settings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "merger",
        filter_subject: subjects::BATCHES_ENDED,
        ack_wait: settings.merger.ack_wait,
        max_deliver: settings.merger.max_deliver,
        max_ack_pending: 1_000,
    }
}

/// The consumers of the job lifecycle messages (few, one per suspension or resume).
pub fn lifecycle_specs(settings: &Settings) -> [ConsumerSpec; 2] {
    let spec = |durable, filter_subject| ConsumerSpec {
        durable,
        filter_subject,
        ack_wait: settings.merger.ack_wait,
        max_deliver: settings.merger.max_deliver,
        max_ack_pending: 100,
    };
    [
        spec("merger-suspended", subjects::JOBS_SUSPENDED),
        spec("merger-resume", subjects::JOBS_RESUME),
    ]
}

/// Runs the merger service until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = Bus::connect_retrying(
        &settings.nats,
        "rowsmith-merger",
        &shutdown,
        CONNECT_PATIENCE,
    )
    .await?;
    let merger = Arc::new(Merger {
        bus: bus.clone(),
        store: Store::open(&settings.store)?,
        limits: settings.limits.clone(),
        output: settings.output.clone(),
        cache: settings.cache.clone(),
        duckdb: settings.duckdb.limits(),
    });
    let [suspended_spec, resume_spec] = lifecycle_specs(&settings);
    let (suspended, resumes) = (
        bus.work_consumer(&suspended_spec).await?,
        bus.work_consumer(&resume_spec).await?,
    );
    let spec = consumer_spec(&settings);
    let consumer = bus.work_consumer(&spec).await?;
    let (for_suspended, for_resumes) = (merger.clone(), merger.clone());
    let concurrency = settings.merger.concurrency;
    tokio::try_join!(
        run_worker(
            consumer,
            spec,
            concurrency,
            shutdown.clone(),
            move |delivery| {
                let merger = merger.clone();
                async move { handle(&merger, delivery).await }
            }
        ),
        run_worker(
            suspended,
            suspended_spec,
            1,
            shutdown.clone(),
            move |delivery| {
                let merger = for_suspended.clone();
                async move { handle_suspended(&merger, delivery).await }
            }
        ),
        run_worker(resumes, resume_spec, 1, shutdown, move |delivery| {
            let merger = for_resumes.clone();
            async move { handle_resume(&merger, delivery).await }
        }),
    )?;
    Ok(())
}
