//! What the simulator keeps of Bedrock model invocation jobs: plain data, so that the
//! simulator's state can hold it without its module importing the Bedrock handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use time::OffsetDateTime;

/// Bedrock's jobs, by their 12-character id, and what creation remembers.
#[derive(Debug, Default)]
pub struct BedrockState {
    pub(crate) jobs: HashMap<String, Job>,
    /// Job ids in creation order (list pages continue after an index here).
    pub(crate) order: Vec<String>,
    /// `clientRequestToken` → the job it created: a repeat returns that job.
    pub(crate) tokens: HashMap<String, String>,
    /// Creates answered with an earlier job because their token was seen before.
    pub(crate) idempotent_replays: u64,
    /// Jobs created as the first attempt of their shard: the ordinal of the next one, for
    /// `expire_shards`.
    pub(crate) first_attempt_jobs: u32,
    /// The control-plane requests as they arrived, for a signature check outside.
    pub(crate) requests: Vec<serde_json::Value>,
}

impl BedrockState {
    /// Jobs created (idempotent replays not counted).
    pub(crate) fn created(&self) -> usize {
        self.order.len()
    }

    /// Jobs a stop was asked for.
    pub(crate) fn stopped(&self) -> usize {
        self.jobs.values().filter(|j| j.stop.is_some()).count()
    }
}

/// One line of a job's input file.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) record_id: String,
    pub(crate) model_input: Value,
}

/// Where an S3 URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Location {
    pub(crate) bucket: String,
    /// The key (input) or prefix (output), without leading or trailing `/`.
    pub(crate) key: String,
}

/// A model invocation job as created, and how far it got.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) arn: String,
    pub(crate) name: String,
    pub(crate) model_id: String,
    pub(crate) token: Option<String>,
    pub(crate) role_arn: String,
    /// `inputDataConfig` and `outputDataConfig` as the create sent them.
    pub(crate) input_config: Value,
    pub(crate) output_config: Value,
    pub(crate) vpc_config: Option<Value>,
    pub(crate) timeout_hours: i64,
    pub(crate) invocation_type: String,
    pub(crate) input: S3Location,
    pub(crate) output: S3Location,
    /// The records read at create, or why validation fails the job.
    pub(crate) records: Result<Arc<Vec<Record>>, String>,
    /// The `rowsmith-shard` tag as the other APIs' metadata: `{"rowsmith_shard": ...}`.
    pub(crate) metadata: Option<Value>,
    /// The rowsmith job the tag names (`bedrock` without one) and the attempt.
    pub(crate) job_label: String,
    pub(crate) attempt: u32,
    pub(crate) created: Instant,
    pub(crate) submit_time: OffsetDateTime,
    /// Records processed before the job stops running (`expire_shards`): 0 ends it Expired,
    /// more PartiallyCompleted.
    pub(crate) expires_after: Option<usize>,
    pub(crate) stop: Option<Instant>,
    /// An ending whose files are being written: readers meanwhile see it still running.
    pub(crate) finishing: bool,
    pub(crate) ended: Option<Ended>,
}

/// The four record counters of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) total: u64,
    pub(crate) processed: u64,
    pub(crate) success: u64,
    pub(crate) error: u64,
}

/// A terminal state reached, its files (if any) written.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub(crate) status: &'static str,
    pub(crate) at: OffsetDateTime,
    pub(crate) counts: Counts,
    /// Why it failed (Failed only).
    pub(crate) message: Option<String>,
}
