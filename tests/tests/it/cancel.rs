//! Cancelling a running job: batches cancelled at the provider, finished rows kept, the rest
//! listed as cancelled, the job `cancelled` with its outputs.

use std::time::Duration;

use rowsmith_bus::lifecycle::request_cancel;
use rowsmith_contract::messages::ShardKey;
use rowsmith_contract::records::{JobState, ShardRecord, ShardState, shard_key};
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, spec, to_csv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_keeps_finished_rows_and_lists_the_rest_as_cancelled() {
    let stack = Stack::start_with(|settings| settings.sim.rows_per_second = 100.0).await;
    let rows: Vec<Vec<String>> = awkward_rows(2000)
        .into_iter()
        .map(|mut row| {
            row[3] = format!("{} to cancel", row[1]);
            row
        })
        .collect();
    let input = stack.upload_input("cancel.csv", to_csv(&rows)).await;
    let mut job_spec = spec("cancel-me", &input, "description");
    job_spec.options.max_requests_per_batch = 500;
    stack.submit(&job_spec).await;
    // Wait until the first batch is running, then cancel.
    let first = shard_key(&ShardKey {
        job_id: "cancel-me".into(),
        attempt: 1,
        shard: 0,
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let record = stack.bus.read::<ShardRecord>(&first).await.expect("read");
        if record.is_some_and(|(r, _)| r.state == ShardState::Submitted) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first batch never went out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    request_cancel(&stack.bus, "cancel-me")
        .await
        .expect("cancel")
        .expect("job still running");
    let job = stack
        .wait_for_end("cancel-me", Duration::from_secs(60))
        .await;
    assert_eq!(job.state, JobState::Cancelled, "{:?}", job.error);
    let ((_, enriched), (_, failures)) = stack.output_tables(&job).await;
    assert_eq!(
        enriched.len() + failures.len(),
        2000,
        "every row once across the two files"
    );
    assert!(
        !enriched.is_empty(),
        "rows finished before the cancel are kept"
    );
    assert!(
        failures.len() > 1000,
        "most rows were not done: {}",
        failures.len()
    );
    assert!(
        failures.iter().all(|row| row[1] == "cancelled"),
        "reasons: {:?}",
        failures
            .iter()
            .map(|r| &r[1])
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(
        job.shards_per_attempt.len(),
        1,
        "cancelled rows are not retried"
    );
    assert!(
        request_cancel(&stack.bus, "cancel-me")
            .await
            .expect("cancel")
            .is_err(),
        "an ended job cannot be cancelled"
    );
}
