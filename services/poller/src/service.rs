//! The poller loop: one durable consumer on `rowsmith.batches.submitted`, shared by every
//! poller replica; unlimited deliveries, since each check is a delivery.

use std::sync::Arc;

use rowsmith_bus::{Bus, CONNECT_PATIENCE, ConsumerSpec, run_worker};
use rowsmith_config::Settings;
use rowsmith_contract::messages::subjects;
use rowsmith_providers::Providers;
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Poller, handle};

pub fn consumer_spec(settings: &Settings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "poller",
        filter_subject: subjects::BATCHES_SUBMITTED,
        ack_wait: settings.poller.ack_wait,
        max_deliver: -1,
        // Parked batches (NAKed with a delay) count against this; size it for all of them.
        max_ack_pending: settings.poller.max_ack_pending,
    }
}

/// Runs the poller service until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = Bus::connect_retrying(
        &settings.nats,
        "rowsmith-poller",
        &shutdown,
        CONNECT_PATIENCE,
    )
    .await?;
    let poller = Arc::new(Poller {
        bus: bus.clone(),
        store: Store::open(&settings.store)?,
        providers: Providers::from_settings(&settings)?,
        schedule: settings.poller.schedule()?,
        quota_wait: settings.quota.wait,
        give_up_after: settings.poller.completion_window + settings.poller.grace,
    });
    let spec = consumer_spec(&settings);
    let consumer = bus.work_consumer(&spec).await?;
    run_worker(
        consumer,
        spec,
        settings.poller.concurrency,
        shutdown,
        move |delivery| {
            let poller = poller.clone();
            async move { handle(&poller, delivery).await }
        },
    )
    .await?;
    Ok(())
}
