//! The provider's HTTP answers: rate limits and server errors are retried as they ask;
//! `insufficient_quota` is not, and fails the job with the provider's words.

use std::time::Duration;

use rowsmith_contract::records::{JobState, SUBMITTER_CAPABILITY_KEY, SubmitterCapability};
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, spec, to_csv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_and_server_errors_are_retried_and_the_job_completes() {
    let stack = Stack::start_with(|settings| {
        settings.sim.faults.http_429_every = Some(3);
        settings.sim.faults.http_500_every = Some(7);
        // A 500 to a create is unconfirmed: looked for before creating again.
        settings.creation.unconfirmed_wait = Duration::from_millis(300);
    })
    .await;
    let input = stack
        .upload_input("limited.csv", to_csv(&awkward_rows(300)))
        .await;
    let mut job_spec = spec("limited", &input, "description");
    job_spec.options.max_requests_per_batch = 100;
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for_end("limited", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.counts.failed, 0);
    let stats = stack.sim_stats().await;
    assert!(
        stats["http_faults_injected"].as_u64().expect("count") >= 3,
        "{stats}"
    );
    assert_eq!(
        stats["batches_created"], 3,
        "faults answered before the request is handled: one batch per shard: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insufficient_quota_is_not_retried_and_suspends_the_job_with_the_reason() {
    let stack = Stack::start_with(|settings| settings.sim.faults.insufficient_quota = true).await;
    let input = stack
        .upload_input("broke.csv", to_csv(&awkward_rows(20)))
        .await;
    stack.submit(&spec("broke", &input, "description")).await;
    // Suspended, not failed: once its shards exist a job can be resumed (here, after the
    // account has credit again) without ingesting again.
    let job = stack
        .wait_for("broke", Duration::from_secs(60), |job| {
            job.state.is_stopped()
        })
        .await;
    assert_eq!(job.state, JobState::Suspended);
    let error = job.error.expect("error");
    assert!(
        error.contains("HTTP 429") && error.contains("insufficient_quota"),
        "{error}"
    );
    let stats = stack.sim_stats().await;
    // upload and one create: no retries, and no look-up (no earlier claim to reconcile).
    assert_eq!(stats["api_calls"], 2, "{stats}");
    assert_eq!(stats["batches_created"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_set_for_one_job_hit_only_that_job() {
    let stack = Stack::start().await;
    let faults = serde_json::json!({"bad_request_rate": 1.0});
    let answer = reqwest::Client::new()
        .post(format!("http://{}/sim/faults/doomed", stack.sim_address))
        .json(&faults)
        .send()
        .await
        .expect("set faults");
    assert!(answer.status().is_success());
    let input = stack
        .upload_input("two.csv", to_csv(&awkward_rows(40)))
        .await;
    stack.submit(&spec("doomed", &input, "description")).await;
    stack.submit(&spec("spared", &input, "description")).await;
    let doomed = stack.wait_for_end("doomed", Duration::from_secs(60)).await;
    let spared = stack.wait_for_end("spared", Duration::from_secs(60)).await;
    assert_eq!(
        (doomed.state, spared.state),
        (JobState::Completed, JobState::Completed)
    );
    assert_eq!((doomed.counts.succeeded, doomed.counts.failed), (0, 36));
    assert_eq!((spared.counts.succeeded, spared.counts.failed), (36, 0));
}

/// HTTP faults set for one job meet only that job's calls: its create answer is lost (and
/// the batch found again), while another job running at the same time is answered plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_and_download_faults_set_for_one_job_meet_only_its_calls() {
    create_and_download_faults_meet_only_their_job("sim").await;
}

/// The same on Gemini with every shard uploaded as a file, so its results are a file
/// download (Google's own path) that the faults cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_create_and_download_faults_set_for_one_job_meet_only_its_calls() {
    create_and_download_faults_meet_only_their_job("gemini").await;
}

async fn create_and_download_faults_meet_only_their_job(provider: &str) {
    let stack = Stack::start_with(|settings: &mut rowsmith_config::Settings| {
        settings.creation.unconfirmed_wait = Duration::from_millis(1200);
        settings.provider.gemini.inline_max_bytes = 0;
    })
    .await;
    let lossy = rowsmith_config::SimFaults {
        create_response_lost_every: Some(1),
        create_response_lost_as: rowsmith_config::LostResponse::ServerError,
        download_dropped_every: Some(2),
        ..Default::default()
    };
    stack.set_sim_faults("lossy", &lossy).await;
    for job_id in ["lossy", "plain"] {
        let input = stack
            .upload_input(&format!("{job_id}.csv"), to_csv(&awkward_rows(100)))
            .await;
        let mut job_spec = spec(job_id, &input, "description");
        job_spec.provider = provider.into();
        stack.submit(&job_spec).await;
    }
    for job_id in ["lossy", "plain"] {
        let job = stack.wait_for_end(job_id, Duration::from_secs(120)).await;
        assert_eq!(job.state, JobState::Completed, "{job_id}: {:?}", job.error);
        let (enriched, failures) = stack.output_tables(&job).await;
        assert_eq!(enriched.1.len(), 100, "{job_id}");
        assert!(failures.1.is_empty(), "{job_id}: {failures:?}");
    }
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 2, "one batch per job: {stats}");
    assert_eq!(
        stats["create_responses_lost"], 1,
        "only the lossy job's create lost its answer: {stats}"
    );
    assert!(
        stats["downloads_dropped"].as_u64() >= Some(1),
        "the lossy job's downloads were cut: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_for_a_provider_no_submitter_has_a_key_for_is_refused_before_anything_is_sent() {
    let stack = Stack::start_with(|settings| settings.provider.openai.api_key = None).await;
    // The submitter announces the providers it holds a key for when it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let capability = loop {
        let record = stack
            .bus
            .read::<SubmitterCapability>(SUBMITTER_CAPABILITY_KEY)
            .await
            .expect("read");
        if let Some((capability, _)) = record {
            break capability;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no capability announced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let announced: Vec<&str> = capability.providers.iter().map(String::as_str).collect();
    assert_eq!(
        announced,
        ["anthropic", "gemini", "groq", "mistral", "sim", "together"],
        "never a key, only provider names"
    );
    let input = stack
        .upload_input("keyless.csv", to_csv(&awkward_rows(20)))
        .await;
    let mut job_spec = spec("keyless", &input, "description");
    job_spec.provider = "openai".into();
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for("keyless", Duration::from_secs(60), |job| {
            job.state.is_stopped()
        })
        .await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.expect("error");
    assert!(
        error.contains("no API key for openai at any submitter")
            && error.contains("OPENAI_API_KEY"),
        "{error}"
    );
    assert_eq!(stack.sim_stats().await["api_calls"], 0, "nothing was sent");
    assert_eq!(job.counts.rows_total, 0, "nothing was read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_simulator_refuses_calls_without_credentials_as_each_api_does() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let base = format!("http://{}", stack.sim_address);
    let client = reqwest::Client::new();
    let answer = client
        .get(format!("{base}/v1/batches"))
        .send()
        .await
        .expect("call");
    assert_eq!(answer.status(), 401);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("didn't provide an API key")),
        "{body}"
    );
    let answer = client
        .get(format!("{base}/v1/messages/batches"))
        .send()
        .await
        .expect("call");
    assert_eq!(answer.status(), 401);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(
        (body["type"].as_str(), body["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error")),
        "{body}"
    );
    let answer = client
        .get(format!("{base}/v1/messages/batches"))
        .header("x-api-key", "sk-ant-x")
        .send()
        .await
        .expect("call");
    assert_eq!(answer.status(), 400, "anthropic-version is required");
    let answer = client
        .get(format!("{base}/v1/batches"))
        .bearer_auth("sk-x")
        .send()
        .await
        .expect("call");
    assert_eq!(answer.status(), 200);
    assert_eq!(
        stack.sim_stats().await["api_calls"],
        1,
        "refusals come first"
    );
}
