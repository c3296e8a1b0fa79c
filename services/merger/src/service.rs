//! The merger loops: durable consumers on `rowsmith.batches.ended`, `rowsmith.jobs.suspended`
//! and `rowsmith.jobs.resume`, each a worker of its own.

use std::sync::Arc;

use rowsmith_bus::ConsumerSpec;
use rowsmith_config::{
    CacheSettings, DuckdbSettings, LimitsSettings, OutputSettings, ProcessSettings, Settings,
    WorkerSettings,
};
use rowsmith_contract::messages::subjects;
use rowsmith_runtime::{ServiceSettings, connect, run_service};
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

use crate::handler::{Merger, handle};
use crate::lifecycle::{handle_resume, handle_suspended};

/// What the merger reads of the configuration: the job limits (retry shards), the outputs,
/// the result cache and DuckDB's. No provider settings: it calls no provider.
#[derive(Debug, Clone)]
pub struct Config {
    pub process: ProcessSettings,
    pub merger: WorkerSettings,
    pub limits: LimitsSettings,
    pub output: OutputSettings,
    pub cache: CacheSettings,
    pub duckdb: DuckdbSettings,
}

impl ServiceSettings for Config {
    fn from_settings(settings: Settings) -> Self {
        Self {
            process: ProcessSettings::of(&settings),
            merger: settings.merger,
            limits: settings.limits,
            output: settings.output,
            cache: settings.cache,
            duckdb: settings.duckdb,
        }
    }
    fn process(&self) -> &ProcessSettings {
        &self.process
    }
}

pub fn consumer_spec(merger: &WorkerSettings) -> ConsumerSpec {
    ConsumerSpec {
        durable: "merger",
        filter_subject: subjects::BATCHES_ENDED,
        ack_wait: merger.ack_wait,
        max_deliver: merger.max_deliver,
        max_ack_pending: 1_000,
    }
}

/// The consumers of the job lifecycle messages (few, one per suspension or resume).
pub fn lifecycle_specs(merger: &WorkerSettings) -> [ConsumerSpec; 2] {
    let spec = |durable, filter_subject| ConsumerSpec {
        durable,
        filter_subject,
        ack_wait: merger.ack_wait,
        max_deliver: merger.max_deliver,
        max_ack_pending: 100,
    };
    [
        spec("merger-suspended", subjects::JOBS_SUSPENDED),
        spec("merger-resume", subjects::JOBS_RESUME),
    ]
}

/// Runs the merger service until `shutdown`: the merge loop and the two lifecycle loops.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = connect(&config.process, "rowsmith-merger", &shutdown).await?;
    let merger = Arc::new(Merger {
        bus: bus.clone(),
        store: Store::open(&config.process.store)?,
        limits: config.limits.clone(),
        output: config.output.clone(),
        cache: config.cache.clone(),
        duckdb: config.duckdb.limits(),
    });
    let [suspended, resume] = lifecycle_specs(&config.merger);
    let concurrency = config.merger.concurrency;
    tokio::try_join!(
        run_service(
            &bus,
            consumer_spec(&config.merger),
            concurrency,
            shutdown.clone(),
            merger.clone(),
            |merger, delivery| async move { handle(&merger, delivery).await }
        ),
        run_service(
            &bus,
            suspended,
            1,
            shutdown.clone(),
            merger.clone(),
            |merger, delivery| async move { handle_suspended(&merger, delivery).await }
        ),
        run_service(
            &bus,
            resume,
            1,
            shutdown,
            merger,
            |merger, delivery| async move { handle_resume(&merger, delivery).await }
        ),
    )?;
    Ok(())
}
