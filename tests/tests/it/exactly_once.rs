//! The mechanisms behind "nothing lost, nothing paid twice", one at a time.

use std::time::Duration;

use bytes::Bytes;

use rowsmith_bus::Delivery;
use rowsmith_config::Settings;
use rowsmith_contract::messages::{BatchEnded, ShardKey, ShardReady, subjects};
use rowsmith_contract::records::{
    CreateClaim, JobRecord, JobState, ShardRecord, ShardState, job_key, shard_key,
};
use rowsmith_jobs::shards::{ShardSize, create_shard_records};
use rowsmith_providers::{BatchProvider, Providers};
use rowsmith_store::layout;
use rowsmith_tests::Stack;

use crate::pipeline::{awkward_rows, spec, to_csv};

fn delivery<T: serde::Serialize>(subject: &str, message: &T) -> Delivery {
    Delivery {
        subject: subject.into(),
        payload: Bytes::from(serde_json::to_vec(message).expect("json")),
        delivered: 2,
        last: false,
        exhausted: false,
        stream_sequence: 0,
    }
}

/// Records what a first life of the submitter left in the shard record before it died: the
/// uploaded file and a creation claim that started `claimed_ms_ago` and has run out since.
async fn record_first_life(stack: &Stack, key: &ShardKey, file_id: &str, claimed_ms_ago: i64) {
    stack
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<_, rowsmith_bus::BusError> {
                shard.state = ShardState::Uploading;
                shard.provider_file_id = Some(file_id.to_owned());
                let now = rowsmith_contract::now_unix_ms();
                shard.creating = Some(CreateClaim {
                    owner: "first-life".into(),
                    since_ms: now - claimed_ms_ago,
                    until_ms: now - 1,
                });
                Ok(rowsmith_bus::Cas::Write(()))
            },
        )
        .await
        .expect("record the first life");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitter_that_crashed_after_creating_a_batch_finds_it_instead_of_creating_another() {
    // Only NATS and the simulator: the test plays the submitter's two lives.
    let stack = Stack::start_services(|_| {}, &[]).await;
    let job = spec("crashed", "inputs/none.csv", "description");
    let mut record = JobRecord::new(job.clone());
    record.state = JobState::Running;
    stack
        .bus
        .create(&job_key("crashed"), &record)
        .await
        .expect("job record");
    let key = ShardKey {
        job_id: "crashed".into(),
        attempt: 1,
        shard: 0,
    };
    let line = r#"{"custom_id":"r0","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"Row data to enhance:\ndescription: x\n\nRow context: "}]}}"#;
    let lines = Bytes::from(format!("{line}\n"));
    stack
        .store
        .put_bytes(&layout::requests(&key), lines.clone())
        .await
        .expect("requests");
    create_shard_records(
        &stack.bus,
        &job,
        1,
        &[ShardSize {
            requests: 1,
            bytes: lines.len() as u64,
        }],
    )
    .await
    .expect("shard record");

    // First life: uploaded and recorded the file, claimed the creation, created the batch,
    // crashed before recording it; its claim has expired since.
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let sim = providers.get("sim").expect("sim");
    let file_id = sim
        .upload(&key, lines.clone().into())
        .await
        .expect("upload");
    record_first_life(&stack, &key, &file_id, 1_000).await;
    let orphan = sim
        .create(&key, "gpt-4o-mini", &file_id, lines.clone().into())
        .await
        .expect("create");

    // Second life: the redelivered message.
    let submitter = rowsmith_submitter::Submitter {
        bus: stack.bus.clone(),
        store: stack.store.clone(),
        providers: providers.clone(),
        quota: Default::default(),
        creation: Default::default(),
        chaos_crash_after_create: 0.0,
        abandoned: Default::default(),
    };
    let ready = ShardReady {
        key: key.clone(),
        provider: "sim".into(),
        requests_path: layout::requests(&key),
        request_count: 1,
        bytes: lines.len() as u64,
    };
    let outcome =
        rowsmith_submitter::handle(&submitter, delivery(subjects::SHARDS_READY, &ready)).await;
    assert_eq!(outcome, rowsmith_bus::Outcome::Done);
    let (shard, _) = stack
        .bus
        .read::<ShardRecord>(&shard_key(&key))
        .await
        .expect("read")
        .expect("shard");
    assert_eq!(shard.provider_batch_id.as_deref(), Some(orphan.id.as_str()));
    assert_eq!(shard.state, ShardState::Submitted);
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 1, "{stats}");
    assert_eq!(stats["files_uploaded"], 1, "the recorded upload is reused");

    // A third delivery (a lost ack) changes nothing either.
    let outcome =
        rowsmith_submitter::handle(&submitter, delivery(subjects::SHARDS_READY, &ready)).await;
    assert_eq!(outcome, rowsmith_bus::Outcome::Done);
    assert_eq!(stack.sim_stats().await["batches_created"], 1);
}

/// Submits an 80-row job of `rows` as `job_id` (one attempt, `faults` in the simulator) and
/// plays a first life of the submitter that made two batches for its shard (a zombie and a
/// crashed delivery) and died before recording either; with `until_ended`, both batches run
/// to the end before it returns. Returns the shard and the two batches.
async fn first_life_with_two_batches(
    stack: &Stack,
    job_id: &str,
    rows: &[Vec<String>],
    faults: &rowsmith_config::SimFaults,
    until_ended: bool,
) -> (
    ShardKey,
    rowsmith_providers::BatchRef,
    rowsmith_providers::BatchRef,
) {
    let input = stack
        .upload_input(&format!("{job_id}.csv"), to_csv(rows))
        .await;
    let mut job = spec(job_id, &input, "description");
    job.options.max_attempts = 1;
    stack.set_sim_faults(job_id, faults).await;
    stack.submit(&job).await;
    let key = ShardKey {
        job_id: job_id.into(),
        attempt: 1,
        shard: 0,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let record = loop {
        if let Some((record, _)) = stack
            .bus
            .read::<ShardRecord>(&shard_key(&key))
            .await
            .expect("read")
        {
            break record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest made no shard"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines = stack
        .store
        .get_bytes(&record.requests_path)
        .await
        .expect("requests");
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let sim = providers.get("sim").expect("sim");
    let file_id = sim
        .upload(&key, lines.clone().into())
        .await
        .expect("upload");
    let first = sim
        .create(&key, "gpt-4o-mini", &file_id, lines.clone().into())
        .await
        .expect("create");
    let second = sim
        .create(&key, "gpt-4o-mini", &file_id, lines.clone().into())
        .await
        .expect("create");
    for batch in [&first, &second].into_iter().filter(|_| until_ended) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !sim.status(batch).await.expect("status").state.is_terminal() {
            assert!(tokio::time::Instant::now() < deadline, "batch never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    record_first_life(stack, &key, &file_id, 30_000).await;
    (key, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orphan_still_being_cancelled_when_the_shards_batch_ends_is_waited_for() {
    // A batch runs about 2.6 s (80 rows at 40 a second, plus its phases); a cancel takes 4 s
    // to end, so the orphan cancelled at the start is still `cancelling` when the adopted
    // batch ends.
    let stack = Stack::start_services(
        |settings| {
            settings.sim.rows_per_second = 40.0;
            settings.sim.cancelling = Duration::from_secs(4);
        },
        &["ingest", "poller", "merger"],
    )
    .await;
    let rows = awkward_rows(80);
    let faults = rowsmith_config::SimFaults {
        server_error_rate: 0.4,
        ..Default::default()
    };
    let (key, _, _) =
        first_life_with_two_batches(&stack, "orphan-late", &rows, &faults, false).await;
    stack.start_service("submitter");
    let done = stack
        .wait_for_end("orphan-late", Duration::from_secs(60))
        .await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.error);
    let (shard, _) = stack
        .bus
        .read::<ShardRecord>(&shard_key(&key))
        .await
        .expect("read")
        .expect("shard");
    assert_eq!(shard.own_orphans.len(), 1, "{shard:?}");
    let collected: Vec<&str> = shard
        .orphan_results
        .iter()
        .map(|r| r.status.as_str())
        .collect();
    assert_eq!(
        collected,
        ["cancelled"],
        "the poller waited for the cancel to end"
    );
    let ((_, enriched), (_, failures)) = stack.output_tables(&done).await;
    assert_eq!(enriched.len() + failures.len(), rows.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orphan_batch_is_cancelled_and_its_answers_fill_the_rows_the_recorded_batch_failed() {
    // No submitter at first: the test plays a first life that made two batches for the shard
    // (a zombie and a crashed delivery) and died before recording either.
    let stack = Stack::start_services(|_| {}, &["ingest", "poller", "merger"]).await;
    let rows = awkward_rows(80);
    let faults = rowsmith_config::SimFaults {
        server_error_rate: 0.4,
        ..Default::default()
    };
    let (key, first, second) =
        first_life_with_two_batches(&stack, "orphan", &rows, &faults, true).await;

    // The second life finds both batches, adopts one and cancels the other.
    stack.start_service("submitter");
    let done = stack.wait_for_end("orphan", Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.error);
    let (shard, _) = stack
        .bus
        .read::<ShardRecord>(&shard_key(&key))
        .await
        .expect("read")
        .expect("shard");
    let adopted = shard.provider_batch_id.clone().expect("a recorded batch");
    let orphan = [&first.id, &second.id]
        .into_iter()
        .find(|id| **id != adopted)
        .expect("the other batch")
        .clone();
    assert_eq!(shard.orphan_batches, std::slice::from_ref(&orphan));
    assert_eq!(shard.own_orphans, std::slice::from_ref(&orphan));
    assert_eq!(shard.orphan_results.len(), 1, "{shard:?}");
    assert_eq!(stack.sim_stats().await["batches_created"], 2);

    // Which rows each batch failed: the simulator draws them from the batch id.
    let fails = |batch: &str, row: usize| {
        rowsmith_provider_sim::faults::fate(&faults, "orphan", 1, batch, &format!("r{row}"))
            != rowsmith_provider_sim::faults::Fate::Answer
    };
    // Rows with an empty description send no request.
    let sent: Vec<usize> = (0..rows.len())
        .filter(|r| !rows[*r][3].is_empty())
        .collect();
    let failed_by_adopted: Vec<usize> = sent
        .iter()
        .copied()
        .filter(|r| fails(&adopted, *r))
        .collect();
    let failed_by_both: Vec<usize> = failed_by_adopted
        .iter()
        .copied()
        .filter(|r| fails(&orphan, *r))
        .collect();
    assert!(
        failed_by_adopted.len() > failed_by_both.len(),
        "the orphan answers some row the adopted batch failed"
    );
    let ((_, enriched), (_, failures)) = stack.output_tables(&done).await;
    let failed: Vec<usize> = failures
        .iter()
        .map(|r| r[0].parse().expect("index"))
        .collect();
    assert_eq!(
        failed, failed_by_both,
        "only the rows both batches failed are failures"
    );
    assert_eq!(enriched.len() + failures.len(), rows.len());
    assert_eq!(
        done.counts.succeeded + done.counts.rows_skipped,
        enriched.len() as u64
    );
    let events = stack
        .events_until("orphan", rowsmith_contract::events::EventKind::Completed)
        .await;
    assert!(
        events.iter().any(|e| e
            .message
            .contains(&format!("a second batch {orphan} was made for shard 0"))),
        "the orphan is reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_job_id_is_accepted_once_and_a_different_spec_under_it_is_refused() {
    let stack = Stack::start().await;
    let input = stack
        .upload_input("once.csv", to_csv(&awkward_rows(30)))
        .await;
    let job = spec("once", &input, "description");
    stack.submit(&job).await;
    let first = stack.wait_for_end("once", Duration::from_secs(60)).await;
    assert_eq!(first.state, JobState::Completed);
    // The same spec again, past JetStream's duplicate window (another message id).
    stack
        .bus
        .publish(subjects::JOBS_SUBMIT, "once-again", &job)
        .await
        .expect("publish");
    let mut other = job.clone();
    other.instructions = "Something else entirely.".into();
    stack
        .bus
        .publish(subjects::JOBS_SUBMIT, "once-other", &other)
        .await
        .expect("publish");
    let events = stack
        .events_until("once", rowsmith_contract::events::EventKind::Refused)
        .await;
    let refused = events.last().expect("refused event");
    assert!(
        refused
            .message
            .contains("already taken by a job with a different spec"),
        "{}",
        refused.message
    );
    let (after, _) = stack
        .bus
        .read::<JobRecord>(&job_key("once"))
        .await
        .expect("read")
        .expect("job");
    assert_eq!(after.spec, job, "the first spec stays");
    assert_eq!(after.state, JobState::Completed);
    assert_eq!(
        stack.sim_stats().await["batches_created"],
        1,
        "the repeat created no batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_terminated_and_the_services_go_on() {
    let stack = Stack::start().await;
    for subject in [
        subjects::JOBS_SUBMIT,
        subjects::SHARDS_READY,
        subjects::BATCHES_SUBMITTED,
        subjects::BATCHES_ENDED,
    ] {
        let ack = stack
            .bus
            .js
            .publish(subject, Bytes::from_static(b"{not json"))
            .await
            .expect("publish");
        ack.await.expect("stored");
    }
    let input = stack
        .upload_input("after-poison.csv", to_csv(&awkward_rows(20)))
        .await;
    stack
        .submit(&spec("after-poison", &input, "description"))
        .await;
    let job = stack
        .wait_for_end("after-poison", Duration::from_secs(60))
        .await;
    assert_eq!(job.state, JobState::Completed);
    // Terminated messages leave the work queue: nothing is left behind.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = stack
            .bus
            .js
            .get_stream(rowsmith_bus::WORK_STREAM)
            .await
            .expect("stream");
        let left = stream.info().await.expect("info").state.messages;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} messages stuck in the work stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_on_its_last_delivery_suspends_the_job_with_a_readable_reason() {
    let stack = Stack::start_with(|settings: &mut Settings| {
        settings.merger.max_deliver = 2;
        settings.merger.ack_wait = Duration::from_secs(2);
    })
    .await;
    let job = spec("dead-letter", "inputs/none.csv", "description");
    let mut record = JobRecord::new(job.clone());
    record.state = JobState::Running;
    record.shards_per_attempt = vec![1];
    stack
        .bus
        .create(&job_key("dead-letter"), &record)
        .await
        .expect("job");
    // A batch ended, but its request file is gone: the merger cannot merge it, ever.
    let ended = BatchEnded {
        key: ShardKey {
            job_id: "dead-letter".into(),
            attempt: 1,
            shard: 0,
        },
        provider: "sim".into(),
        batch_id: "batch_x".into(),
        status: "completed".into(),
        output_path: None,
        errors_path: None,
        failure: None,
    };
    stack
        .bus
        .publish(subjects::BATCHES_ENDED, "ended.dead-letter", &ended)
        .await
        .expect("publish");
    // The job has a shard out, so it is suspended (answers kept), never failed.
    let stopped = stack
        .wait_for("dead-letter", Duration::from_secs(60), |job| {
            job.state.is_stopped()
        })
        .await;
    assert_eq!(stopped.state, JobState::Suspended);
    let error = stopped.error.expect("reason");
    assert!(
        error.contains("jobs/dead-letter/requests/a1-s0.jsonl")
            && error.contains("gave up after 2 deliveries"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_are_written_once_a_duplicate_finalize_does_nothing_a_redelivery_takes_over() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let job_id = "final-once";
    // A job whose rows all had empty targets: nothing to send, only outputs to write.
    let scratch = tempfile::tempdir().expect("scratch");
    let csv = scratch.path().join("input.csv");
    std::fs::write(&csv, "sku,description\n1,\n2,\n").expect("csv");
    let indexed_key = layout::indexed(job_id);
    let indexed = stack
        .store
        .local_target(&indexed_key, scratch.path())
        .expect("target");
    rowsmith_dataplane::table::index_input(
        &csv,
        &indexed,
        &stack.settings.limits,
        &stack.settings.duckdb.limits(),
    )
    .expect("index");
    stack
        .store
        .commit_local(&indexed_key, &indexed)
        .await
        .expect("commit");
    let mut record = JobRecord::new(spec(job_id, "inputs/none.csv", "description"));
    record.state = JobState::Merging;
    record.counts.rows_total = 2;
    record.counts.rows_skipped = 2;
    record.indexed_path = Some(indexed_key);
    // The handler of message 7 is writing the outputs.
    record.finalizing_by = Some(7);
    stack
        .bus
        .create(&job_key(job_id), &record)
        .await
        .expect("job");
    let duckdb = stack.settings.duckdb.limits();
    let finalize = |by: u64| {
        rowsmith_jobs::outputs::finalize_job(
            &stack.bus,
            rowsmith_jobs::outputs::OutputWriter {
                store: &stack.store,
                output: &stack.settings.output,
                cache: &stack.settings.cache,
                duckdb: &duckdb,
            },
            job_id,
            by,
        )
    };
    let enriched = layout::output(job_id, "enriched.csv");
    // Another message asking to finalize (a duplicate `batches.ended`): nothing happens.
    finalize(9).await.expect("duplicate");
    let (job, _) = stack
        .bus
        .read::<JobRecord>(&job_key(job_id))
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::Merging);
    assert!(!stack.store.exists(&enriched).await.expect("exists"));
    // Message 7 delivered again: its first handler died; this one writes the outputs.
    finalize(7).await.expect("takeover");
    let (job, _) = stack
        .bus
        .read::<JobRecord>(&job_key(job_id))
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let text = stack.read_text(&enriched).await;
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_naming_a_running_job_never_change_it_they_are_refused_as_events() {
    // Slow enough that the job is still running while the other messages arrive.
    let stack = Stack::start_with(|settings: &mut Settings| {
        settings.sim.rows_per_second = 200.0;
    })
    .await;
    let input = stack
        .upload_input("victim.csv", to_csv(&awkward_rows(400)))
        .await;
    let job = spec("victim-1", &input, "description");
    stack.submit(&job).await;
    stack
        .events_until(
            "victim-1",
            rowsmith_contract::events::EventKind::ShardSubmitted,
        )
        .await;
    // 21 bytes that are no JobSpec, an invalid spec, and a valid spec with a changed field,
    // each under the running job's id.
    let ack = stack
        .bus
        .js
        .publish(
            subjects::JOBS_SUBMIT,
            Bytes::from_static(b"{\"job_id\":\"victim-1\"}"),
        )
        .await
        .expect("publish");
    ack.await.expect("stored");
    let mut invalid = job.clone();
    invalid.options.max_attempts = 0;
    let mut changed = job.clone();
    changed.instructions = "Something else.".into();
    for (n, other) in [invalid, changed].iter().enumerate() {
        stack
            .bus
            .publish(subjects::JOBS_SUBMIT, &format!("victim-other-{n}"), other)
            .await
            .expect("publish");
    }
    let ended = stack
        .wait_for_end("victim-1", Duration::from_secs(120))
        .await;
    assert_eq!(ended.state, JobState::Completed, "{:?}", ended.error);
    assert_eq!(ended.spec, job, "the job's own spec stays");
    let (enriched, _) = stack.output_tables(&ended).await;
    assert_eq!(enriched.1.len(), 400);
    // Three refusals, each an event of the job, none its end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = stack
            .events_until("victim-1", rowsmith_contract::events::EventKind::Completed)
            .await;
        let refused: Vec<_> = events
            .iter()
            .filter(|e| e.kind == rowsmith_contract::events::EventKind::Refused)
            .collect();
        if refused.len() == 3 {
            assert!(
                refused.iter().all(|e| e.message.contains("victim-1")),
                "{refused:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusals seen: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobspec_without_an_id_delivered_twice_is_one_job() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let input = stack
        .upload_input("anonymous.csv", to_csv(&awkward_rows(20)))
        .await;
    let mut job = spec("unused", &input, "description");
    job.job_id = None;
    let ingest = rowsmith_ingest::Ingest {
        bus: stack.bus.clone(),
        store: stack.store.clone(),
        allowed_inputs: stack.settings.store.allowed_inputs.clone(),
        limits: stack.settings.limits.clone(),
        output: stack.settings.output.clone(),
        prices: stack.settings.prices.clone(),
        cache: stack.settings.cache.clone(),
        duckdb: stack.settings.duckdb.limits(),
    };
    // The same message (stream sequence 42) delivered again after its first handler died.
    let mut message = delivery(subjects::JOBS_SUBMIT, &job);
    message.stream_sequence = 42;
    for _ in 0..2 {
        let outcome = rowsmith_ingest::handle(&ingest, message.clone()).await;
        assert_eq!(outcome, rowsmith_bus::Outcome::Done);
    }
    let jobs = stack.bus.keys_with_prefix("job.").await.expect("keys");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].starts_with("job.job-42-"), "{jobs:?}");
}
