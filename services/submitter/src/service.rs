//! The submitter loop: one durable consumer on `rowsmith.shards.ready`.

use std::sync::Arc;

use rowsmith_bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, run_worker};
use rowsmith_config::Settings;
use rowsmith_contract::messages::subjects;
use rowsmith_providers::Providers;
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::Submitter;
use crate::handler::handle;

pub fn consumer_spec(settings: &Settings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "submitter",
        filter_subject: subjects::SHARDS_READY,
        ack_wait: settings.submitter.ack_wait,
        // Held-back shards are redelivered until the quota frees up, so deliveries are not
        // counted against them; permanent errors still fail the job at once.
        max_deliver: -1,
        max_ack_pending: 1_000,
    }
}

/// Runs the submitter service until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = Bus::connect_retrying(
        &settings.nats,
        "rowsmith-submitter",
        &shutdown,
        CONNECT_PATIENCE,
    )
    .await?;
    let submitter = Arc::new(Submitter {
        bus: bus.clone(),
        store: Store::open(&settings.store)?,
        providers: Providers::from_settings(&settings)?,
        quota: settings.quota.clone(),
        creation: settings.creation.clone(),
        chaos_crash_after_create: settings.submitter.chaos_crash_after_create,
    });
    let spec = consumer_spec(&settings);
    let consumer = bus.work_consumer(&spec).await?;
    run_worker(
        consumer,
        spec,
        settings.submitter.concurrency,
        shutdown,
        move |delivery| {
            let submitter = submitter.clone();
            async move { handle(&submitter, delivery).await }
        },
    )
    .await?;
    Ok(())
}
