//! The ingest service: takes a JobSpec from `rowsmith.jobs.submit`, indexes the table, renders
//! one request per row into shards within the provider's limits, records the job and its
//! shards, and publishes one `rowsmith.shards.ready` per shard.

pub mod handler;
pub mod input;
pub mod service;

pub use handler::{Ingest, handle};
pub use service::{Config, run};
