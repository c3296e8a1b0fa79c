//! The work messages between the services and the subjects they travel on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Subjects of the work stream (WorkQueue retention, one durable consumer each).
pub mod subjects {
    pub const JOBS_SUBMIT: &str = "rowsmith.jobs.submit";
    pub const SHARDS_READY: &str = "rowsmith.shards.ready";
    pub const BATCHES_SUBMITTED: &str = "rowsmith.batches.submitted";
    pub const BATCHES_ENDED: &str = "rowsmith.batches.ended";
    /// A user asks to continue a suspended job ([`super::ResumeJob`]).
    pub const JOBS_RESUME: &str = "rowsmith.jobs.resume";
    /// A service suspended a job; the merger writes its partial outputs
    /// ([`super::JobSuspended`]).
    pub const JOBS_SUSPENDED: &str = "rowsmith.jobs.suspended";
    /// Prefix of the events stream: `rowsmith.events.<job_id>.<kind>`.
    pub const EVENTS_PREFIX: &str = "rowsmith.events";
}

/// Identifies one shard attempt: the unit of one provider batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct ShardKey {
    pub job_id: String,
    /// 1-based attempt number; attempt 1 holds every row, later ones the rows to retry.
    pub attempt: u32,
    /// 0-based shard number within the attempt.
    pub shard: u32,
}

impl ShardKey {
    /// `<job>.<attempt>.<shard>`: KV key suffix, message-id suffix and batch metadata.
    pub fn dotted(&self) -> String {
        format!("{}.{}.{}", self.job_id, self.attempt, self.shard)
    }

    /// `a<attempt>-s<shard>`: the file stem in the object store.
    pub fn file_stem(&self) -> String {
        format!("a{}-s{}", self.attempt, self.shard)
    }
}

/// `rowsmith.shards.ready`: a request shard is in the store and waits to be submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShardReady {
    pub key: ShardKey,
    pub provider: String,
    /// Store key of the JSONL request file.
    pub requests_path: String,
    pub request_count: u64,
    pub bytes: u64,
}

/// `rowsmith.batches.submitted`: the provider holds the batch; the poller watches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchSubmitted {
    pub key: ShardKey,
    pub provider: String,
    pub batch_id: String,
    /// Unix milliseconds when the batch was created.
    pub submitted_at_ms: i64,
}

/// `rowsmith.batches.ended`: the batch reached a terminal state and its files are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BatchEnded {
    pub key: ShardKey,
    pub provider: String,
    pub batch_id: String,
    /// The provider's terminal status (`completed`, `expired`, `failed`, `cancelled`).
    pub status: String,
    /// Store key of the output lines, when the provider produced any.
    pub output_path: Option<String>,
    /// Store key of the error lines, when the provider produced any.
    pub errors_path: Option<String>,
    /// Why the batch failed as a whole (validation errors), when it did.
    pub failure: Option<String>,
}

/// `rowsmith.jobs.resume`: continue a suspended job once its cause is fixed. Rows already
/// answered are not sent again; batches still at the provider are watched again, never
/// created again. Publish with `Nats-Msg-Id` = `resume.<job_id>.<anything unique>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeJob {
    pub job_id: String,
}

/// `rowsmith.jobs.suspended`: a job was suspended; the merger writes its partial outputs
/// (or, when a cancel was asked for, ends it `cancelled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobSuspended {
    pub job_id: String,
    /// Why, as the job record's `error` says it.
    pub reason: String,
}
