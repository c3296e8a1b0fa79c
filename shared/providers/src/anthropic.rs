//! Anthropic Message Batches client: create (the requests inline), retrieve, list, cancel,
//! results. Structured output is a forced tool whose `input_schema` is the field schema (see
//! `render`). Timestamps are RFC 3339 strings; counters other than `processing` stay 0
//! until the batch has ended.

use std::time::Duration;

use bytes::Bytes;
use reqwest::RequestBuilder;
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

pub const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct AnthropicClient {
    api: Endpoint,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessageBatch {
    pub id: String,
    pub processing_status: String,
    #[serde(default)]
    pub request_counts: RequestCounts,
    #[serde(default)]
    pub cancel_initiated_at: Option<String>,
    #[serde(default)]
    pub ended_at: Option<String>,
    #[serde(default)]
    pub results_url: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
}

impl MessageBatch {
    /// `created_at` in Unix ms, when it is there and readable.
    pub fn created_ms(&self) -> Option<i64> {
        let text = self.created_at.as_deref()?;
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()?;
        i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub processing: u64,
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub errored: u64,
    #[serde(default)]
    pub canceled: u64,
    #[serde(default)]
    pub expired: u64,
}

impl MessageBatch {
    pub fn to_status(&self) -> BatchStatus {
        let counts = self.request_counts;
        let state = match self.processing_status.as_str() {
            "in_progress" => BatchState::InProgress,
            "canceling" => BatchState::Cancelling,
            "ended" if self.cancel_initiated_at.is_some() => BatchState::Cancelled,
            "ended" if counts.expired > 0 && counts.succeeded + counts.errored == 0 => {
                BatchState::Expired
            }
            "ended" => BatchState::Completed,
            other => BatchState::Other(other.to_owned()),
        };
        BatchStatus {
            state,
            total: counts.processing
                + counts.succeeded
                + counts.errored
                + counts.canceled
                + counts.expired,
            completed: counts.succeeded,
            failed: counts.errored + counts.canceled + counts.expired,
            output_file_id: self.results_url.clone(),
            error_file_id: None,
            errors: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct BatchList {
    data: Vec<MessageBatch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

impl AnthropicClient {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let http = Http::new("anthropic", timeout, Duration::from_secs(60))?;
        let authorize = |request: RequestBuilder, key: &str| {
            request
                .header("anthropic-version", ANTHROPIC_VERSION)
                .header("x-api-key", key)
        };
        Ok(Self {
            api: Endpoint::new(http, base_url, api_key, authorize),
        })
    }

    pub fn has_key(&self) -> bool {
        self.api.has_key()
    }

    pub async fn retrieve(&self, batch_id: &str) -> Result<MessageBatch, ProviderError> {
        let url = self.api.url(&format!("/v1/messages/batches/{batch_id}"));
        let response = self
            .api
            .send("retrieve batch", |http| http.get(&url))
            .await?;
        self.api.http.json("retrieve batch", response).await
    }
}

/// Turns a shard's request lines, chunk by chunk, into the elements of the JSON array the
/// create call takes: newlines become commas between lines (empty lines dropped), whatever
/// the chunk boundaries.
#[derive(Debug, Default)]
struct ArrayElements {
    /// A line has been written.
    started: bool,
    /// A line ended; a comma goes before the next one.
    separator: bool,
}

impl ArrayElements {
    fn convert(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(chunk.len() + 1);
        for line in chunk.split_inclusive(|b| *b == b'\n') {
            let (text, ended) = match line.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (line, false),
            };
            if !text.is_empty() {
                if self.separator {
                    out.push(b',');
                    self.separator = false;
                }
                out.extend_from_slice(text);
                self.started = true;
            }
            if ended && self.started {
                self.separator = true;
            }
        }
        Bytes::from(out)
    }
}

/// The create call's body, `{"requests": [...]}`, made from the lines as they are read.
fn requests_body(lines: &ShardLines) -> reqwest::Body {
    use futures::{StreamExt, TryStreamExt};
    let mut elements = ArrayElements::default();
    let head = futures::stream::once(std::future::ready(Ok(Bytes::from_static(
        b"{\"requests\":[",
    ))));
    let tail = futures::stream::once(std::future::ready(Ok(Bytes::from_static(b"]}"))));
    let middle = lines.chunks().map_ok(move |chunk| elements.convert(&chunk));
    reqwest::Body::wrap_stream(head.chain(middle).chain(tail).boxed())
}

impl BatchProvider for AnthropicClient {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn limits(&self) -> Limits {
        rowsmith_contract::providers::ANTHROPIC
    }

    /// Anthropic takes the requests inline at creation: nothing to upload.
    async fn upload(&self, key: &ShardKey, _lines: ShardLines) -> Result<String, ProviderError> {
        Ok(format!("inline:{}", key.dotted()))
    }

    async fn create(
        &self,
        _key: &ShardKey,
        _model: &str,
        _file_id: &str,
        lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        let url = self.api.url("/v1/messages/batches");
        // Streamed from the store: a shard of up to 256 MB is never held whole.
        let batch: MessageBatch = self
            .api
            .create("create batch", |http| {
                http.post(&url)
                    .header("content-type", "application/json")
                    .body(requests_body(&lines))
            })
            .await?;
        Ok(BatchRef { id: batch.id })
    }

    /// Anthropic batches carry no metadata. A batch may be the shard's when it was created in
    /// the shard's claim window (on the provider's clock, measured from the `Date` header, to
    /// within [`CreateWindow::MEASURED_SKEW_MS`]) and holds as many requests as the shard.
    /// The submitter lets only one Anthropic create run at a time and skips batches already
    /// recorded for another shard, so no other shard's batch of rowsmith's is taken. (A batch
    /// made outside rowsmith with the same key, in the same seconds, with the same request
    /// count, could still be: the README states this.)
    async fn find(
        &self,
        _key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        let mut offset_ms = None;
        loop {
            let (page, page_offset) = self.list_page(after.as_deref()).await?;
            // Without a measured clock offset a window cannot be told apart from its
            // neighbours: fail the look (retryable) rather than guess.
            let offset = offset_ms
                .or(page_offset)
                .ok_or_else(|| ProviderError::Decode {
                    provider: "anthropic".into(),
                    operation: "list batches",
                    source: "the answer has no readable Date header to compare clocks with".into(),
                })?;
            offset_ms = Some(offset);
            let mut past_window = false;
            for batch in &page.data {
                let Some(created_ms) = batch.created_ms() else {
                    continue;
                };
                if window.is_before(created_ms - offset) {
                    past_window = true;
                    break;
                }
                if window.admits(created_ms, offset)
                    && batch.to_status().total == window.request_count
                {
                    found.push(BatchRef {
                        id: batch.id.clone(),
                    });
                }
            }
            match page.last_id {
                Some(last) if page.has_more && !past_window => after = Some(last),
                _ => break,
            }
        }
        found.reverse();
        Ok(found)
    }

    fn tags_batches(&self) -> bool {
        false
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
        let Some(results_url) = &status.output_file_id else {
            return Ok(ResultFiles::default());
        };
        let response = self
            .api
            .send("download results", |http| http.get(results_url))
            .await?;
        self.api
            .http
            .download_to("download results", response, store, &into.output)
            .await?;
        Ok(ResultFiles {
            output_path: Some(into.output.clone()),
            errors_path: None,
        })
    }

    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        let url = self
            .api
            .url(&format!("/v1/messages/batches/{}/cancel", batch.id));
        self.api
            .send("cancel batch", |http| http.post(&url))
            .await
            .map(|_| ())
    }
}

impl AnthropicClient {
    /// One page of batches, newest first, after `after`.
    /// One page of batches, newest first, after `after`, and how far the provider's clock
    /// runs ahead of ours (from the answer's `Date`).
    async fn list_page(
        &self,
        after: Option<&str>,
    ) -> Result<(BatchList, Option<i64>), ProviderError> {
        let mut url = self.api.url("/v1/messages/batches?limit=100");
        if let Some(after) = after {
            url.push_str(&format!("&after_id={after}"));
        }
        let response = self.api.send("list batches", |http| http.get(&url)).await?;
        let offset = super::clock_offset_ms(&response, rowsmith_contract::now_unix_ms());
        Ok((self.api.http.json("list batches", response).await?, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_stay_zero_until_ended_and_ended_is_terminal() {
        let running: MessageBatch = serde_json::from_str(
            r#"{"id":"msgbatch_1","type":"message_batch","processing_status":"in_progress",
                "request_counts":{"processing":2,"succeeded":0,"errored":0,"canceled":0,"expired":0},
                "ended_at":null,"created_at":"2024-09-24T18:37:24.100435Z","results_url":null}"#,
        )
        .expect("decode");
        let status = running.to_status();
        assert_eq!(
            (status.state, status.total, status.output_file_id),
            (BatchState::InProgress, 2, None)
        );
        let ended: MessageBatch = serde_json::from_str(
            r#"{"id":"msgbatch_1","processing_status":"ended",
                "request_counts":{"processing":0,"succeeded":1,"errored":1,"canceled":0,"expired":0},
                "results_url":"http://x/v1/messages/batches/msgbatch_1/results"}"#,
        )
        .expect("decode");
        let status = ended.to_status();
        assert_eq!(status.state, BatchState::Completed);
        assert_eq!((status.completed, status.failed), (1, 1));
        assert!(status.output_file_id.is_some());
    }

    #[test]
    fn shard_lines_become_the_requests_array_whatever_the_chunk_boundaries() {
        let lines: &[u8] =
            b"\n{\"custom_id\":\"r1\"}\n\n{\"custom_id\":\"r2\"}\n{\"custom_id\":\"r3\"}";
        for chunk_size in [1, 2, 3, 7, lines.len()] {
            let mut elements = ArrayElements::default();
            let mut body = b"{\"requests\":[".to_vec();
            for chunk in lines.chunks(chunk_size) {
                body.extend_from_slice(&elements.convert(chunk));
            }
            body.extend_from_slice(b"]}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("{chunk_size}: {e}: {}", String::from_utf8_lossy(&body))
            });
            let ids: Vec<&str> = body["requests"]
                .as_array()
                .expect("array")
                .iter()
                .map(|r| r["custom_id"].as_str().expect("id"))
                .collect();
            assert_eq!(ids, ["r1", "r2", "r3"], "chunks of {chunk_size}");
        }
    }
}
