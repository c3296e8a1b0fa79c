//! Operating it: an S3 store end to end, the ops endpoint (health, readiness, metrics) and
//! one trace per job carried in NATS headers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use rowsmith_contract::records::JobState;
use rowsmith_tests::{S3Server, Stack};

use crate::pipeline::{awkward_rows, spec, to_csv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_on_an_s3_store_and_large_files_go_up_in_parts() {
    let s3 = S3Server::start("rowsmith").await;
    let stack = Stack::start_with(|settings| s3.configure(settings, "team-a")).await;
    let rows = awkward_rows(300);
    let input = stack.upload_input("s3.csv", to_csv(&rows)).await;
    stack.submit(&spec("on-s3", &input, "description")).await;
    let job = stack.wait_for_end("on-s3", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (_, enriched) = stack.output_tables(&job).await.0;
    assert_eq!(enriched.len(), rows.len());

    // The outputs are S3 objects under the prefix: the bucket's root sees them there.
    let key = job.outputs.enriched_csv.as_deref().expect("csv output");
    let mut root = stack.settings.store.clone();
    root.url = "s3://rowsmith".into();
    let root = rowsmith_store::Store::open(&root).expect("bucket root");
    let text = root
        .get_bytes(&format!("team-a/{key}"))
        .await
        .expect("the output under the prefix");
    let text = String::from_utf8(text.to_vec()).expect("utf-8");
    assert_eq!(rowsmith_tests::parse_csv(&text).1.len(), rows.len());

    // A 40 MB file is uploaded as a 3-part multipart upload (16 MB parts) and streams back.
    let scratch = tempfile::tempdir().expect("tempdir");
    let big = scratch.path().join("big.bin");
    let content: Vec<u8> = (0..40 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &content).expect("write");
    stack
        .store
        .upload("blobs/big.bin", &big)
        .await
        .expect("upload");
    let meta = stack
        .store
        .object_store()
        .head(&"blobs/big.bin".into())
        .await
        .expect("head");
    assert_eq!(meta.size, content.len() as u64);
    let etag = meta.e_tag.unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-3"),
        "not multipart: {etag}"
    );
    let back = scratch.path().join("back.bin");
    stack
        .store
        .download("blobs/big.bin", &back)
        .await
        .expect("download");
    assert!(std::fs::read(&back).expect("read") == content);
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// Polls `url` until its status is `want`, failing after 30 s.
async fn wait_status(url: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(url).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: still {status} {body} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(name_and_labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ops_endpoint_answers_health_readiness_and_metrics() {
    let mut stack = Stack::start().await;
    let mut settings = stack.settings.clone();
    settings.ops.listen = "127.0.0.1:0".into();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let address = rowsmith_runtime::ops::serve(
        &rowsmith_config::ProcessSettings::of(&settings),
        "ops-test",
        shutdown.clone(),
    )
    .await
    .expect("serve")
    .expect("listening");
    let base = format!("http://{address}");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    wait_status(&format!("{base}/readyz"), 200).await;

    let rows = awkward_rows(200);
    let input = stack.upload_input("ops.csv", to_csv(&rows)).await;
    stack.submit(&spec("ops", &input, "description")).await;
    let job = stack.wait_for_end("ops", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        metric(
            &text,
            "rowsmith_messages_total{consumer=\"merger\",outcome=\"done\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "rowsmith_rows_total{outcome=\"succeeded\"}") >= job.counts.succeeded as f64,
        "{text}"
    );
    assert!(
        text.contains("rowsmith_provider_requests_total{provider=\"sim\""),
        "{text}"
    );
    assert!(
        text.contains("rowsmith_batches_ended_total{state=\"completed\"}"),
        "{text}"
    );

    // NATS down: not ready, but alive; back up: ready again.
    stack.nats.stop();
    let body = wait_status(&format!("{base}/readyz"), 503).await;
    assert!(body.contains("NATS"), "{body}");
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    stack.nats.resume();
    wait_status(&format!("{base}/readyz"), 200).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_is_one_trace_across_services() {
    let stack = Stack::start_with(|settings| {
        // Two attempts, so that the merger's retry shards are in the trace too.
        settings.sim.faults.server_error_rate = 0.2;
    })
    .await;
    let mut work = stack
        .bus
        .client
        .subscribe("rowsmith.>")
        .await
        .expect("subscribe");
    let rows = awkward_rows(400);
    let input = stack.upload_input("trace.csv", to_csv(&rows)).await;
    // Submitted inside a span, as the CLI does: the trace starts at the submitter's side.
    {
        use tracing::Instrument;
        let span = tracing::info_span!("submit", job_id = "traced");
        stack
            .submit(&spec("traced", &input, "description"))
            .instrument(span)
            .await;
    }
    let job = stack.wait_for_end("traced", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert!(job.attempt >= 2, "expected a retry attempt");

    let traces = rowsmith_tests::job_traces(&mut work, "traced").await;
    let subjects: BTreeSet<String> = traces
        .values()
        .flatten()
        .map(|s| s.split('.').take(3).collect::<Vec<_>>().join("."))
        .collect();
    for subject in [
        "rowsmith.jobs.submit",
        "rowsmith.shards.ready",
        "rowsmith.batches.submitted",
        "rowsmith.batches.ended",
        "rowsmith.events.traced",
    ] {
        assert!(
            subjects.contains(subject),
            "no {subject} seen: {subjects:?}"
        );
    }
    assert_eq!(traces.len(), 1, "one trace per job, got {traces:?}");
}
