//! The merger service: validates every result line of an ended batch against the field
//! schema, records good and failed rows per shard, and when all shards of the job have ended
//! joins the results onto the table and writes the outputs.

pub mod handler;
pub mod lifecycle;
pub mod merge;
pub mod service;
pub mod validate;

pub use handler::{Merger, handle};
pub use service::{Config, run};
