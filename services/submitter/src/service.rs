//! The submitter's settings and loop: one durable consumer on `rowsmith.shards.ready`.

use std::sync::Arc;

use rowsmith_bus::{Cas, ConsumerSpec};
use rowsmith_config::{
    CreationSettings, ProcessSettings, ProviderSettings, QuotaSettings, Settings, WorkerSettings,
};
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::{SUBMITTER_CAPABILITY_KEY, SubmitterCapability};
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
    announce_capability(&submitter).await;
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

/// Adds the providers this submitter holds a key for to `capability.submitter`, so that
/// ingest refuses a job for a provider no submitter can call. Best effort: without it ingest
/// accepts every job, and a keyless one stops at its first call.
pub async fn announce_capability(submitter: &Submitter) {
    let providers: std::collections::BTreeSet<String> = submitter
        .providers
        .with_keys()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let bus = &submitter.bus;
    let first = SubmitterCapability {
        providers: providers.clone(),
        updated_at_ms: rowsmith_contract::now_unix_ms(),
    };
    let announced = match bus.create(SUBMITTER_CAPABILITY_KEY, &first).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            bus.modify(
                SUBMITTER_CAPABILITY_KEY,
                |capability: &mut SubmitterCapability| -> Result<Cas<()>, rowsmith_bus::BusError> {
                    if providers.is_subset(&capability.providers) {
                        return Ok(Cas::Keep(()));
                    }
                    capability.providers.extend(providers.iter().cloned());
                    capability.updated_at_ms = rowsmith_contract::now_unix_ms();
                    Ok(Cas::Write(()))
                },
            )
            .await
        }
        Err(error) => Err(error),
    };
    match announced {
        Ok(()) => tracing::info!(?providers, "providers with an API key announced"),
        Err(error) => {
            tracing::warn!(%error, "could not announce the providers with an API key")
        }
    }
}
