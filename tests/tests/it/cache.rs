//! Pay once across jobs: a request a completed job was answered for is not sent again; a
//! re-run of an edited table sends only the changed rows.

use std::time::Duration;

use rowsmith_contract::records::JobState;
use rowsmith_tests::Stack;

use crate::pipeline::{spec, to_csv};

fn rows(count: usize, edit: impl Fn(usize) -> Option<String>) -> Vec<Vec<String>> {
    (0..count)
        .map(|i| {
            let description =
                edit(i).unwrap_or_else(|| format!("A sturdy item number {i}, in blue"));
            vec![
                format!("{i:05}"),
                format!("Item {i}"),
                "1.00".into(),
                description,
                String::new(),
            ]
        })
        .collect()
}

async fn answered(stack: &Stack) -> u64 {
    stack.sim_stats().await["requests_answered"]
        .as_u64()
        .expect("requests_answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rerun_of_an_edited_table_sends_only_the_changed_rows() {
    let stack = Stack::start().await;
    let first = rows(500, |_| None);
    let input = stack.upload_input("cache-a.csv", to_csv(&first)).await;
    stack.submit(&spec("cache-a", &input, "description")).await;
    let a = stack
        .wait_for_end("cache-a", Duration::from_secs(120))
        .await;
    assert_eq!(a.state, JobState::Completed, "{:?}", a.error);
    assert_eq!(a.counts.rows_cached, 0);
    let sent_by_a = answered(&stack).await;
    assert_eq!(sent_by_a, 500);

    // 20 rows edited, 30 appended: only those 50 are sent.
    let mut second = rows(530, |i| {
        (i % 25 == 3).then(|| format!("Edited description {i}"))
    });
    second.truncate(530);
    let input = stack.upload_input("cache-b.csv", to_csv(&second)).await;
    stack.submit(&spec("cache-b", &input, "description")).await;
    let b = stack
        .wait_for_end("cache-b", Duration::from_secs(120))
        .await;
    assert_eq!(b.state, JobState::Completed, "{:?}", b.error);
    assert_eq!(
        answered(&stack).await - sent_by_a,
        50,
        "only changed and new rows are sent"
    );
    assert_eq!(b.counts.rows_cached, 480);
    assert_eq!(b.counts.succeeded, 530);

    // The cached rows carry the answers job A got for the same rows.
    let ((header_a, out_a), _) = stack.output_tables(&a).await;
    let ((header_b, out_b), _) = stack.output_tables(&b).await;
    assert_eq!(header_a, header_b);
    for i in (0..500).filter(|i| i % 25 != 3) {
        assert_eq!(out_a[i], out_b[i], "row {i}");
    }
    assert_eq!(out_b.len(), 530);
    assert!(
        out_b.iter().all(|row| !row[5].is_empty()),
        "every row has its answer"
    );

    // A third run of the same table sends nothing at all.
    let input = stack.upload_input("cache-c.csv", to_csv(&second)).await;
    stack.submit(&spec("cache-c", &input, "description")).await;
    let c = stack
        .wait_for_end("cache-c", Duration::from_secs(120))
        .await;
    assert_eq!(c.state, JobState::Completed, "{:?}", c.error);
    assert_eq!(answered(&stack).await - sent_by_a, 50);
    assert_eq!((c.counts.rows_cached, c.counts.shards_total), (530, 0));
    let ((_, out_c), _) = stack.output_tables(&c).await;
    assert_eq!(out_c, out_b);

    // Another model is another request: nothing is served from the cache.
    let mut other = spec("cache-d", &input, "description");
    other.model = "gpt-4o".into();
    stack.submit(&other).await;
    let d = stack
        .wait_for_end("cache-d", Duration::from_secs(120))
        .await;
    assert_eq!(d.state, JobState::Completed, "{:?}", d.error);
    assert_eq!(d.counts.rows_cached, 0);
    assert_eq!(answered(&stack).await - sent_by_a, 50 + 530);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_cache_off_every_job_pays() {
    let stack = Stack::start_with(|settings| settings.cache.enabled = false).await;
    let table = to_csv(&rows(100, |_| None));
    for job in ["nocache-a", "nocache-b"] {
        let input = stack
            .upload_input(&format!("{job}.csv"), table.clone())
            .await;
        stack.submit(&spec(job, &input, "description")).await;
        let record = stack.wait_for_end(job, Duration::from_secs(120)).await;
        assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
        assert_eq!(record.counts.rows_cached, 0);
    }
    assert_eq!(answered(&stack).await, 200);
    assert!(stack.store.list("cache/").await.expect("list").is_empty());
}
