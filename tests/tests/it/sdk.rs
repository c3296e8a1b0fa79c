//! The official Python SDKs (pinned in scripts/tools-requirements.txt) against the simulator:
//! our wire format checked by clients we did not write.

use std::path::PathBuf;
use std::time::Duration;

use rowsmith_config::SimSettings;
use tokio_util::sync::CancellationToken;

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/bootstrap",
        venv.display()
    );
    venv
}

async fn run_check(script: &str, base_url: String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .arg(&base_url)
            .output(),
    )
    .await
    .expect("the SDK check finished in time")
    .expect("run python");
    assert!(
        output.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn start_sim() -> (std::net::SocketAddr, CancellationToken) {
    let settings = SimSettings {
        listen: "127.0.0.1:0".into(),
        rows_per_second: 1000.0,
        validating: Duration::from_millis(50),
        finalizing: Duration::from_millis(50),
        ..SimSettings::default()
    };
    let shutdown = CancellationToken::new();
    let (address, _) = rowsmith_provider_sim::start(settings, shutdown.clone())
        .await
        .expect("sim");
    (address, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_against_the_simulator() {
    let (address, shutdown) = start_sim().await;
    run_check("check_openai.py", format!("http://{address}/v1")).await;
    shutdown.cancel();
}

/// Gemini lines as rendered, checked by `google-genai`'s types, then a whole batch of them
/// through the simulator driven by that SDK (`sdk/check_gemini.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_lines_fit_google_genai_and_the_sdk_drives_a_batch_through_the_simulator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gemini.jsonl");
    std::fs::write(&path, rendered_lines("gemini", "gemini-2.5-flash", 5)).expect("write");
    let (address, shutdown) = start_sim().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/check_gemini.py");
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .arg(format!("http://{address}"))
        .arg(&path)
        .output()
        .await
        .expect("run python");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_mistral_sdk_works_against_the_simulator() {
    let (address, shutdown) = start_sim().await;
    run_check("check_mistral.py", format!("http://{address}")).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_against_the_simulator() {
    let (address, shutdown) = start_sim().await;
    run_check("check_anthropic.py", format!("http://{address}")).await;
    shutdown.cancel();
}

/// A JobSpec published by the official NATS Python client (nats-py, with `Nats-Msg-Id`)
/// runs to `completed`; publishing it twice is deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_with_the_official_nats_python_client_completes() {
    use rowsmith_contract::events::{Event, EventKind};
    use rowsmith_contract::records::JobState;

    let stack = rowsmith_tests::Stack::start().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let csv = std::fs::read(root.join("../examples/products.csv")).expect("examples/products.csv");
    let input = stack.upload_input("py/products.csv", csv).await;
    let script = root.join("sdk/nats_submit.py");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .args(["--nats", &stack.nats.url(), "--input", &input])
            .args(["--job-id", "py-nats", "--timeout", "90"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the NATS client finished in time")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The event the script printed reads as our own Event type.
    let event: Event =
        serde_json::from_str(stdout.lines().last().expect("the final event")).expect("event json");
    assert_eq!(
        (event.job_id.as_str(), event.kind),
        ("py-nats", EventKind::Completed)
    );
    let job = stack.wait_for_end("py-nats", Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.counts.rows_total, event.counts.rows_total);
    assert!(job.counts.succeeded > 100, "{:?}", job.counts);
}

/// `rows` request lines of `provider` as rowsmith renders them, for a spec with a field of
/// every type.
fn rendered_lines(provider: &str, model: &str, rows: i64) -> Vec<u8> {
    use rowsmith_contract::spec::JobSpec;
    use rowsmith_dataplane::render::RequestTemplate;

    let columns = vec!["sku".to_owned(), "description".to_owned()];
    let cells = [Some("00501"), Some("A \"red\" ball,\nround ✓")];
    let mut spec = JobSpec::builder("in.csv", "Write a title, pick a shelf, list tags.")
        .with_id("contract")
        .with_targets(["description"])
        .with_field_texts([
            "title:string:a title",
            "shelf:enum(toys|tools|garden):the shelf",
            "in_stock:boolean",
            "tags:array:3 to 5 keywords",
            "price:number",
        ])
        .expect("fields")
        .with_provider(provider, model);
    spec.options.max_output_tokens = Some(512);
    spec.validate().expect("a valid spec");
    let template = RequestTemplate::new(&spec, &columns);
    let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
    for row in 0..rows {
        template
            .render(row, |i| cells[i], &mut scratch, &mut escaped, &mut out)
            .expect("rendered");
    }
    out
}

/// Request lines as rowsmith renders them, for every provider format, validated against the
/// official SDKs' request types with unknown keys refused (`sdk/check_contract.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_requests_fit_the_official_sdks_request_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut paths = Vec::new();
    for (provider, model) in [
        ("openai", "gpt-4o-mini"),
        ("openai", "o3-mini"),
        ("anthropic", "claude-3-5-haiku-latest"),
        ("mistral", "mistral-small-latest"),
    ] {
        let out = rendered_lines(provider, model, 3);
        let path = dir.path().join(format!("{provider}-{model}.jsonl"));
        std::fs::write(&path, &out).expect("write");
        paths.push((provider, path));
    }
    let of = |wanted: &str| {
        paths
            .iter()
            .find(|(p, _)| *p == wanted)
            .map(|(_, path)| path.clone())
            .expect("rendered")
    };
    let (anthropic, mistral) = (of("anthropic"), of("mistral"));
    // The bodies that create a batch, as the clients send them.
    let key = rowsmith_contract::messages::ShardKey {
        job_id: "contract_job".into(),
        attempt: 2,
        shard: 7,
    };
    let creates = serde_json::json!({
        "openai": rowsmith_providers::OpenAiClient::create_request(&key, "file-abc"),
        "mistral": rowsmith_providers::MistralClient::create_request(&key, "mistral-small-latest", "f-1"),
        "together": rowsmith_providers::TogetherClient::create_request(
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "file-1",
        ),
    });
    let creates_path = dir.path().join("creates.json");
    std::fs::write(&creates_path, creates.to_string()).expect("write");
    for (provider, path) in paths.iter().filter(|(p, _)| *p == "openai") {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/check_contract.py");
        let output = tokio::process::Command::new(python())
            .arg(&script)
            .arg(path)
            .arg(&anthropic)
            .arg(&mistral)
            .arg(&creates_path)
            .output()
            .await
            .expect("run python");
        assert!(
            output.status.success(),
            "{provider} {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Bedrock records as rowsmith renders them and the create its client sends, checked against
/// the `anthropic` SDK's request types and botocore's service model, then boto3 driving a job
/// through the simulator's control plane over S3 (`sdk/check_bedrock.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_records_and_creates_fit_the_aws_model_and_boto3_drives_the_simulator() {
    use bytes::Bytes;
    use rowsmith_contract::messages::ShardKey;
    use rowsmith_providers::{BatchProvider, BedrockClient};

    const MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";
    let s3 = rowsmith_tests::S3Server::start("bedrock-sdk").await;
    let mut settings = rowsmith_config::Settings::default();
    s3.configure_bedrock(&mut settings, "batch");
    let sim = SimSettings {
        listen: "127.0.0.1:0".into(),
        rows_per_second: 1000.0,
        validating: Duration::from_millis(50),
        finalizing: Duration::from_millis(50),
        bedrock_s3: settings.sim.bedrock_s3.clone(),
        ..SimSettings::default()
    };
    let shutdown = CancellationToken::new();
    let (address, _) = rowsmith_provider_sim::start(sim, shutdown.clone())
        .await
        .expect("sim");
    settings.provider.bedrock.base_url = Some(format!("http://{address}"));
    let client = BedrockClient::new(&settings.provider.bedrock).expect("client");
    let key = ShardKey {
        job_id: "news_2026".into(),
        attempt: 1,
        shard: 3,
    };
    let file = format!(
        "s3://{}/batch/news_2026/1.3.1765152000000/input.jsonl",
        s3.bucket
    );
    let create = client
        .create_request(&key, MODEL, &file)
        .expect("create request");
    let rendered = rendered_lines("bedrock", MODEL, 120);
    // rowsmith's own client signs a create, a read, a listing and a stop: the check
    // recomputes those signatures.
    let uploaded = client
        .upload(&key, Bytes::from(rendered.clone()).into())
        .await
        .expect("upload");
    let batch = client
        .create(&key, MODEL, &uploaded, Bytes::new().into())
        .await
        .expect("create");
    client.status(&batch).await.expect("status");
    let window = rowsmith_providers::CreateWindow {
        since_ms: 0,
        until_ms: i64::MAX / 2,
        request_count: 120,
        file_id: Some(uploaded.clone()),
    };
    let found = client.find(&key, &window).await.expect("find");
    assert_eq!(found, std::slice::from_ref(&batch), "found by name");
    client.cancel(&batch).await.expect("stop");
    let dir = tempfile::tempdir().expect("tempdir");
    let (lines, request) = (
        dir.path().join("lines.jsonl"),
        dir.path().join("create.json"),
    );
    std::fs::write(&lines, &rendered).expect("write");
    std::fs::write(&request, create.to_string()).expect("write");
    let keys = serde_json::json!({"AKIDROWSMITHTEST": "rowsmith-test-secret"});
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/check_bedrock.py");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .arg(&lines)
            .arg(&request)
            .arg(format!("http://{address}"))
            .arg(s3.endpoint())
            .arg(&s3.bucket)
            .arg(keys.to_string())
            .output(),
    )
    .await
    .expect("the check finished in time")
    .expect("run python");
    shutdown.cancel();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("checked 120 records"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Together lines as rendered, checked against the `together` SDK's request types and its own
/// `check_file`, then that SDK uploading them through the simulator's 3-step flow (the second
/// upload of the same bytes deduplicated), driving a batch to COMPLETED and another to
/// CANCELLED (`sdk/check_together.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn together_lines_fit_the_together_sdk_and_it_drives_batches_through_the_simulator() {
    let rendered = rendered_lines("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("together.jsonl");
    std::fs::write(&path, rendered).expect("write");
    let (address, shutdown) = start_sim().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/check_together.py");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(&script)
            .arg(format!("http://{address}/together/v1"))
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK check finished in time")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("checked 20 lines"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats: serde_json::Value = reqwest::get(format!("http://{address}/sim/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json");
    shutdown.cancel();
    assert_eq!(stats["together_batches_created"], 2, "{stats}");
    assert_eq!(stats["batches_created"], 2, "{stats}");
    assert_eq!(stats["files_uploaded"], 2, "{stats}");
    assert_eq!(
        stats["batches_per_shard"],
        serde_json::json!({"sdk.1.0": 1, "sdk.1.1": 1}),
        "the shard is read from the uploaded file's name: {stats}"
    );
    assert!(
        stats["together_uploads_deduplicated"].as_u64() >= Some(1),
        "{stats}"
    );
}
