//! Events: what happened to a job, for people and progress bars
//! (`rowsmith.events.<job_id>.<kind>` on the `ROWSMITH_EVENTS` stream).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Accepted,
    Refused,
    Ingested,
    ShardSubmitted,
    BatchProgress,
    ShardEnded,
    Retrying,
    Completed,
    Failed,
    Cancelled,
    /// Something the user should know that did not stop the job (odd result lines).
    Warning,
    /// An error after work was sent stopped the job; the message says why and what to do.
    /// Running batches are still collected; `rowsmith resume` continues.
    Suspended,
    /// `rowsmith resume` moved a suspended job back to running.
    Resumed,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::Accepted,
        EventKind::Refused,
        EventKind::Ingested,
        EventKind::ShardSubmitted,
        EventKind::BatchProgress,
        EventKind::ShardEnded,
        EventKind::Retrying,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Cancelled,
        EventKind::Warning,
        EventKind::Suspended,
        EventKind::Resumed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Refused => "refused",
            EventKind::Ingested => "ingested",
            EventKind::ShardSubmitted => "shard_submitted",
            EventKind::BatchProgress => "batch_progress",
            EventKind::ShardEnded => "shard_ended",
            EventKind::Retrying => "retrying",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Warning => "warning",
            EventKind::Suspended => "suspended",
            EventKind::Resumed => "resumed",
        }
    }

    /// Whether the job ends with this event.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EventKind::Completed | EventKind::Failed | EventKind::Cancelled
        )
    }

    /// Whether nothing more happens after this event without the user: a final event, or
    /// `suspended` (which waits for `rowsmith resume`).
    pub fn stops_the_job(self) -> bool {
        self.is_final() || self == EventKind::Suspended
    }
}

/// Row counts of a job as they stand at an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Counts {
    pub rows_total: u64,
    pub rows_skipped: u64,
    /// Rows whose request repeats an earlier row's: sent once, answered alike.
    #[serde(default)]
    pub rows_deduplicated: u64,
    /// Rows answered from the result cache of earlier jobs: not sent.
    #[serde(default)]
    pub rows_cached: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
    pub shards_total: u64,
    pub shards_ended: u64,
}

/// One thing that happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub job_id: String,
    pub kind: EventKind,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// A sentence for a person: what happened, and for failures what to do.
    pub message: String,
    pub counts: Counts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::messages::ShardKey>,
}

impl Event {
    pub fn new(job_id: &str, kind: EventKind, message: impl Into<String>, counts: Counts) -> Self {
        Self {
            job_id: job_id.to_owned(),
            kind,
            at_ms: crate::now_unix_ms(),
            message: message.into(),
            counts,
            shard: None,
        }
    }

    pub fn with_shard(mut self, shard: crate::messages::ShardKey) -> Self {
        self.shard = Some(shard);
        self
    }

    pub fn subject(&self) -> String {
        format!(
            "{}.{}.{}",
            crate::messages::subjects::EVENTS_PREFIX,
            self.job_id,
            self.kind.as_str()
        )
    }
}
