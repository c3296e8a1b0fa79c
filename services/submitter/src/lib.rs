//! The submitter service: uploads each request shard and creates its provider batch exactly
//! once per (job, shard, attempt), then publishes `rowsmith.batches.submitted`.

pub mod creation;
pub mod handler;
pub mod service;

pub use handler::{Submitter, handle};
pub use service::run;
