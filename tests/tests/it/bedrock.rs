//! Bedrock batch inference end to end: records through S3 (moto), jobs through the
//! simulator's control plane, signed calls, the per-job minimum of records kept by the shard
//! cutter, a lost create answer that makes no second job, and a rest too small to retry on
//! Bedrock.

use std::time::Duration;

use rowsmith_config::{LostResponse, Settings, SimFaults};
use rowsmith_contract::events::EventKind;
use rowsmith_contract::records::JobState;
use rowsmith_contract::spec::{Fallback, JobSpec};
use rowsmith_tests::{S3Server, Stack};

use crate::pipeline::{awkward_rows, spec, to_csv};

const MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

/// 278 awkward rows: 250 requests (every tenth row is empty and sends none).
const ROWS: usize = 278;

async fn bedrock_stack(s3: &S3Server, configure: impl FnOnce(&mut Settings)) -> Stack {
    Stack::start_with(|settings: &mut Settings| {
        s3.configure_bedrock(settings, "batch");
        configure(settings);
    })
    .await
}

async fn bedrock_job(stack: &Stack, job_id: &str) -> JobSpec {
    let input = stack
        .upload_input(&format!("{job_id}.csv"), to_csv(&awkward_rows(ROWS)))
        .await;
    let mut job = spec(job_id, &input, "description");
    job.provider = "bedrock".into();
    job.model = MODEL.into();
    job.options.max_requests_per_batch = 200;
    job
}

async fn shard_requests(stack: &Stack, job_id: &str, attempt: u32, shards: u32) -> Vec<u64> {
    let mut sizes = Vec::new();
    for shard in 0..shards {
        sizes.push(
            stack
                .shard_record(job_id, attempt, shard)
                .await
                .request_count,
        );
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bedrock_job_completes_with_its_short_last_shard_made_up_to_the_minimum() {
    let s3 = S3Server::start("bedrock-e2e").await;
    let stack = bedrock_stack(&s3, |_| {}).await;
    let job_id = "bedrock-tail";
    stack.submit(&bedrock_job(&stack, job_id).await).await;
    let job = stack.wait_for_end(job_id, Duration::from_secs(90)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, failures) = stack.output_tables(&job).await;
    assert_eq!(enriched.1.len(), ROWS, "every row is in enriched.csv");
    assert!(failures.1.is_empty(), "{failures:?}");
    // Cut at 200, the last shard would hold 50, below Bedrock's 100 (the simulator fails
    // such a job): it takes 50 from the shard before.
    assert_eq!(shard_requests(&stack, job_id, 1, 2).await, [150, 100]);
    let stats = stack.sim_stats().await;
    assert_eq!(stats["bedrock_jobs_created"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bedrock_create_whose_answer_is_lost_makes_no_second_job() {
    let s3 = S3Server::start("bedrock-lost").await;
    let stack = bedrock_stack(&s3, |settings| {
        settings.sim.faults.create_response_lost_every = Some(1);
        settings.sim.faults.create_response_lost_as = LostResponse::Dropped;
        settings.creation.unconfirmed_wait = Duration::from_millis(500);
    })
    .await;
    let job_id = "bedrock-lost";
    stack.submit(&bedrock_job(&stack, job_id).await).await;
    let job = stack.wait_for_end(job_id, Duration::from_secs(90)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, failures) = stack.output_tables(&job).await;
    assert_eq!((enriched.1.len(), failures.1.len()), (ROWS, 0));
    let stats = stack.sim_stats().await;
    assert!(
        stats["create_responses_lost"].as_u64() >= Some(2),
        "each create lost its answer: {stats}"
    );
    assert_eq!(
        stats["bedrock_jobs_created"], 2,
        "one job per shard: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_too_few_for_a_bedrock_retry_end_in_the_failures_or_go_to_the_fallback() {
    let s3 = S3Server::start("bedrock-retry").await;
    let stack = bedrock_stack(&s3, |_| {}).await;
    let flaky = SimFaults {
        server_error_rate: 0.08,
        retryable_until_attempt: 1,
        ..Default::default()
    };
    // No fallback: the rows that failed are fewer than Bedrock takes in a job.
    let alone = "bedrock-rest";
    stack.set_sim_faults(alone, &flaky).await;
    let mut job = bedrock_job(&stack, alone).await;
    job.options.max_attempts = 3;
    stack.submit(&job).await;
    let warnings = stack.events_until(alone, EventKind::Completed).await;
    let ended = stack.wait_for_end(alone, Duration::from_secs(90)).await;
    assert_eq!(ended.state, JobState::Completed, "{:?}", ended.error);
    assert_eq!(ended.attempt, 1, "no Bedrock job of fewer than 100 records");
    let (enriched, failures) = stack.output_tables(&ended).await;
    let failed = failures.1.len() as u64;
    assert!((1..100).contains(&failed), "{failed} rows failed");
    assert_eq!(enriched.1.len() as u64 + failed, ROWS as u64);
    let warning = warnings
        .iter()
        .find(|event| event.kind == EventKind::Warning)
        .expect("a warning says why the rows were not retried");
    assert!(
        warning.message.contains(&format!("{failed} rows"))
            && warning.message.contains("at least 100")
            && warning.message.contains("--fallback"),
        "{}",
        warning.message
    );
    // With a fallback, the last attempt takes them to another provider.
    let rescued = "bedrock-fallback";
    stack.set_sim_faults(rescued, &flaky).await;
    let mut job = bedrock_job(&stack, rescued).await;
    // Other requests than the first job's, which the result cache would answer.
    job.instructions.push_str(" Keep it short.");
    job.options.max_attempts = 2;
    job.fallback = Some(Fallback {
        provider: "anthropic".into(),
        model: "claude-3-5-haiku-latest".into(),
    });
    stack.submit(&job).await;
    let ended = stack.wait_for_end(rescued, Duration::from_secs(90)).await;
    assert_eq!(ended.state, JobState::Completed, "{:?}", ended.error);
    assert_eq!(ended.attempt, 2);
    let (enriched, failures) = stack.output_tables(&ended).await;
    assert_eq!((enriched.1.len(), failures.1.len()), (ROWS, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bedrock_job_of_fewer_rows_than_a_batch_takes_is_refused_before_anything_is_sent() {
    let s3 = S3Server::start("bedrock-small").await;
    let stack = bedrock_stack(&s3, |_| {}).await;
    let job_id = "bedrock-small";
    let input = stack
        .upload_input("small.csv", to_csv(&awkward_rows(60)))
        .await;
    let mut job = spec(job_id, &input, "description");
    job.provider = "bedrock".into();
    job.model = MODEL.into();
    stack.submit(&job).await;
    let ended = stack.wait_for_end(job_id, Duration::from_secs(60)).await;
    assert_eq!(ended.state, JobState::Failed);
    let error = ended.error.expect("a reason");
    assert!(
        error.contains("at least 100") && error.contains("54 to send"),
        "{error}"
    );
    let stats = stack.sim_stats().await;
    assert_eq!(stats["bedrock_jobs_created"], 0, "{stats}");
}
