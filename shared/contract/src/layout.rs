//! Where a job's objects live in the store (DESIGN.md §3).

use crate::messages::ShardKey;

pub fn job_dir(job_id: &str) -> String {
    format!("jobs/{job_id}")
}
pub fn indexed(job_id: &str) -> String {
    format!("jobs/{job_id}/input.indexed.parquet")
}
pub fn requests(key: &ShardKey) -> String {
    format!("jobs/{}/requests/{}.jsonl", key.job_id, key.file_stem())
}
pub fn results_output(key: &ShardKey) -> String {
    format!(
        "jobs/{}/results/{}.output.jsonl",
        key.job_id,
        key.file_stem()
    )
}
pub fn results_errors(key: &ShardKey) -> String {
    format!(
        "jobs/{}/results/{}.errors.jsonl",
        key.job_id,
        key.file_stem()
    )
}
/// Where a batch's downloaded output and error files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultPaths {
    pub output: String,
    pub errors: String,
}

impl ResultPaths {
    /// The files of the shard attempt's recorded batch.
    pub fn of_shard(key: &ShardKey) -> Self {
        Self {
            output: results_output(key),
            errors: results_errors(key),
        }
    }

    /// The files of an orphan: a second batch made for the same shard attempt.
    pub fn of_orphan(key: &ShardKey, batch_id: &str) -> Self {
        let stem = format!("{}.orphan-{}", key.file_stem(), path_token(batch_id));
        Self {
            output: format!("jobs/{}/results/{stem}.output.jsonl", key.job_id),
            errors: format!("jobs/{}/results/{stem}.errors.jsonl", key.job_id),
        }
    }
}

/// `text` as one path segment: characters other than letters, digits, `-` and `_` become `_`.
fn path_token(text: &str) -> String {
    text.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '_',
            },
        )
        .collect()
}

pub fn duplicates(job_id: &str) -> String {
    format!("jobs/{job_id}/duplicates.parquet")
}
pub fn rows(key: &ShardKey) -> String {
    format!("jobs/{}/rows/{}.parquet", key.job_id, key.file_stem())
}
pub fn output(job_id: &str, file: &str) -> String {
    format!("jobs/{job_id}/output/{file}")
}
/// Where the CLI stages a local input: by job and content, so a second submission with
/// other content never overwrites the first's.
pub fn upload(job_id: &str, content_hash: &str, file_name: &str) -> String {
    format!("inputs/{job_id}/{content_hash}/{file_name}")
}
/// `(row, body hash)` of each distinct request a job sent or took from the cache.
pub fn hashes(job_id: &str) -> String {
    format!("jobs/{job_id}/hashes.parquet")
}
/// The rows a job took from the result cache, as a rows file of attempt 0.
pub fn cached_rows(job_id: &str) -> String {
    format!("jobs/{job_id}/cached.parquet")
}
/// The result cache of one request template (`fingerprint`): one segment per job.
pub fn cache_dir(fingerprint: &str) -> String {
    format!("cache/{fingerprint}/")
}
pub fn cache_segment(fingerprint: &str, job_id: &str) -> String {
    format!("cache/{fingerprint}/{job_id}.parquet")
}
