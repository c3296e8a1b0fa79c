//! What the simulator holds of Together beyond the shared batch machinery: announced files
//! (with their checksum, and the bytes PUT to the presigned URL until they are preprocessed),
//! how each batch shows, and the counters of `/sim/stats`. Also the pure rules Together's
//! wire follows that the shared machinery needs: its chat parameters and the shard a file's
//! name gives.

use std::collections::HashMap;

use bytes::Bytes;

/// Together's files and batches beyond the shared machinery.
#[derive(Debug, Default)]
pub(crate) struct TogetherState {
    /// Files announced through `POST /together/v1/files`, by id.
    pub(crate) files: HashMap<String, TogetherFile>,
    /// Batches created through Together, by id.
    pub(crate) batches: HashMap<String, TogetherBatch>,
    /// `POST /files` answered 409 (a file with that checksum and purpose exists).
    pub(crate) uploads_deduplicated: u64,
}

impl TogetherState {
    pub(crate) fn created(&self) -> usize {
        self.batches.len()
    }
}

/// A file as announced: once preprocessed its bytes live in `SimState::files` under the same
/// id; until then the bytes PUT to the presigned URL wait in `uploaded`.
#[derive(Debug, Clone)]
pub(crate) struct TogetherFile {
    pub(crate) filename: String,
    /// The name these bytes were last announced under: a 409 keeps the file (and the name
    /// it shows) but a later shard attempt may announce the same bytes, and its batch then
    /// runs as that attempt.
    pub(crate) announced_as: String,
    pub(crate) purpose: String,
    pub(crate) file_type: String,
    /// The SHA-256 (hex) announced, if any: the PUT must match it.
    pub(crate) checksum: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) uploaded: Option<Bytes>,
    pub(crate) processed: bool,
}

/// What Together shows of a batch beyond the shared machinery.
#[derive(Debug, Clone)]
pub(crate) struct TogetherBatch {
    pub(crate) model: String,
    pub(crate) file_size: u64,
}

/// The chat completion body parameters Together declares (the `together` SDK 3.1.1's
/// `CompletionCreateParams`, `stream` included); a line with another is refused per request.
/// OpenAI's `max_completion_tokens` is not among them: Together's allowance is `max_tokens`.
pub(crate) const CHAT_PARAMETERS: &[&str] = &[
    "messages",
    "model",
    "chat_template_kwargs",
    "compliance",
    "context_length_exceeded_behavior",
    "echo",
    "frequency_penalty",
    "function_call",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "min_p",
    "n",
    "presence_penalty",
    "reasoning",
    "reasoning_effort",
    "repetition_penalty",
    "response_format",
    "safety_model",
    "seed",
    "stop",
    "temperature",
    "tool_choice",
    "tools",
    "top_k",
    "top_p",
    "stream",
];

/// The shard (`<job>.<attempt>.<shard>`) a file's name gives, when it is rowsmith's
/// `rowsmith-<job>.<attempt>.<shard>.jsonl` (job ids are `[A-Za-z0-9_-]{1,64}`).
pub(crate) fn shard_of_file_name(name: &str) -> Option<String> {
    let dotted = name.strip_prefix("rowsmith-")?.strip_suffix(".jsonl")?;
    let mut parts = dotted.rsplitn(3, '.');
    let shard: u32 = parts.next()?.parse().ok()?;
    let attempt: u32 = parts.next()?.parse().ok()?;
    let job = parts.next()?;
    let job_ok = (1..=64).contains(&job.len())
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    job_ok.then(|| format!("{job}.{attempt}.{shard}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowsmith_file_names_give_their_shard_and_others_none() {
        assert_eq!(
            shard_of_file_name("rowsmith-news_2026.2.13.jsonl").as_deref(),
            Some("news_2026.2.13")
        );
        assert_eq!(
            shard_of_file_name("rowsmith-a-b.1.0.jsonl").as_deref(),
            Some("a-b.1.0")
        );
        for other in [
            "batch.jsonl",
            "rowsmith-job.1.jsonl",
            "rowsmith-.1.0.jsonl",
            "rowsmith-j.x.0.jsonl",
            "rowsmith-j.1.0.csv",
            "rowsmith-a.b.1.0.jsonl",
        ] {
            assert_eq!(shard_of_file_name(other), None, "{other}");
        }
    }
}
