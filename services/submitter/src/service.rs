//! The submitter's settings and loop: one durable consumer on `rowsmith.shards.ready`.

use std::sync::Arc;

use rowsmith_bus::ConsumerSpec;
use rowsmith_config::{
    CreationSettings, ProcessSettings, ProviderSettings, QuotaSettings, Settings, WorkerSettings,
};
use rowsmith_contract::messages::subjects;
use rowsmith_providers::Providers;
use rowsmith_runtime::{ServiceSettings, connect, run_service};
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::Submitter;
use crate::handler::handle;

/// What the submitter reads of the configuration: the provider clients (it uploads and
/// creates batches), the enqueued-token quota and the creation lease.
#[derive(Debug, Clone)]
pub struct Config {
    pub process: ProcessSettings,
    pub provider: ProviderSettings,
    pub submitter: WorkerSettings,
    pub quota: QuotaSettings,
    pub creation: CreationSettings,
}

impl ServiceSettings for Config {
    fn from_settings(settings: Settings) -> Self {
        Self {
            process: ProcessSettings::of(&settings),
            provider: settings.provider,
            submitter: settings.submitter,
            quota: settings.quota,
            creation: settings.creation,
        }
    }
    fn process(&self) -> &ProcessSettings {
        &self.process
    }
}

pub fn consumer_spec(submitter: &WorkerSettings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "submitter",
        filter_subject: subjects::SHARDS_READY,
        ack_wait: submitter.ack_wait,
        // Held-back shards are redelivered until the quota frees up, so deliveries are not
        // counted against them; permanent errors still fail the job at once.
        max_deliver: -1,
        max_ack_pending: 1_000,
    }
}

/// Runs the submitter service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The keys are read here, by the two services that call providers, and nowhere else.
    let mut provider = config.provider.clone();
    provider.load_keys(&std::env::vars().collect())?;
    let bus = connect(&config.process, "rowsmith-submitter", &shutdown).await?;
    let submitter = Arc::new(Submitter {
        bus: bus.clone(),
        store: Store::open(&config.process.store)?,
        providers: Providers::from_settings(&provider)?,
        quota: config.quota.clone(),
        creation: config.creation.clone(),
        chaos_crash_after_create: config.submitter.chaos_crash_after_create,
        abandoned: Default::default(),
    });
    let spec = consumer_spec(&config.submitter);
    let concurrency = config.submitter.concurrency;
    run_service(
        &bus,
        spec,
        concurrency,
        shutdown,
        submitter,
        |submitter, delivery| async move { handle(&submitter, delivery).await },
    )
    .await
}
