//! Job and shard records in the KV bucket `rowsmith-jobs`, and their legal transitions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::events::Counts;
use crate::messages::ShardKey;
use crate::spec::JobSpec;

pub const BUCKET: &str = "rowsmith-jobs";

pub fn job_key(job_id: &str) -> String {
    format!("job.{job_id}")
}

pub fn shard_key(key: &ShardKey) -> String {
    format!("shard.{}", key.dotted())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Accepted,
    Ingesting,
    Running,
    Merging,
    /// Stopped by an error after work was sent: running batches are still collected and
    /// merged, nothing new is sent, partial outputs are written; `rowsmith resume` continues.
    Suspended,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    /// The job ended for good: its record never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// Nothing more happens without the user: the job ended, or it is suspended until
    /// `rowsmith resume` (what `watch` waits for).
    pub fn is_stopped(self) -> bool {
        self.is_terminal() || self == JobState::Suspended
    }

    /// Whether a job may move from `self` to `next` (staying put is always allowed).
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        self == next
            || match self {
                Accepted => matches!(next, Ingesting | Failed | Cancelled),
                Ingesting => matches!(next, Running | Completed | Failed | Cancelled),
                Running => matches!(next, Merging | Suspended | Failed | Cancelled),
                Merging => matches!(next, Running | Suspended | Completed | Failed | Cancelled),
                // Resumed, or ended by a cancel; never `failed`: it has spent money.
                Suspended => matches!(next, Running | Cancelled),
                Completed | Failed | Cancelled => false,
            }
    }
}

/// Where a finished job's outputs are, as store keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Outputs {
    pub enriched_csv: Option<String>,
    pub enriched_parquet: Option<String>,
    #[serde(default)]
    pub enriched_jsonl: Option<String>,
    pub failures_csv: Option<String>,
    pub manifest: Option<String>,
}

/// `job.<job_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub state: JobState,
    pub counts: Counts,
    /// The current attempt (1-based).
    pub attempt: u32,
    /// Shards of each attempt; index 0 is attempt 1.
    pub shards_per_attempt: Vec<u32>,
    /// Shards of the current attempt whose rows are merged.
    pub merged_shards: Vec<u32>,
    /// Rows of the current attempt that failed in a way another attempt may fix.
    #[serde(default)]
    pub retryable_failed: u64,
    /// A user asked to cancel: no new batches, running ones cancelled, partial results kept.
    #[serde(default)]
    pub cancel_requested: bool,
    /// How often the job was resumed after a suspension; part of the message ids of what a
    /// resume publishes again, so the stream's duplicate window does not drop them.
    #[serde(default)]
    pub resumes: u32,
    /// Stream sequence of the resume message that last resumed the job: its redelivery
    /// finishes that resume instead of starting another.
    #[serde(default)]
    pub resumed_by: Option<u64>,
    /// Store key of the indexed table, once ingested.
    pub indexed_path: Option<String>,
    /// The work-stream sequence of the message whose handler writes the outputs: another
    /// message asking to finalize is a duplicate and does nothing; a redelivery of this one
    /// means its handler died or stalled, and it takes over.
    #[serde(default)]
    pub finalizing_by: Option<u64>,
    pub outputs: Outputs,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

impl JobRecord {
    pub fn new(spec: JobSpec) -> Self {
        let now = crate::now_unix_ms();
        Self {
            spec,
            state: JobState::Accepted,
            counts: Counts::default(),
            attempt: 1,
            shards_per_attempt: Vec::new(),
            merged_shards: Vec::new(),
            retryable_failed: 0,
            cancel_requested: false,
            resumes: 0,
            resumed_by: None,
            indexed_path: None,
            finalizing_by: None,
            outputs: Outputs::default(),
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
        }
    }

    /// Moves to `next`, refusing illegal transitions.
    pub fn transition(&mut self, next: JobState) -> Result<(), IllegalTransition> {
        if !self.state.can_become(next) {
            return Err(IllegalTransition {
                from: format!("{:?}", self.state),
                to: format!("{next:?}"),
            });
        }
        self.state = next;
        self.updated_at_ms = crate::now_unix_ms();
        if next.is_terminal() {
            self.finished_at_ms = Some(self.updated_at_ms);
        }
        Ok(())
    }

    /// Store key of the indexed table.
    pub fn indexed_key(&self) -> String {
        self.indexed_path
            .clone()
            .unwrap_or_else(|| crate::layout::indexed(self.spec.id()))
    }

    /// Whether work may be at the provider: the job's record lists a shard (it does from the
    /// moment ingest records and announces them). From then on an error suspends the job
    /// instead of failing it, since batches may be running and paid for.
    pub fn may_have_sent(&self) -> bool {
        self.shards_per_attempt.iter().any(|shards| *shards > 0)
    }

    /// Shards of the current attempt not merged yet.
    pub fn unmerged_shards(&self) -> Vec<u32> {
        (0..self.shards_in_attempt())
            .filter(|shard| !self.merged_shards.contains(shard))
            .collect()
    }

    pub fn shards_in_attempt(&self) -> u32 {
        let index = self.attempt.saturating_sub(1) as usize;
        self.shards_per_attempt.get(index).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition from {from} to {to}")]
pub struct IllegalTransition {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    Ready,
    Uploading,
    Submitted,
    Ended,
}

impl ShardState {
    pub fn can_become(self, next: ShardState) -> bool {
        use ShardState::*;
        self == next
            || matches!(
                (self, next),
                (Ready, Uploading | Ended)
                    | (Uploading, Submitted | Ended)
                    // Sent again after the provider refused it for its token quota.
                    | (Submitted, Uploading | Ended)
            )
    }
}

/// `shard.<job_id>.<attempt>.<n>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShardRecord {
    pub key: ShardKey,
    pub state: ShardState,
    pub provider: String,
    pub requests_path: String,
    pub request_count: u64,
    pub bytes: u64,
    pub provider_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub batch_status: Option<String>,
    pub output_path: Option<String>,
    pub errors_path: Option<String>,
    pub rows_path: Option<String>,
    pub succeeded: u64,
    pub failed: u64,
    /// How often the shard was sent again after a `token_limit_exceeded` failure.
    #[serde(default)]
    pub resubmissions: u32,
    /// Not to be submitted before this time (Unix ms), after a quota refusal.
    #[serde(default)]
    pub not_before_ms: Option<i64>,
    /// A submitter's claim on creating this shard attempt's batch; kept until the batch id
    /// is recorded, so a later delivery that finds it knows a create may have happened.
    #[serde(default)]
    pub creating: Option<CreateClaim>,
    /// Batches found for this shard attempt besides the recorded one: cancelled and
    /// reported, never silent.
    #[serde(default)]
    pub orphan_batches: Vec<String>,
    /// Of `orphan_batches`, those surely made by rowsmith for this shard attempt (so
    /// cancelled): the poller waits a while for them to end, and the merger takes from their
    /// answers the rows the recorded batch failed or never answered.
    #[serde(default)]
    pub own_orphans: Vec<String>,
    /// The downloaded result files of the own orphans that ended.
    #[serde(default)]
    pub orphan_results: Vec<OrphanResults>,
    /// When the poller first saw the recorded batch ended (Unix ms): own orphans are waited
    /// for until `ORPHAN_PATIENCE` after it.
    #[serde(default)]
    pub batch_ended_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// An ended orphan batch and where its result files are in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrphanResults {
    pub batch_id: String,
    pub status: String,
    pub output_path: Option<String>,
    pub errors_path: Option<String>,
}

/// Who is creating a shard's batch, since when, and until when the claim holds (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreateClaim {
    pub owner: String,
    pub since_ms: i64,
    pub until_ms: i64,
}

impl CreateClaim {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.until_ms > now_ms
    }
}

/// `capability.submitter`: the providers some submitter holds an API key for (never the keys),
/// so that ingest refuses a job no submitter could send instead of accepting it. Submitters
/// add to it when they start; nothing removes from it, so it may claim more than holds now
/// (the job then stops at its first provider call), never less.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SubmitterCapability {
    pub providers: std::collections::BTreeSet<String>,
    pub updated_at_ms: i64,
}

pub const SUBMITTER_CAPABILITY_KEY: &str = "capability.submitter";

/// `lease.create.<provider>`: for providers whose batches carry no shard key, one create at a
/// time, so that a claim's time window holds no other shard's batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreateMutex {
    pub owner: String,
    pub shard: String,
    pub until_ms: i64,
}

pub fn create_mutex_key(provider: &str) -> String {
    format!("lease.create.{provider}")
}

/// `batch.<provider>.<batch_id>`: the shard (`<job>.<attempt>.<n>`) a batch of a provider
/// without shard keys is recorded for, so reconciliation never takes it for another shard.
pub fn batch_owner_key(provider: &str, batch_id: &str) -> String {
    format!("batch.{provider}.{}", key_token(batch_id))
}

/// `text` as one KV key token: characters other than letters, digits, `-` and `_` become `_`.
fn key_token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl ShardRecord {
    /// Input tokens the shard's requests hold, estimated at four bytes a token.
    pub fn estimated_tokens(&self) -> u64 {
        self.bytes / 4
    }
}

pub fn quota_key(provider: &str, model: &str) -> String {
    format!("quota.{provider}.{}", key_token(model))
}

/// Tokens reserved in a model's enqueued-token quota, by shard (`<job>.<attempt>.<shard>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaRecord {
    pub reserved: std::collections::BTreeMap<String, u64>,
}

impl QuotaRecord {
    pub fn in_use(&self) -> u64 {
        self.reserved.values().sum()
    }
}

impl ShardRecord {
    pub fn transition(&mut self, next: ShardState) -> Result<(), IllegalTransition> {
        if !self.state.can_become(next) {
            return Err(IllegalTransition {
                from: format!("{:?}", self.state),
                to: format!("{next:?}"),
            });
        }
        self.state = next;
        self.updated_at_ms = crate::now_unix_ms();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_jobs_never_move() {
        for terminal in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert!(!terminal.can_become(JobState::Running));
            assert!(!terminal.can_become(JobState::Accepted));
        }
        assert!(JobState::Accepted.can_become(JobState::Ingesting));
        assert!(!JobState::Accepted.can_become(JobState::Merging));
        assert!(!ShardState::Ended.can_become(ShardState::Submitted));
        assert!(ShardState::Uploading.can_become(ShardState::Submitted));
    }

    #[test]
    fn a_suspended_job_resumes_or_is_cancelled_but_never_fails() {
        assert!(JobState::Running.can_become(JobState::Suspended));
        assert!(JobState::Merging.can_become(JobState::Suspended));
        assert!(!JobState::Ingesting.can_become(JobState::Suspended));
        assert!(JobState::Suspended.can_become(JobState::Running));
        assert!(JobState::Suspended.can_become(JobState::Cancelled));
        assert!(!JobState::Suspended.can_become(JobState::Failed));
        assert!(!JobState::Suspended.can_become(JobState::Completed));
        assert!(JobState::Suspended.is_stopped() && !JobState::Suspended.is_terminal());
    }
}
