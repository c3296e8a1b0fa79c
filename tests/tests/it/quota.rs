//! The providers' enqueued-token quota: a batch refused with `token_limit_exceeded` is sent
//! again later, and a submitter that knows the quota holds shards back instead.

use std::time::Duration;

use rowsmith_contract::records::JobState;
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, read_csv, spec, to_csv};

async fn run_three_shard_job(stack: &Stack) -> rowsmith_contract::records::JobRecord {
    let rows: Vec<Vec<String>> = awkward_rows(3000)
        .into_iter()
        .map(|mut row| {
            row[3] = format!("{} for the quota", row[1]);
            row
        })
        .collect();
    let input = stack.upload_input("quota.csv", to_csv(&rows)).await;
    let mut job_spec = spec("quota", &input, "description");
    job_spec.options.max_requests_per_batch = 1000;
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end("quota", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.shards_per_attempt,
        [3],
        "quota refusals are not retry attempts"
    );
    assert_eq!(job.counts.failed, 0);
    let (_, enriched) = read_csv(
        &stack
            .read_text(job.outputs.enriched_csv.as_deref().expect("csv"))
            .await,
    );
    assert_eq!(enriched.len(), 3000);
    assert!(enriched.iter().all(|row| !row[5].is_empty()));
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_refused_for_the_token_quota_are_sent_again_and_the_job_completes() {
    let stack = Stack::start_with(|settings| {
        // One batch at a time fits the provider's quota; the submitter does not know it.
        settings.sim.faults.enqueued_token_quota = Some(1);
        // Batches that run half a second overlap for sure.
        settings.sim.rows_per_second = 2000.0;
        settings.quota.wait = Duration::from_millis(200);
    })
    .await;
    run_three_shard_job(&stack).await;
    let stats = stack.sim_stats().await;
    assert!(
        stats["token_limit_failures"].as_u64().expect("count") >= 1,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitter_that_knows_the_quota_holds_shards_back_and_is_never_refused() {
    let stack = Stack::start_with(|settings| {
        settings.sim.faults.enqueued_token_quota = Some(1);
        // Batches that run half a second overlap for sure.
        settings.sim.rows_per_second = 2000.0;
        settings
            .quota
            .enqueued_tokens
            .insert("gpt-4o-mini".into(), 1);
        settings.quota.wait = Duration::from_millis(100);
    })
    .await;
    run_three_shard_job(&stack).await;
    let stats = stack.sim_stats().await;
    assert_eq!(stats["token_limit_failures"], 0, "{stats}");
    assert_eq!(stats["batches_created"], 3);
}
