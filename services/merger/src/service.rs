//! The merger loop: one durable consumer on `rowsmith.batches.ended`.

use std::sync::Arc;

use rowsmith_shared::bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, run_worker};
use rowsmith_shared::config::Settings;
use rowsmith_shared::messages::subjects;
use rowsmith_shared::providers::Providers;
use rowsmith_shared::storage::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Merger, handle};

pub fn consumer_spec(settings: &Settings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "merger",
        filter_subject: subjects::BATCHES_ENDED,
        ack_wait: settings.merger.ack_wait,
        max_deliver: settings.merger.max_deliver,
        max_ack_pending: 1_000,
    }
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
        providers: Providers::from_settings(&settings)?,
        limits: settings.limits.clone(),
        output: settings.output.clone(),
        cache: settings.cache.clone(),
        duckdb: settings.duckdb.limits(),
    });
    let spec = consumer_spec(&settings);
    let consumer = bus.work_consumer(&spec).await?;
    run_worker(
        consumer,
        spec,
        settings.merger.concurrency,
        shutdown,
        move |delivery| {
            let merger = merger.clone();
            async move { handle(&merger, delivery).await }
        },
    )
    .await?;
    Ok(())
}
