//! Together end to end: its three-step upload, a batch per shard, and a second job of the same
//! rows whose uploads Together answers with the files it already holds (409) while every
//! create's answer is lost: each shard still gets one batch, found again by the file it was
//! recorded with.

use std::time::Duration;

use rowsmith_config::{LostResponse, Settings};
use rowsmith_contract::records::JobState;
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, spec, to_csv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_together_job_of_rows_it_already_holds_gets_one_batch_per_shard_despite_lost_answers() {
    let stack = Stack::start_with(|settings: &mut Settings| {
        // The second job sends the same requests: no result cache to answer them.
        settings.cache.enabled = false;
        settings.provider.together.timeout = Duration::from_millis(700);
        settings.creation.unconfirmed_wait = Duration::from_millis(1200);
    })
    .await;
    let input = stack
        .upload_input("together.csv", to_csv(&awkward_rows(300)))
        .await;
    let job = |id: &str| {
        let mut job = spec(id, &input, "description");
        job.provider = "together".into();
        job.model = "meta-llama/Llama-3.3-70B-Instruct-Turbo".into();
        job.options.max_requests_per_batch = 100;
        job
    };
    stack.submit(&job("together-first")).await;
    let first = stack
        .wait_for_end("together-first", Duration::from_secs(60))
        .await;
    assert_eq!(first.state, JobState::Completed, "{:?}", first.error);
    let (enriched, failures) = stack.output_tables(&first).await;
    assert_eq!((enriched.1.len(), failures.1.len()), (300, 0));

    let lost = rowsmith_config::SimFaults {
        create_response_lost_every: Some(1),
        create_response_lost_as: LostResponse::Dropped,
        ..Default::default()
    };
    stack.set_sim_default_faults(&lost).await;
    stack.submit(&job("together-again")).await;
    let again = stack
        .wait_for_end("together-again", Duration::from_secs(120))
        .await;
    assert_eq!(again.state, JobState::Completed, "{:?}", again.error);
    let (enriched, failures) = stack.output_tables(&again).await;
    assert_eq!((enriched.1.len(), failures.1.len()), (300, 0));
    let stats = stack.sim_stats().await;
    assert!(
        stats["together_uploads_deduplicated"].as_u64() >= Some(3),
        "the second job's shards were files Together held: {stats}"
    );
    assert!(
        stats["create_responses_lost"].as_u64() >= Some(3),
        "{stats}"
    );
    // The simulator counts a batch for the shard that last announced its bytes.
    for job in ["together-first", "together-again"] {
        for shard in 0..3 {
            assert_eq!(
                stats["batches_per_shard"][format!("{job}.1.{shard}")],
                1,
                "one batch for {job} shard {shard}: {stats}"
            );
        }
    }
    assert_eq!(
        stats["together_batches_created"], 6,
        "three per job: {stats}"
    );
}
