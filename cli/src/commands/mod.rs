//! One module per verb.

pub mod cancel;
pub mod enrich;
pub mod estimate;
pub mod events;
pub mod list;
pub mod render;
pub mod result;
pub mod resume;
pub mod setup;
pub mod status;
pub mod submit;
pub mod up;
pub mod watch;

use anyhow::Context;

use rowsmith_bus::Bus;
use rowsmith_config::Settings;
use rowsmith_contract::records::{JobRecord, job_key};

pub fn settings() -> anyhow::Result<Settings> {
    Ok(Settings::from_env()?)
}

/// Connects as a client: the streams and the KV bucket are only looked up, never created or
/// changed (a laptop's settings must not rewrite a production topology; `rowsmith setup`
/// owns it).
pub async fn connect(settings: &Settings) -> anyhow::Result<Bus> {
    let mut nats = settings.nats.clone();
    nats.ensure_topology = false;
    connect_with(&nats).await
}

/// Connects and creates or updates the streams and the KV bucket (`setup`, `up`).
pub async fn connect_and_set_up(settings: &Settings) -> anyhow::Result<Bus> {
    let mut nats = settings.nats.clone();
    nats.ensure_topology = true;
    connect_with(&nats).await
}

async fn connect_with(nats: &rowsmith_config::NatsSettings) -> anyhow::Result<Bus> {
    Bus::connect(nats, "rowsmith-cli").await.with_context(|| {
        "is NATS running? start it and the services with `rowsmith up --sim`, or set ROWSMITH_NATS__URL"
    })
}

pub async fn read_job(bus: &Bus, job_id: &str) -> anyhow::Result<JobRecord> {
    match bus.read::<JobRecord>(&job_key(job_id)).await? {
        Some((job, _)) => Ok(job),
        None => anyhow::bail!("no job {job_id:?}; `rowsmith list` shows the jobs"),
    }
}
