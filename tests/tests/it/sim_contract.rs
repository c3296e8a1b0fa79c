//! The simulator refuses what the real APIs refuse, in their own shapes (issue 14, point 5;
//! Gemini's table below):
//! a table of malformed requests, each sent through the provider clients, with the refusal
//! the API gives — at validation for OpenAI's file format, per request for the parameters
//! (both APIs check those when they run the request).

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use rowsmith_contract::messages::ShardKey;
use rowsmith_providers::{BatchProvider, BatchRef, BatchState, BatchStatus, Provider, Providers};
use rowsmith_store::layout::ResultPaths;
use rowsmith_tests::Stack;

fn key(shard: u32) -> ShardKey {
    ShardKey {
        job_id: "contract".into(),
        attempt: 1,
        shard,
    }
}

fn jsonl(lines: &[Value]) -> Bytes {
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    if text.is_empty() {
        text.push('\n');
    }
    Bytes::from(text)
}

async fn ended(provider: &Provider, batch: &BatchRef) -> BatchStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = provider.status(batch).await.expect("status");
        if status.state.is_terminal() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Uploads and creates a batch of `lines` and returns how it ended, with its result text.
async fn run(
    stack: &Stack,
    provider: &Provider,
    shard: u32,
    lines: &[Value],
) -> (BatchStatus, String) {
    let bytes = jsonl(lines);
    let file_id = match provider.name() {
        "anthropic" => String::new(),
        _ => provider
            .upload(&key(shard), bytes.clone().into())
            .await
            .expect("upload"),
    };
    let model = rowsmith_contract::providers::default_model(provider.name()).unwrap_or("");
    let batch = provider
        .create(&key(shard), model, &file_id, bytes.into())
        .await
        .expect("create");
    let status = ended(provider, &batch).await;
    let files = provider
        .download(&status, &stack.store, &ResultPaths::of_shard(&key(shard)))
        .await
        .expect("download");
    let mut text = String::new();
    for path in [files.output_path, files.errors_path].into_iter().flatten() {
        text.push_str(&stack.read_text(&path).await);
    }
    (status, text)
}

fn openai_line(id: &str, body: Value) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_format_is_refused_where_the_batch_api_refuses_it() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let sim = providers.get("sim").expect("sim");
    let mut get = openai_line("r1", chat("gpt-4o-mini"));
    get["method"] = json!("GET");
    let mut streaming = chat("gpt-4o-mini");
    streaming["stream"] = json!(true);
    // (lines, the validation error code the batch fails with)
    let refused: Vec<(Vec<Value>, &str)> = vec![
        (
            vec![openai_line("r0", chat("gpt-4o-mini")), get],
            "invalid_method",
        ),
        (
            vec![
                openai_line("r0", chat("gpt-4o-mini")),
                openai_line("r1", chat("gpt-4o")),
            ],
            "mismatched_model",
        ),
        (vec![openai_line("r0", streaming)], "invalid_request"),
        (
            vec![openai_line("r0", json!({"messages": []}))],
            "missing_required_parameter",
        ),
        (
            vec![openai_line("r0", chat("m")), openai_line("r0", chat("m"))],
            "duplicate_custom_id",
        ),
    ];
    for (shard, (lines, code)) in refused.into_iter().enumerate() {
        let (status, _) = run(&stack, sim, shard as u32, &lines).await;
        assert_eq!(status.state, BatchState::Failed, "{code}");
        assert!(
            status.errors.iter().any(|e| e.starts_with(code)),
            "{code}: {:?}",
            status.errors
        );
    }
    // A parameter the API does not declare fails that request only, with HTTP 400.
    let mut odd = chat("gpt-4o-mini");
    odd["temprature"] = json!(0);
    let lines = [
        openai_line("r0", chat("gpt-4o-mini")),
        openai_line("r1", odd),
    ];
    let (status, text) = run(&stack, sim, 10, &lines).await;
    assert_eq!(
        (status.state, status.completed, status.failed),
        (BatchState::Completed, 1, 1)
    );
    assert!(
        text.contains("Unrecognized request argument supplied: temprature"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_params_the_messages_api_does_not_declare_are_errored_results() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let anthropic = providers.get("anthropic").expect("anthropic");
    let params = |extra: Value| {
        let mut params = json!({"model": "claude-3-5-haiku-latest", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().expect("object") {
            params[k] = v.clone();
        }
        params
    };
    let mut no_max_tokens = params(json!({}));
    no_max_tokens
        .as_object_mut()
        .expect("object")
        .remove("max_tokens");
    let cases = [
        (params(json!({})), None),
        (
            params(json!({"temperature": 0.0})),
            Some("params.temperature: Extra inputs are not permitted"),
        ),
        (no_max_tokens, Some("params.max_tokens: Field required")),
        (
            params(json!({"stream": true})),
            Some("params.stream: batch requests cannot stream"),
        ),
    ];
    let lines: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (params, _))| json!({"custom_id": format!("r{i}"), "params": params}))
        .collect();
    let (status, text) = run(&stack, anthropic, 0, &lines).await;
    assert!(status.state.is_terminal(), "{status:?}");
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    for (i, (_, refusal)) in cases.iter().enumerate() {
        let result = results
            .iter()
            .find(|r| r["custom_id"] == format!("r{i}"))
            .expect("a result per request");
        match refusal {
            None => assert_eq!(result["result"]["type"], "succeeded", "{result}"),
            Some(message) => {
                assert_eq!(result["result"]["type"], "errored", "{result}");
                assert_eq!(result["result"]["error"]["error"]["message"], *message);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_objects_keep_the_timestamps_of_their_state_machine() {
    let stack = Stack::start_services(
        |settings| {
            settings.sim.rows_per_second = 20.0;
            settings.sim.cancelling = Duration::from_millis(500);
        },
        &[],
    )
    .await;
    let base = format!("http://{}", stack.sim_address);
    let client = reqwest::Client::new();
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let sim = providers.get("sim").expect("sim");
    let lines: Vec<Value> = (0..100)
        .map(|i| openai_line(&format!("r{i}"), chat("m")))
        .collect();
    let bytes = jsonl(&lines);
    let file_id = sim
        .upload(&key(0), bytes.clone().into())
        .await
        .expect("upload");
    let batch = sim
        .create(&key(0), "gpt-4o-mini", &file_id, bytes.into())
        .await
        .expect("create");
    let object = |id: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .get(format!("{base}/v1/batches/{id}"))
                .bearer_auth("sk-x")
                .send()
                .await
                .expect("get")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let running = loop {
        let running = object(batch.id.clone()).await;
        if running["status"] == "in_progress" {
            break running;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never in progress: {running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let created = running["created_at"].as_i64().expect("created_at");
    assert!(
        running["in_progress_at"].as_i64() >= Some(created),
        "{running}"
    );
    assert_eq!(running["expires_at"].as_i64(), Some(created + 86_400));
    sim.cancel(&batch).await.expect("cancel");
    let cancelling = object(batch.id.clone()).await;
    assert_eq!(
        cancelling["status"], "cancelling",
        "a cancel takes a while: {cancelling}"
    );
    assert!(
        cancelling["cancelling_at"].as_i64() >= Some(created),
        "{cancelling}"
    );
    let done = ended(sim, &batch).await;
    assert_eq!(done.state, BatchState::Cancelled);
    assert!(
        done.completed < 100,
        "the cancel stopped it part-way: {done:?}"
    );

    // Anthropic: expires 24 hours after it was created.
    let anthropic = providers.get("anthropic").expect("anthropic");
    let line = json!({"custom_id": "r0", "params": {"model": "m", "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}]}});
    let batch = anthropic
        .create(&key(1), "m", "", jsonl(&[line]).into())
        .await
        .expect("create");
    let object: Value = client
        .get(format!("{base}/v1/messages/batches/{}", batch.id))
        .header("x-api-key", "sk-ant-x")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let parse = |field: &str| {
        time::OffsetDateTime::parse(
            object[field].as_str().expect("a timestamp"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339")
    };
    assert_eq!(
        parse("expires_at") - parse("created_at"),
        time::Duration::hours(24)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mistral_jobs_are_refused_where_the_batch_jobs_api_refuses_them() {
    let stack = Stack::start_services(|_| {}, &[]).await;
    let base = format!("http://{}/v1", stack.sim_address);
    let client = reqwest::Client::new();
    let providers = Providers::from_settings(&stack.settings.provider).expect("providers");
    let mistral = providers.get("mistral").expect("mistral");
    let line = json!({"custom_id": "r0", "body": chat("mistral-small-latest")});
    let file_id = mistral
        .upload(&key(0), jsonl(std::slice::from_ref(&line)).into())
        .await
        .expect("upload");
    let create = |body: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .post(format!("{base}/batch/jobs"))
                .bearer_auth("sk-x")
                .json(&body)
                .send()
                .await
                .expect("create")
                .status()
        }
    };
    let endpoint = "/v1/chat/completions";
    assert_eq!(
        create(json!({"input_files": [file_id], "endpoint": endpoint})).await,
        422,
        "a job names its model"
    );
    assert_eq!(
        create(json!({"input_files": [file_id], "endpoint": "/v1/nope", "model": "m"})).await,
        422
    );
    // A whole job through the client: OpenAI's result lines, Mistral's statuses.
    let (status, text) = run(&stack, mistral, 1, &[line]).await;
    assert_eq!((status.state, status.completed), (BatchState::Completed, 1));
    let result: Value = serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    assert_eq!(result["custom_id"], "r0");
    assert_eq!(result["response"]["status_code"], 200);
}

/// A Gemini request line of rowsmith's shape with `request` as given.
fn gemini_line(key: &str, request: Value) -> Value {
    json!({"key": key, "request": request})
}

fn gemini_request() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "Row data to enhance:\ntitle: a ball"}]}],
           "generationConfig": {"responseMimeType": "application/json", "responseSchema": {
               "type": "OBJECT", "properties": {"title": {"type": "STRING"}},
               "required": ["title"], "propertyOrdering": ["title"]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_calls_are_refused_where_the_batch_api_refuses_them() {
    let stack = Stack::start_services(
        |settings| settings.sim.faults.enqueued_token_quota = Some(1),
        &[],
    )
    .await;
    let base = format!("http://{}", stack.sim_address);
    let client = reqwest::Client::new();
    // An uploaded file, by the resumable protocol.
    let lines = jsonl(&[gemini_line("r0", gemini_request())]);
    let session = client
        .post(format!("{base}/upload/v1beta/files"))
        .header("x-goog-api-key", "k")
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header(
            "X-Goog-Upload-Header-Content-Length",
            lines.len().to_string(),
        )
        .json(&json!({"file": {"displayName": "d"}}))
        .send()
        .await
        .expect("start");
    let url = session.headers()["x-goog-upload-url"]
        .to_str()
        .expect("url")
        .to_owned();
    let chunk = |offset: usize, command: &'static str, bytes: Bytes| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .header("X-Goog-Upload-Command", command)
                .header("X-Goog-Upload-Offset", offset.to_string())
                .body(bytes)
                .send()
                .await
                .expect("chunk")
        }
    };
    let skipped = chunk(5, "upload, finalize", lines.clone()).await;
    assert_eq!(
        skipped.status(),
        400,
        "a chunk at another offset than received"
    );
    let early = chunk(0, "upload, finalize", lines.slice(..4)).await;
    assert_eq!(early.status(), 400, "finalized before every declared byte");
    let done = chunk(4, "upload, finalize", lines.slice(4..)).await;
    assert_eq!(done.headers()["x-goog-upload-status"], "final");
    let file: Value = done.json().await.expect("file");
    let file_name = file["file"]["name"].as_str().expect("name").to_owned();

    let create = |body: Value, key: Option<&'static str>| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let mut request = client
                .post(format!(
                    "{base}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
                ))
                .json(&body);
            if let Some(key) = key {
                request = request.header("x-goog-api-key", key);
            }
            let response = request.send().await.expect("create");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (
                status,
                body["error"]["status"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    let from_file = json!({"fileName": file_name});
    let cases: Vec<(&str, Value, Option<&'static str>, u16, &str)> = vec![
        (
            "no key",
            json!({"batch": {"displayName": "x", "inputConfig": from_file}}),
            None,
            403,
            "PERMISSION_DENIED",
        ),
        (
            "no display name",
            json!({"batch": {"inputConfig": from_file}}),
            Some("k"),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "an unknown batch field",
            json!({"batch": {"displayName": "x", "inputConfig": from_file, "labels": {}}}),
            Some("k"),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "file and inline at once",
            json!({"batch": {"displayName": "x", "inputConfig": {"fileName": file_name, "requests": {"requests": []}}}}),
            Some("k"),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "no such file",
            json!({"batch": {"displayName": "x", "inputConfig": {"fileName": "files/nope"}}}),
            Some("k"),
            404,
            "NOT_FOUND",
        ),
        (
            "an unknown inline field",
            json!({"batch": {"displayName": "x", "inputConfig": {"requests": {"requests": [{"request": gemini_request(), "key": "r0"}]}}}}),
            Some("k"),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "a call over 20 MB",
            json!({"batch": {"displayName": "x", "inputConfig": {"requests": {"requests": [{"request": {"contents": [{"parts": [{"text": "x".repeat(21_000_000)}]}]}}]}}}}),
            Some("k"),
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (what, body, key, status, name) in cases {
        assert_eq!(create(body, key).await, (status, name.to_owned()), "{what}");
    }
    // The first batch takes the whole enqueued-token quota; the next is refused at create.
    let first = create(
        json!({"batch": {"displayName": "x", "inputConfig": from_file}}),
        Some("k"),
    )
    .await;
    assert_eq!(first.0, 200);
    let second = create(
        json!({"batch": {"displayName": "y", "inputConfig": from_file}}),
        Some("k"),
    )
    .await;
    assert_eq!(
        second,
        (429, "RESOURCE_EXHAUSTED".to_owned()),
        "over the quota"
    );
    // An uploaded file cannot be downloaded back.
    let download = client
        .get(format!("{base}/v1beta/{file_name}:download?alt=media"))
        .header("x-goog-api-key", "k")
        .send()
        .await
        .expect("download");
    assert_eq!(download.status(), 400);

    // Per request, once it runs: a field the proto does not declare is that line's 400, the
    // others are answered; through the client, inline.
    let mut unknown = gemini_request();
    unknown["generationConfig"]["responseFormat"] = json!({});
    let lines = [
        gemini_line("r0", gemini_request()),
        gemini_line("r1", unknown),
    ];
    let unlimited = Stack::start_services(|_| {}, &[]).await;
    let providers = Providers::from_settings(&unlimited.settings.provider).expect("providers");
    let gemini = providers.get("gemini").expect("gemini");
    let (status, text) = run(&unlimited, gemini, 2, &lines).await;
    assert_eq!(status.state, BatchState::Completed);
    let mut results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    results.sort_by_key(|r| r["key"].as_str().unwrap_or("").to_owned());
    assert!(results[0]["response"]["candidates"][0]["content"]["parts"][0]["text"].is_string());
    assert_eq!(results[1]["error"]["code"], 400, "{}", results[1]);
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("responseFormat")),
        "{}",
        results[1]
    );
}
