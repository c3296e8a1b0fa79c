//! Shards and result files go between the store and a provider as streams: uploading a
//! 384 MiB shard, sending it in an Anthropic create, and downloading a 384 MiB result file
//! each raise the process's peak memory by a few parts (16 MiB each), not by the file. Before, the submitter read the whole shard
//! into memory to upload it (and again to create its batch), and every client read a whole
//! result body before storing it. One test in its own binary: it measures the process's peak.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use secrecy::SecretString;

use rowsmith_contract::messages::ShardKey;
use rowsmith_providers::http::Http;
use rowsmith_providers::{AnthropicClient, BatchProvider, OpenAiClient, ShardLines};
use rowsmith_store::Store;

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 6 * 1024;

/// The process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number");
    kib * 1024
}

/// Reads a request body to its end, keeping nothing; its length.
async fn drain(body: Body) -> usize {
    let mut chunks = body.into_data_stream();
    let mut received = 0;
    while let Some(chunk) = chunks.next().await {
        received += chunk.expect("chunk").len();
    }
    received
}

/// Asserts that the peak grew by less than 96 MiB since `before`, and prints how much.
fn assert_peak_grew_little(before: u64, what: &str, total: u64) {
    let grown = peak_rss().saturating_sub(before);
    // 0 when the step stayed under an earlier step's peak.
    println!(
        "{what} {} MiB; peak memory grew {} MiB over the earlier peak",
        total >> 20,
        grown >> 20
    );
    assert!(
        grown < 96 << 20,
        "peak memory grew {} MiB for {what} {} MiB",
        grown >> 20,
        total >> 20
    );
}

/// A server that makes the body up as it sends it, so it holds none of it.
async fn serve() -> String {
    let body = || async {
        let line = Bytes::from(
            format!(
                "{{\"custom_id\":\"r\",\"x\":\"{}\"}}\n",
                "y".repeat(CHUNK - 24)
            )
            .into_bytes(),
        );
        let chunks = futures::stream::iter(
            (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(line.slice(..CHUNK))),
        );
        Body::from_stream(chunks)
    };
    // An upload's body is read and dropped as it comes.
    let sink = |body: Body| async move {
        let received = drain(body).await;
        axum::Json(serde_json::json!({"id": format!("file-{received}"), "object": "file"}))
    };
    let batch_sink = |body: Body| async move {
        let received = drain(body).await;
        axum::Json(
            serde_json::json!({"id": format!("msgbatch_{received}"), "processing_status": "in_progress"}),
        )
    };
    let app = Router::new()
        .route("/results", get(body))
        .route("/v1/files", post(sink))
        .route("/v1/messages/batches", post(batch_sink));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_and_result_files_are_streamed_not_held_whole() {
    let base = serve().await;
    let url = format!("{base}/results");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::from_url(&format!("file://{}", dir.path().display())).expect("store");
    let http = Http::new("test", Duration::from_secs(120), Duration::from_secs(1)).expect("http");
    let before = peak_rss();
    let response = http
        .send("download", || http.client.get(&url))
        .await
        .expect("response");
    let written = http
        .download_to("download", response, &store, "jobs/j/results/out.jsonl")
        .await
        .expect("downloaded");
    let total = (CHUNK * CHUNKS) as u64;
    assert_eq!(written, total);
    let stored = std::fs::metadata(dir.path().join("jobs/j/results/out.jsonl")).expect("stored");
    assert_eq!(stored.len(), total);
    assert_peak_grew_little(before, "downloading", total);

    // The downloaded file, uploaded as a shard's request lines.
    let client = OpenAiClient::new(
        "openai",
        &format!("{base}/v1"),
        Some(SecretString::from("sk-test")),
        Duration::from_secs(120),
    )
    .expect("client");
    let lines = ShardLines::object(&store, "jobs/j/results/out.jsonl")
        .await
        .expect("lines");
    let key = ShardKey {
        job_id: "j".into(),
        attempt: 1,
        shard: 0,
    };
    let before = peak_rss();
    let file_id = client.upload(&key, lines).await.expect("uploaded");
    let received: u64 = file_id
        .strip_prefix("file-")
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(
        received > total,
        "the multipart body holds every byte: {received}"
    );
    assert_peak_grew_little(before, "uploading", total);

    // The same lines as an Anthropic create, whose body holds the requests.
    let anthropic = AnthropicClient::new(
        &base,
        Some(SecretString::from("sk-ant-test")),
        Duration::from_secs(120),
    )
    .expect("client");
    let lines = ShardLines::object(&store, "jobs/j/results/out.jsonl")
        .await
        .expect("lines");
    let before = peak_rss();
    let batch = anthropic
        .create(&key, "claude-3-5-haiku-latest", "", lines)
        .await
        .expect("created");
    let received: u64 = batch
        .id
        .strip_prefix("msgbatch_")
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(
        received > total,
        "the create body holds every byte: {received}"
    );
    assert_peak_grew_little(before, "an Anthropic create of", total);
}
