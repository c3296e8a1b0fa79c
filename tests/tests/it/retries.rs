//! Rows that fail retryably are sent again until they succeed; permanent failures end in
//! failures.csv with their reason.

use std::collections::BTreeSet;
use std::time::Duration;

use rowsmith_config::SimFaults;
use rowsmith_contract::messages::ShardKey;
use rowsmith_contract::records::{JobState, ShardRecord};
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, read_csv, spec, to_csv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    retried_until_only_permanent_failures_remain("openai", "faulty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    retried_until_only_permanent_failures_remain("anthropic", "anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mistral_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    retried_until_only_permanent_failures_remain("mistral", "faulty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    // Gemini keeps nothing of an expired batch: the whole expired shard goes again. Each
    // shard (about 6 MB) goes inline, its answers in the batch's operation.
    retried_until_only_permanent_failures_remain("gemini", "faulty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_shards_uploaded_as_files_are_retried_the_same() {
    // And each request's error named `status`, as some implementers read them.
    retried_until_only_permanent_failures_remain_with("gemini", "faulty", |settings| {
        settings.provider.gemini.inline_max_bytes = 0;
        settings.sim.faults.gemini_errors_as_status = true;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bedrock_failed_and_partially_completed_rows_are_retried_and_only_permanent_failures_remain()
 {
    // The expiring shard ends `PartiallyCompleted`, with the records it did in its output.
    let s3 = rowsmith_tests::S3Server::start("bedrock-retries").await;
    retried_until_only_permanent_failures_remain_with("bedrock", "faulty", |settings| {
        s3.configure_bedrock(settings, "batch");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn together_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    retried_until_only_permanent_failures_remain("together", "faulty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groq_failed_and_expired_rows_are_retried_and_only_permanent_failures_remain() {
    retried_until_only_permanent_failures_remain("groq", "faulty").await;
}

/// A 10,000-row job with 5% row errors, 2% invalid JSON, a few schema violations and cut-off
/// answers, and one of its three shards expiring half done: every row ends in enriched.csv
/// but the ones made to fail permanently, which end in failures.csv.
async fn retried_until_only_permanent_failures_remain(provider: &str, stats_key: &str) {
    retried_until_only_permanent_failures_remain_with(provider, stats_key, |_| {}).await;
}

async fn retried_until_only_permanent_failures_remain_with(
    provider: &str,
    stats_key: &str,
    configure: impl FnOnce(&mut rowsmith_config::Settings),
) {
    let stack = Stack::start_with(|settings| {
        configure(settings);
        settings.sim.faults = SimFaults {
            server_error_rate: 0.04,
            bad_request_rate: 0.01,
            refusal_rate: 0.005,
            invalid_json_rate: 0.02,
            schema_violation_rate: 0.005,
            length_rate: 0.005,
            expire_shards: vec![1],
            expire_at_fraction: 0.5,
            ..SimFaults::default()
        };
    })
    .await;
    let rows: Vec<Vec<String>> = awkward_rows(10_000)
        .into_iter()
        .map(|mut row| {
            row[3] = format!("{} with a description", row[1]);
            row
        })
        .collect();
    let input = stack.upload_input("faulty.csv", to_csv(&rows)).await;
    let mut job_spec = spec("faulty", &input, "description");
    job_spec.provider = provider.into();
    job_spec.model = rowsmith_contract::providers::default_model(provider)
        .expect("a default model")
        .into();
    job_spec.options.max_requests_per_batch = 4000;
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end("faulty", Duration::from_secs(180)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.shards_per_attempt.len(),
        2,
        "one retry attempt: {:?}",
        job.shards_per_attempt
    );
    assert_eq!(job.shards_per_attempt[0], 3);

    let stats = stack.sim_stats().await;
    if provider == "gemini" {
        // Inline shards upload nothing; with inline off, every shard is a file.
        let uploaded = stats["files_uploaded"].as_u64().expect("files_uploaded");
        match stack.settings.provider.gemini.inline_max_bytes {
            0 => assert!(uploaded >= 4, "{uploaded} files uploaded"),
            _ => assert_eq!(uploaded, 0, "shards went inline"),
        }
    }
    let permanent: BTreeSet<i64> = stats["permanent_failures"][stats_key]
        .as_array()
        .expect("permanent failures")
        .iter()
        .map(|id| id.as_str().expect("id")[1..].parse().expect("row index"))
        .collect();
    assert!(
        (100..=260).contains(&permanent.len()),
        "{} permanent failures",
        permanent.len()
    );

    let (header, failures) = read_csv(
        &stack
            .read_text(job.outputs.failures_csv.as_deref().expect("failures"))
            .await,
    );
    assert_eq!(
        &header[..4],
        ["_row_index", "_reason", "_message", "_attempts"]
    );
    let failed: BTreeSet<i64> = failures
        .iter()
        .map(|r| r[0].parse().expect("index"))
        .collect();
    assert_eq!(
        failed, permanent,
        "failures.csv holds exactly the rows made to fail permanently"
    );
    // Gemini has no refusal: it withholds the answer for safety.
    let refusal = if provider == "gemini" {
        "content_filter"
    } else {
        "refusal"
    };
    for row in &failures {
        assert!(
            ["http_error", "invalid_request", refusal].contains(&row[1].as_str()),
            "reason {}",
            row[1]
        );
        // Sent once, or twice when its first batch expired before reaching it.
        assert!(
            ["1", "2"].contains(&row[3].as_str()),
            "a permanent failure is not retried: {}",
            row[3]
        );
        let index: usize = row[0].parse().expect("index");
        assert_eq!(
            &row[4..],
            &rows[index][..],
            "failures.csv keeps the original cells"
        );
    }

    let (_, enriched) = read_csv(
        &stack
            .read_text(job.outputs.enriched_csv.as_deref().expect("csv"))
            .await,
    );
    assert_eq!(enriched.len(), rows.len() - permanent.len());
    let expected: Vec<&Vec<String>> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| !permanent.contains(&(*i as i64)))
        .map(|(_, r)| r)
        .collect();
    for (output, input) in enriched.iter().zip(expected) {
        assert_eq!(&output[..5], &input[..]);
        assert!(["toys", "tools", "garden"].contains(&output[6].as_str()));
    }
    assert_eq!(job.counts.succeeded, enriched.len() as u64);
    assert_eq!(job.counts.failed, permanent.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_attempt_goes_to_the_fallback_provider_and_model() {
    falls_back("fallback", "sim", "anthropic", "claude-fallback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_falls_back_to_gemini() {
    falls_back(
        "fallback-to-gemini",
        "anthropic",
        "gemini",
        "gemini-fallback",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_falls_back_to_mistral() {
    falls_back(
        "fallback-to-mistral",
        "gemini",
        "mistral",
        "mistral-fallback",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bedrock_falls_back_to_together() {
    // About 90 rows fail on Bedrock: too few for another Bedrock job, not for Together.
    let s3 = rowsmith_tests::S3Server::start("bedrock-fallback").await;
    falls_back_with(
        "fallback-to-together",
        "bedrock",
        "together",
        "together-fallback",
        |settings| s3.configure_bedrock(settings, "batch"),
    )
    .await;
}

/// A 1,000-row job on `from` with 10% server errors and two attempts: the second goes to
/// `to` with `model`, in `to`'s own format, and every row ends once.
async fn falls_back(job_id: &str, from: &str, to: &str, model: &str) {
    falls_back_with(job_id, from, to, model, |_| {}).await;
}

async fn falls_back_with(
    job_id: &str,
    from: &str,
    to: &str,
    model: &str,
    configure: impl FnOnce(&mut rowsmith_config::Settings),
) {
    let stack = Stack::start_with(|settings| {
        configure(settings);
        settings.sim.faults = SimFaults {
            server_error_rate: 0.1,
            ..SimFaults::default()
        };
    })
    .await;
    let rows = awkward_rows(1000);
    let input = stack.upload_input("fallback.csv", to_csv(&rows)).await;
    let mut job_spec = spec(job_id, &input, "description");
    job_spec.provider = from.into();
    job_spec.model = rowsmith_contract::providers::default_model(from)
        .expect("a default model")
        .into();
    job_spec.options.max_attempts = 2;
    job_spec.fallback = Some(rowsmith_contract::spec::Fallback {
        provider: to.into(),
        model: model.into(),
    });
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end(job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.shards_per_attempt.len(), 2);
    let shard = stack.shard_record(job_id, 2, 0).await;
    assert_eq!(shard.provider, to);
    let requests = stack.read_text(&shard.requests_path).await;
    let first: serde_json::Value =
        serde_json::from_str(requests.lines().next().expect("a line")).expect("json");
    match to {
        "anthropic" => {
            assert_eq!(first["params"]["model"], model);
            assert_eq!(first["params"]["tool_choice"]["name"], "row_enrichment");
        }
        "gemini" => {
            assert!(first["key"].is_string() && first["request"]["contents"].is_array());
        }
        _ => assert_eq!(first["body"]["model"], model),
    }
    // The fallback's model reached the create call (Gemini and Mistral name it there).
    let batch_id = shard.provider_batch_id.clone().expect("a batch");
    let client = reqwest::Client::new();
    let base = &stack.settings.provider.gemini.base_url;
    let named = match to {
        "gemini" => Some(
            client
                .get(format!("{base}/v1beta/{batch_id}"))
                .header("x-goog-api-key", "k")
                .send()
                .await
                .expect("get")
                .json::<serde_json::Value>()
                .await
                .expect("json")["metadata"]["model"]
                .clone(),
        ),
        "mistral" => Some(
            client
                .get(format!("{base}/v1/batch/jobs/{batch_id}"))
                .bearer_auth("k")
                .send()
                .await
                .expect("get")
                .json::<serde_json::Value>()
                .await
                .expect("json")["model"]
                .clone(),
        ),
        _ => None,
    };
    if let Some(named) = named {
        let expected = if to == "gemini" {
            format!("models/{model}")
        } else {
            model.to_owned()
        };
        assert_eq!(named, serde_json::json!(expected));
    }
    // Roughly the 10% that failed on the first provider went to the second; all came back.
    let retried = requests.lines().count();
    assert!(
        (50..=150).contains(&retried),
        "{retried} rows in the fallback attempt"
    );
    let ((_, enriched), (_, failures)) = stack.output_tables(&job).await;
    assert_eq!(
        enriched.len() + failures.len(),
        1000,
        "every row once across the two files"
    );
    assert_eq!(
        job.counts.succeeded + job.counts.failed,
        900,
        "the 100 rows with empty targets are skipped"
    );
    // The result cache keeps only the answers to the job's own requests, not the fallback's.
    let segments = stack.store.list("cache/").await.expect("list");
    assert_eq!(segments.len(), 1, "{segments:?}");
    let path = stack.store.local_path(&segments[0]).expect("a file store");
    let keys =
        rowsmith_dataplane::table::read_cache_keys(&[path], &Default::default()).expect("segment");
    // Every row answered in attempt 1 (those not retried); none of the fallback's answers.
    assert_eq!(keys.len() as u64, 900 - retried as u64);
    assert!((keys.len() as u64) < job.counts.succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_past_its_completion_window_is_cancelled_and_its_rows_retried() {
    let stack = Stack::start_with(|settings| {
        settings.sim.rows_per_second = 0.1;
        settings.poller.completion_window = Duration::from_millis(600);
        settings.poller.grace = Duration::ZERO;
    })
    .await;
    let input = stack
        .upload_input("slow.csv", to_csv(&awkward_rows(20)))
        .await;
    let mut job_spec = spec("overdue", &input, "description");
    job_spec.options.max_attempts = 2;
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end("overdue", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.shards_per_attempt.len(),
        2,
        "the overdue rows were retried once"
    );
    let (_, failures) = read_csv(
        &stack
            .read_text(job.outputs.failures_csv.as_deref().expect("failures"))
            .await,
    );
    assert_eq!(
        failures.len(),
        18,
        "no row finished at one row in ten seconds within 0.6 s"
    );
    // Cancelled by the poller at the deadline, and the provider says so.
    assert!(
        failures
            .iter()
            .all(|row| row[1] == "cancelled" && row[3] == "2"),
        "{failures:?}"
    );
}

/// A batch past its completion window is cancelled, and what it finished is kept: only the
/// rest of its rows go into the next attempt, and no row is answered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overdue_batch_keeps_the_rows_it_finished_and_only_the_rest_are_resent() {
    let stack = Stack::start_with(|settings| {
        settings.sim.rows_per_second = 25.0;
        settings.poller.completion_window = Duration::from_secs(1);
        settings.poller.grace = Duration::from_secs(1);
    })
    .await;
    let input = stack
        .upload_input("overdue.csv", to_csv(&awkward_rows(100)))
        .await;
    let mut job_spec = spec("overdue", &input, "description");
    job_spec.options.max_attempts = 6;
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for_end("overdue", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, failures) = stack.output_tables(&job).await;
    assert_eq!(enriched.1.len(), 100);
    assert!(failures.1.is_empty(), "{failures:?}");
    assert!(job.attempt >= 2, "the first batch was overdue");
    let first = shard(&stack, "overdue", 1).await;
    let second = shard(&stack, "overdue", 2).await;
    assert!(
        first.succeeded > 0,
        "the overdue batch finished some rows: {first:?}"
    );
    assert_eq!(
        second.request_count,
        first.request_count - first.succeeded,
        "only the rows the overdue batch did not finish were sent again"
    );
    let stats = stack.sim_stats().await;
    assert_eq!(
        stats["requests_answered"], 90,
        "no row answered twice: {stats}"
    );
}

async fn shard(stack: &Stack, job_id: &str, attempt: u32) -> ShardRecord {
    stack.shard_record(job_id, attempt, 0).await
}

/// Answers cut off at `max_tokens` are retried with twice the room, up to the deployment's
/// cap; rows that still do not fit end as `truncated`.
async fn truncated_answers(cap: u32) -> (rowsmith_contract::records::JobRecord, Stack) {
    let stack = Stack::start_with(|settings| {
        settings.sim.faults.answer_tokens = Some(1500);
        settings.limits.max_output_tokens = cap;
    })
    .await;
    let input = stack
        .upload_input("long-answers.csv", to_csv(&awkward_rows(50)))
        .await;
    let mut job_spec = spec("long-answers", &input, "description");
    job_spec.provider = "anthropic".into();
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for_end("long-answers", Duration::from_secs(60))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    (job, stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_answers_are_retried_with_more_room_and_complete() {
    let (job, stack) = truncated_answers(8192).await;
    assert_eq!(job.shards_per_attempt.len(), 2, "one retry was enough");
    let (_, failures) = stack.output_tables(&job).await;
    assert!(failures.1.is_empty(), "{failures:?}");
    let key = ShardKey {
        job_id: "long-answers".into(),
        attempt: 2,
        shard: 0,
    };
    let requests = stack
        .read_text(&rowsmith_store::layout::requests(&key))
        .await;
    let first: serde_json::Value =
        serde_json::from_str(requests.lines().next().expect("a line")).expect("json");
    assert_eq!(
        first["params"]["max_tokens"], 2048,
        "twice the first attempt's 1024"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_that_never_fit_under_the_cap_end_as_truncated() {
    let (job, stack) = truncated_answers(1024).await;
    let (_, failures) = stack.output_tables(&job).await;
    assert_eq!(
        failures.1.len(),
        45,
        "every row with a target: {failures:?}"
    );
    assert!(
        failures.1.iter().all(|row| row[1] == "truncated"),
        "{failures:?}"
    );
}
