//! A provider's result file is written to the store as it arrives: downloading 384 MiB
//! raises the process's peak memory by a few parts (16 MiB each), not by the file. Before,
//! every client read the whole body into memory first (and a 1 GB Gemini shard's results
//! can be larger than its input).

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;

use rowsmith_providers::http::Http;
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
    let app = Router::new().route("/results", get(body));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_file_is_written_as_it_arrives_not_held_whole() {
    let url = serve().await;
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
    let grown = peak_rss().saturating_sub(before);
    println!(
        "downloaded {} MiB; peak memory grew {} MiB",
        total >> 20,
        grown >> 20
    );
    assert!(
        grown < 96 << 20,
        "peak memory grew {} MiB for a {} MiB download",
        grown >> 20,
        total >> 20
    );
}
