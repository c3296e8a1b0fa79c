//! rowsmith's wire contract: what the services and the CLI say to each other and keep.
//! Messages and subjects, KV records and their transitions, events, the job spec with its
//! `--field` grammar, the object layout, the provider facts every service needs, and the
//! JSON Schemas of all of it (`proto/`). Plain data: no tokio, no NATS, no DuckDB. What a
//! rolling upgrade must keep compatible lives here and nowhere else.

pub mod events;
pub mod layout;
pub mod messages;
pub mod proto;
pub mod providers;
pub mod records;
pub mod spec;
pub mod step;

/// Milliseconds since the Unix epoch, the timestamp unit of every record and event.
pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
