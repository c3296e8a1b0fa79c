//! OpenAI Files + Batches client (`/v1/chat/completions` batches); any OpenAI-compatible
//! endpoint, including the simulator, by base URL.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{RequestBuilder, StatusCode};
use secrecy::SecretString;
use serde::Deserialize;

use super::http::{Endpoint, Http};
use super::{
    BatchProvider, BatchRef, BatchState, BatchStatus, CreateWindow, Limits, ProviderError,
    ResultFiles, ShardLines,
};
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::Store;
use rowsmith_store::layout::ResultPaths;

/// Metadata key that names the shard a batch was created for (reconciliation looks it up).
pub const SHARD_METADATA_KEY: &str = "rowsmith_shard";
const JOB_METADATA_KEY: &str = "rowsmith_job";

/// Whether `metadata` names shard `shard` (`<job>.<attempt>.<n>`).
pub(crate) fn tagged_for(metadata: Option<&HashMap<String, String>>, shard: &str) -> bool {
    metadata
        .and_then(|m| m.get(SHARD_METADATA_KEY))
        .map(String::as_str)
        == Some(shard)
}

#[derive(Debug, Clone)]
pub struct OpenAiClient {
    api: Endpoint,
    /// Azure OpenAI: the `api-version` query value; the key then goes in an `api-key` header.
    azure_api_version: Option<String>,
}

/// The Batch object; only the fields the spec requires are not optional.
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchErrorItem>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BatchErrorItem {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Debug, Deserialize)]
struct BatchList {
    data: Vec<Batch>,
    #[serde(default)]
    has_more: bool,
}

impl OpenAiClient {
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let http = Http::new(name, timeout, Duration::from_secs(120))?;
        let bearer = |request: RequestBuilder, key: &str| request.bearer_auth(key);
        Ok(Self {
            api: Endpoint::new(http, base_url, api_key, bearer),
            azure_api_version: None,
        })
    }

    /// Talks to Azure OpenAI: `api-key` header and `api-version` query.
    pub fn with_azure_api_version(mut self, api_version: Option<String>) -> Self {
        if api_version.is_some() {
            self.api = self
                .api
                .authorized_by(|request: RequestBuilder, key: &str| request.header("api-key", key));
        }
        self.azure_api_version = api_version;
        self
    }

    fn url(&self, path: &str) -> String {
        match &self.azure_api_version {
            Some(version) => {
                let separator = if path.contains('?') { '&' } else { '?' };
                format!("{}{separator}api-version={version}", self.api.url(path))
            }
            None => self.api.url(path),
        }
    }

    pub fn has_key(&self) -> bool {
        self.api.has_key()
    }

    /// The body of `POST /batches` for shard attempt `key`'s uploaded file: tagged with the
    /// shard, which reconciliation looks for.
    pub fn create_request(key: &ShardKey, file_id: &str) -> serde_json::Value {
        serde_json::json!({
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {
                SHARD_METADATA_KEY: key.dotted(),
                JOB_METADATA_KEY: key.job_id,
            },
        })
    }

    /// One page of batches, newest first, after `after`.
    async fn list_page(&self, after: Option<&str>) -> Result<BatchList, ProviderError> {
        let mut url = self.url("/batches?limit=100");
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        let response = self.api.send("list batches", |http| http.get(&url)).await?;
        self.api.http.json("list batches", response).await
    }

    pub async fn retrieve(&self, batch_id: &str) -> Result<Batch, ProviderError> {
        let url = self.url(&format!("/batches/{batch_id}"));
        let response = self
            .api
            .send("retrieve batch", |http| http.get(&url))
            .await?;
        self.api.http.json("retrieve batch", response).await
    }

    /// Streams file `file_id`'s content into object `key`.
    pub async fn download_file(
        &self,
        file_id: &str,
        store: &Store,
        key: &str,
    ) -> Result<(), ProviderError> {
        let url = self.url(&format!("/files/{file_id}/content"));
        let response = self
            .api
            .send("download file", |http| http.get(&url))
            .await?;
        self.api
            .http
            .download_to("download file", response, store, key)
            .await?;
        Ok(())
    }
}

impl Batch {
    pub fn to_status(&self) -> BatchStatus {
        let state = match self.status.as_str() {
            "validating" => BatchState::Validating,
            "in_progress" => BatchState::InProgress,
            "finalizing" => BatchState::Finalizing,
            "cancelling" => BatchState::Cancelling,
            "completed" => BatchState::Completed,
            "expired" => BatchState::Expired,
            "failed" => BatchState::Failed,
            "cancelled" => BatchState::Cancelled,
            other => BatchState::Other(other.to_owned()),
        };
        let counts = self.request_counts.unwrap_or_default();
        let errors = self
            .errors
            .as_ref()
            .map(|e| {
                e.data
                    .iter()
                    .map(|item| {
                        let line = item
                            .line
                            .map(|l| format!(" (line {l})"))
                            .unwrap_or_default();
                        format!(
                            "{}: {}{line}",
                            item.code.as_deref().unwrap_or("error"),
                            item.message.as_deref().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        BatchStatus {
            state,
            total: counts.total,
            completed: counts.completed,
            failed: counts.failed,
            output_file_id: self.output_file_id.clone(),
            error_file_id: self.error_file_id.clone(),
            errors,
        }
    }
}

impl BatchProvider for OpenAiClient {
    fn name(&self) -> &str {
        &self.api.http.name
    }

    fn limits(&self) -> Limits {
        rowsmith_contract::providers::OPENAI
    }

    /// A multipart upload whose file part is read from the store as it is sent.
    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        let url = self.url("/files");
        let file_name = format!("{}.jsonl", key.dotted());
        let build = |http: &reqwest::Client| {
            let part = reqwest::multipart::Part::stream_with_length(lines.body(), lines.len())
                .file_name(file_name.clone());
            let part = part.mime_str("application/jsonl").unwrap_or_else(|_| {
                reqwest::multipart::Part::stream_with_length(lines.body(), lines.len())
            });
            let form = reqwest::multipart::Form::new()
                .text("purpose", "batch")
                .part("file", part);
            http.post(&url).multipart(form)
        };
        let response = self.api.send("upload file", build).await?;
        let file: FileObject = self.api.http.json("upload file", response).await?;
        Ok(file.id)
    }

    async fn create(
        &self,
        key: &ShardKey,
        _model: &str,
        file_id: &str,
        _lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let url = self.url("/batches");
        let body = Self::create_request(key, file_id);
        let batch: Batch = self
            .api
            .create("create batch", |http| http.post(&url).json(&body))
            .await?;
        Ok(BatchRef { id: batch.id })
    }

    /// Pages newest first until the listing is past the window (no fixed page cap: an
    /// organisation with many batches is read as far back as the claim), matching the shard
    /// key in the metadata. A failed batch (refused for the token quota) is never one to keep.
    async fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let wanted = key.dotted();
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.list_page(after.as_deref()).await?;
            let mut past_window = false;
            for batch in &page.data {
                if window.is_before(batch.created_at.saturating_mul(1000)) {
                    past_window = true;
                    break;
                }
                if tagged_for(batch.metadata.as_ref(), &wanted) && batch.status != "failed" {
                    found.push(BatchRef {
                        id: batch.id.clone(),
                    });
                }
            }
            match page.data.last() {
                Some(last) if page.has_more && !past_window => after = Some(last.id.clone()),
                _ => break,
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
        let mut files = ResultFiles::default();
        if let Some(file_id) = &status.output_file_id {
            self.download_file(file_id, store, &into.output).await?;
            files.output_path = Some(into.output.clone());
        }
        if let Some(file_id) = &status.error_file_id {
            self.download_file(file_id, store, &into.errors).await?;
            files.errors_path = Some(into.errors.clone());
        }
        Ok(files)
    }

    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        let url = self.url(&format!("/batches/{}/cancel", batch.id));
        match self.api.send("cancel batch", |http| http.post(&url)).await {
            Ok(_) => Ok(()),
            // Already ended: nothing to cancel.
            Err(ProviderError::Http { status, .. }) if status == StatusCode::CONFLICT.as_u16() => {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_with_only_required_fields_decodes() {
        let batch: Batch = serde_json::from_str(
            r#"{"id":"batch_1","object":"batch","endpoint":"/v1/chat/completions",
                "input_file_id":"file-1","completion_window":"24h","status":"validating",
                "created_at":1711471533}"#,
        )
        .expect("decode");
        let status = batch.to_status();
        assert_eq!(status.state, BatchState::Validating);
        assert_eq!((status.total, status.output_file_id), (0, None));
    }

    #[test]
    fn completed_batch_without_output_file_is_terminal() {
        let batch: Batch = serde_json::from_str(
            r#"{"id":"b","status":"completed","output_file_id":null,"error_file_id":"file-e",
                "request_counts":{"total":2,"completed":0,"failed":2},
                "errors":null}"#,
        )
        .expect("decode");
        let status = batch.to_status();
        assert!(status.state.is_terminal());
        assert_eq!(status.error_file_id.as_deref(), Some("file-e"));
        assert_eq!(status.failed, 2);
    }

    /// The request head of a status call of the client `configure` makes for a base URL of
    /// path `path` (on a listener that answers it).
    async fn status_request_head(
        path: &str,
        configure: impl FnOnce(OpenAiClient) -> OpenAiClient,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}{path}", listener.local_addr().expect("address"));
        let key = Some(SecretString::from("azure-key-1"));
        let client = configure(
            OpenAiClient::new("openai", &base, key, Duration::from_secs(5)).expect("client"),
        );
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buffer = vec![0; 8192];
            let read = socket.read(&mut buffer).await.expect("read");
            let body = r#"{"id":"b1","status":"in_progress"}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&buffer[..read]).into_owned()
        });
        let batch = BatchRef { id: "b1".into() };
        client.status(&batch).await.expect("status");
        server.await.expect("server")
    }

    #[tokio::test]
    async fn azure_gets_the_key_as_api_key_and_the_api_version_on_every_call() {
        let head = status_request_head("/openai", |client| {
            client.with_azure_api_version(Some("2024-10-21".into()))
        })
        .await;
        assert!(
            head.starts_with("GET /openai/batches/b1?api-version=2024-10-21 "),
            "{head}"
        );
        assert!(head.contains("api-key: azure-key-1"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("authorization"),
            "{head}"
        );
        // OpenAI itself: a bearer token, no api-version.
        let head = status_request_head("/v1", |client| client).await;
        assert!(head.starts_with("GET /v1/batches/b1 "), "{head}");
        assert!(head.contains("authorization: Bearer azure-key-1"), "{head}");
    }

    #[test]
    fn the_api_key_never_shows_in_debug() {
        let client = OpenAiClient::new(
            "openai",
            "http://x/v1",
            Some(SecretString::from("k-secret-1234")),
            Duration::from_secs(1),
        )
        .expect("client");
        assert!(!format!("{client:?}").contains("k-secret-1234"));
    }
}
