//! A job that has spent money never ends `failed`: an error after its shards went out
//! suspends it with the reason, its finished rows are in partial outputs, and `resume`
//! finishes it without sending a row or creating a batch twice. A message whose deliveries
//! run out stops its job even when the handler never returned. A stopped job gives back its
//! share of the enqueued-token quota.

use std::time::Duration;

use rowsmith_bus::lifecycle::request_cancel;
use rowsmith_bus::lifecycle::request_resume;
use rowsmith_config::SimFaults;
use rowsmith_contract::events::EventKind;
use rowsmith_contract::messages::ShardKey;
use rowsmith_contract::records::{
    JobRecord, JobState, QuotaRecord, ShardRecord, ShardState, quota_key, shard_key,
};
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, read_csv, spec, to_csv};

/// Uploads `rows` awkward rows (every tenth with an empty description) for job `job_id`
/// and submits it in shards of `per_shard` requests.
async fn submit_job(stack: &Stack, job_id: &str, rows: usize, per_shard: u64) {
    let rows: Vec<Vec<String>> = awkward_rows(rows)
        .into_iter()
        .map(|mut row| {
            if !row[3].is_empty() {
                row[3] = format!("{} for {job_id}", row[1]);
            }
            row
        })
        .collect();
    let input = stack
        .upload_input(&format!("{job_id}.csv"), to_csv(&rows))
        .await;
    let mut job_spec = spec(job_id, &input, "description");
    job_spec.options.max_requests_per_batch = per_shard;
    stack.submit(&job_spec).await;
}

async fn shard_record(stack: &Stack, job_id: &str, shard: u32) -> ShardRecord {
    let key = shard_key(&ShardKey {
        job_id: job_id.into(),
        attempt: 1,
        shard,
    });
    let (record, _) = stack.bus.read(&key).await.expect("read").expect("shard");
    record
}

/// Polls the record of shard 0 of attempt 1 of `job_id` until `done` holds.
async fn wait_for_first_shard(stack: &Stack, job_id: &str, done: impl Fn(&ShardRecord) -> bool) {
    let first = shard_key(&ShardKey {
        job_id: job_id.into(),
        attempt: 1,
        shard: 0,
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let record = stack.bus.read::<ShardRecord>(&first).await.expect("read");
        if record.is_some_and(|(record, _)| done(&record)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard 0 of {job_id} never got there"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests in the job's shards that are not merged: the rows a partial output lists as
/// `pending`.
async fn unmerged_requests(stack: &Stack, job: &JobRecord) -> u64 {
    let mut requests = 0;
    for shard in job.unmerged_shards() {
        requests += shard_record(stack, job.spec.id(), shard)
            .await
            .request_count;
    }
    requests
}

/// (rows in enriched.csv, reasons in failures.csv) of the job's current outputs.
async fn outputs(stack: &Stack, job: &JobRecord) -> (usize, Vec<String>) {
    let ((_, enriched), (header, failures)) = stack.output_tables(job).await;
    assert_eq!(header[1], "_reason");
    (
        enriched.len(),
        failures.into_iter().map(|r| r[1].clone()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_key_mid_job_suspends_it_with_partial_outputs_and_resume_pays_nothing_twice() {
    // Shards of 500, 500, 500 and 300 requests: the small one ends seconds before the rest.
    let stack = Stack::start_with(|settings| settings.sim.rows_per_second = 100.0).await;
    submit_job(&stack, "rotated", 2000, 500).await;
    let merged_one = stack
        .wait_for("rotated", Duration::from_secs(60), |job| {
            !job.merged_shards.is_empty()
        })
        .await;
    assert_eq!(merged_one.shards_per_attempt, [4]);
    // The API key is rotated: every status check is refused from now on.
    let refused = SimFaults {
        status_unauthorized: true,
        ..SimFaults::default()
    };
    stack.set_sim_faults("rotated", &refused).await;
    let suspended = stack
        .wait_for("rotated", Duration::from_secs(30), |job| {
            job.state.is_stopped()
        })
        .await;
    assert_eq!(
        suspended.state,
        JobState::Suspended,
        "{:?}",
        suspended.error
    );
    let reason = suspended.error.clone().expect("a reason");
    assert!(
        reason.contains("HTTP 401") && reason.contains("OPENAI_API_KEY"),
        "{reason}"
    );
    assert!(
        suspended.merged_shards.len() < 4,
        "some shards were still out"
    );
    // Partial outputs: the rows of the merged shards answered, every other row pending.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (job, enriched, reasons) = loop {
        let job = stack
            .wait_for("rotated", Duration::from_secs(30), |job| {
                job.outputs.failures_csv.is_some()
            })
            .await;
        let (enriched, reasons) = outputs(&stack, &job).await;
        if reasons.len() as u64 == unmerged_requests(&stack, &job).await {
            break (job, enriched, reasons);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partial outputs never matched the record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job.state, JobState::Suspended);
    assert!(
        !reasons.is_empty() && reasons.iter().all(|r| r == "pending"),
        "{reasons:?}"
    );
    assert_eq!(
        enriched + reasons.len(),
        2000,
        "every row once across the two files"
    );
    assert!(
        enriched >= 300,
        "the finished shard's rows are kept: {enriched}"
    );
    let events = stack.events_until("rotated", EventKind::Suspended).await;
    let message = &events.last().expect("event").message;
    assert!(message.contains("rowsmith resume rotated"), "{message}");

    // The key is fixed; resume collects the batches that were out and sends nothing twice.
    stack.set_sim_faults("rotated", &SimFaults::default()).await;
    request_resume(&stack.bus, "rotated")
        .await
        .expect("resume")
        .expect("the job was suspended");
    let done = stack.wait_for_end("rotated", Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.error);
    assert_eq!(done.resumes, 1);
    let ((_, enriched), (_, failures)) = stack.output_tables(&done).await;
    assert_eq!((enriched.len(), failures.len()), (2000, 0));
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 4, "{stats}");
    assert_eq!(
        stats["requests_answered"], 1800,
        "no row answered twice: {stats}"
    );
    for count in stats["batches_per_shard"]
        .as_object()
        .expect("per shard")
        .values()
    {
        assert_eq!(count, 1, "a batch created twice: {stats}");
    }
    let kinds: Vec<EventKind> = stack
        .events_until("rotated", EventKind::Completed)
        .await
        .iter()
        .map(|e| e.kind)
        .filter(|k| {
            matches!(
                k,
                EventKind::Suspended | EventKind::Resumed | EventKind::Failed
            )
        })
        .collect();
    assert_eq!(kinds, [EventKind::Suspended, EventKind::Resumed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cancelled_while_holding_the_quota_gives_it_back_to_the_next_job() {
    let stack = Stack::start_with(|settings| {
        settings.sim.rows_per_second = 50.0;
        // One shard at a time for this model.
        settings
            .quota
            .enqueued_tokens
            .insert("gpt-4o-mini".into(), 1);
        settings.quota.wait = Duration::from_millis(100);
    })
    .await;
    submit_job(&stack, "holder", 1000, 1000).await;
    let quota = quota_key("sim", "gpt-4o-mini");
    wait_for_first_shard(&stack, "holder", |record| {
        record.state == ShardState::Submitted
    })
    .await;
    let (held, _) = stack
        .bus
        .read::<QuotaRecord>(&quota)
        .await
        .expect("read")
        .expect("quota");
    assert!(held.reserved.contains_key("holder.1.0"), "{held:?}");
    // The provider stops answering for this job's key, and its owner cancels it.
    let refused = SimFaults {
        status_unauthorized: true,
        ..SimFaults::default()
    };
    stack.set_sim_faults("holder", &refused).await;
    request_cancel(&stack.bus, "holder")
        .await
        .expect("cancel")
        .expect("job running");
    let holder = stack.wait_for_end("holder", Duration::from_secs(30)).await;
    assert_eq!(holder.state, JobState::Cancelled, "{:?}", holder.error);
    let (_, failures) = read_csv(
        &stack
            .read_text(holder.outputs.failures_csv.as_deref().expect("failures"))
            .await,
    );
    assert_eq!(failures.len(), 900, "every request listed as not done");
    assert!(failures.iter().all(|row| row[1] == "cancelled"));
    let (left, _) = stack
        .bus
        .read::<QuotaRecord>(&quota)
        .await
        .expect("read")
        .expect("quota");
    assert!(left.reserved.is_empty(), "{left:?}");
    // The next job of that model is not held back.
    submit_job(&stack, "next", 100, 1000).await;
    let next = stack.wait_for_end("next", Duration::from_secs(30)).await;
    assert_eq!(next.state, JobState::Completed, "{:?}", next.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merger_killed_on_its_last_delivery_leaves_the_job_suspended_with_the_reason() {
    let stack = Stack::start_services(
        |settings| {
            settings.merger.max_deliver = 2;
            settings.merger.ack_wait = Duration::from_secs(1);
        },
        &["ingest", "submitter", "poller"],
    )
    .await;
    submit_job(&stack, "killed", 100, 1000).await;
    wait_for_first_shard(&stack, "killed", |record| record.batch_status.is_some()).await;
    // The batch's end waits for the merger. Two mergers take it on the merger's own consumer
    // and die before acking (killed, out of memory): nothing is acked or handled.
    let spec = rowsmith_merger::service::consumer_spec(&stack.settings.merger);
    let consumer = stack.bus.work_consumer(&spec).await.expect("consumer");
    for delivery in 1..=2 {
        let mut pulled = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .expect("pull");
        let message = futures::StreamExt::next(&mut pulled)
            .await
            .expect("a delivery")
            .expect("message");
        assert_eq!(message.info().expect("info").delivered, delivery);
    }
    // A merger that lives sees the delivery past the last: the dead letter, recorded.
    stack.start_service("merger");
    let job = stack
        .wait_for("killed", Duration::from_secs(30), |job| {
            job.state.is_stopped()
        })
        .await;
    assert_eq!(job.state, JobState::Suspended, "{:?}", job.error);
    let reason = job.error.clone().expect("a reason");
    assert!(
        reason.contains("gave up after 2 deliveries") && reason.contains("killed or out of memory"),
        "{reason}"
    );
    // Resumed, the batch is watched again (not created again) and merged.
    request_resume(&stack.bus, "killed")
        .await
        .expect("resume")
        .expect("suspended");
    let done = stack.wait_for_end("killed", Duration::from_secs(30)).await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.error);
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 1, "{stats}");
    assert_eq!(stats["requests_answered"], 90, "{stats}");
}
