//! rowsmith's shared library: the contract between the services (messages, KV records,
//! subjects), configuration, the JetStream bus, the object store, the provider clients, and
//! the table code (DuckDB) that ingest, merger and the CLI's offline `render` share.

pub mod bus;
pub mod config;
pub mod events;
pub mod messages;
pub mod proto;
pub mod providers;
pub mod records;
pub mod render;
pub mod spec;
pub mod storage;
pub mod table;
pub mod telemetry;

/// Seconds since the Unix epoch, the timestamp unit of every record and event.
pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
