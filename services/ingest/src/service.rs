//! The ingest loop: one durable consumer on `rowsmith.jobs.submit`.

use std::sync::Arc;

use rowsmith_bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, run_worker};
use rowsmith_config::Settings;
use rowsmith_contract::messages::subjects;
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Ingest, handle};

pub fn consumer_spec(settings: &Settings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "ingest",
        filter_subject: subjects::JOBS_SUBMIT,
        ack_wait: settings.ingest.ack_wait,
        max_deliver: settings.ingest.max_deliver,
        max_ack_pending: 1_000,
    }
}

/// Runs the ingest service until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = Bus::connect_retrying(
        &settings.nats,
        "rowsmith-ingest",
        &shutdown,
        CONNECT_PATIENCE,
    )
    .await?;
    let ingest = Arc::new(Ingest {
        bus: bus.clone(),
        store: Store::open(&settings.store)?,
        allowed_inputs: settings.store.allowed_inputs.clone(),
        limits: settings.limits.clone(),
        output: settings.output.clone(),
        prices: settings.prices.clone(),
        cache: settings.cache.clone(),
        duckdb: settings.duckdb.limits(),
    });
    let spec = consumer_spec(&settings);
    let consumer = bus.work_consumer(&spec).await?;
    run_worker(
        consumer,
        spec,
        settings.ingest.concurrency,
        shutdown,
        move |delivery| {
            let ingest = ingest.clone();
            async move { handle(&ingest, delivery).await }
        },
    )
    .await?;
    Ok(())
}
