//! Ingest's settings and loop: one durable consumer on `rowsmith.jobs.submit`.

use std::collections::BTreeMap;
use std::sync::Arc;

use rowsmith_bus::ConsumerSpec;
use rowsmith_config::{
    CacheSettings, DuckdbSettings, LimitsSettings, OutputSettings, Price, ProcessSettings,
    Settings, WorkerSettings,
};
use rowsmith_contract::messages::subjects;
use rowsmith_runtime::{ServiceSettings, connect, run_service};
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Ingest, handle};

/// What ingest reads of the configuration: the job limits, DuckDB's, the outputs it writes
/// when the cache answers every row, the result cache and the prices of its estimate. No
/// provider settings: it calls no provider.
#[derive(Debug, Clone)]
pub struct Config {
    pub process: ProcessSettings,
    pub ingest: WorkerSettings,
    pub limits: LimitsSettings,
    pub output: OutputSettings,
    pub cache: CacheSettings,
    pub duckdb: DuckdbSettings,
    pub prices: BTreeMap<String, Price>,
}

impl ServiceSettings for Config {
    fn from_settings(settings: Settings) -> Self {
        Self {
            process: ProcessSettings::of(&settings),
            ingest: settings.ingest,
            limits: settings.limits,
            output: settings.output,
            cache: settings.cache,
            duckdb: settings.duckdb,
            prices: settings.prices,
        }
    }
    fn process(&self) -> &ProcessSettings {
        &self.process
    }
}

pub fn consumer_spec(ingest: &WorkerSettings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "ingest",
        filter_subject: subjects::JOBS_SUBMIT,
        ack_wait: ingest.ack_wait,
        max_deliver: ingest.max_deliver,
        max_ack_pending: 1_000,
    }
}

/// Runs the ingest service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = connect(&config.process, "rowsmith-ingest", &shutdown).await?;
    let ingest = Arc::new(Ingest {
        bus: bus.clone(),
        store: Store::open(&config.process.store)?,
        allowed_inputs: config.process.store.allowed_inputs.clone(),
        limits: config.limits.clone(),
        output: config.output.clone(),
        prices: config.prices.clone(),
        cache: config.cache.clone(),
        duckdb: config.duckdb.limits(),
    });
    let spec = consumer_spec(&config.ingest);
    run_service(
        &bus,
        spec,
        config.ingest.concurrency,
        shutdown,
        ingest,
        |ingest, delivery| async move { handle(&ingest, delivery).await },
    )
    .await
}
