//! What every service must know of the provider batch APIs without calling one: their names
//! and what one batch may hold (ingest and the merger cut shards to fit).

/// What one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: u64,
    pub max_bytes: u64,
    /// The fewest requests a batch may hold (Bedrock's per-job minimum; 1 elsewhere).
    pub min_requests: u64,
}

/// OpenAI's Batch API (and the simulator, which imitates it): 50,000 requests, 200 MB.
pub const OPENAI: Limits = Limits {
    max_requests: 50_000,
    max_bytes: 200 * 1024 * 1024,
    min_requests: 1,
};

/// Anthropic's Message Batches: 100,000 requests, 256 MB.
pub const ANTHROPIC: Limits = Limits {
    max_requests: 100_000,
    max_bytes: 256 * 1000 * 1000,
    min_requests: 1,
};

/// Mistral's batch jobs: 1,000,000 requests per job, files up to 512 MB.
pub const MISTRAL: Limits = Limits {
    max_requests: 1_000_000,
    max_bytes: 512 * 1024 * 1024,
    min_requests: 1,
};

/// Gemini batch mode (Developer API): no published request cap (an enqueued-token quota
/// bounds a job instead), input files up to 2 GB. rowsmith keeps a shard to 100,000 requests
/// and 1 GB so that one failed or expired job (Gemini keeps no partial results) costs little.
pub const GEMINI: Limits = Limits {
    max_requests: 100_000,
    max_bytes: 1024 * 1024 * 1024,
    min_requests: 1,
};

/// Together's Batch API: 50,000 requests and 100 MB per input file.
pub const TOGETHER: Limits = Limits {
    max_requests: 50_000,
    max_bytes: 100 * 1000 * 1000,
    min_requests: 1,
};

/// AWS Bedrock batch inference: 50,000 records and 1 GB per input file (the usual account
/// quotas; rowsmith sends one file per job), and at least 100 records per job.
pub const BEDROCK: Limits = Limits {
    max_requests: 50_000,
    max_bytes: 1024 * 1024 * 1024,
    min_requests: BEDROCK_MIN_RECORDS,
};

/// Bedrock's default "Minimum number of records per batch inference job" quota.
pub const BEDROCK_MIN_RECORDS: u64 = 100;

/// The `anthropic_version` of a Claude request body on Bedrock.
pub const BEDROCK_ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

/// Whether a Bedrock model id names a Claude model (a foundation model such as
/// `anthropic.claude-3-5-haiku-20241022-v1:0`, or a cross-region inference profile such as
/// `us.anthropic.claude-…`, or an ARN of either): the only request body rowsmith renders for
/// Bedrock is Claude's.
pub fn is_bedrock_claude(model: &str) -> bool {
    let id = model.rsplit('/').next().unwrap_or(model);
    id.starts_with("anthropic.claude")
        || id
            .split_once('.')
            .is_some_and(|(_, rest)| rest.starts_with("anthropic.claude"))
}

/// The providers a job may name.
/// `groq` is Groq's OpenAI-compatible Batch API, spoken by the OpenAI client (same lines,
/// files, batches and statuses) at Groq's base URL.
pub const NAMES: [&str; 8] = [
    "openai",
    "anthropic",
    "mistral",
    "gemini",
    "groq",
    "bedrock",
    "together",
    "sim",
];

/// Where provider `name`'s API key comes from, as a user sets it.
pub fn api_key_source(name: &str) -> &'static str {
    match name {
        "anthropic" => "ANTHROPIC_API_KEY (or provider.anthropic.api_key_file)",
        "mistral" => "MISTRAL_API_KEY (or provider.mistral.api_key_file)",
        "gemini" => "GEMINI_API_KEY (or provider.gemini.api_key_file)",
        "groq" => "GROQ_API_KEY (or provider.groq.api_key_file)",
        "together" => "TOGETHER_API_KEY (or provider.together.api_key_file)",
        "bedrock" => {
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or provider.bedrock.s3.access_key_id and \
             secret_access_key, or provider.bedrock.ambient_credentials for a role the \
             environment gives), with provider.bedrock.role_arn and provider.bedrock.s3_uri"
        }
        _ => "OPENAI_API_KEY (or provider.openai.api_key_file)",
    }
}

/// The model a job of provider `name` uses when it names none.
pub fn default_model(name: &str) -> Option<&'static str> {
    match name {
        "openai" | "sim" => Some("gpt-4o-mini"),
        "anthropic" => Some("claude-3-5-haiku-latest"),
        "mistral" => Some("mistral-small-latest"),
        "gemini" => Some("gemini-2.5-flash"),
        // One of the models Groq serves with json_schema structured outputs.
        "groq" => Some("openai/gpt-oss-20b"),
        // A model Together serves with json_schema structured outputs.
        "together" => Some("meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        // A Claude model Bedrock runs batch inference for (in us-east-1 and us-west-2).
        "bedrock" => Some("anthropic.claude-3-5-haiku-20241022-v1:0"),
        _ => None,
    }
}

/// The temperatures provider `name` takes: OpenAI 0 to 2; none for Anthropic, whose current
/// Messages API (the official SDK's `MessageCreateParams`, 1.0 to 2.15) declares no
/// `temperature`.
pub fn temperature_range(name: &str) -> Option<std::ops::RangeInclusive<f64>> {
    match name {
        "anthropic" => None,
        // Claude's InvokeModel body on Bedrock takes a temperature from 0 to 1.
        "bedrock" => Some(0.0..=1.0),
        _ => Some(0.0..=2.0),
    }
}

/// Whether an OpenAI `model` is a reasoning model (o1, o3, o4-mini, gpt-5…), which takes no
/// `temperature`.
pub fn is_reasoning_model(model: &str) -> bool {
    let model = model.trim().to_ascii_lowercase();
    ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|family| model == *family || model.starts_with(&format!("{family}-")))
}

/// OpenAI Structured Outputs: enum values across the whole schema.
pub const OPENAI_MAX_ENUM_VALUES: usize = 1_000;
/// OpenAI Structured Outputs: one enum property with more than this many values ...
pub const OPENAI_LARGE_ENUM: usize = 250;
/// ... may hold at most this many characters of values in all.
pub const OPENAI_LARGE_ENUM_CHARS: usize = 15_000;

/// The batch limits of the provider called `name`; `None` for a name rowsmith does not know.
pub fn batch_limits(name: &str) -> Option<Limits> {
    match name {
        // Groq: up to 50,000 lines and 200 MB per batch file, as OpenAI.
        "openai" | "groq" | "sim" => Some(OPENAI),
        "anthropic" => Some(ANTHROPIC),
        "mistral" => Some(MISTRAL),
        "gemini" => Some(GEMINI),
        "bedrock" => Some(BEDROCK),
        "together" => Some(TOGETHER),
        _ => None,
    }
}
