//! The submitter service: uploads each request shard and creates its provider batch exactly
//! once per (job, shard, attempt), then publishes `rowsmith.batches.submitted`.

pub mod creation;
pub mod handler;
pub mod service;

use rowsmith_bus::Bus;
use rowsmith_config::{CreationSettings, QuotaSettings};
use rowsmith_providers::Providers;
use rowsmith_store::Store;

/// What the submitter's steps share: the bus, the store, the provider clients and its knobs.
#[derive(Debug, Clone)]
pub struct Submitter {
    pub bus: Bus,
    pub store: Store,
    pub providers: Providers,
    pub quota: QuotaSettings,
    pub creation: CreationSettings,
    /// Testing only: probability of aborting right after a batch is created.
    pub chaos_crash_after_create: f64,
    /// The claims this process's deliveries left behind when they failed.
    pub abandoned: creation::AbandonedClaims,
}

pub use handler::handle;
pub use service::{Config, run};
