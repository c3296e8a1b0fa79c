//! Gemini batch mode through the Developer API (an API key, `x-goog-api-key`): a small shard
//! goes inline in the create call and its answers come back in the operation; a larger one is
//! uploaded through the resumable Files API. A batch is created from the file with
//! `models/{model}:batchGenerateContent` under a display name that names the shard (creates
//! are not idempotent: reconciliation lists batches and matches it), its state is read from
//! the long-running operation (`BATCH_STATE_*`, or the SDKs' `JOB_STATE_*`), and its
//! responses file (`{key, response | error}` lines, errors inline) is downloaded whole.

use bytes::Bytes;
use reqwest::RequestBuilder;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

use super::http::{Endpoint, Http};
use super::{
    BatchProvider, BatchRef, BatchState, BatchStatus, CreateWindow, Limits, ProviderError,
    ResultFiles, ShardLines,
};
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::Store;
use rowsmith_store::layout::ResultPaths;

/// Bytes per chunk of a resumable upload (the SDK's size): a failed chunk is sent again, not
/// the whole file.
pub const UPLOAD_CHUNK: usize = 8 * 1024 * 1024;

/// The most an inline create may carry: Gemini caps the whole call at 20 MB; the rest is room
/// for the wrapping.
pub const INLINE_LIMIT: u64 = 16 * 1024 * 1024;

/// The "file id" of a shard sent inline, and the "output file" of a batch answered inline.
const INLINE: &str = "inline:";

/// The display name of shard `key`'s batches (and files): what reconciliation matches.
pub fn display_name(key: &ShardKey) -> String {
    format!("rowsmith-{}", key.dotted())
}

#[derive(Debug, Clone)]
pub struct GeminiClient {
    api: Endpoint,
    /// Shards up to this size go inline (no upload; the answers come in the operation).
    inline_max_bytes: u64,
}

/// A batch's long-running operation; only what rowsmith reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Operation {
    /// `batches/<id>`.
    pub name: String,
    #[serde(default)]
    pub metadata: Option<BatchMetadata>,
    #[serde(default)]
    pub done: bool,
    #[serde(default)]
    pub response: Option<Output>,
    #[serde(default)]
    pub error: Option<RpcStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchMetadata {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub batch_stats: Option<BatchStats>,
    #[serde(default)]
    pub output: Option<Output>,
}

/// Request counts; int64 values come as JSON strings (`"7"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchStats {
    #[serde(default)]
    pub request_count: Option<Value>,
    #[serde(default)]
    pub successful_request_count: Option<Value>,
    #[serde(default)]
    pub failed_request_count: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// `files/<id>`.
    #[serde(default)]
    pub responses_file: Option<String>,
    /// The answers of a batch sent inline.
    #[serde(default)]
    pub inlined_responses: Option<InlinedResponses>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlinedResponses {
    #[serde(default)]
    pub inlined_responses: Vec<Value>,
}

impl Output {
    fn inlined(&self) -> Option<&[Value]> {
        self.inlined_responses
            .as_ref()
            .map(|r| r.inlined_responses.as_slice())
    }
}

impl Operation {
    /// The answers of a batch sent inline, from the metadata or the response.
    fn inlined(&self) -> Option<&[Value]> {
        self.metadata
            .as_ref()
            .and_then(|m| m.output.as_ref())
            .and_then(Output::inlined)
            .or_else(|| self.response.as_ref().and_then(Output::inlined))
    }
}

/// One inline answer as a line of a responses file: the key at the top, then the `response`
/// or the `error`.
fn inline_line(item: &Value) -> Value {
    let mut line = serde_json::Map::new();
    if let Some(key) = item.pointer("/metadata/key") {
        line.insert("key".into(), key.clone());
    }
    for name in ["response", "error"] {
        if let Some(value) = item.get(name) {
            line.insert(name.into(), value.clone());
        }
    }
    Value::Object(line)
}

/// The shard's `{key, request}` lines as inline requests: `{request, metadata: {key}}`.
fn inline_requests(lines: &[u8]) -> Result<Vec<Value>, serde_json::Error> {
    lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut line: Value = serde_json::from_slice(line)?;
            let key = line.get("key").cloned().unwrap_or(Value::Null);
            let request = line
                .get_mut("request")
                .map(Value::take)
                .unwrap_or(Value::Null);
            Ok(serde_json::json!({"request": request, "metadata": {"key": key}}))
        })
        .collect()
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RpcStatus {
    #[serde(default)]
    pub code: i64,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationList {
    #[serde(default)]
    operations: Vec<Operation>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// How many chunk answers in a row may be lost without the session getting further before
/// the upload fails.
const MAX_UNANSWERED_CHUNKS: u32 = 8;

/// What an upload session holds.
enum UploadProgress {
    Received(u64),
    Final(FileName),
}

#[derive(Debug, Deserialize)]
struct UploadedFile {
    file: FileName,
}

#[derive(Debug, Deserialize)]
struct FileName {
    name: String,
}

/// An int64 of proto-JSON: a string, or a number from a lenient server.
fn count(value: &Option<Value>) -> u64 {
    match value {
        Some(Value::String(text)) => text.parse().unwrap_or(0),
        Some(Value::Number(number)) => number.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// Unix ms of an RFC 3339 time.
fn unix_ms(rfc3339: &str) -> Option<i64> {
    let at = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A batch state in either spelling (`BATCH_STATE_*` of the REST API, `JOB_STATE_*` of the
/// SDKs and Vertex).
pub fn state_of(state: &str) -> BatchState {
    let bare = state
        .strip_prefix("BATCH_STATE_")
        .or_else(|| state.strip_prefix("JOB_STATE_"))
        .unwrap_or(state);
    match bare {
        "PENDING" | "QUEUED" => BatchState::Validating,
        "RUNNING" => BatchState::InProgress,
        "SUCCEEDED" => BatchState::Completed,
        "FAILED" => BatchState::Failed,
        "CANCELLING" => BatchState::Cancelling,
        "CANCELLED" => BatchState::Cancelled,
        "EXPIRED" => BatchState::Expired,
        _ => BatchState::Other(state.to_owned()),
    }
}

impl Operation {
    pub fn to_status(&self) -> BatchStatus {
        let metadata = self.metadata.clone().unwrap_or_default();
        let mut state = metadata
            .state
            .as_deref()
            .map(state_of)
            .unwrap_or(BatchState::Other(String::new()));
        // A finished operation with an error failed, whatever its metadata says.
        if self.done && self.error.is_some() && !state.is_terminal() {
            state = BatchState::Failed;
        }
        let stats = metadata.batch_stats.unwrap_or_default();
        let output_file_id = metadata
            .output
            .and_then(|o| o.responses_file)
            .or_else(|| {
                self.response
                    .as_ref()
                    .and_then(|r| r.responses_file.clone())
            })
            .or_else(|| self.inlined().map(|_| format!("{INLINE}{}", self.name)));
        BatchStatus {
            state,
            total: count(&stats.request_count),
            completed: count(&stats.successful_request_count),
            failed: count(&stats.failed_request_count),
            output_file_id,
            // Per-request errors are lines of the responses file.
            error_file_id: None,
            errors: self
                .error
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect(),
        }
    }
}

impl GeminiClient {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: std::time::Duration,
        inline_max_bytes: u64,
    ) -> Result<Self, ProviderError> {
        let http = Http::new("gemini", timeout, std::time::Duration::from_secs(120))?;
        let authorize = |request: RequestBuilder, key: &str| request.header("x-goog-api-key", key);
        Ok(Self {
            api: Endpoint::new(http, base_url, api_key, authorize),
            inline_max_bytes: inline_max_bytes.min(INLINE_LIMIT),
        })
    }

    pub fn has_key(&self) -> bool {
        self.api.has_key()
    }

    pub async fn operation(&self, name: &str) -> Result<Operation, ProviderError> {
        let url = self.api.url(&format!("/v1beta/{name}"));
        let response = self.api.send("get batch", |http| http.get(&url)).await?;
        self.api.http.json("get batch", response).await
    }

    async fn list_page(&self, token: Option<&str>) -> Result<OperationList, ProviderError> {
        let url = self.api.url("/v1beta/batches");
        let mut query = vec![("pageSize", PAGE_SIZE.to_string())];
        if let Some(token) = token {
            query.push(("pageToken", token.to_owned()));
        }
        let response = self
            .api
            .send("list batches", |http| http.get(&url).query(&query))
            .await?;
        self.api.http.json("list batches", response).await
    }

    /// Asks an upload session how far it got (`X-Goog-Upload-Command: query`): the bytes it
    /// holds, or the file it made when the last chunk arrived.
    async fn query_upload(&self, session: &str) -> Result<UploadProgress, ProviderError> {
        const OPERATION: &str = "query upload";
        let response = self
            .api
            .send(OPERATION, |http| {
                http.post(session)
                    .header("X-Goog-Upload-Command", "query")
                    .header(reqwest::header::CONTENT_LENGTH, "0")
            })
            .await?;
        let header = |name: &str| super::http::header(&response, name);
        if header("x-goog-upload-status").as_deref() == Some("final") {
            let uploaded: UploadedFile = self.api.http.json(OPERATION, response).await?;
            return Ok(UploadProgress::Final(uploaded.file));
        }
        header("x-goog-upload-size-received")
            .and_then(|v| v.parse().ok())
            .map(UploadProgress::Received)
            .ok_or_else(|| Self::decode_error(OPERATION, "no x-goog-upload-size-received"))
    }

    fn decode_error(operation: &'static str, message: &str) -> ProviderError {
        ProviderError::Decode {
            provider: "gemini".into(),
            operation,
            source: message.to_owned().into(),
        }
    }
}

/// Batches asked for per page of a listing.
const PAGE_SIZE: usize = 100;

impl BatchProvider for GeminiClient {
    fn name(&self) -> &str {
        "gemini"
    }

    fn limits(&self) -> Limits {
        rowsmith_contract::providers::GEMINI
    }

    /// A small shard goes inline (nothing to upload). A larger one takes the resumable
    /// protocol: a start call names the file and its size and answers with the
    /// session URL; the bytes follow in chunks, the last one finalizing. A chunk left unanswered
    /// (a 5xx, a timeout, a dropped connection) may have been stored: the session is asked
    /// how far it got (`query`) and the upload goes on from there, or ends with the file the
    /// session made. An upload that fails for good
    /// leaves an unused file that Gemini deletes after 48 h.
    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        const OPERATION: &str = "upload file";
        if lines.len() <= self.inline_max_bytes {
            return Ok(format!("{INLINE}{}", key.dotted()));
        }
        let start_url = self.api.url("/upload/v1beta/files");
        let body = serde_json::json!({"file": {"displayName": display_name(key)}});
        let size = lines.len().to_string();
        let started = self
            .api
            .send(OPERATION, |http| {
                http.post(&start_url)
                    .header("X-Goog-Upload-Protocol", "resumable")
                    .header("X-Goog-Upload-Command", "start")
                    .header("X-Goog-Upload-Header-Content-Length", &size)
                    .header("X-Goog-Upload-Header-Content-Type", "jsonl")
                    .json(&body)
            })
            .await?;
        let session = super::http::header(&started, "x-goog-upload-url")
            .ok_or_else(|| Self::decode_error(OPERATION, "no x-goog-upload-url in the answer"))?;
        let total = lines.len();
        let mut offset: u64 = 0;
        let mut unanswered = 0;
        loop {
            let end = (offset + UPLOAD_CHUNK as u64).min(total);
            let last = end == total;
            // One chunk in memory at a time.
            let chunk = lines.range(offset..end).await?;
            let command = if last { "upload, finalize" } else { "upload" };
            let sent = self
                .api
                .send_unrepeatable(OPERATION, |http| {
                    http.post(&session)
                        .header("X-Goog-Upload-Command", command)
                        .header("X-Goog-Upload-Offset", offset.to_string())
                        .body(chunk.clone())
                })
                .await;
            let answered = match sent {
                Ok(response) if last => self
                    .api
                    .http
                    .json(OPERATION, response)
                    .await
                    .map_err(ProviderError::unconfirmed),
                Ok(_) => {
                    offset = end;
                    continue;
                }
                Err(error) => Err(error),
            };
            match answered {
                Ok(UploadedFile { file }) => return Ok(file.name),
                // The chunk may have been stored: the session says how far it got.
                Err(error) if error.is_unconfirmed() && unanswered < MAX_UNANSWERED_CHUNKS => {
                    unanswered += 1;
                    tracing::warn!(%error, offset, "an upload chunk went unanswered; asking the session how far it got");
                    match self.query_upload(&session).await? {
                        UploadProgress::Received(received) if received <= total => {
                            if received > offset {
                                unanswered = 0;
                            }
                            offset = received;
                        }
                        UploadProgress::Received(received) => {
                            return Err(Self::decode_error(
                                OPERATION,
                                &format!("the session holds {received} bytes of {total}"),
                            ));
                        }
                        UploadProgress::Final(file) => return Ok(file.name),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn create(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
        lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        let url = self
            .api
            .url(&format!("/v1beta/models/{model}:batchGenerateContent"));
        let input = if file_id.starts_with(INLINE) {
            // At most `inline_max_bytes` (16 MiB): read whole.
            let lines = lines.bytes().await?;
            let requests = inline_requests(&lines).map_err(|e| ProviderError::Decode {
                provider: "gemini".into(),
                operation: "create batch",
                source: format!("the shard's request lines: {e}").into(),
            })?;
            serde_json::json!({"requests": {"requests": requests}})
        } else {
            serde_json::json!({"fileName": file_id})
        };
        let body = serde_json::json!({
            "batch": {"displayName": display_name(key), "inputConfig": input}
        });
        let created = self
            .api
            .create::<Operation>("create batch", |http| http.post(&url).json(&body))
            .await;
        match created {
            Ok(created) => Ok(BatchRef { id: created.name }),
            // A file is deleted 48 h after its upload (a shard held back that long by the
            // quota, or a job suspended and resumed days later): Google answers that the file
            // is not found, or not there to be read.
            Err(ProviderError::Http {
                status: 403 | 404,
                message,
                ..
            }) if !file_id.starts_with(INLINE) && message.contains(file_id) => {
                Err(ProviderError::InputGone {
                    provider: "gemini".into(),
                    file_id: file_id.to_owned(),
                    message,
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Lists batches (newest first, as Google's listings are) until a whole page is older than
    /// the window, matching the display name; a failed batch is never one to keep. Should a
    /// page come oldest first, every page is read.
    async fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let wanted = display_name(key);
        let mut found: Vec<(i64, BatchRef)> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_page(token.as_deref()).await?;
            let created: Vec<i64> = page
                .operations
                .iter()
                .map(|op| {
                    op.metadata
                        .as_ref()
                        .and_then(|m| m.create_time.as_deref())
                        .and_then(unix_ms)
                        .unwrap_or(i64::MAX)
                })
                .collect();
            for (op, at) in page.operations.iter().zip(&created) {
                let metadata = op.metadata.clone().unwrap_or_default();
                let failed = metadata.state.as_deref().map(state_of) == Some(BatchState::Failed);
                if metadata.display_name.as_deref() == Some(wanted.as_str()) && !failed {
                    found.push((
                        *at,
                        BatchRef {
                            id: op.name.clone(),
                        },
                    ));
                }
            }
            let newest_first = created.windows(2).all(|pair| pair[0] >= pair[1]);
            let past_window = !created.is_empty()
                && newest_first
                && created.iter().all(|at| window.is_before(*at));
            token = page.next_page_token.filter(|t| !t.is_empty());
            if past_window || token.is_none() {
                break;
            }
        }
        found.sort_by_key(|(at, _)| *at);
        Ok(found.into_iter().map(|(_, batch)| batch).collect())
    }

    fn tags_batches(&self) -> bool {
        true
    }

    async fn status(&self, batch: &BatchRef) -> Result<BatchStatus, ProviderError> {
        Ok(self.operation(&batch.id).await?.to_status())
    }

    async fn download(
        &self,
        status: &BatchStatus,
        store: &Store,
        into: &ResultPaths,
    ) -> Result<ResultFiles, ProviderError> {
        let mut files = ResultFiles::default();
        if let Some(name) = status
            .output_file_id
            .as_deref()
            .and_then(|f| f.strip_prefix(INLINE))
        {
            // Answered inline: the operation holds the answers.
            let operation = self.operation(name).await?;
            let mut lines = Vec::new();
            for item in operation.inlined().unwrap_or_default() {
                serde_json::to_writer(&mut lines, &inline_line(item)).map_err(|e| {
                    ProviderError::Decode {
                        provider: "gemini".into(),
                        operation: "download responses",
                        source: e.into(),
                    }
                })?;
                lines.push(b'\n');
            }
            store.put_bytes(&into.output, Bytes::from(lines)).await?;
            files.output_path = Some(into.output.clone());
            return Ok(files);
        }
        if let Some(file) = &status.output_file_id {
            const OPERATION: &str = "download responses";
            let url = self
                .api
                .url(&format!("/download/v1beta/{file}:download?alt=media"));
            let response = self.api.send(OPERATION, |http| http.get(&url)).await?;
            self.api
                .http
                .download_to(OPERATION, response, store, &into.output)
                .await?;
            files.output_path = Some(into.output.clone());
        }
        Ok(files)
    }

    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        let url = self.api.url(&format!("/v1beta/{}:cancel", batch.id));
        match self.api.send("cancel batch", |http| http.post(&url)).await {
            Ok(_) => Ok(()),
            // Already ended: nothing to cancel.
            Err(ProviderError::Http {
                status: 400 | 409,
                message,
                ..
            }) if message.contains("FAILED_PRECONDITION") => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_state_spellings_map_and_string_counts_are_read() {
        let states: Vec<BatchState> = [
            "BATCH_STATE_PENDING",
            "JOB_STATE_RUNNING",
            "BATCH_STATE_SUCCEEDED",
            "JOB_STATE_FAILED",
            "BATCH_STATE_CANCELLED",
            "BATCH_STATE_EXPIRED",
            "JOB_STATE_PAUSED",
        ]
        .iter()
        .map(|s| state_of(s))
        .collect();
        assert_eq!(
            states,
            [
                BatchState::Validating,
                BatchState::InProgress,
                BatchState::Completed,
                BatchState::Failed,
                BatchState::Cancelled,
                BatchState::Expired,
                BatchState::Other("JOB_STATE_PAUSED".into()),
            ]
        );
        let operation: Operation = serde_json::from_str(
            r#"{"name": "batches/b1", "done": true,
                "metadata": {"state": "BATCH_STATE_SUCCEEDED", "displayName": "rowsmith-j.1.0",
                  "batchStats": {"requestCount": "7", "successfulRequestCount": "5",
                                 "failedRequestCount": "2"}},
                "response": {"responsesFile": "files/out1"}}"#,
        )
        .expect("operation");
        let status = operation.to_status();
        assert_eq!(status.state, BatchState::Completed);
        assert_eq!((status.total, status.completed, status.failed), (7, 5, 2));
        assert_eq!(status.output_file_id.as_deref(), Some("files/out1"));
        let failed: Operation = serde_json::from_str(
            r#"{"name": "batches/b2", "done": true, "metadata": {"state": "BATCH_STATE_RUNNING"},
                "error": {"code": 3, "message": "malformed file"}}"#,
        )
        .expect("operation");
        let status = failed.to_status();
        assert_eq!(status.state, BatchState::Failed);
        assert_eq!(status.errors, ["3: malformed file"]);
    }

    #[test]
    fn a_shard_sent_inline_keeps_its_keys_both_ways() {
        let lines =
            b"{\"key\":\"r3\",\"request\":{\"contents\":[]}}\n{\"key\":\"r5\",\"request\":{}}\n";
        let requests = inline_requests(lines).expect("requests");
        assert_eq!(
            requests[0],
            serde_json::json!({"request": {"contents": []}, "metadata": {"key": "r3"}})
        );
        assert_eq!(requests[1]["metadata"]["key"], "r5");
        let operation: Operation = serde_json::from_str(
            r#"{"name": "batches/b3", "done": true,
                "metadata": {"state": "BATCH_STATE_SUCCEEDED", "output": {"inlinedResponses": {
                  "inlinedResponses": [
                    {"response": {"candidates": []}, "metadata": {"key": "r3"}},
                    {"error": {"code": 400, "message": "bad"}, "metadata": {"key": "r5"}}]}}}}"#,
        )
        .expect("operation");
        let status = operation.to_status();
        assert_eq!(status.output_file_id.as_deref(), Some("inline:batches/b3"));
        let lines: Vec<Value> = operation
            .inlined()
            .expect("inlined")
            .iter()
            .map(inline_line)
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"key": "r3", "response": {"candidates": []}})
        );
        assert_eq!(lines[1]["key"], "r5");
        assert_eq!(lines[1]["error"]["code"], 400);
    }
}
