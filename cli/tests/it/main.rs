//! The `rowsmith` binary as a user runs it, against a real nats-server and the services.

use std::path::Path;
use std::process::{Command, Output};

use rowsmith_tests::Stack;

/// `rowsmith ARGS` aimed at the test stack.
fn command(stack: &Stack, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rowsmith"));
    command
        .args(args)
        .env("ROWSMITH_NATS__URL", stack.nats.url())
        .env("ROWSMITH_STORE__URL", &stack.settings.store.url)
        .env(
            "ROWSMITH_PROVIDER__SIM__BASE_URL",
            &stack.settings.provider.sim.base_url,
        )
        .env_remove("ROWSMITH_CONFIG");
    command
}

fn rowsmith(stack: &Stack, args: &[&str]) -> Output {
    command(stack, args).output().expect("run rowsmith")
}

/// `rowsmith estimate TABLE --json JOB...`, which must succeed, as JSON.
fn estimate_json(stack: &Stack, table: &str, job: &[&str]) -> serde_json::Value {
    let mut args = vec!["estimate", table, "--json"];
    args.extend_from_slice(job);
    let output = rowsmith(stack, &args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("estimate json")
}

/// `rowsmith render TABLE --out-dir OUT EXTRA... JOB...`.
fn render(stack: &Stack, table: &str, out: &Path, extra: &[&str], job: &[&str]) -> Output {
    let mut args = vec!["render", table, "--out-dir", out.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    args.extend_from_slice(job);
    rowsmith(stack, &args)
}

fn write_table(dir: &Path) -> String {
    let path = dir.join("products.csv");
    let mut writer = csv::Writer::from_path(&path).expect("csv");
    writer.write_record(["sku", "description"]).expect("header");
    for i in 0..40 {
        writer
            .write_record([format!("{i:05}"), format!("A \"fine\" item, number {i}")])
            .expect("row");
    }
    writer.flush().expect("flush");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrich_status_events_and_render_work_from_the_command_line() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = write_table(dir.path());
    let out = dir.path().join("out");
    let job = [
        "--instructions",
        "Write a title.",
        "--target",
        "description",
        "--field",
        "title:string:a title",
        "--field",
        "shelf:enum(toys|tools)",
    ];
    let mut enrich = vec![
        "enrich",
        table.as_str(),
        "--job-id",
        "cli-job",
        "--out",
        out.to_str().expect("utf-8"),
    ];
    enrich.extend_from_slice(&job);
    let mut work = stack
        .bus
        .client
        .subscribe("rowsmith.>")
        .await
        .expect("subscribe");
    // enrich waits for the job: off the runtime's threads, which run the services.
    let mut enrich_command = command(&stack, &enrich);
    let result =
        tokio::task::spawn_blocking(move || enrich_command.output().expect("run rowsmith"))
            .await
            .expect("join");
    assert!(
        result.status.success(),
        "enrich failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    // The job's trace starts at the CLI's submit and runs through every service.
    let traces = rowsmith_tests::job_traces(&mut work, "cli-job").await;
    assert_eq!(traces.len(), 1, "one trace per job: {traces:?}");
    let subjects = traces.values().next().expect("trace");
    assert!(
        subjects.iter().any(|s| s == "rowsmith.jobs.submit"),
        "{subjects:?}"
    );
    assert!(
        subjects.iter().any(|s| s == "rowsmith.batches.ended"),
        "{subjects:?}"
    );
    let printed = String::from_utf8_lossy(&result.stdout);
    assert!(
        printed.contains("enriched.csv") && printed.contains("failures.csv"),
        "{printed}"
    );
    let enriched = std::fs::read_to_string(out.join("enriched.csv")).expect("enriched.csv");
    assert_eq!(enriched.lines().next(), Some("sku,description,title,shelf"));
    assert!(enriched.contains("00039"));

    let status = rowsmith(&stack, &["status", "cli-job", "--json"]);
    let record: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(record["state"], "completed");
    assert_eq!(record["counts"]["succeeded"], 40);

    let events = rowsmith(&stack, &["events", "cli-job", "--json"]);
    let kinds: Vec<String> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("event")["kind"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("accepted"));
    assert_eq!(kinds.last().map(String::as_str), Some("completed"));

    let shards = dir.path().join("shards");
    let rendered = render(&stack, &table, &shards, &[], &job);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let lines = std::fs::read_to_string(shards.join("a1-s0.jsonl")).expect("shard file");
    assert_eq!(lines.lines().count(), 40);

    // Another provider without --model gets that provider's default model, and Anthropic
    // gets no temperature unless one is asked for.
    let anthropic_shards = dir.path().join("anthropic-shards");
    let rendered = render(
        &stack,
        &table,
        &anthropic_shards,
        &["--provider", "anthropic"],
        &job,
    );
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let text = std::fs::read_to_string(anthropic_shards.join("a1-s0.jsonl")).expect("shard");
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    assert_eq!(
        first["params"]["model"], "claude-3-5-haiku-latest",
        "{first}"
    );
    assert!(first["params"].get("temperature").is_none(), "{first}");
    let refused = render(
        &stack,
        &table,
        &anthropic_shards,
        &["--temperature", "2.5"],
        &job,
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("options.temperature is 2.5"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The job just paid for these 40 requests: an estimate of the same job counts them as
    // answered by the result cache, free.
    let estimated = estimate_json(&stack, &table, &job);
    assert_eq!(estimated["cached_rows"], 40, "{estimated}");
    assert_eq!(estimated["requests"], 0, "{estimated}");

    let bad = rowsmith(
        &stack,
        &[
            "submit",
            table.as_str(),
            "--instructions",
            "x",
            "--target",
            "description",
            "--field",
            "n:text",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("types are: string, number, boolean, array, enum(a|b|c)")
    );
    let completions = rowsmith(&stack, &["completions", "bash"]);
    assert!(completions.status.success());
    assert!(
        String::from_utf8_lossy(&completions.stdout).contains("rowsmith,enrich)"),
        "a bash completion script"
    );

    let missing = rowsmith(&stack, &["status", "no-such-job"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no job \"no-such-job\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn estimate_counts_tokens_and_prices_and_budget_refuses_before_any_batch() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = write_table(dir.path());
    let job = [
        "--instructions",
        "Write a title.",
        "--target",
        "description",
        "--field",
        "title:string:a title",
        "--model",
        "gpt-4o-mini",
    ];
    let json = estimate_json(&stack, &table, &job);
    assert_eq!(json["rows"], 40);
    assert_eq!(json["requests"], 40);
    assert_eq!(json["shards"], 1);
    assert_eq!(
        json["sampled_requests"], 40,
        "a small job is counted exactly"
    );
    let input_tokens = json["input_tokens"].as_u64().expect("tokens");
    // Each request carries a system message, the instructions, the schema and one row.
    assert!(
        (40 * 60..40 * 600).contains(&input_tokens),
        "{input_tokens}"
    );
    let batch = json["cost_batch_usd"].as_f64().expect("priced");
    let sync = json["cost_sync_usd"].as_f64().expect("priced");
    assert!(
        batch > 0.0 && (sync - 2.0 * batch).abs() < 1e-9,
        "{batch} {sync}"
    );

    // Bedrock takes no job of 40 requests: the estimate says so and exits 1.
    let mut bedrock = vec!["estimate", table.as_str()];
    bedrock.extend_from_slice(&job[..6]);
    bedrock.extend_from_slice(&["--provider", "bedrock"]);
    let output = rowsmith(&stack, &bedrock);
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("bedrock takes at least 100") && said.contains("has 40"),
        "{said}"
    );

    // The table form, and a budget it is over: exit 1 and say so.
    let mut over = vec!["estimate", table.as_str(), "--budget-usd", "0.000001"];
    over.extend_from_slice(&job);
    let output = rowsmith(&stack, &over);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("cost at batch price"), "{text}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("over budget"));

    // Submitted with that budget, the job fails at ingest, before any batch exists.
    let mut enrich = vec![
        "enrich",
        table.as_str(),
        "--job-id",
        "over-budget",
        "--budget-usd",
        "0.000001",
        "--out",
    ];
    let out = dir.path().join("out").display().to_string();
    enrich.push(&out);
    enrich.extend_from_slice(&job);
    let output = rowsmith(&stack, &enrich);
    assert_eq!(output.status.code(), Some(1), "the job failed");
    let job = stack
        .wait_for_end("over-budget", std::time::Duration::from_secs(30))
        .await;
    let error = job.error.expect("reason");
    assert!(
        error.contains("over options.budget_usd")
            && error.contains("input")
            && error.contains("at batch price"),
        "{error}"
    );
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 0, "{stats}");
    assert_eq!(stats["files_uploaded"], 0, "{stats}");
}

/// Accepts one HTTP request on a free port and hands over its request line and headers.
fn one_http_request() -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("a request");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            if let Some(value) = line.to_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
            if line.trim().is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        head
    });
    (address, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set_and_limits_apply_to_the_cli() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = write_table(dir.path());
    let (endpoint, request) = one_http_request();
    let args = [
        "submit",
        table.as_str(),
        "--job-id",
        "traced-cli",
        "--instructions",
        "Write a title.",
        "--target",
        "description",
        "--field",
        "title:string",
    ];
    let mut submit = command(&stack, &args);
    submit.env("ROWSMITH_TELEMETRY__OTLP_ENDPOINT", &endpoint);
    let output = tokio::task::spawn_blocking(move || submit.output().expect("run rowsmith"))
        .await
        .expect("join");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let head = tokio::task::spawn_blocking(move || request.join().expect("server"))
        .await
        .expect("join");
    assert!(head.starts_with("POST /v1/traces "), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/x-protobuf"),
        "{head}"
    );

    // Instructions over limits.max_instruction_bytes are refused by the CLI before anything
    // is uploaded or published (a JobSpec must also fit NATS's 1 MB message limit).
    let instructions = dir.path().join("long.txt");
    std::fs::write(&instructions, "x".repeat(1024 * 1024)).expect("write");
    let at_file = format!("@{}", instructions.display());
    let long = rowsmith(
        &stack,
        &[
            "submit",
            table.as_str(),
            "--instructions",
            &at_file,
            "--target",
            "description",
            "--field",
            "title:string",
        ],
    );
    assert_eq!(long.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&long.stderr);
    assert!(
        stderr.contains("1048576 bytes, more than limits.max_instruction_bytes"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_command_line_never_changes_the_topology_only_setup_makes_it() {
    let nats = rowsmith_tests::NatsServer::start();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rowsmith"))
            .args(args)
            .env("ROWSMITH_NATS__URL", nats.url())
            .env_remove("ROWSMITH_CONFIG")
            .output()
            .expect("run rowsmith")
    };
    // No streams yet: a client command says what to do and creates nothing.
    let list = run(&["list"]);
    assert!(!list.status.success());
    let stderr = String::from_utf8_lossy(&list.stderr);
    assert!(stderr.contains("rowsmith setup"), "{stderr}");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream(rowsmith_bus::WORK_STREAM).await.is_err());
    // setup makes them; then a client command works and leaves their configuration alone.
    let setup = run(&["setup"]);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let mut work = js
        .get_stream(rowsmith_bus::WORK_STREAM)
        .await
        .expect("work stream");
    let mut config = work.info().await.expect("info").config.clone();
    config.description = Some("changed by the operator".into());
    js.update_stream(&config).await.expect("update");
    let list = run(&["list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let after = work.info().await.expect("info").config.clone();
    assert_eq!(
        after.description.as_deref(),
        Some("changed by the operator")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrich_again_under_a_taken_job_id_with_another_spec_is_refused_and_uploads_nothing() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = write_table(dir.path());
    let out = dir.path().join("out");
    let enrich = |instructions: &str| {
        rowsmith(
            &stack,
            &[
                "enrich",
                table.as_str(),
                "--job-id",
                "taken",
                "--out",
                out.to_str().expect("utf-8"),
                "--instructions",
                instructions,
                "--target",
                "description",
                "--field",
                "title:string",
            ],
        )
    };
    let first = enrich("Write a title.");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let staged = stack.store.list("inputs/taken/").await.expect("list");
    assert_eq!(staged.len(), 1, "{staged:?}");
    let original = stack.store.get_bytes(&staged[0]).await.expect("input");
    // The same id again, with other content and instructions.
    std::fs::write(&table, "sku,description\n1,something else\n").expect("rewrite");
    let second = enrich("Write a different title.");
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("job id taken is taken by a job with a different spec"),
        "{stderr}"
    );
    assert_eq!(
        stack.store.list("inputs/taken/").await.expect("list"),
        staged
    );
    assert_eq!(
        stack.store.get_bytes(&staged[0]).await.expect("input"),
        original
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspended_job_from_the_command_line_partial_outputs_then_resume_and_watch() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = write_table(dir.path());
    let out = dir.path().join("out");
    // The provider refuses the key at every status check, as after a key rotation.
    let refused = rowsmith_config::SimFaults {
        status_unauthorized: true,
        ..Default::default()
    };
    stack.set_sim_faults("cli-suspended", &refused).await;
    let enrich = rowsmith(
        &stack,
        &[
            "enrich",
            table.as_str(),
            "--job-id",
            "cli-suspended",
            "--out",
            out.to_str().expect("utf-8"),
            "--instructions",
            "Write a title.",
            "--target",
            "description",
            "--field",
            "title:string",
        ],
    );
    assert_eq!(enrich.status.code(), Some(1), "suspended is not success");
    let stderr = String::from_utf8_lossy(&enrich.stderr);
    assert!(stderr.contains("rowsmith resume cli-suspended"), "{stderr}");
    // Partial outputs: nothing merged yet, so every row is pending.
    let failures = std::fs::read_to_string(out.join("failures.csv")).expect("partial failures");
    assert_eq!(failures.lines().count(), 41, "{failures}");
    assert!(failures.contains("pending"), "{failures}");
    // The key is fixed: resume, watch until it completes, and fetch the whole result.
    stack
        .set_sim_faults("cli-suspended", &Default::default())
        .await;
    let resume = rowsmith(&stack, &["resume", "cli-suspended"]);
    assert!(
        resume.status.success(),
        "{}",
        String::from_utf8_lossy(&resume.stderr)
    );
    let watch = rowsmith(&stack, &["watch", "cli-suspended"]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let result_dir = dir.path().join("result");
    let result = rowsmith(
        &stack,
        &[
            "result",
            "cli-suspended",
            "--out",
            result_dir.to_str().expect("utf-8"),
        ],
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let enriched = std::fs::read_to_string(result_dir.join("enriched.csv")).expect("enriched");
    assert_eq!(
        csv::Reader::from_reader(enriched.as_bytes())
            .records()
            .count(),
        40
    );
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 1, "{stats}");
}
