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
