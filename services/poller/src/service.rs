//! The poller's settings and loop: one durable consumer on `rowsmith.batches.submitted`,
//! shared by every poller replica; unlimited deliveries, since each check is a delivery.

use std::sync::Arc;

use rowsmith_bus::ConsumerSpec;
use rowsmith_config::{PollerSettings, ProcessSettings, ProviderSettings, QuotaSettings, Settings};
use rowsmith_contract::messages::subjects;
use rowsmith_providers::Providers;
use rowsmith_runtime::{ServiceSettings, connect, run_service};
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Poller, handle};

/// What the poller reads of the configuration: the provider clients (it checks and downloads
/// batches), its schedule and how long a quota hold-back waits.
#[derive(Debug, Clone)]
pub struct Config {
    pub process: ProcessSettings,
    pub provider: ProviderSettings,
    pub poller: PollerSettings,
    pub quota: QuotaSettings,
}

impl ServiceSettings for Config {
    fn from_settings(settings: Settings) -> Self {
        Self {
            process: ProcessSettings::of(&settings),
            provider: settings.provider,
            poller: settings.poller,
            quota: settings.quota,
        }
    }
    fn process(&self) -> &ProcessSettings {
        &self.process
    }
}

pub fn consumer_spec(poller: &PollerSettings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "poller",
        filter_subject: subjects::BATCHES_SUBMITTED,
        ack_wait: poller.ack_wait,
        max_deliver: -1,
        // Parked batches (NAKed with a delay) count against this; size it for all of them.
        max_ack_pending: poller.max_ack_pending,
    }
}

/// Runs the poller service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The keys are read here, by the two services that call providers, and nowhere else.
    let mut provider = config.provider.clone();
    provider.load_keys(&std::env::vars().collect())?;
    let bus = connect(&config.process, "rowsmith-poller", &shutdown).await?;
    let poller = Arc::new(Poller {
        bus: bus.clone(),
        store: Store::open(&config.process.store)?,
        providers: Providers::from_settings(&provider)?,
        schedule: config.poller.schedule()?,
        quota_wait: config.quota.wait,
        give_up_after: config.poller.completion_window + config.poller.grace,
    });
    let spec = consumer_spec(&config.poller);
    run_service(
        &bus,
        spec,
        config.poller.concurrency,
        shutdown,
        poller,
        |poller, delivery| async move { handle(&poller, delivery).await },
    )
    .await
}
