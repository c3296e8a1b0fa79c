//! The simulator's Bedrock control plane (model invocation jobs) holds to the wire contract
//! the Bedrock client is written against: SigV4-shaped auth, create checked as the service
//! model checks it, idempotent by `clientRequestToken`, the lifecycle with its files in S3
//! (moto here), list filters and pages, stop, and the expiry faults.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use rowsmith_config::{S3Settings, SimFaults, SimSettings, StoreSettings};
use rowsmith_store::Store;
use rowsmith_tests::S3Server;

const BUCKET: &str = "bedrock-sim";
const ROLE: &str = "arn:aws:iam::123456789012:role/BedrockBatch";
const MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";
const DATE: &str = "20250101T000000Z";

/// A well-shaped (never verified) SigV4 header scoped to `service`.
fn sigv4(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=AKIDSIMTEST/20250101/us-east-1/{service}/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, Signature={}",
        "0123456789abcdef".repeat(4)
    )
}

/// moto, the simulator pointed at it, and a store on the same bucket.
struct Sim {
    base: String,
    client: reqwest::Client,
    store: Store,
    shutdown: CancellationToken,
    _s3: S3Server,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a call answered: status, `x-amzn-ErrorType`, body.
struct Answer {
    status: StatusCode,
    kind: Option<String>,
    body: Value,
}

impl Sim {
    async fn start(rows_per_second: f64) -> Self {
        let s3_server = S3Server::start(BUCKET).await;
        let s3 = S3Settings {
            endpoint: Some(s3_server.endpoint()),
            region: Some("us-east-1".into()),
            path_style: Some(true),
            allow_http: Some(true),
            access_key_id: Some("rowsmith-test".into()),
            secret_access_key: Some("rowsmith-test-secret".to_owned().into()),
            session_token: None,
        };
        let settings = SimSettings {
            listen: "127.0.0.1:0".into(),
            rows_per_second,
            // Long enough that a loaded machine's polls still see each state.
            validating: Duration::from_millis(150),
            finalizing: Duration::from_millis(150),
            cancelling: Duration::from_millis(300),
            bedrock_s3: s3.clone(),
            bedrock_min_records: 3,
            ..SimSettings::default()
        };
        let shutdown = CancellationToken::new();
        let (address, _) = rowsmith_provider_sim::start(settings, shutdown.clone())
            .await
            .expect("start the simulator");
        let store = Store::open(&StoreSettings {
            url: format!("s3://{BUCKET}"),
            s3,
            allowed_inputs: vec![],
        })
        .expect("open the bucket");
        Self {
            base: format!("http://{address}"),
            client: reqwest::Client::new(),
            store,
            shutdown,
            _s3: s3_server,
        }
    }

    /// A call signed as the Bedrock client signs it.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("authorization", sigv4("bedrock"))
            .header("x-amz-date", DATE);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request.send().await.expect("call the simulator")).await
    }

    async fn create(&self, body: Value) -> Answer {
        self.call(Method::POST, "/model-invocation-job", Some(body))
            .await
    }

    /// Creates a job and returns its ARN.
    async fn created(&self, body: Value) -> String {
        let answer = self.create(body).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["jobArn"].as_str().expect("jobArn").to_owned()
    }

    async fn get(&self, arn: &str) -> Value {
        let answer = self
            .call(
                Method::GET,
                &format!("/model-invocation-job/{}", encoded(arn)),
                None,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body
    }

    /// Polls the job until `done` holds (no fixed sleeps); the statuses it showed on the way.
    async fn until(&self, arn: &str, done: impl Fn(&Value) -> bool) -> (Value, Vec<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut seen: Vec<String> = Vec::new();
        loop {
            let job = self.get(arn).await;
            let status = job["status"].as_str().unwrap_or("").to_owned();
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            if done(&job) {
                return (job, seen);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {arn} never got there; statuses {seen:?}, last {job}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn ended(&self, arn: &str) -> (Value, Vec<String>) {
        self.until(arn, |job| {
            matches!(
                job["status"].as_str(),
                Some("Completed" | "PartiallyCompleted" | "Failed" | "Stopped" | "Expired")
            )
        })
        .await
    }

    async fn put_input(&self, key: &str, lines: &[Value]) {
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        self.store
            .put_bytes(key, Bytes::from(text))
            .await
            .expect("put the input");
    }

    async fn read(&self, key: &str) -> Option<String> {
        let bytes = self.store.get_bytes(key).await.ok()?;
        Some(String::from_utf8(bytes.to_vec()).expect("utf-8"))
    }

    async fn stats(&self) -> Value {
        reqwest::get(format!("{}/sim/stats", self.base))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    async fn set_job_faults(&self, job_id: &str, faults: &SimFaults) {
        let answer = self
            .client
            .post(format!("{}/sim/faults/{job_id}", self.base))
            .json(faults)
            .send()
            .await
            .expect("set faults");
        assert!(answer.status().is_success());
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let kind = response
        .headers()
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or(Value::Null);
    Answer { status, kind, body }
}

/// The ARN as one path segment, as the AWS SDKs send it.
fn encoded(arn: &str) -> String {
    arn.replace(':', "%3A").replace('/', "%2F")
}

fn job_id(arn: &str) -> &str {
    arn.rsplit('/').next().expect("job id")
}

fn schema() -> Value {
    json!({"type": "object", "properties": {
        "category": {"type": "string"}, "score": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["category", "score", "tags"]})
}

fn record(id: &str) -> Value {
    json!({"recordId": id, "modelInput": {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 512,
        "messages": [{"role": "user", "content": format!("Row data to enhance:\nname: {id}")}],
        "tools": [{"name": "emit_row", "description": "the row", "input_schema": schema()}],
        "tool_choice": {"type": "tool", "name": "emit_row"},
    }})
}

fn records(prefix: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| record(&format!("{prefix}{i:08}")))
        .collect()
}

fn create_body(name: &str, token: &str, input_key: &str, shard: Option<&str>) -> Value {
    let mut body = json!({
        "jobName": name,
        "roleArn": ROLE,
        "modelId": MODEL,
        "clientRequestToken": token,
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": format!("s3://{BUCKET}/{input_key}"), "s3InputFormat": "JSONL"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": format!("s3://{BUCKET}/out/")}},
        "timeoutDurationInHours": 24,
    });
    if let Some(shard) = shard {
        body["tags"] = json!([{"key": "rowsmith-shard", "value": shard}]);
    }
    body
}

/// The output lines of a job, by recordId.
async fn output_lines(sim: &Sim, arn: &str, file: &str) -> HashMap<String, Value> {
    let key = format!("out/{}/{file}.out", job_id(arn));
    let text = sim.read(&key).await.unwrap_or_else(|| panic!("no {key}"));
    text.lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).expect("an output line is JSON");
            (
                line["recordId"].as_str().expect("recordId").to_owned(),
                line,
            )
        })
        .collect()
}

async fn manifest(sim: &Sim, arn: &str) -> Value {
    let key = format!("out/{}/manifest.json.out", job_id(arn));
    let text = sim.read(&key).await.unwrap_or_else(|| panic!("no {key}"));
    serde_json::from_str(&text).expect("manifest JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bedrock_creates_are_checked_idempotent_and_listed() {
    let sim = Sim::start(2_000.0).await;
    sim.put_input("in/a.jsonl", &records("a", 3)).await;
    // Auth: none, or a credential scoped to another service, is refused.
    let unsigned = sim
        .client
        .post(format!("{}/model-invocation-job", sim.base))
        .json(&create_body("nokey", "t0", "in/a.jsonl", None))
        .send()
        .await
        .expect("call");
    let unsigned = answer(unsigned).await;
    assert_eq!(unsigned.status, StatusCode::FORBIDDEN);
    assert_eq!(
        unsigned.kind.as_deref(),
        Some("MissingAuthenticationTokenException")
    );
    assert_eq!(unsigned.body["message"], "Missing Authentication Token");
    let wrong_scope = sim
        .client
        .get(format!("{}/model-invocation-jobs", sim.base))
        .header("authorization", sigv4("s3"))
        .header("x-amz-date", DATE)
        .send()
        .await
        .expect("call");
    let wrong_scope = answer(wrong_scope).await;
    assert_eq!(wrong_scope.status, StatusCode::FORBIDDEN);
    assert_eq!(
        wrong_scope.kind.as_deref(),
        Some("InvalidSignatureException")
    );
    assert!(
        wrong_scope.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("'bedrock'"))
    );

    // Create, then the same token again: the same job, nothing new.
    let body = create_body("rowsmith-a-1-0", "tokenA", "in/a.jsonl", Some("a.1.0"));
    let arn = sim.created(body.clone()).await;
    let id = job_id(&arn);
    assert!(
        arn.starts_with("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/")
            && id.len() == 12
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{arn}"
    );
    assert_eq!(sim.created(body).await, arn);
    let stats = sim.stats().await;
    assert_eq!(stats["bedrock_jobs_created"], 1, "{stats}");
    assert_eq!(stats["bedrock_idempotent_replays"], 1, "{stats}");
    let conflict = sim
        .create(create_body("rowsmith-a-1-0", "tokenB", "in/a.jsonl", None))
        .await;
    assert_eq!(
        (conflict.status, conflict.kind.as_deref()),
        (StatusCode::BAD_REQUEST, Some("ConflictException"))
    );

    // What the service model refuses.
    let bad_name = create_body("-bad name", "tokenC", "in/a.jsonl", None);
    let mut short_timeout = create_body("short", "tokenD", "in/a.jsonl", None);
    short_timeout["timeoutDurationInHours"] = json!(12);
    let mut unknown = create_body("unknown", "tokenE", "in/a.jsonl", None);
    unknown["priority"] = json!("high");
    for (body, member) in [
        (bad_name, "jobName"),
        (short_timeout, "timeoutDurationInHours"),
        (unknown, "priority"),
    ] {
        let refused = sim.create(body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{member}");
        assert_eq!(
            refused.kind.as_deref(),
            Some("ValidationException"),
            "{member}"
        );
        let message = refused.body["message"].as_str().unwrap_or("");
        assert!(message.contains(member), "{member}: {message}");
    }

    // Get by the encoded ARN and by the bare id; an unknown id is 404.
    let by_arn = sim.get(&arn).await;
    let by_id = sim
        .call(Method::GET, &format!("/model-invocation-job/{id}"), None)
        .await;
    assert_eq!(by_id.status, StatusCode::OK);
    assert_eq!(by_arn["jobArn"], by_id.body["jobArn"]);
    for field in [
        "jobName",
        "modelId",
        "roleArn",
        "clientRequestToken",
        "submitTime",
        "jobExpirationTime",
    ] {
        assert!(by_arn.get(field).is_some(), "{field}: {by_arn}");
    }
    assert_eq!(by_arn["modelInvocationType"], "InvokeModel");
    assert!(
        by_arn["submitTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('.'))
    );
    let missing = sim
        .call(Method::GET, "/model-invocation-job/zzzzzzzzzzzz", None)
        .await;
    assert_eq!(
        (missing.status, missing.kind.as_deref()),
        (StatusCode::NOT_FOUND, Some("ResourceNotFoundException"))
    );

    // List: nameContains finds exactly the job; pages of one follow nextToken.
    sim.created(create_body("other-b", "tokenF", "in/a.jsonl", None))
        .await;
    sim.created(create_body("other-c", "tokenG", "in/a.jsonl", None))
        .await;
    let found = sim
        .call(
            Method::GET,
            "/model-invocation-jobs?nameContains=rowsmith-a",
            None,
        )
        .await;
    let summaries = found.body["invocationJobSummaries"]
        .as_array()
        .expect("summaries");
    assert_eq!(summaries.len(), 1, "{}", found.body);
    assert_eq!(summaries[0]["jobArn"], arn);
    assert!(found.body.get("nextToken").is_none());
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(token) => format!("/model-invocation-jobs?maxResults=1&nextToken={token}"),
            None => "/model-invocation-jobs?maxResults=1".into(),
        };
        let page = sim.call(Method::GET, &path, None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let summaries = page.body["invocationJobSummaries"]
            .as_array()
            .expect("summaries");
        assert_eq!(summaries.len(), 1, "{}", page.body);
        names.push(summaries[0]["jobName"].as_str().expect("name").to_owned());
        match page.body["nextToken"].as_str() {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        names,
        ["other-c", "other-b", "rowsmith-a-1-0"],
        "newest first"
    );
    let invalid = sim
        .call(Method::GET, "/model-invocation-jobs?maxResults=0", None)
        .await;
    assert_eq!(invalid.kind.as_deref(), Some("ValidationException"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bedrock_jobs_run_to_their_end_and_write_their_output() {
    let sim = Sim::start(200.0).await;
    let mut lines = records("r", 6);
    lines[2]["modelInput"]["model"] = json!(MODEL);
    sim.put_input("in/run/input.jsonl", &lines).await;
    let arn = sim
        .created(create_body(
            "run",
            "tokenRun",
            "in/run/input.jsonl",
            Some("run.1.0"),
        ))
        .await;
    let (job, seen) = sim.ended(&arn).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert!(seen.contains(&"InProgress".to_owned()), "{seen:?}");
    assert!(
        seen.iter().any(|s| s == "Submitted" || s == "Validating"),
        "{seen:?}"
    );
    assert!(
        job.get("endTime").is_some() && job.get("message").is_none(),
        "{job}"
    );
    // One line per record, joined on recordId; the refused modelInput is a 400 error line.
    let output = output_lines(&sim, &arn, "input.jsonl").await;
    let ids: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l["recordId"].as_str())
        .collect();
    assert_eq!(
        output.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        ids
    );
    let properties: BTreeSet<&str> = ["category", "score", "tags"].into();
    for (id, line) in &output {
        assert_eq!(
            line["modelInput"],
            lines
                .iter()
                .find(|l| l["recordId"] == id.as_str())
                .expect("input")["modelInput"]
        );
        if id == "r00000002" {
            assert_eq!(line["error"]["errorCode"], 400, "{line}");
            assert_eq!(
                line["error"]["errorMessage"],
                "model: Extra inputs are not permitted"
            );
            assert!(line.get("modelOutput").is_none());
            continue;
        }
        let output = &line["modelOutput"];
        assert_eq!(
            (&output["type"], &output["model"]),
            (&json!("message"), &json!(MODEL)),
            "{line}"
        );
        assert_eq!(output["stop_reason"], "tool_use");
        assert_eq!(output["content"][0]["type"], "tool_use");
        let input = output["content"][0]["input"]
            .as_object()
            .expect("tool input");
        assert_eq!(
            input.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            properties
        );
    }
    let manifest = manifest(&sim, &arn).await;
    for (field, count) in [
        ("totalRecordCount", 6),
        ("processedRecordCount", 6),
        ("successRecordCount", 5),
        ("errorRecordCount", 1),
    ] {
        assert_eq!(manifest[field], count, "{field}: {manifest}");
        assert_eq!(job[field], count, "{field}: {job}");
    }
    assert!(
        manifest["inputTokenCount"].as_u64().is_some_and(|n| n > 0),
        "{manifest}"
    );

    // Too few records, or no input at all, fail the job at validation with a message.
    sim.put_input("in/few.jsonl", &records("f", 2)).await;
    let few = sim
        .created(create_body("few", "tokenFew", "in/few.jsonl", None))
        .await;
    let absent = sim
        .created(create_body(
            "absent",
            "tokenAbsent",
            "in/absent.jsonl",
            None,
        ))
        .await;
    let (few, _) = sim.ended(&few).await;
    assert_eq!(few["status"], "Failed", "{few}");
    let message = few["message"].as_str().unwrap_or("");
    assert!(
        message.contains("(2)") && message.contains("minimum of 3"),
        "{message}"
    );
    let (absent, _) = sim.ended(&absent).await;
    assert_eq!(absent["status"], "Failed");
    assert!(
        absent["message"]
            .as_str()
            .is_some_and(|m| m.contains("s3 object not found")),
        "{absent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bedrock_jobs_stop_expire_and_partially_complete() {
    let sim = Sim::start(100.0).await;
    // Stop: Stopping for `cancelling`, then Stopped with what was done by the stop.
    sim.put_input("in/long.jsonl", &records("l", 200)).await;
    let long = sim
        .created(create_body("long", "tokenLong", "in/long.jsonl", None))
        .await;
    sim.until(&long, |job| job["status"] == "InProgress").await;
    let stopped = sim
        .call(
            Method::POST,
            &format!("/model-invocation-job/{}/stop", encoded(&long)),
            None,
        )
        .await;
    assert_eq!(
        (stopped.status, &stopped.body),
        (StatusCode::OK, &json!({}))
    );
    assert_eq!(sim.get(&long).await["status"], "Stopping");
    let (job, _) = sim.ended(&long).await;
    assert_eq!(job["status"], "Stopped", "{job}");
    let processed = job["processedRecordCount"].as_u64().expect("processed");
    assert!(processed < 200, "{job}");
    assert_eq!(
        output_lines(&sim, &long, "long.jsonl").await.len() as u64,
        processed
    );
    assert_eq!(
        manifest(&sim, &long).await["processedRecordCount"],
        processed
    );
    let again = sim
        .call(
            Method::POST,
            &format!("/model-invocation-job/{}/stop", job_id(&long)),
            None,
        )
        .await;
    assert_eq!(
        (again.status, again.kind.as_deref()),
        (StatusCode::BAD_REQUEST, Some("ValidationException"))
    );

    // expire_shards: at fraction 0 the job never starts (Expired, the manifest only); at 0.5
    // it processes half its records (PartiallyCompleted, only those lines).
    let every_ordinal: Vec<u32> = (0..100).collect();
    for (job, fraction) in [("expiring", 0.0), ("partial", 0.5)] {
        let faults = SimFaults {
            expire_shards: every_ordinal.clone(),
            expire_at_fraction: fraction,
            ..SimFaults::default()
        };
        sim.set_job_faults(job, &faults).await;
    }
    sim.put_input("in/ten.jsonl", &records("t", 10)).await;
    let expiring = sim
        .created(create_body(
            "expiring",
            "tokenExp",
            "in/ten.jsonl",
            Some("expiring.1.0"),
        ))
        .await;
    let partial = sim
        .created(create_body(
            "partial",
            "tokenPart",
            "in/ten.jsonl",
            Some("partial.1.0"),
        ))
        .await;
    let (expired, seen) = sim.ended(&expiring).await;
    assert_eq!(expired["status"], "Expired", "{expired}");
    assert!(!seen.contains(&"InProgress".to_owned()), "{seen:?}");
    assert_eq!(expired["processedRecordCount"], 0);
    assert!(
        sim.read(&format!("out/{}/ten.jsonl.out", job_id(&expiring)))
            .await
            .is_none()
    );
    assert_eq!(manifest(&sim, &expiring).await["processedRecordCount"], 0);
    let (partial_job, _) = sim.ended(&partial).await;
    assert_eq!(partial_job["status"], "PartiallyCompleted", "{partial_job}");
    assert_eq!(partial_job["processedRecordCount"], 5);
    assert_eq!(output_lines(&sim, &partial, "ten.jsonl").await.len(), 5);
}
