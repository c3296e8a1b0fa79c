//! A batch is created once per shard attempt under the faults that make real systems pay
//! twice: a create whose answer is lost after the batch exists, two deliveries at once, a
//! crash between create and record with a provider whose batches carry no shard key, and a
//! handler slower than `ack_wait`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use rowsmith_bus::{Bus, Cas, ConsumerSpec, Delivery, Outcome, run_worker};
use rowsmith_config::{LostResponse, Settings};
use rowsmith_contract::messages::{ShardKey, ShardReady, subjects};
use rowsmith_contract::records::{
    CreateClaim, JobRecord, JobState, ShardRecord, ShardState, job_key, shard_key,
};
use rowsmith_jobs::shards::{ShardSize, create_shard_records};
use rowsmith_providers::{BatchProvider, Providers};
use rowsmith_store::layout;
use rowsmith_tests::{NatsServer, Stack};

use crate::pipeline::{awkward_rows, spec, to_csv};

/// A 300-row job in three shards on `provider` while every create's answer is lost as `how`:
/// the job completes, every batch was created exactly once, none had to be cancelled.
async fn every_create_answer_lost(provider: &str, how: LostResponse) {
    let stack = Stack::start_with(|settings: &mut Settings| {
        settings.sim.faults.create_response_lost_every = Some(1);
        settings.sim.faults.create_response_lost_as = how;
        settings.sim.faults.slow_create = Duration::from_millis(1500);
        settings.provider.openai.timeout = Duration::from_millis(700);
        settings.provider.anthropic.timeout = Duration::from_millis(700);
        settings.provider.gemini.timeout = Duration::from_millis(700);
        settings.provider.mistral.timeout = Duration::from_millis(700);
        settings.provider.together.timeout = Duration::from_millis(700);
        settings.creation.unconfirmed_wait = Duration::from_millis(1200);
    })
    .await;
    let job_id = format!("lost-{provider}-{how:?}").to_lowercase();
    let input = stack
        .upload_input("lost.csv", to_csv(&awkward_rows(300)))
        .await;
    let mut job_spec = spec(&job_id, &input, "description");
    job_spec.provider = provider.into();
    job_spec.options.max_requests_per_batch = 100;
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end(&job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, failures) = stack.output_tables(&job).await;
    assert_eq!(enriched.1.len(), 300, "every row is in enriched.csv");
    assert!(failures.1.is_empty(), "{failures:?}");
    let stats = stack.sim_stats().await;
    assert!(
        stats["create_responses_lost"].as_u64() >= Some(3),
        "each create lost its answer: {stats}"
    );
    assert_eq!(stats["batches_created"], 3, "one batch per shard: {stats}");
    assert_eq!(
        stats["batches_cancelled"], 0,
        "no orphan to cancel: {stats}"
    );
    for shard in 0..3 {
        let record = stack.shard_record(&job_id, 1, shard).await;
        assert!(record.orphan_batches.is_empty(), "{record:?}");
        assert_eq!(record.creating, None, "the claim ends with the record");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_create_answered_500_after_the_batch_exists_makes_no_second_batch() {
    every_create_answer_lost("sim", LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_create_whose_connection_drops_makes_no_second_batch() {
    every_create_answer_lost("sim", LostResponse::Dropped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_create_slower_than_the_client_timeout_makes_no_second_batch() {
    every_create_answer_lost("sim", LostResponse::Slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mistral_create_answered_500_after_the_job_exists_makes_no_second_job() {
    every_create_answer_lost("mistral", LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn together_create_answered_500_after_the_batch_exists_makes_no_second_batch() {
    every_create_answer_lost("together", LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn together_create_whose_connection_drops_makes_no_second_batch() {
    every_create_answer_lost("together", LostResponse::Dropped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_create_answered_503_after_the_batch_exists_makes_no_second_batch() {
    every_create_answer_lost("gemini", LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_create_whose_connection_drops_makes_no_second_batch() {
    every_create_answer_lost("gemini", LostResponse::Dropped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_create_slower_than_the_client_timeout_makes_no_second_batch() {
    every_create_answer_lost("gemini", LostResponse::Slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_create_answered_500_after_the_batch_exists_makes_no_second_batch() {
    every_create_answer_lost("anthropic", LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_create_slower_than_the_client_timeout_makes_no_second_batch() {
    every_create_answer_lost("anthropic", LostResponse::Slow).await;
}

/// A Gemini upload of three chunks while every chunk's answer (the last one's too) is lost
/// as `how` after the chunk was stored: the client asks the session how far it got and goes on from there, so the file
/// holds every byte once and no second session is opened.
async fn upload_chunk_answers_lost(how: LostResponse) {
    let stack = Stack::start_services(
        |settings: &mut Settings| {
            settings.sim.faults.upload_chunk_lost_every = Some(1);
            settings.sim.faults.create_response_lost_as = how;
            settings.sim.faults.slow_create = Duration::from_millis(2500);
            settings.provider.gemini.timeout = Duration::from_millis(1500);
            settings.provider.gemini.inline_max_bytes = 0;
        },
        &[],
    )
    .await;
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let gemini = providers.get("gemini").expect("gemini");
    let chunk = rowsmith_providers::gemini::UPLOAD_CHUNK;
    let line = format!("{{\"key\":\"r\",\"request\":\"{}\"}}\n", "x".repeat(1000));
    let lines = Bytes::from(line.repeat((2 * chunk + chunk / 2) / line.len()));
    let key = ShardKey {
        job_id: "chunks".into(),
        attempt: 1,
        shard: 0,
    };
    let file = gemini
        .upload(&key, lines.clone().into())
        .await
        .expect("uploaded");
    let stats = stack.sim_stats().await;
    assert!(
        stats["upload_chunks_lost"].as_u64() >= Some(3),
        "every chunk lost its answer: {stats}"
    );
    assert_eq!(stats["files_uploaded"], 1, "one file: {stats}");
    let resource: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/v1beta/{file}", stack.sim_address))
        .header("x-goog-api-key", "k")
        .send()
        .await
        .expect("get file")
        .json()
        .await
        .expect("file");
    assert_eq!(
        resource["sizeBytes"],
        lines.len().to_string(),
        "every byte once: {resource}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gemini_upload_chunk_answered_503_after_it_was_stored_is_not_sent_twice() {
    upload_chunk_answers_lost(LostResponse::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gemini_upload_chunk_whose_connection_drops_is_not_sent_twice() {
    upload_chunk_answers_lost(LostResponse::Dropped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gemini_upload_chunk_slower_than_the_client_timeout_is_not_sent_twice() {
    upload_chunk_answers_lost(LostResponse::Slow).await;
}

/// A Gemini shard held back at create (429 `RESOURCE_EXHAUSTED`) longer than Gemini keeps its
/// uploaded file: the create that names the deleted file is answered 404, the shard is
/// uploaded again, and the job completes with one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gemini_shard_whose_uploaded_file_expired_before_its_create_is_uploaded_again() {
    let stack = Stack::start_with(|settings: &mut Settings| {
        settings.provider.gemini.inline_max_bytes = 0;
        settings.sim.gemini_file_ttl = Duration::from_secs(2);
    })
    .await;
    let job_id = "file-expired";
    let refused = rowsmith_config::SimFaults {
        insufficient_quota: true,
        ..Default::default()
    };
    stack.set_sim_faults(job_id, &refused).await;
    let input = stack
        .upload_input("expired.csv", to_csv(&awkward_rows(100)))
        .await;
    let mut job_spec = spec(job_id, &input, "description");
    job_spec.provider = "gemini".into();
    stack.submit(&job_spec).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = stack.sim_stats().await;
        if stats["files_uploaded"] == 1 && stats["http_faults_injected"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refused create: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The file's TTL runs out while its creates are refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack
        .set_sim_faults(job_id, &rowsmith_config::SimFaults::default())
        .await;
    let job = stack.wait_for_end(job_id, Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, failures) = stack.output_tables(&job).await;
    assert_eq!((enriched.1.len(), failures.1.len()), (100, 0));
    let stats = stack.sim_stats().await;
    assert_eq!(stats["files_uploaded"], 2, "uploaded again once: {stats}");
    assert_eq!(stats["batches_created"], 1, "{stats}");
}

/// A job record and one shard of `lines`, ready to submit, with only NATS and the simulator.
async fn one_ready_shard(stack: &Stack, job_id: &str, provider: &str) -> (ShardReady, Bytes) {
    let mut job = spec(job_id, "inputs/none.csv", "description");
    job.provider = provider.into();
    if let Some(model) = rowsmith_contract::providers::default_model(provider) {
        job.model = model.into();
    }
    let mut record = JobRecord::new(job.clone());
    record.state = JobState::Running;
    stack
        .bus
        .create(&job_key(job_id), &record)
        .await
        .expect("job record");
    let key = ShardKey {
        job_id: job_id.into(),
        attempt: 1,
        shard: 0,
    };
    let line = match provider {
        "anthropic" => {
            r#"{"custom_id":"r0","params":{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"Row data to enhance:\ndescription: x\n\nRow context: "}]}}"#
        }
        "bedrock" => {
            r#"{"recordId":"r0","modelInput":{"anthropic_version":"bedrock-2023-05-31","max_tokens":64,"messages":[{"role":"user","content":"Row data to enhance:\ndescription: x\n\nRow context: "}]}}"#
        }
        _ => {
            r#"{"custom_id":"r0","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"Row data to enhance:\ndescription: x\n\nRow context: "}]}}"#
        }
    };
    let lines = Bytes::from(format!("{line}\n"));
    stack
        .store
        .put_bytes(&layout::requests(&key), lines.clone())
        .await
        .expect("requests");
    let size = ShardSize {
        requests: 1,
        bytes: lines.len() as u64,
    };
    create_shard_records(&stack.bus, &job, 1, &[size])
        .await
        .expect("shard record");
    let ready = ShardReady {
        key: key.clone(),
        provider: provider.into(),
        requests_path: layout::requests(&key),
        request_count: 1,
        bytes: lines.len() as u64,
    };
    (ready, lines)
}

fn submitter(stack: &Stack) -> rowsmith_submitter::Submitter {
    rowsmith_submitter::Submitter {
        bus: stack.bus.clone(),
        store: stack.store.clone(),
        providers: Providers::from_settings(&stack.settings.provider).expect("providers"),
        quota: Default::default(),
        creation: stack.settings.creation.clone(),
        chaos_crash_after_create: 0.0,
        abandoned: Default::default(),
    }
}

fn delivery(ready: &ShardReady) -> Delivery {
    Delivery {
        subject: subjects::SHARDS_READY.into(),
        payload: Bytes::from(serde_json::to_vec(ready).expect("json")),
        delivered: 1,
        last: false,
        exhausted: false,
        stream_sequence: 0,
    }
}

async fn shard_record(stack: &Stack, key: &ShardKey) -> ShardRecord {
    stack
        .bus
        .read::<ShardRecord>(&shard_key(key))
        .await
        .expect("read")
        .expect("shard")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_deliveries_of_one_shard_at_once_create_one_batch() {
    let s3 = rowsmith_tests::S3Server::start("twice").await;
    for provider in ["sim", "anthropic", "together", "bedrock"] {
        // Every answer takes a while, so both deliveries are inside the create at once.
        let stack = Stack::start_services(
            |settings: &mut Settings| {
                settings.sim.faults.response_delay = Duration::from_millis(300);
                s3.configure_bedrock(settings, provider);
            },
            &[],
        )
        .await;
        let job_id = format!("twice-{provider}");
        let (ready, _) = one_ready_shard(&stack, &job_id, provider).await;
        let submitter = submitter(&stack);
        let (first, second) = tokio::join!(
            rowsmith_submitter::handle(&submitter, delivery(&ready)),
            rowsmith_submitter::handle(&submitter, delivery(&ready)),
        );
        let outcomes = [first, second];
        assert!(
            outcomes.contains(&Outcome::Done),
            "one delivery submitted: {outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Done | Outcome::Retry { .. })),
            "the other waited for the claim or found the batch: {outcomes:?}"
        );
        // The one that waited comes back and finds the batch recorded.
        for outcome in outcomes {
            if let Outcome::Retry { .. } = outcome {
                let again = rowsmith_submitter::handle(&submitter, delivery(&ready)).await;
                assert_eq!(again, Outcome::Done);
            }
        }
        let stats = stack.sim_stats().await;
        assert_eq!(stats["batches_created"], 1, "{provider}: {stats}");
        if provider == "bedrock" {
            // The claim kept the second create from being sent at all, token or not.
            assert_eq!(stats["bedrock_idempotent_replays"], 0, "{stats}");
        }
        let record = shard_record(&stack, &ready.key).await;
        assert_eq!(record.state, ShardState::Submitted);
        assert!(record.orphan_batches.is_empty(), "{record:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_slower_than_the_claim_lease_keeps_its_claim_and_makes_one_batch() {
    for provider in ["sim", "anthropic"] {
        // Every answer takes 2.5 s, the lease is 1 s: the create outlives it several times.
        let stack = Stack::start_services(
            |settings: &mut Settings| {
                settings.sim.faults.response_delay = Duration::from_millis(2500);
                settings.creation.lease = Duration::from_secs(1);
            },
            &[],
        )
        .await;
        let job_id = format!("slow-create-{provider}");
        let (ready, _) = one_ready_shard(&stack, &job_id, provider).await;
        let submitter = submitter(&stack);
        let first = rowsmith_submitter::handle(&submitter, delivery(&ready));
        let second = async {
            // Once the first delivery's claim is older than its lease, a second arrives.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let record = shard_record(&stack, &ready.key).await;
                let old = record
                    .creating
                    .as_ref()
                    .is_some_and(|claim| rowsmith_contract::now_unix_ms() - claim.since_ms > 1_500);
                if old {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no claim: {record:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rowsmith_submitter::handle(&submitter, delivery(&ready)).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!(first, Outcome::Done, "{provider}");
        assert!(
            matches!(second, Outcome::Retry { .. }),
            "{provider}: the renewed claim made the second delivery wait: {second:?}"
        );
        let stats = stack.sim_stats().await;
        assert_eq!(stats["batches_created"], 1, "{provider}: {stats}");
        assert_eq!(stats["batches_cancelled"], 0, "{provider}: {stats}");
    }
}

/// The first life of a shard's submitter: it recorded the file, claimed the creation (a claim
/// that expires 2 s later), and, the test goes on, created the batch and died.
async fn first_life_claim(stack: &Stack, key: &ShardKey, file_id: &str) {
    let claimed_at = rowsmith_contract::now_unix_ms();
    stack
        .bus
        .modify(
            &shard_key(key),
            |shard: &mut ShardRecord| -> Result<_, rowsmith_bus::BusError> {
                shard.state = ShardState::Uploading;
                shard.provider_file_id = Some(file_id.to_owned());
                shard.creating = Some(CreateClaim {
                    owner: "first-life".into(),
                    since_ms: claimed_at,
                    until_ms: claimed_at + 2_000,
                });
                Ok(Cas::Write(()))
            },
        )
        .await
        .expect("claim");
}

/// The second life: the shard delivered again until it is done (once the first life's claim
/// has expired), within 10 s.
async fn second_life(stack: &Stack, ready: &ShardReady) -> Outcome {
    let submitter = submitter(stack);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = rowsmith_submitter::handle(&submitter, delivery(ready)).await;
        if outcome == Outcome::Done || tokio::time::Instant::now() > deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anthropic_submitter_that_crashed_after_creating_finds_the_batch_by_its_window() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let (ready, lines) = one_ready_shard(&stack, "crashed-a", "anthropic").await;
    let key = ready.key.clone();
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let anthropic = providers.get("anthropic").expect("anthropic");
    // An unrelated batch of another size, created just before: not to be taken for this one.
    let mut other = String::from_utf8(lines.to_vec()).expect("utf8");
    other.push_str(&other.replace("\"r0\"", "\"r1\""));
    let other_key = ShardKey {
        shard: 9,
        ..key.clone()
    };
    let unrelated = anthropic
        .create(
            &other_key,
            "claude-3-5-haiku-latest",
            "",
            Bytes::from(other).into(),
        )
        .await
        .expect("unrelated batch");
    // First life: claimed the creation, created the batch, died before recording it; its
    // claim has expired since.
    let file_id = format!("inline:{}", key.dotted());
    first_life_claim(&stack, &key, &file_id).await;
    let lost = anthropic
        .create(&key, "gpt-4o-mini", &file_id, lines.clone().into())
        .await
        .expect("create");
    assert_ne!(lost.id, unrelated.id);
    // Second life, once the claim has expired.
    assert_eq!(second_life(&stack, &ready).await, Outcome::Done);
    let record = shard_record(&stack, &key).await;
    assert_eq!(record.provider_batch_id.as_deref(), Some(lost.id.as_str()));
    let stats = stack.sim_stats().await;
    assert_eq!(
        stats["batches_created"], 2,
        "no batch beyond the two: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bedrock_submitter_that_crashed_after_creating_finds_the_job_by_its_name() {
    let s3 = rowsmith_tests::S3Server::start("crashed-b").await;
    // One record: the simulator's minimum is lowered so that the job does not fail (a failed
    // job is not one reconciliation keeps).
    let stack = Stack::start_services(
        |settings| {
            s3.configure_bedrock(settings, "b");
            settings.sim.bedrock_min_records = 1;
        },
        &[],
    )
    .await;
    let (ready, lines) = one_ready_shard(&stack, "crashed-b", "bedrock").await;
    let key = ready.key.clone();
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let bedrock = providers.get("bedrock").expect("bedrock");
    // First life: uploaded, recorded the file, claimed the creation, created the job and died
    // before recording it; its claim expires 2 s later.
    let file_id = bedrock
        .upload(&key, lines.clone().into())
        .await
        .expect("upload");
    first_life_claim(&stack, &key, &file_id).await;
    let model = rowsmith_contract::providers::default_model("bedrock").expect("model");
    let lost = bedrock
        .create(&key, model, &file_id, lines.into())
        .await
        .expect("create");
    // Second life, once the claim has expired: it lists jobs by the shard's name.
    assert_eq!(second_life(&stack, &ready).await, Outcome::Done);
    let record = shard_record(&stack, &key).await;
    assert_eq!(record.provider_batch_id.as_deref(), Some(lost.id.as_str()));
    let stats = stack.sim_stats().await;
    assert_eq!(stats["bedrock_jobs_created"], 1, "{stats}");
    assert_eq!(
        stats["bedrock_idempotent_replays"], 0,
        "found by its name, not saved by the token: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_slower_than_ack_wait_runs_once_and_nothing_waits_in_a_client_buffer() {
    let nats = NatsServer::start();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    let bus = Bus::connect(&settings.nats, "slow-handler-test")
        .await
        .expect("bus");
    let spec = ConsumerSpec {
        durable: "slow-test",
        filter_subject: subjects::BATCHES_ENDED,
        ack_wait: Duration::from_secs(2),
        max_deliver: 5,
        max_ack_pending: 100,
    };
    let consumer = bus.work_consumer(&spec).await.expect("consumer");
    for n in 0..2 {
        bus.publish(subjects::BATCHES_ENDED, &format!("slow-{n}"), &n)
            .await
            .expect("publish");
    }
    let runs: Arc<[AtomicU32; 2]> = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let done = Arc::new(AtomicU32::new(0));
    let shutdown = CancellationToken::new();
    let worker = {
        let (runs, done) = (runs.clone(), done.clone());
        tokio::spawn(run_worker(
            consumer.clone(),
            spec.clone(),
            1,
            shutdown.clone(),
            move |delivery: Delivery| {
                let (runs, done) = (runs.clone(), done.clone());
                async move {
                    let n: usize = serde_json::from_slice(&delivery.payload).expect("n");
                    runs[n].fetch_add(1, Ordering::SeqCst);
                    // Three times ack_wait.
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                    Outcome::Done
                }
            },
        ))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while done.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handlers did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut consumer = consumer;
    let info = consumer.info().await.expect("consumer info").clone();
    shutdown.cancel();
    worker.await.expect("join").expect("worker");
    let runs: Vec<u32> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    assert_eq!(runs, [1, 1], "each message handled once");
    assert_eq!(info.num_redelivered, 0, "the server redelivered nothing");
    assert_eq!(info.num_ack_pending, 0);
}

/// A delivery that claimed the creation and then failed while NATS was down (its refused
/// create could not even release the claim) leaves its claim live for `creation.lease` (10
/// minutes). The next delivery in the same process knows the claimant is gone and goes on at
/// once; one batch is made.
async fn a_claim_abandoned_in_a_nats_outage_is_taken_over_at_once(provider: &str) {
    let mut stack = Stack::start_services(
        |settings| {
            settings.sim.faults.insufficient_quota = true;
            settings.sim.faults.response_delay = Duration::from_secs(2);
        },
        &[],
    )
    .await;
    assert_eq!(stack.settings.creation.lease, Duration::from_secs(600));
    let job_id = format!("abandoned-{provider}");
    let (ready, _) = one_ready_shard(&stack, &job_id, provider).await;
    let submitter = submitter(&stack);
    let first = {
        let (submitter, ready) = (submitter.clone(), ready.clone());
        tokio::spawn(async move { rowsmith_submitter::handle(&submitter, delivery(&ready)).await })
    };
    // The claim is taken and the create is on its way (held 2 s by the simulator): NATS goes
    // down, so the refusal that follows cannot release the claim.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while shard_record(&stack, &ready.key).await.creating.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no claim was taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.nats.stop();
    let outcome = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the first delivery ends")
        .expect("join");
    assert_ne!(outcome, Outcome::Done, "nothing was created");
    stack.nats.resume();
    stack.set_sim_default_faults(&Default::default()).await;
    let claim = shard_record(&stack, &ready.key).await.creating;
    assert!(
        claim.is_some_and(|c| c.is_live(rowsmith_contract::now_unix_ms())),
        "the first delivery's claim is still live"
    );
    // Far inside the 10-minute lease, the next delivery creates the batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let outcome = rowsmith_submitter::handle(&submitter, delivery(&ready)).await;
        if outcome == Outcome::Done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shard waits for the abandoned claim: {outcome:?}"
        );
        if let Outcome::Retry { after } = outcome {
            tokio::time::sleep(after.min(Duration::from_secs(1))).await;
        }
    }
    let record = shard_record(&stack, &ready.key).await;
    assert!(record.provider_batch_id.is_some(), "{record:?}");
    assert_eq!(stack.sim_stats().await["batches_created"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_openai_claim_abandoned_in_a_nats_outage_is_taken_over_at_once() {
    a_claim_abandoned_in_a_nats_outage_is_taken_over_at_once("sim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anthropic_claim_abandoned_in_a_nats_outage_is_taken_over_at_once() {
    a_claim_abandoned_in_a_nats_outage_is_taken_over_at_once("anthropic").await;
}

/// The create took effect and its answer arrives while NATS is down: the delivery keeps
/// trying to record the batch and does once NATS is back, so a delivery in another process
/// (which cannot know the claimant is gone) finds the batch recorded instead of waiting out
/// the 10-minute claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_created_during_a_nats_outage_is_recorded_by_its_delivery_once_nats_is_back() {
    let mut stack = Stack::start_services(
        |settings| {
            settings.sim.faults.create_response_lost_every = Some(1);
            settings.sim.faults.create_response_lost_as = LostResponse::Slow;
            settings.sim.faults.slow_create = Duration::from_secs(2);
            // A KV write waits this long for NATS before it fails: shorter than the outage.
            settings.nats.request_timeout = Duration::from_secs(1);
        },
        &[],
    )
    .await;
    let (ready, _) = one_ready_shard(&stack, "record-outage", "sim").await;
    let first = {
        let submitter = submitter(&stack);
        let ready = ready.clone();
        tokio::spawn(async move { rowsmith_submitter::handle(&submitter, delivery(&ready)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stack.sim_stats().await["batches_created"] == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch was created"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The answer comes 2 s after the batch, while NATS is down for 4 s.
    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack.nats.resume();
    let outcome = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the delivery ends")
        .expect("join");
    assert_eq!(outcome, Outcome::Done);
    let record = shard_record(&stack, &ready.key).await;
    assert!(record.provider_batch_id.is_some(), "{record:?}");
    assert_eq!(record.creating, None);
    // Another process's delivery: nothing to wait for, nothing to create.
    let elsewhere = submitter(&stack);
    let outcome = rowsmith_submitter::handle(&elsewhere, delivery(&ready)).await;
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(stack.sim_stats().await["batches_created"], 1);
}
