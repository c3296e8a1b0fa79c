//! Test harness for rowsmith's end-to-end tests: a real nats-server per test on a free port
//! with its own store directory (killed on drop, restartable), and the whole stack — the four
//! services and the provider simulator — running in-process against it.

use rowsmith_runtime::ServiceSettings;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;
use rowsmith_bus::{Bus, EVENTS_STREAM};
use rowsmith_config::Settings;
use rowsmith_contract::events::{Event, EventKind};
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::{JobRecord, job_key};
use rowsmith_contract::spec::JobSpec;
use rowsmith_store::Store;
use tokio_util::sync::CancellationToken;

/// Logs go to the test output only when `TEST_LOG` is set.
/// Spans (and so trace context in message headers) are recorded either way, as in a service.
pub fn init_logging() {
    static TELEMETRY: std::sync::OnceLock<rowsmith_telemetry::Guard> = std::sync::OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let log = rowsmith_config::LogSettings {
            level: match std::env::var_os("TEST_LOG") {
                Some(_) => "info".into(),
                None => "off".into(),
            },
            ..Default::default()
        };
        rowsmith_telemetry::init(&log, &Default::default(), "rowsmith-tests")
    });
    rowsmith_runtime::ops::metrics();
}

/// The nats-server binary: `ROWSMITH_NATS_SERVER`, else `.tools/bin/nats-server` (what
/// `scripts/bootstrap` installs), else `nats-server` on PATH.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ROWSMITH_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server");
    if tools.exists() {
        return tools;
    }
    PathBuf::from("nats-server")
}

/// A nats-server with JetStream on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store_dir: tempfile::TempDir,
    /// A server config file (`-c`) and the environment it reads (passwords).
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

/// Whether what listens at `address` is a NATS server: it greets a new connection with
/// `INFO` (another test's listener on a reused port does not).
fn greets_as_nats(address: &SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect_timeout(address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"INFO"
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_configured(None)
    }

    /// Starts the server with a config file (e.g. deploy/nats/rowsmith-auth.conf) and the
    /// environment variables it refers to.
    pub fn start_with_config(config: &Path, env: &[(&str, &str)]) -> Self {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_configured(Some((config.to_owned(), env)))
    }

    fn start_configured(config: Option<(PathBuf, Vec<(String, String)>)>) -> Self {
        let store_dir = tempfile::tempdir().expect("temp dir for JetStream");
        let mut server = Self {
            child: None,
            port: free_port(),
            store_dir,
            config,
        };
        // A free port can be taken by another test between asking for it and binding it:
        // then this server exits at start, and it tries again on another port.
        for _ in 0..5 {
            if server.try_spawn().is_ok() {
                return server;
            }
            server.port = free_port();
        }
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        if let Err(status) = self.try_spawn() {
            panic!("nats-server exited at start with {status}");
        }
    }

    /// Starts the server and waits until it greets on its port; `Err` when it exited first.
    fn try_spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        let binary = nats_server_binary();
        let mut command = Command::new(&binary);
        if let Some((config, env)) = &self.config {
            command.arg("-c").arg(config).envs(env.iter().cloned());
        }
        let child = command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start nats-server ({}): {error}. Run scripts/bootstrap, which installs \
                     it into .tools/bin, or set ROWSMITH_NATS_SERVER",
                    binary.display()
                )
            });
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(15);
        while !greets_as_nats(&address) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops and starts the server on the same port and store (file storage survives).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the server until [`NatsServer::resume`].
    pub fn stop(&mut self) {
        self.kill();
    }

    pub fn resume(&mut self) {
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The trace ids of the messages of job `job_id` that `subscriber` has received (until it
/// has been quiet for 500 ms), each with the subjects seen in it; panics on a message of the
/// job that carries no `traceparent`.
pub async fn job_traces(
    subscriber: &mut async_nats::Subscriber,
    job_id: &str,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut traces = std::collections::BTreeMap::new();
    let quoted = format!("\"{job_id}\"");
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await
    {
        if !String::from_utf8_lossy(&message.payload).contains(&quoted) {
            continue;
        }
        let parent = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| panic!("{} carries no traceparent", message.subject));
        let trace = parent.split('-').nth(1).expect("trace id").to_owned();
        assert_ne!(trace, "0".repeat(32), "an empty trace id");
        traces
            .entry(trace)
            .or_insert_with(Vec::new)
            .push(message.subject.to_string());
    }
    traces
}

/// A tool the bootstrap installs into `.tools/venv/bin`, else the same name on PATH.
pub fn venv_tool(name: &str) -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/venv/bin")
        .join(name);
    if tools.exists() {
        return tools;
    }
    PathBuf::from(name)
}

/// An S3-compatible server (`moto_server`, from `moto[server]` in
/// scripts/tools-requirements.txt) on a free loopback port with one bucket, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    pub bucket: String,
}

impl S3Server {
    pub async fn start(bucket: &str) -> Self {
        let binary = venv_tool("moto_server");
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start moto_server ({}): {error}. Run scripts/bootstrap, which                      installs it into .tools/venv",
                    binary.display()
                )
            });
        let mut server = Self {
            child,
            port,
            bucket: bucket.into(),
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("moto_server exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not accept connections within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // moto accepts any credentials; a bucket is made by a plain PUT.
        let created = reqwest::Client::new()
            .put(format!("{}/{bucket}", server.endpoint()))
            .send()
            .await
            .expect("create the bucket");
        assert!(created.status().is_success(), "create bucket: {created:?}");
        server.bucket = bucket.into();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points `settings` at this server (`s3://bucket/prefix`, path style, plain HTTP).
    pub fn configure(&self, settings: &mut Settings, prefix: &str) {
        settings.store.url = format!("s3://{}/{prefix}", self.bucket);
        settings.store.s3.endpoint = Some(self.endpoint());
        settings.store.s3.region = Some("us-east-1".into());
        settings.store.s3.path_style = Some(true);
        settings.store.s3.allow_http = Some(true);
        settings.store.s3.access_key_id = Some("rowsmith-test".into());
        settings.store.s3.secret_access_key = Some("rowsmith-test-secret".to_owned().into());
    }
}

impl S3Server {
    /// Points Bedrock at this server, for the client (`provider.bedrock`, with a service role
    /// and credentials) and for the simulator's control plane, which reads and writes the
    /// same bucket: inputs and outputs under `s3://bucket/prefix`.
    pub fn configure_bedrock(&self, settings: &mut Settings, prefix: &str) {
        let s3 = rowsmith_config::S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            path_style: Some(true),
            allow_http: Some(true),
            access_key_id: Some("AKIDROWSMITHTEST".into()),
            secret_access_key: Some("rowsmith-test-secret".to_owned().into()),
            session_token: None,
        };
        let bedrock = &mut settings.provider.bedrock;
        bedrock.s3_uri = Some(format!("s3://{}/{prefix}", self.bucket));
        bedrock.role_arn = Some("arn:aws:iam::123456789012:role/rowsmith-batch".into());
        bedrock.s3 = s3.clone();
        settings.sim.bedrock_s3 = s3;
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole stack in-process: nats-server, the four services, the simulator, a file store.
#[derive(Debug)]
pub struct Stack {
    pub nats: NatsServer,
    pub settings: Settings,
    pub bus: Bus,
    pub store: Store,
    pub sim_address: SocketAddr,
    pub store_dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts the stack after `configure` has adjusted the test settings (simulator faults,
    /// pace, schedule).
    pub async fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start_services(configure, &["ingest", "submitter", "poller", "merger"]).await
    }

    /// Starts nats-server, the simulator and only the named services.
    pub async fn start_services(configure: impl FnOnce(&mut Settings), services: &[&str]) -> Self {
        Self::start_on(NatsServer::start(), configure, services, |_, _| {}).await
    }

    /// Starts the simulator and the named services against `nats`; `per_service` adjusts each
    /// service's own settings (its NATS user, say), `configure` everyone's, the test's too.
    pub async fn start_on(
        nats: NatsServer,
        configure: impl FnOnce(&mut Settings),
        services: &[&str],
        per_service: impl Fn(&str, &mut Settings),
    ) -> Self {
        init_logging();
        let store_dir = tempfile::tempdir().expect("temp store");
        let mut settings = Settings::default();
        settings.nats.url = nats.url();
        settings.store.url = format!("file://{}", store_dir.path().display());
        settings.poller.schedule = ["50ms", "100ms", "200ms"].map(String::from).to_vec();
        settings.sim.listen = "127.0.0.1:0".into();
        settings.sim.rows_per_second = 20_000.0;
        settings.sim.validating = Duration::from_millis(50);
        settings.sim.finalizing = Duration::from_millis(50);
        // The simulator, like the real APIs, answers no call without a key.
        settings.provider.openai.api_key = Some("sk-test-openai".to_owned().into());
        settings.provider.anthropic.api_key = Some("sk-ant-test".to_owned().into());
        settings.provider.mistral.api_key = Some("sk-mistral-test".to_owned().into());
        settings.provider.gemini.api_key = Some("gemini-test-key".to_owned().into());
        settings.provider.groq.api_key = Some("gsk-test".to_owned().into());
        settings.provider.together.api_key = Some("tgp-test".to_owned().into());
        configure(&mut settings);
        let shutdown = CancellationToken::new();
        let (sim_address, _sim) =
            rowsmith_provider_sim::start(settings.sim.clone(), shutdown.clone())
                .await
                .expect("start the simulator");
        settings.provider.sim.base_url = format!("http://{sim_address}/v1");
        // The simulator serves every API on one address.
        settings.provider.openai.base_url = format!("http://{sim_address}/v1");
        settings.provider.anthropic.base_url = format!("http://{sim_address}");
        settings.provider.mistral.base_url = format!("http://{sim_address}/v1");
        settings.provider.gemini.base_url = format!("http://{sim_address}");
        settings.provider.groq.base_url = format!("http://{sim_address}/v1");
        settings.provider.bedrock.base_url = Some(format!("http://{sim_address}"));
        // Together's files and batches live at OpenAI's paths: the simulator serves them
        // under their own prefix.
        settings.provider.together.base_url = format!("http://{sim_address}/together/v1");
        settings.validate().expect("test settings are valid");
        let bus = Bus::connect(&settings.nats, "rowsmith-tests")
            .await
            .expect("connect to nats");
        for service in services {
            let mut settings = settings.clone();
            per_service(service, &mut settings);
            spawn_service(service, settings, shutdown.clone());
        }
        let store = Store::open(&settings.store).expect("store");
        Self {
            nats,
            settings,
            bus,
            store,
            sim_address,
            store_dir,
            shutdown,
        }
    }

    /// Starts one more service (one left out of [`Stack::start_services`]).
    pub fn start_service(&self, service: &str) {
        spawn_service(service, self.settings.clone(), self.shutdown.clone());
    }

    /// Polls the job record until `done` holds, failing the test after `timeout`.
    pub async fn wait_for(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        let mut read_errors = Vec::new();
        while Instant::now() < deadline {
            match self.bus.read::<JobRecord>(&job_key(job_id)).await {
                Ok(Some((job, _))) => {
                    if done(&job) {
                        return job;
                    }
                    last = Some(job);
                }
                Ok(None) => {}
                // A read that times out on a loaded machine is asked again until the
                // deadline; the errors are shown if the condition is never met.
                Err(error) => read_errors.push(error.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "job {job_id}: condition not met within {timeout:?}; last record: {last:#?}; \
             read errors: {read_errors:?}"
        );
    }

    /// The record of shard `shard` of `job_id`'s attempt `attempt`, which must exist.
    pub async fn shard_record(
        &self,
        job_id: &str,
        attempt: u32,
        shard: u32,
    ) -> rowsmith_contract::records::ShardRecord {
        let key = rowsmith_contract::messages::ShardKey {
            job_id: job_id.into(),
            attempt,
            shard,
        };
        self.bus
            .read(&rowsmith_contract::records::shard_key(&key))
            .await
            .expect("read the shard record")
            .map(|(record, _)| record)
            .unwrap_or_else(|| panic!("no record of shard {}", key.dotted()))
    }

    /// Sets the simulator's faults for one job (`POST /sim/faults/<job_id>`).
    pub async fn set_sim_faults(&self, job_id: &str, faults: &rowsmith_config::SimFaults) {
        let answer = reqwest::Client::new()
            .post(format!("http://{}/sim/faults/{job_id}", self.sim_address))
            .json(faults)
            .send()
            .await
            .expect("set sim faults");
        assert!(answer.status().is_success(), "set sim faults: {answer:?}");
    }

    /// Sets the simulator's default faults, for every job without its own (`POST /sim/faults`).
    pub async fn set_sim_default_faults(&self, faults: &rowsmith_config::SimFaults) {
        let answer = reqwest::Client::new()
            .post(format!("http://{}/sim/faults", self.sim_address))
            .json(faults)
            .send()
            .await
            .expect("set sim faults");
        assert!(answer.status().is_success(), "set sim faults: {answer:?}");
    }

    /// Publishes a JobSpec as a user would (`Nats-Msg-Id` = job id).
    pub async fn submit(&self, spec: &JobSpec) {
        self.bus
            .publish(subjects::JOBS_SUBMIT, spec.id(), spec)
            .await
            .expect("publish the job");
    }

    /// Polls the job record until it is terminal, failing the test after `timeout`.
    pub async fn wait_for_end(&self, job_id: &str, timeout: Duration) -> JobRecord {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some((job, _)) = self
                .bus
                .read::<JobRecord>(&job_key(job_id))
                .await
                .expect("read job")
            {
                if job.state.is_terminal() {
                    return job;
                }
                last = Some(job);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {job_id} did not end within {timeout:?}; last record: {last:#?}");
    }

    /// The job's events from its first, until one of `kind` (failing the test after 30 s).
    pub async fn events_until(&self, job_id: &str, kind: EventKind) -> Vec<Event> {
        let stream = self
            .bus
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .expect("events stream");
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("{}.{job_id}.>", subjects::EVENTS_PREFIX),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("events consumer");
        let mut messages = consumer.messages().await.expect("events");
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, messages.next()).await {
            let event: Event =
                serde_json::from_slice(&message.expect("event").payload).expect("event json");
            let found = event.kind == kind;
            events.push(event);
            if found {
                return events;
            }
        }
        panic!(
            "no {kind:?} event for {job_id}; saw {:?}",
            events.iter().map(|e| e.kind).collect::<Vec<_>>()
        );
    }

    /// The simulator's counters (`/sim/stats`).
    pub async fn sim_stats(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/sim/stats", self.sim_address))
            .await
            .expect("sim stats")
            .json()
            .await
            .expect("sim stats json")
    }

    /// Reads a stored object as text.
    pub async fn read_text(&self, key: &str) -> String {
        let bytes = self
            .store
            .get_bytes(key)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    /// A finished job's `enriched.csv` and `failures.csv` as (header, rows) each.
    pub async fn output_tables(&self, job: &JobRecord) -> (CsvTable, CsvTable) {
        let read = |key: Option<String>| async move {
            let key = key.expect("the job has this output");
            parse_csv(&self.read_text(&key).await)
        };
        (
            read(job.outputs.enriched_csv.clone()).await,
            read(job.outputs.failures_csv.clone()).await,
        )
    }

    /// Puts a local file into the store under `inputs/` and returns its key.
    pub async fn upload_input(&self, name: &str, bytes: Vec<u8>) -> String {
        let key = format!("inputs/{name}");
        self.store
            .put_bytes(&key, bytes.into())
            .await
            .expect("upload input");
        key
    }
}

/// Runs one service in-process until `shutdown`.
fn spawn_service(service: &str, settings: Settings, shutdown: CancellationToken) {
    match service {
        "ingest" => drop(tokio::spawn(rowsmith_ingest::run(
            rowsmith_ingest::Config::from_settings(settings),
            shutdown,
        ))),
        "submitter" => drop(tokio::spawn(rowsmith_submitter::run(
            rowsmith_submitter::Config::from_settings(settings),
            shutdown,
        ))),
        "poller" => drop(tokio::spawn(rowsmith_poller::run(
            rowsmith_poller::Config::from_settings(settings),
            shutdown,
        ))),
        "merger" => drop(tokio::spawn(rowsmith_merger::run(
            rowsmith_merger::Config::from_settings(settings),
            shutdown,
        ))),
        other => panic!("no service {other}"),
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A CSV file's header and rows.
pub type CsvTable = (Vec<String>, Vec<Vec<String>>);

/// Parses CSV text.
pub fn parse_csv(text: &str) -> CsvTable {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    let rows = reader
        .records()
        .map(|r| r.expect("record").iter().map(str::to_owned).collect())
        .collect();
    (header, rows)
}
