//! Together's Batch API: OpenAI's request lines and result files, with its own upload and
//! batch objects. A shard is uploaded in three steps (announce the file with its SHA-256 and
//! get a presigned URL, `PUT` the bytes there, ask Together to preprocess it; a file whose
//! checksum Together already holds is answered 409 with that file's id), a batch is created
//! from it (`{job, warning}` comes back), its status is upper case with a progress
//! percentage and no request counts, and a listing is a bare array. Batches carry no
//! metadata: reconciliation finds the shard's files by their name
//! (`rowsmith-<job>.<attempt>.<shard>.jsonl`) and the batches made from them.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::RequestBuilder;
use secrecy::SecretString;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::http::{Endpoint, Http, header};
use super::{
    BatchProvider, BatchRef, BatchState, BatchStatus, CreateWindow, Limits, OpenAiClient,
    ProviderError, ResultFiles, ShardLines,
};
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::Store;
use rowsmith_store::layout::ResultPaths;

const PROVIDER: &str = "together";

#[derive(Debug, Clone)]
pub struct TogetherClient {
    api: Endpoint,
    /// The same API with redirects answered, not followed: the file announce's 302 carries
    /// the presigned upload URL.
    announce: Endpoint,
    /// The same API as an OpenAI client: result files are read and batches cancelled the
    /// OpenAI way.
    files: OpenAiClient,
}

/// A batch job; only what rowsmith reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchJob {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// ISO 8601.
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Created {
    job: Option<BatchJob>,
    #[serde(default)]
    warning: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileResponse {
    id: String,
    #[serde(default)]
    filename: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileList {
    data: Vec<FileResponse>,
}

/// The answer to a 409 upload: the file Together already holds with that checksum.
#[derive(Debug, Deserialize)]
struct Existing {
    file_id: String,
}

/// The name a shard attempt's file is uploaded under: what reconciliation looks for.
pub fn file_name(key: &ShardKey) -> String {
    format!("rowsmith-{}.jsonl", key.dotted())
}

/// A Together status on rowsmith's scale.
pub fn state_of(status: &str) -> BatchState {
    match status {
        "VALIDATING" => BatchState::Validating,
        "IN_PROGRESS" => BatchState::InProgress,
        "COMPLETED" => BatchState::Completed,
        "EXPIRED" => BatchState::Expired,
        "FAILED" => BatchState::Failed,
        "CANCELLED" => BatchState::Cancelled,
        other => BatchState::Other(other.to_owned()),
    }
}

fn unix_ms(iso: &str) -> Option<i64> {
    let at =
        time::OffsetDateTime::parse(iso, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

impl BatchJob {
    pub fn to_status(&self) -> BatchStatus {
        let state = state_of(self.status.as_deref().unwrap_or(""));
        BatchStatus {
            errors: match (&state, &self.error) {
                (BatchState::Failed, Some(error)) => vec![format!("FAILED: {error}")],
                (BatchState::Failed, None) => vec!["FAILED: the batch failed".into()],
                _ => Vec::new(),
            },
            state,
            // Together gives a progress percentage, not counts.
            total: 0,
            completed: 0,
            failed: 0,
            output_file_id: self.output_file_id.clone(),
            error_file_id: self.error_file_id.clone(),
        }
    }
}

impl TogetherClient {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let http = Http::new(PROVIDER, timeout, Duration::from_secs(120))?;
        let announce = http.clone().passing_redirects(timeout)?;
        let bearer = |request: RequestBuilder, key: &str| request.bearer_auth(key);
        Ok(Self {
            api: Endpoint::new(http, base_url, api_key.clone(), bearer),
            announce: Endpoint::new(announce, base_url, api_key.clone(), bearer),
            files: OpenAiClient::new(PROVIDER, base_url, api_key, timeout)?,
        })
    }

    pub fn has_key(&self) -> bool {
        self.api.has_key()
    }

    /// The body of `POST /batches` for an uploaded file, with the attempt's model.
    pub fn create_request(model: &str, file_id: &str) -> serde_json::Value {
        serde_json::json!({
            "endpoint": "/v1/chat/completions",
            "input_file_id": file_id,
            "completion_window": "24h",
            "model_id": model,
        })
    }

    /// The SHA-256 of the lines, read once from the store.
    async fn checksum(lines: &ShardLines) -> Result<String, ProviderError> {
        use futures::StreamExt;
        let mut hasher = Sha256::new();
        let mut chunks = lines.chunks();
        while let Some(chunk) = chunks.next().await {
            hasher.update(&chunk?);
        }
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Announces the file: `Ok(Err(id))` when Together already holds it (409), else the
    /// presigned URL and the new file's id.
    async fn announce(
        &self,
        key: &ShardKey,
        checksum: &str,
    ) -> Result<Result<(String, String), String>, ProviderError> {
        let url = self.api.url("/files");
        let form = || {
            reqwest::multipart::Form::new()
                .text("purpose", "batch-api")
                .text("file_name", file_name(key))
                .text("file_type", "jsonl")
                .text("checksum", checksum.to_owned())
        };
        let sent = self
            .announce
            .send_unrepeatable("upload file", |http| http.post(&url).multipart(form()))
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(ProviderError::Http {
                status: 409,
                message,
                ..
            }) => {
                return match serde_json::from_str::<Existing>(&message) {
                    Ok(existing) => Ok(Err(existing.file_id)),
                    Err(error) => Err(ProviderError::Decode {
                        provider: PROVIDER.into(),
                        operation: "upload file",
                        source: format!("409 without a file id ({error}): {message}").into(),
                    }),
                };
            }
            Err(error) => return Err(error),
        };
        match (
            header(&response, "location"),
            header(&response, "x-together-file-id"),
        ) {
            (Some(location), Some(id)) => Ok(Ok((location, id))),
            _ => Err(ProviderError::Decode {
                provider: PROVIDER.into(),
                operation: "upload file",
                source: format!(
                    "HTTP {} without Location and X-Together-File-Id",
                    response.status()
                )
                .into(),
            }),
        }
    }

    /// The ids of the files uploaded for shard attempt `key`.
    async fn files_of(&self, key: &ShardKey) -> Result<HashSet<String>, ProviderError> {
        let url = self.api.url("/files");
        let response = self.api.send("list files", |http| http.get(&url)).await?;
        let files: FileList = self.api.http.json("list files", response).await?;
        let wanted = file_name(key);
        Ok(files
            .data
            .into_iter()
            .filter(|file| file.filename.as_deref() == Some(wanted.as_str()))
            .map(|file| file.id)
            .collect())
    }

    pub async fn retrieve(&self, batch_id: &str) -> Result<BatchJob, ProviderError> {
        let url = self.api.url(&format!("/batches/{batch_id}"));
        let response = self
            .api
            .send("retrieve batch", |http| http.get(&url))
            .await?;
        self.api.http.json("retrieve batch", response).await
    }
}

impl BatchProvider for TogetherClient {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn limits(&self) -> Limits {
        rowsmith_contract::providers::TOGETHER
    }

    /// Announce (with the checksum), `PUT` to the presigned URL (no API key: the URL is the
    /// credential), preprocess. The lines are read twice from the store, never held whole.
    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        let checksum = Self::checksum(&lines).await?;
        let (location, file_id) = match self.announce(key, &checksum).await? {
            Ok(fresh) => fresh,
            Err(existing) => return Ok(existing),
        };
        let length = lines.len();
        self.api
            .http
            .send("upload file", || {
                self.api
                    .http
                    .client
                    .put(&location)
                    .header(reqwest::header::CONTENT_LENGTH, length)
                    .body(lines.body())
            })
            .await?;
        let url = self.api.url(&format!("/files/{file_id}/preprocess"));
        let response = self
            .api
            .send("preprocess file", |http| http.post(&url))
            .await?;
        let file: FileResponse = self.api.http.json("preprocess file", response).await?;
        Ok(file.id)
    }

    async fn create(
        &self,
        _key: &ShardKey,
        model: &str,
        file_id: &str,
        _lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let url = self.api.url("/batches");
        let body = Self::create_request(model, file_id);
        let created: Created = self
            .api
            .create("create batch", |http| http.post(&url).json(&body))
            .await?;
        if let Some(warning) = created.warning.filter(|w| !w.is_empty()) {
            tracing::warn!(provider = PROVIDER, %warning, "Together answered the create with a warning");
        }
        match created.job {
            Some(job) => Ok(BatchRef { id: job.id }),
            None => Err(ProviderError::Unconfirmed {
                provider: PROVIDER.into(),
                operation: "create batch",
                source: "the answer holds no job".into(),
            }),
        }
    }

    /// The batches made from the shard attempt's files (the one it was uploaded as, which
    /// may be an earlier upload of the same bytes, and any named for it) within the window,
    /// oldest first; a failed one is never one to keep.
    async fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let mut files = self.files_of(key).await?;
        files.extend(window.file_id.clone());
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let url = self.api.url("/batches");
        let response = self.api.send("list batches", |http| http.get(&url)).await?;
        let jobs: Vec<BatchJob> = self.api.http.json("list batches", response).await?;
        let mut found: Vec<(i64, BatchRef)> = jobs
            .into_iter()
            .filter(|job| {
                job.input_file_id
                    .as_ref()
                    .is_some_and(|id| files.contains(id))
            })
            .filter(|job| job.status.as_deref() != Some("FAILED"))
            .filter_map(|job| {
                let created = job.created_at.as_deref().and_then(unix_ms)?;
                (!window.is_before(created)).then_some((created, BatchRef { id: job.id }))
            })
            .collect();
        found.sort_by_key(|(at, _)| *at);
        Ok(found.into_iter().map(|(_, batch)| batch).collect())
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

    /// A cancel of a batch that has ended is refused (400): then it is left as it is.
    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        match self.files.cancel(batch).await {
            Err(ProviderError::Http { status: 400, .. })
                if self
                    .retrieve(&batch.id)
                    .await?
                    .to_status()
                    .state
                    .is_terminal() =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_jobs_read_upper_case_statuses_and_keep_their_files() {
        let job: BatchJob = serde_json::from_value(serde_json::json!({
            "id": "b-1", "status": "COMPLETED", "progress": 100.0,
            "created_at": "2026-12-08T01:00:00Z", "input_file_id": "file-1",
            "output_file_id": "file-2", "error_file_id": null, "model_id": "m"}))
        .expect("decode");
        let status = job.to_status();
        assert_eq!(status.state, BatchState::Completed);
        assert_eq!(status.output_file_id.as_deref(), Some("file-2"));
        assert_eq!(state_of("IN_PROGRESS"), BatchState::InProgress);
        assert_eq!(
            state_of("in_progress"),
            BatchState::Other("in_progress".into())
        );
        let failed: BatchJob =
            serde_json::from_value(serde_json::json!({"id": "b-2", "status": "FAILED",
                "error": "input file is not valid JSONL"}))
            .expect("decode");
        assert_eq!(
            failed.to_status().errors,
            ["FAILED: input file is not valid JSONL"]
        );
    }
}
