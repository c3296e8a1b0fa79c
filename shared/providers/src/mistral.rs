//! Mistral batch jobs (`/v1/batch/jobs`): the shard is uploaded through Mistral's Files API
//! (the same multipart upload as OpenAI's, purpose `batch`), the job names the model and the
//! endpoint and carries the shard key in its `metadata`, and its output lines are OpenAI's
//! (`custom_id`, `response: {status_code, body}`).

use std::collections::HashMap;

use reqwest::RequestBuilder;
use secrecy::SecretString;
use serde::Deserialize;

use super::http::{Endpoint, Http};
use super::openai::{OpenAiClient, SHARD_METADATA_KEY, tagged_for};
use super::{
    BatchProvider, BatchRef, BatchState, BatchStatus, CreateWindow, Limits, ProviderError,
    ResultFiles, ShardLines,
};
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::Store;
use rowsmith_store::layout::ResultPaths;

#[derive(Debug, Clone)]
pub struct MistralClient {
    api: Endpoint,
    /// Uploads and file downloads: Mistral's Files API speaks OpenAI's.
    files: OpenAiClient,
}

/// A batch job; only what rowsmith reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file: Option<String>,
    #[serde(default)]
    pub error_file: Option<String>,
    #[serde(default)]
    pub errors: Vec<JobError>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    pub total_requests: u64,
    #[serde(default)]
    pub succeeded_requests: u64,
    #[serde(default)]
    pub failed_requests: u64,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub count: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct JobList {
    #[serde(default)]
    data: Vec<Job>,
}

/// Jobs asked for per page of a listing.
const PAGE_SIZE: usize = 100;

impl MistralClient {
    /// The body of `POST /batch/jobs` for shard attempt `key`'s uploaded file, with the
    /// attempt's model, tagged with the shard.
    pub fn create_request(key: &ShardKey, model: &str, file_id: &str) -> serde_json::Value {
        serde_json::json!({
            "input_files": [file_id],
            "endpoint": "/v1/chat/completions",
            "model": model,
            "metadata": {SHARD_METADATA_KEY: key.dotted(), "rowsmith_job": key.job_id},
            "timeout_hours": 24,
        })
    }

    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: std::time::Duration,
    ) -> Result<Self, ProviderError> {
        let http = Http::new("mistral", timeout, std::time::Duration::from_secs(120))?;
        let authorize = |request: RequestBuilder, key: &str| request.bearer_auth(key);
        Ok(Self {
            files: OpenAiClient::new("mistral", base_url, api_key.clone(), timeout)?,
            api: Endpoint::new(http, base_url, api_key, authorize),
        })
    }

    pub fn has_key(&self) -> bool {
        self.api.has_key()
    }

    pub async fn retrieve(&self, id: &str) -> Result<Job, ProviderError> {
        let url = self.api.url(&format!("/batch/jobs/{id}"));
        let response = self
            .api
            .send("retrieve batch job", |http| http.get(&url))
            .await?;
        self.api.http.json("retrieve batch job", response).await
    }

    async fn list_page(&self, page: usize) -> Result<JobList, ProviderError> {
        let url = self
            .api
            .url(&format!("/batch/jobs?page={page}&page_size={PAGE_SIZE}"));
        let response = self
            .api
            .send("list batch jobs", |http| http.get(&url))
            .await?;
        self.api.http.json("list batch jobs", response).await
    }
}

impl Job {
    pub fn to_status(&self) -> BatchStatus {
        let state = match self.status.as_str() {
            "QUEUED" => BatchState::Validating,
            "RUNNING" => BatchState::InProgress,
            "SUCCESS" => BatchState::Completed,
            "FAILED" => BatchState::Failed,
            "TIMEOUT_EXCEEDED" => BatchState::Expired,
            "CANCELLATION_REQUESTED" => BatchState::Cancelling,
            "CANCELLED" => BatchState::Cancelled,
            other => BatchState::Other(other.to_owned()),
        };
        BatchStatus {
            state,
            total: self.total_requests,
            completed: self.succeeded_requests,
            failed: self.failed_requests,
            output_file_id: self.output_file.clone(),
            error_file_id: self.error_file.clone(),
            errors: self
                .errors
                .iter()
                .map(|e| match e.count {
                    Some(count) => format!("error: {} ({count} requests)", e.message),
                    None => format!("error: {}", e.message),
                })
                .collect(),
        }
    }
}

impl BatchProvider for MistralClient {
    fn name(&self) -> &str {
        "mistral"
    }

    fn limits(&self) -> Limits {
        rowsmith_contract::providers::MISTRAL
    }

    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        self.files.upload(key, lines).await
    }

    async fn create(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
        _lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let url = self.api.url("/batch/jobs");
        let body = Self::create_request(key, model, file_id);
        let job: Job = self
            .api
            .create("create batch job", |http| http.post(&url).json(&body))
            .await?;
        Ok(BatchRef { id: job.id })
    }

    /// Pages newest first until past the window, matching the shard key in the metadata;
    /// a failed job is never one to keep.
    async fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let wanted = key.dotted();
        let mut found = Vec::new();
        for page in 0.. {
            let list = self.list_page(page).await?;
            let mut past_window = false;
            for job in &list.data {
                if window.is_before(job.created_at.saturating_mul(1000)) {
                    past_window = true;
                    break;
                }
                if tagged_for(job.metadata.as_ref(), &wanted) && job.status != "FAILED" {
                    found.push(BatchRef { id: job.id.clone() });
                }
            }
            if past_window || list.data.len() < PAGE_SIZE {
                break;
            }
        }
        found.reverse();
        Ok(found)
    }

    fn tags_batches(&self) -> bool {
        true
    }

    async fn status(&self, batch: &BatchRef) -> Result<BatchStatus, ProviderError> {
        Ok(self.retrieve(&batch.id).await?.to_status())
    }

    async fn download(
        &self,
        status: &BatchStatus,
        store: &Store,
        into: &ResultPaths,
    ) -> Result<ResultFiles, ProviderError> {
        self.files.download(status, store, into).await
    }

    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        let url = self.api.url(&format!("/batch/jobs/{}/cancel", batch.id));
        self.api
            .send("cancel batch job", |http| http.post(&url))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_status_maps_to_a_state() {
        let job = |status: &str| Job {
            id: "j".into(),
            status: status.into(),
            output_file: None,
            error_file: None,
            errors: Vec::new(),
            metadata: None,
            total_requests: 3,
            succeeded_requests: 2,
            failed_requests: 1,
            created_at: 0,
        };
        let states: Vec<BatchState> = [
            "QUEUED",
            "RUNNING",
            "SUCCESS",
            "FAILED",
            "TIMEOUT_EXCEEDED",
            "CANCELLATION_REQUESTED",
            "CANCELLED",
        ]
        .iter()
        .map(|s| job(s).to_status().state)
        .collect();
        assert_eq!(
            states,
            [
                BatchState::Validating,
                BatchState::InProgress,
                BatchState::Completed,
                BatchState::Failed,
                BatchState::Expired,
                BatchState::Cancelling,
                BatchState::Cancelled
            ]
        );
        let status = job("SUCCESS").to_status();
        assert_eq!((status.total, status.completed, status.failed), (3, 2, 1));
    }
}
