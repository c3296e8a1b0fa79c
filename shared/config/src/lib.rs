//! Configuration of every service and the CLI: defaults < `rowsmith.toml` (or the file named
//! by `ROWSMITH_CONFIG`) < environment `ROWSMITH_<SECTION>__<KEY>`.
//!
//! The loader takes the environment as a map so tests never touch the process environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use humantime_serde::re::humantime;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    pub store: StoreSettings,
    pub provider: ProviderSettings,
    pub ingest: WorkerSettings,
    pub submitter: WorkerSettings,
    pub poller: PollerSettings,
    pub merger: WorkerSettings,
    /// How the submitter claims a batch's creation (exactly once per shard attempt).
    pub creation: CreationSettings,
    pub sim: SimSettings,
    pub log: LogSettings,
    pub quota: QuotaSettings,
    pub ops: OpsSettings,
    pub telemetry: TelemetrySettings,
    pub limits: LimitsSettings,
    pub output: OutputSettings,
    pub cache: CacheSettings,
    pub duckdb: DuckdbSettings,
    /// USD prices per model, for `rowsmith estimate` and `options.budget_usd`. A model is
    /// priced by its entry or by the longest entry its name starts with
    /// (`gpt-4o-mini-2024-07-18` takes `gpt-4o-mini`).
    pub prices: std::collections::BTreeMap<String, Price>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats: Default::default(),
            store: Default::default(),
            provider: Default::default(),
            ingest: Default::default(),
            submitter: Default::default(),
            poller: Default::default(),
            merger: Default::default(),
            creation: Default::default(),
            sim: Default::default(),
            log: Default::default(),
            quota: Default::default(),
            ops: Default::default(),
            telemetry: Default::default(),
            limits: Default::default(),
            output: Default::default(),
            cache: Default::default(),
            duckdb: Default::default(),
            prices: default_prices(),
        }
    }
}

/// A model's price in USD per million tokens at the synchronous rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Cached input tokens (prompt caching), when the provider offers it.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// The batch price as a fraction of the synchronous one (both providers: 0.5).
    #[serde(default = "half")]
    pub batch_factor: f64,
}

fn half() -> f64 {
    0.5
}

/// List prices at the time of writing (USD per million tokens); set `[prices]` to yours.
pub fn default_prices() -> std::collections::BTreeMap<String, Price> {
    let price = |input: f64, output: f64, cached: f64| Price {
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: Some(cached),
        batch_factor: 0.5,
    };
    [
        ("gpt-4o-mini", price(0.15, 0.60, 0.075)),
        ("gpt-4o", price(2.50, 10.00, 1.25)),
        ("claude-3-5-haiku", price(0.80, 4.00, 0.08)),
        ("claude-sonnet-4", price(3.00, 15.00, 0.30)),
    ]
    .into_iter()
    .map(|(model, price)| (model.to_owned(), price))
    .collect()
}

/// What every service process needs whatever its work: where NATS and the store are, its logs
/// and traces, and its operations endpoint. Each service's own settings hold this and only
/// the sections it uses, so that no process keeps another's knobs or provider keys.
#[derive(Debug, Clone, Default)]
pub struct ProcessSettings {
    pub nats: NatsSettings,
    pub store: StoreSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub ops: OpsSettings,
}

impl ProcessSettings {
    /// The process part of the whole file's settings.
    pub fn of(settings: &Settings) -> Self {
        Self {
            nats: settings.nats.clone(),
            store: settings.store.clone(),
            log: settings.log.clone(),
            telemetry: settings.telemetry.clone(),
            ops: settings.ops.clone(),
        }
    }
}

impl Settings {
    /// The price of `model`: its own entry, else the longest entry it starts with.
    pub fn price(&self, model: &str) -> Option<&Price> {
        find_price(&self.prices, model)
    }
}

/// The price of `model` in `prices`: its own entry, else the longest entry it starts with.
/// A Bedrock model id (`anthropic.claude-…`, an inference profile `us.anthropic.claude-…`,
/// or an ARN of either) is also looked up by the model's own name (`claude-…`): price keys
/// hold no dots, which the configuration reads as nesting.
pub fn find_price<'a>(
    prices: &'a std::collections::BTreeMap<String, Price>,
    model: &str,
) -> Option<&'a Price> {
    let lookup = |model: &str| {
        prices.get(model).or_else(|| {
            prices
                .iter()
                .filter(|(name, _)| model.starts_with(name.as_str()))
                .max_by_key(|(name, _)| name.len())
                .map(|(_, price)| price)
        })
    };
    lookup(model).or_else(|| {
        let id = model.rsplit('/').next().unwrap_or(model);
        let (_, name) = id.split_once("anthropic.")?;
        lookup(name)
    })
}

/// The operations endpoint of a service process: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// `host:port` to serve on (`0.0.0.0:9090` in containers); empty = not served.
    pub listen: String,
}

/// Trace export.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP endpoint (`http://collector:4318`); unset = spans are not exported, but
    /// trace context still travels with every message.
    pub otlp_endpoint: Option<String>,
}

pub use rowsmith_contract::spec::LimitsSettings;

/// The result cache: answers of completed jobs, by request body, in the store's `cache/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// A request identical to one a completed job was answered for (same provider, model,
    /// parameters, messages and schema) is not sent again; the answer is reused.
    pub enabled: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// DuckDB, which indexes inputs, renders shards and writes the outputs. Each table operation
/// opens its own DuckDB instance with these limits, and a service runs up to its
/// `concurrency` operations at once. What does not fit in memory spills to a temporary
/// directory of that instance's own (in `TMPDIR`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuckdbSettings {
    /// Memory one DuckDB instance may use (`512MiB`, `2GB`, or bytes). Unset: 1/8 of the
    /// memory the process may use (the container's cgroup `memory.max`, else the machine's
    /// `MemTotal`), between 128 MiB and 512 MiB.
    pub memory_limit: Option<String>,
    /// Threads of one DuckDB instance. Unset: the CPUs available to the process (cgroup CPU
    /// quota and affinity included).
    pub threads: Option<usize>,
}

/// The smallest `duckdb.memory_limit` accepted: below it DuckDB cannot hold one CSV buffer.
pub const DUCKDB_MIN_MEMORY: u64 = 64 * 1024 * 1024;
/// The default memory of one DuckDB instance is this fraction of what the process may use.
const DUCKDB_MEMORY_FRACTION: u64 = 8;
const DUCKDB_DEFAULT_MEMORY_MIN: u64 = 128 * 1024 * 1024;
const DUCKDB_DEFAULT_MEMORY_MAX: u64 = 512 * 1024 * 1024;

/// `duckdb.*` resolved: what every DuckDB instance is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuckdbLimits {
    pub memory_limit_bytes: u64,
    pub threads: usize,
}

impl Default for DuckdbLimits {
    /// Sized from the machine (see [`DuckdbSettings`]).
    fn default() -> Self {
        DuckdbSettings::default().limits()
    }
}

impl DuckdbSettings {
    /// The limits to open DuckDB with; a value [`Settings::validate`] refuses falls back to
    /// its default.
    pub fn limits(&self) -> DuckdbLimits {
        let memory_limit_bytes = self
            .memory_limit
            .as_deref()
            .and_then(|text| parse_bytes(text).ok())
            .unwrap_or_else(default_duckdb_memory);
        let threads = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        DuckdbLimits {
            memory_limit_bytes,
            threads,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(text) = &self.memory_limit {
            let bytes = parse_bytes(text).map_err(|error| {
                ConfigError::Invalid(format!("duckdb.memory_limit {text:?}: {error}"))
            })?;
            if bytes < DUCKDB_MIN_MEMORY {
                return Err(ConfigError::Invalid(format!(
                    "duckdb.memory_limit {text:?} is below the minimum of 64MiB"
                )));
            }
        }
        if let Some(threads) = self.threads
            && !(1..=256).contains(&threads)
        {
            return Err(ConfigError::Invalid(format!(
                "duckdb.threads must be between 1 and 256, not {threads}"
            )));
        }
        Ok(())
    }
}

/// 1/8 of the memory the process may use, between 128 MiB and 512 MiB.
fn default_duckdb_memory() -> u64 {
    let available = process_memory_limit().unwrap_or(4 * 1024 * 1024 * 1024);
    (available / DUCKDB_MEMORY_FRACTION).clamp(DUCKDB_DEFAULT_MEMORY_MIN, DUCKDB_DEFAULT_MEMORY_MAX)
}

/// The memory the process may use: its cgroup v2 limit (`memory.max` of its own cgroup, or of
/// the root in a container) when set, the machine's `MemTotal` otherwise.
pub fn process_memory_limit() -> Option<u64> {
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        });
    let mut candidates = Vec::new();
    if let Some(path) = own_cgroup {
        candidates.push(format!(
            "/sys/fs/cgroup{}/memory.max",
            path.trim_end_matches('/')
        ));
    }
    candidates.push("/sys/fs/cgroup/memory.max".to_owned());
    let cgroup = candidates.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        text.trim().parse::<u64>().ok()
    });
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    match (cgroup, machine) {
        (Some(cgroup), Some(machine)) => Some(cgroup.min(machine)),
        (cgroup, machine) => cgroup.or(machine),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses a size: bytes (`1073741824`) or a number with a unit, decimal (`KB`, `MB`, `GB`,
/// `TB`) or binary (`KiB`, `MiB`, `GiB`, `TiB`), case-insensitive.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "write a size such as 512MiB, 2GB or a number of bytes".to_owned())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    Ok((number * factor as f64) as u64)
}

/// How outputs are written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSettings {
    /// In CSV outputs, prefix a generated cell that a spreadsheet would run as a formula
    /// (`=`, `+`, `-`, `@`, tab, CR first, and not a number) with `'`. The input's own cells
    /// are never changed.
    pub csv_formula_escape: bool,
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self {
            csv_formula_escape: true,
        }
    }
}

/// The providers' enqueued-token quota: how many input tokens may wait in batches at once,
/// per model. The submitter holds shards back while a model's quota is in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSettings {
    /// `model = tokens`; a model not listed has no limit.
    pub enqueued_tokens: std::collections::BTreeMap<String, u64>,
    /// How long a held-back shard waits before it asks again, and how long after a
    /// `token_limit_exceeded` failure a shard is sent again.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            enqueued_tokens: Default::default(),
            wait: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// `nats://host:port`, or several separated by commas (the nodes of a cluster).
    pub url: String,
    /// How long a JetStream request (publish ack, KV op) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// User and password authentication; the password from `ROWSMITH_NATS__PASSWORD` or,
    /// better, `password_file`.
    pub user: Option<String>,
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    /// Token authentication (`ROWSMITH_NATS__TOKEN` or `token_file`).
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    pub token_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed) for decentralised auth.
    pub creds_file: Option<PathBuf>,
    /// TLS: the CA that signed the server's certificate; setting it requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS client certificate and key (mutual TLS).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even without a CA file (the system roots are used).
    pub tls_required: bool,
    /// Reply subjects start with this instead of `_INBOX`, so that server permissions can
    /// give each service its own inbox space (`_INBOX_ingest.>`).
    pub inbox_prefix: Option<String>,
    /// Create or update the streams and the KV bucket at start (the default, for services).
    /// Off, a process only looks them up, so its NATS user needs no right to change them;
    /// `rowsmith setup` creates them once. The CLI's other commands always only look them up.
    pub ensure_topology: bool,
    /// Replicas of the streams and the KV bucket (3 on a three-node JetStream cluster).
    pub replicas: usize,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            request_timeout: Duration::from_secs(10),
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            inbox_prefix: None,
            ensure_topology: true,
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `file:///abs/dir`, a plain directory path, `s3://bucket[/prefix]` or `memory://`.
    pub url: String,
    /// S3: endpoint, region and addressing; credentials and anything not set here come
    /// from the usual `AWS_*` environment variables.
    pub s3: S3Settings,
    /// Where a job may read its input: store-key prefixes (`inputs/`, where the CLI uploads)
    /// or `file:///dir/` prefixes. Anything else is refused before it is read.
    pub allowed_inputs: Vec<String>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "rowsmith-data".into(),
            s3: S3Settings::default(),
            allowed_inputs: vec!["inputs/".into()],
        }
    }
}

/// S3 options of the store; each overrides its `AWS_*` variable.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// `http://minio:9000` for an S3-compatible server (`AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: Option<bool>,
    /// Allow plain `http://` endpoints.
    pub allow_http: Option<bool>,
    /// Static credentials; usually `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a web
    /// identity or the instance role are the better source.
    pub access_key_id: Option<String>,
    #[serde(skip_serializing)]
    pub secret_access_key: Option<SecretString>,
    /// With temporary credentials (`AWS_SESSION_TOKEN`).
    #[serde(skip_serializing)]
    pub session_token: Option<SecretString>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    pub openai: OpenAiSettings,
    pub anthropic: AnthropicSettings,
    pub mistral: MistralSettings,
    pub gemini: GeminiSettings,
    /// Groq's OpenAI-compatible Batch API (`GROQ_API_KEY`).
    pub groq: OpenAiSettings,
    pub bedrock: BedrockSettings,
    /// Together's Batch API (`TOGETHER_API_KEY`): OpenAI's lines, its own files and batches.
    pub together: OpenAiSettings,
    pub sim: SimProviderSettings,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            openai: OpenAiSettings::default(),
            anthropic: AnthropicSettings::default(),
            mistral: MistralSettings::default(),
            gemini: GeminiSettings::default(),
            groq: OpenAiSettings {
                base_url: "https://api.groq.com/openai/v1".into(),
                ..OpenAiSettings::default()
            },
            bedrock: BedrockSettings::default(),
            together: OpenAiSettings {
                base_url: "https://api.together.xyz/v1".into(),
                ..OpenAiSettings::default()
            },
            sim: SimProviderSettings::default(),
        }
    }
}

/// AWS Bedrock batch inference (model invocation jobs): request files go to `s3_uri`, the job
/// runs as `role_arn`, calls are signed (SigV4) with the AWS credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BedrockSettings {
    pub region: String,
    /// The control plane; unset: `https://bedrock.<region>.amazonaws.com`.
    pub base_url: Option<String>,
    /// `s3://bucket/prefix` under which rowsmith puts each shard's input and Bedrock writes its
    /// output (the service role must read and write there).
    pub s3_uri: Option<String>,
    /// The service role Bedrock assumes to read the input and write the output.
    pub role_arn: Option<String>,
    /// S3 endpoint, addressing and credentials for `s3_uri`; the credentials also sign the
    /// Bedrock calls. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`
    /// fill what is not set here.
    pub s3: S3Settings,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `timeoutDurationInHours` of each job (24 to 168).
    pub job_timeout_hours: u32,
    /// The account's "Minimum number of records per batch inference job" quota for the models
    /// used (100 by default on most accounts).
    pub min_records: u64,
    /// Without static keys, take the credentials the AWS environment gives the process: a
    /// web identity (EKS IRSA), container or Pod Identity credentials, or the instance role.
    /// Set on its own when `AWS_WEB_IDENTITY_TOKEN_FILE` or `AWS_CONTAINER_CREDENTIALS_*`
    /// is in the environment; set it for an EC2 instance role.
    pub ambient_credentials: bool,
}

impl Default for BedrockSettings {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            base_url: None,
            s3_uri: None,
            role_arn: None,
            s3: S3Settings::default(),
            timeout: Duration::from_secs(300),
            job_timeout_hours: 24,
            min_records: 100,
            ambient_credentials: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiSettings {
    /// Base URL including `/v1`; any OpenAI-compatible batch endpoint.
    pub base_url: String,
    /// Never serialized; `OPENAI_API_KEY` or `api_key_file` are the usual sources.
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    /// A file holding the API key (e.g. a mounted Kubernetes secret).
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Azure OpenAI: the `api-version`; the key is then sent as `api-key`.
    pub azure_api_version: Option<String>,
}

/// Anthropic Message Batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicSettings {
    /// Base URL without `/v1`.
    pub base_url: String,
    /// Never serialized; `ANTHROPIC_API_KEY` or `api_key_file` are the usual sources.
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Mistral batch jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MistralSettings {
    /// Base URL including `/v1`.
    pub base_url: String,
    /// Never serialized; `MISTRAL_API_KEY` or `api_key_file` are the usual sources.
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Gemini batch mode through the Developer API (an API key, not Vertex).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeminiSettings {
    /// Base URL without the API version (`/v1beta` and `/upload/v1beta` are appended).
    pub base_url: String,
    /// Never serialized; `GEMINI_API_KEY` or `api_key_file` are the usual sources.
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Shards up to this many bytes go inline in the create call (Gemini caps the call at
    /// 20 MB); larger ones are uploaded through the Files API. 0 uploads every shard.
    pub inline_max_bytes: u64,
}

impl Default for GeminiSettings {
    fn default() -> Self {
        Self {
            base_url: "https://generativelanguage.googleapis.com".into(),
            api_key: None,
            api_key_file: None,
            timeout: Duration::from_secs(300),
            inline_max_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Default for MistralSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.mistral.ai/v1".into(),
            api_key: None,
            api_key_file: None,
            timeout: Duration::from_secs(120),
        }
    }
}

impl Default for AnthropicSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            api_key: None,
            api_key_file: None,
            timeout: Duration::from_secs(120),
        }
    }
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key: None,
            api_key_file: None,
            timeout: Duration::from_secs(120),
            azure_api_version: None,
        }
    }
}

/// Where the provider simulator answers when a job says `provider: sim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimProviderSettings {
    pub base_url: String,
}

impl Default for SimProviderSettings {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8089/v1".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Messages handled at once by one replica.
    pub concurrency: usize,
    /// Deliveries before a message is dead-lettered (the job marked failed).
    pub max_deliver: i64,
    /// How long a message may be worked on before it is redelivered.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Testing only (the chaos test): the submitter aborts with this probability between
    /// creating a batch and recording its id, to exercise the reconciliation path.
    pub chaos_crash_after_create: f64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 2,
            max_deliver: 5,
            ack_wait: Duration::from_secs(300),
            chaos_crash_after_create: 0.0,
        }
    }
}

/// The creation claim: a submitter claims a shard attempt (compare-and-set) before it creates
/// the batch, so two deliveries never both create, and one that finds an expired claim looks
/// for the batch before creating another.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreationSettings {
    /// How long a claim holds: longer than one create call can take (the provider's timeout
    /// and its body upload). A submitter that dies holding it delays the shard this long.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// After a create that may have taken effect (timeout, dropped connection, 5xx), how long
    /// to wait before looking for the batch: longer than the provider may still take to act
    /// on a request the client gave up on.
    #[serde(with = "humantime_serde")]
    pub unconfirmed_wait: Duration,
}

impl Default for CreationSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(600),
            unconfirmed_wait: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollerSettings {
    pub concurrency: usize,
    /// Delay before the n-th status check, indexed by the delivery count; the last repeats.
    pub schedule: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Batches a poller consumer may hold parked between checks.
    pub max_ack_pending: i64,
    /// The providers' completion window; a batch still running after it plus `grace` is
    /// treated as expired (cancelled at the provider, its rows retried).
    #[serde(with = "humantime_serde")]
    pub completion_window: Duration,
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            schedule: ["30s", "1m", "2m", "5m"].map(String::from).to_vec(),
            ack_wait: Duration::from_secs(120),
            max_ack_pending: 20_000,
            completion_window: Duration::from_secs(24 * 3600),
            grace: Duration::from_secs(3600),
        }
    }
}

impl PollerSettings {
    pub fn schedule(&self) -> Result<Vec<Duration>, ConfigError> {
        if self.schedule.is_empty() {
            return Err(ConfigError::Invalid("poller.schedule is empty".into()));
        }
        self.schedule
            .iter()
            .map(|text| {
                humantime::parse_duration(text.trim()).map_err(|error| {
                    ConfigError::Invalid(format!(
                        "poller.schedule entry {text:?} is not a duration ({error}); write e.g. 30s, 5m"
                    ))
                })
            })
            .collect()
    }
}

/// The provider simulator's own settings (`rowsmith-provider-sim`, `rowsmith up --sim`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSettings {
    pub listen: String,
    /// Requests a batch finishes per second once in progress.
    pub rows_per_second: f64,
    #[serde(with = "humantime_serde")]
    pub validating: Duration,
    #[serde(with = "humantime_serde")]
    pub finalizing: Duration,
    /// How long a cancel takes to end (`cancelling`, OpenAI; `canceling`, Anthropic): the
    /// requests done by the cancel are answered, the rest not.
    #[serde(with = "humantime_serde")]
    pub cancelling: Duration,
    /// How long Gemini keeps an uploaded file (48 h): a create naming an older one is
    /// answered 404, as Google deletes it.
    #[serde(with = "humantime_serde")]
    pub gemini_file_ttl: Duration,
    /// Where the Bedrock control plane reads job inputs and writes outputs (`s3://` URIs of
    /// the create calls): an S3-compatible server's endpoint and credentials.
    pub bedrock_s3: S3Settings,
    /// Bedrock's per-job minimum record count (a job with fewer fails its validation).
    pub bedrock_min_records: u64,
    /// Bedrock's quota of submitted and in-progress jobs per model.
    pub bedrock_max_jobs: usize,
    /// Faults for every job (a job's own, set through `POST /sim/faults/<job_id>`, win).
    pub faults: SimFaults,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8089".into(),
            rows_per_second: 2000.0,
            validating: Duration::from_millis(300),
            finalizing: Duration::from_millis(300),
            cancelling: Duration::from_millis(300),
            gemini_file_ttl: Duration::from_secs(48 * 3600),
            bedrock_s3: S3Settings::default(),
            bedrock_min_records: 100,
            bedrock_max_jobs: 20,
            faults: SimFaults::default(),
        }
    }
}

/// Faults the simulator injects. Rates are fractions of a batch's requests, chosen by a hash
/// of the request, so a run is repeatable. Permanent faults (HTTP 400, refusals) hit the same
/// rows on every attempt; retryable ones only on attempts up to `retryable_until_attempt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFaults {
    /// Lines answered HTTP 500 (in the error file).
    pub server_error_rate: f64,
    /// Lines answered HTTP 400 (in the error file); permanent.
    pub bad_request_rate: f64,
    /// Answers that are not valid JSON.
    pub invalid_json_rate: f64,
    /// Answers missing a required field.
    pub schema_violation_rate: f64,
    /// Answers cut off with `finish_reason: length`.
    pub length_rate: f64,
    /// Refusals (`message.refusal`); permanent.
    pub refusal_rate: f64,
    pub retryable_until_attempt: u32,
    /// Shards (of attempt 1) whose batch expires part-way, with partial output.
    pub expire_shards: Vec<u32>,
    /// How far an expiring batch gets (0 to 1).
    pub expire_at_fraction: f64,
    /// Input tokens (bytes / 4) that may wait in unfinished batches; a batch that would go
    /// over fails validation with `token_limit_exceeded`.
    pub enqueued_token_quota: Option<u64>,
    /// Every n-th API call is answered 429 `rate_limit_exceeded` with `retry-after-ms`.
    pub http_429_every: Option<u64>,
    /// Every n-th API call is answered 500 (with `x-should-retry: true`).
    pub http_500_every: Option<u64>,
    /// Batch creation is refused with 429 `insufficient_quota` (never worth retrying).
    pub insufficient_quota: bool,
    /// Every n-th batch creation (either API) is carried out, and then its answer is lost
    /// as `create_response_lost_as` says: the fault that makes a blind retry pay twice.
    pub create_response_lost_every: Option<u64>,
    pub create_response_lost_as: LostResponse,
    /// Every n-th chunk of a Gemini resumable upload is stored, and then its answer is lost
    /// as `create_response_lost_as` says: the client must ask the session how far it got.
    pub upload_chunk_lost_every: Option<u64>,
    /// How long the answer of a `slow` lost create is held back (longer than the client's
    /// timeout, so that the client gives up while the batch exists).
    #[serde(with = "humantime_serde")]
    pub slow_create: Duration,
    /// Added before every API answer (not `/sim/…`).
    #[serde(with = "humantime_serde")]
    pub response_delay: Duration,
    /// Every n-th download (an OpenAI file's content, Anthropic results) is cut off half-way
    /// by a dropped connection.
    pub download_dropped_every: Option<u64>,
    /// Output tokens every answer needs: a request allowing fewer (Anthropic `max_tokens`,
    /// OpenAI `max_completion_tokens`) is cut off (`max_tokens`, `length`).
    pub answer_tokens: Option<u64>,
    /// Batch status checks (`GET /v1/batches/<id>`) are answered 401, as after an API key
    /// rotation; set per job and cleared again to "fix the key".
    pub status_unauthorized: bool,
    /// Gemini result lines name a request's error `status` instead of `error` (implementers
    /// report both).
    pub gemini_errors_as_status: bool,
}

/// How a lost create answer is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostResponse {
    /// HTTP 500 instead of the created batch.
    #[default]
    ServerError,
    /// The connection drops before the body arrives.
    Dropped,
    /// The answer comes after `slow_create`.
    Slow,
}

impl Default for SimFaults {
    fn default() -> Self {
        Self {
            server_error_rate: 0.0,
            bad_request_rate: 0.0,
            invalid_json_rate: 0.0,
            schema_violation_rate: 0.0,
            length_rate: 0.0,
            refusal_rate: 0.0,
            retryable_until_attempt: 1,
            expire_shards: Vec::new(),
            expire_at_fraction: 0.5,
            enqueued_token_quota: None,
            http_429_every: None,
            http_500_every: None,
            insufficient_quota: false,
            create_response_lost_every: None,
            create_response_lost_as: LostResponse::ServerError,
            upload_chunk_lost_every: None,
            slow_create: Duration::from_secs(5),
            response_delay: Duration::ZERO,
            download_dropped_every: None,
            answer_tokens: None,
            status_unauthorized: false,
            gemini_errors_as_status: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter (`info`, `rowsmith=debug`); `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration is invalid: {0}")]
    Invalid(String),
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ProviderSettings {
    /// Fills the API keys not set in the configuration from `api_key_file` or, without one,
    /// `OPENAI_API_KEY` / `ANTHROPIC_API_KEY` in `env`. Only the services that call providers
    /// (the submitter and the poller) do this; the others never hold a key.
    pub fn load_keys(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let sources = [
            (
                &mut self.openai.api_key,
                &self.openai.api_key_file,
                "OPENAI_API_KEY",
            ),
            (
                &mut self.anthropic.api_key,
                &self.anthropic.api_key_file,
                "ANTHROPIC_API_KEY",
            ),
            (
                &mut self.mistral.api_key,
                &self.mistral.api_key_file,
                "MISTRAL_API_KEY",
            ),
            (
                &mut self.gemini.api_key,
                &self.gemini.api_key_file,
                "GEMINI_API_KEY",
            ),
            (
                &mut self.groq.api_key,
                &self.groq.api_key_file,
                "GROQ_API_KEY",
            ),
            (
                &mut self.together.api_key,
                &self.together.api_key_file,
                "TOGETHER_API_KEY",
            ),
        ];
        let ambient = [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ];
        if ambient.iter().any(|name| env.contains_key(*name)) {
            self.bedrock.ambient_credentials = true;
        }
        let s3 = &mut self.bedrock.s3;
        if s3.access_key_id.is_none() && s3.secret_access_key.is_none() {
            s3.access_key_id = env.get("AWS_ACCESS_KEY_ID").cloned();
            s3.secret_access_key = env
                .get("AWS_SECRET_ACCESS_KEY")
                .map(|value| SecretString::from(value.clone()));
            if s3.session_token.is_none() {
                s3.session_token = env
                    .get("AWS_SESSION_TOKEN")
                    .map(|value| SecretString::from(value.clone()));
            }
        }
        for (key, file, variable) in sources {
            if key.is_some() {
                continue;
            }
            *key = match file {
                Some(path) => Some(read_secret_file(path)?),
                None => env
                    .get(variable)
                    .map(|value| SecretString::from(value.clone())),
            };
        }
        Ok(())
    }
}

impl Settings {
    /// Loads defaults < `file` (when it exists) < `env` (`ROWSMITH_<SECTION>__<KEY>`).
    /// Provider keys from files or `OPENAI_API_KEY` are left to
    /// [`ProviderSettings::load_keys`].
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let rowsmith_env: HashMap<String, String> = env
            .iter()
            .filter(|(key, _)| key.starts_with("ROWSMITH_") && key.as_str() != "ROWSMITH_CONFIG")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ROWSMITH")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("poller.schedule")
                .with_list_parse_key("store.allowed_inputs")
                .try_parsing(true)
                .source(Some(rowsmith_env)),
        );
        // Provider keys are not read here: only the two services that call providers read
        // them (`ProviderSettings::load_keys`).
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        if settings.nats.password.is_none()
            && let Some(path) = &settings.nats.password_file
        {
            settings.nats.password = Some(read_secret_file(path)?);
        }
        if settings.nats.token.is_none()
            && let Some(path) = &settings.nats.token_file
        {
            settings.nats.token = Some(read_secret_file(path)?);
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Loads from the process environment and `ROWSMITH_CONFIG` or `./rowsmith.toml`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let file = match env.get("ROWSMITH_CONFIG") {
            Some(path) => Some(PathBuf::from(path)),
            None => Some(PathBuf::from("rowsmith.toml")).filter(|p| p.exists()),
        };
        Self::load(file.as_deref(), &env)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.poller.schedule()?;
        self.duckdb.validate()?;
        for (name, worker) in [
            ("ingest", &self.ingest),
            ("submitter", &self.submitter),
            ("merger", &self.merger),
        ] {
            if worker.concurrency == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{name}.concurrency must be at least 1"
                )));
            }
            if worker.max_deliver < 1 {
                return Err(ConfigError::Invalid(format!(
                    "{name}.max_deliver must be at least 1"
                )));
            }
        }
        if self.creation.lease.is_zero() || self.creation.unconfirmed_wait.is_zero() {
            return Err(ConfigError::Invalid(
                "creation.lease and creation.unconfirmed_wait must be longer than 0s".into(),
            ));
        }
        if self.poller.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "poller.concurrency must be at least 1".into(),
            ));
        }
        if !self.sim.rows_per_second.is_finite() || self.sim.rows_per_second <= 0.0 {
            return Err(ConfigError::Invalid(
                "sim.rows_per_second must be positive".into(),
            ));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(ConfigError::Invalid(
                "nats.user and nats.password (or nats.password_file) go together".into(),
            ));
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "nats.tls_cert_file and nats.tls_key_file go together".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(
                "log.format must be text or json".into(),
            ));
        }
        Ok(())
    }
}

fn read_secret_file(path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(SecretString::from(text.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_defaults_load_and_bedrock_model_ids_find_their_price() {
        let settings = Settings::load(None, &env(&[])).expect("the defaults load");
        for model in [
            "claude-3-5-haiku-latest",
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            "us.anthropic.claude-3-5-haiku-20241022-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0",
        ] {
            let price = settings.price(model).expect(model);
            assert_eq!(price.input_per_mtok, 0.80, "{model}");
        }
        assert!(settings.price("amazon.nova-lite-v1:0").is_none());
    }

    #[test]
    fn only_load_keys_reads_provider_keys_and_a_missing_key_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("openai.key");
        let variables = env(&[
            (
                "ROWSMITH_PROVIDER__OPENAI__API_KEY_FILE",
                missing.to_str().expect("utf-8 path"),
            ),
            ("ANTHROPIC_API_KEY", "sk-ant-from-env"),
        ]);
        // Ingest, the merger and the CLI load settings without the key file they never use.
        let mut settings = Settings::load(None, &variables).expect("load without keys");
        assert!(settings.provider.openai.api_key.is_none());
        assert!(settings.provider.anthropic.api_key.is_none());
        let error = settings
            .provider
            .load_keys(&variables)
            .expect_err("the key file is missing");
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
        std::fs::write(&missing, "sk-openai-from-file\n").expect("write key");
        settings.provider.load_keys(&variables).expect("keys");
        let key = |k: &Option<SecretString>| k.as_ref().expect("key").expose_secret().to_owned();
        assert_eq!(
            key(&settings.provider.openai.api_key),
            "sk-openai-from-file"
        );
        assert_eq!(key(&settings.provider.anthropic.api_key), "sk-ant-from-env");
    }

    #[test]
    fn bedrock_takes_the_aws_keys_or_the_role_the_environment_gives() {
        let mut keys = ProviderSettings::default();
        keys.load_keys(&env(&[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "0123secret"),
            ("AWS_SESSION_TOKEN", "token"),
        ]))
        .expect("keys");
        let s3 = &keys.bedrock.s3;
        assert_eq!(s3.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        let secret = s3.secret_access_key.as_ref().expect("secret");
        assert_eq!(secret.expose_secret(), "0123secret");
        assert!(s3.session_token.is_some() && !keys.bedrock.ambient_credentials);
        // Keys set for Bedrock itself are kept over the environment's (the store's, say).
        let mut own = ProviderSettings::default();
        own.bedrock.s3.access_key_id = Some("AKIDBEDROCK".into());
        own.bedrock.s3.secret_access_key = Some("own".to_owned().into());
        own.load_keys(&env(&[("AWS_ACCESS_KEY_ID", "AKIDSTORE")]))
            .expect("keys");
        assert_eq!(own.bedrock.s3.access_key_id.as_deref(), Some("AKIDBEDROCK"));
        let mut irsa = ProviderSettings::default();
        irsa.load_keys(&env(&[(
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
        )]))
        .expect("keys");
        assert!(irsa.bedrock.ambient_credentials);
        assert!(irsa.bedrock.s3.access_key_id.is_none());
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rowsmith.toml");
        std::fs::write(
            &file,
            "[nats]\nurl = \"nats://file:1\"\n[store]\nurl = \"/data\"\n",
        )
        .expect("write");
        let settings = Settings::load(
            Some(&file),
            &env(&[
                ("ROWSMITH_NATS__URL", "nats://env:2"),
                ("ROWSMITH_PROVIDER__OPENAI__BASE_URL", "http://x/v1"),
                ("ROWSMITH_POLLER__SCHEDULE", "10ms,20ms"),
                ("OPENAI_API_KEY", "k-123"),
            ]),
        )
        .expect("load");
        assert!(
            settings.provider.openai.api_key.is_none(),
            "load reads no provider key"
        );
        let mut settings = settings;
        settings
            .provider
            .load_keys(&env(&[("OPENAI_API_KEY", "k-123")]))
            .expect("keys");
        assert_eq!(settings.nats.url, "nats://env:2");
        assert_eq!(settings.store.url, "/data");
        assert_eq!(settings.provider.openai.base_url, "http://x/v1");
        assert_eq!(
            settings.poller.schedule().expect("schedule"),
            vec![Duration::from_millis(10), Duration::from_millis(20)]
        );
        let key = settings.provider.openai.api_key.as_ref().expect("key");
        assert_eq!(key.expose_secret(), "k-123");
        assert!(!format!("{settings:?}").contains("k-123"));
    }

    #[test]
    fn duckdb_limits_come_from_the_environment_or_the_machine() {
        let settings = Settings::load(
            None,
            &env(&[
                ("ROWSMITH_DUCKDB__MEMORY_LIMIT", "96MiB"),
                ("ROWSMITH_DUCKDB__THREADS", "1"),
            ]),
        )
        .expect("load");
        assert_eq!(
            settings.duckdb.limits(),
            DuckdbLimits {
                memory_limit_bytes: 96 * 1024 * 1024,
                threads: 1
            }
        );
        let sized = Settings::load(None, &env(&[]))
            .expect("load")
            .duckdb
            .limits();
        let available = process_memory_limit().expect("a Linux machine says its memory");
        assert_eq!(
            sized.memory_limit_bytes,
            (available / 8).clamp(128 << 20, 512 << 20)
        );
        assert!(sized.threads >= 1);
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        for (value, says) in [
            ("lots", "write a size"),
            ("16MB", "below the minimum"),
            ("1 parsec", "unknown unit"),
        ] {
            let error = Settings::load(None, &env(&[("ROWSMITH_DUCKDB__MEMORY_LIMIT", value)]))
                .unwrap_err();
            assert!(error.to_string().contains(says), "{value}: {error}");
        }
        let error = Settings::load(None, &env(&[("ROWSMITH_DUCKDB__THREADS", "0")])).unwrap_err();
        assert!(error.to_string().contains("duckdb.threads"), "{error}");
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       24683568 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_683_568 * 1024));
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let error = Settings::load(None, &env(&[("ROWSMITH_NATS__URLL", "x")])).unwrap_err();
        assert!(error.to_string().contains("urll"), "{error}");
        let error =
            Settings::load(None, &env(&[("ROWSMITH_POLLER__SCHEDULE", "soon")])).unwrap_err();
        assert!(error.to_string().contains("not a duration"), "{error}");
    }
}
