//! Where a job may read: only under `store.allowed_inputs`.

use std::time::Duration;

use rowsmith_contract::records::JobState;
use rowsmith_tests::Stack;

use crate::pipeline::spec;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_outside_the_allow_list_is_refused_before_it_is_read() {
    let stack = Stack::start().await;
    stack
        .submit(&spec("peek", "file:///etc/passwd", "description"))
        .await;
    let job = stack.wait_for_end("peek", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.expect("reason");
    assert!(
        error.contains("\"file:///etc/passwd\" is not allowed")
            && error.contains("store.allowed_inputs"),
        "{error}"
    );
    assert_eq!(job.counts.rows_total, 0, "nothing was read");
    assert!(
        !stack
            .store
            .exists("jobs/peek/input.indexed.parquet")
            .await
            .expect("exists")
    );
}
