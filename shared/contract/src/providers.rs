//! What every service must know of the provider batch APIs without calling one: their names
//! and what one batch may hold (ingest and the merger cut shards to fit).

/// What one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: u64,
    pub max_bytes: u64,
}

/// OpenAI's Batch API (and the simulator, which imitates it): 50,000 requests, 200 MB.
pub const OPENAI: Limits = Limits {
    max_requests: 50_000,
    max_bytes: 200 * 1024 * 1024,
};

/// Anthropic's Message Batches: 100,000 requests, 256 MB.
pub const ANTHROPIC: Limits = Limits {
    max_requests: 100_000,
    max_bytes: 256 * 1000 * 1000,
};

/// Mistral's batch jobs: 1,000,000 requests per job, files up to 512 MB.
pub const MISTRAL: Limits = Limits {
    max_requests: 1_000_000,
    max_bytes: 512 * 1024 * 1024,
};

/// Gemini batch mode (Developer API): no published request cap (an enqueued-token quota
/// bounds a job instead), input files up to 2 GB. rowsmith keeps a shard to 100,000 requests
/// and 1 GB so that one failed or expired job (Gemini keeps no partial results) costs little.
pub const GEMINI: Limits = Limits {
    max_requests: 100_000,
    max_bytes: 1024 * 1024 * 1024,
};

/// The providers a job may name.
/// `groq` is Groq's OpenAI-compatible Batch API, spoken by the OpenAI client (same lines,
/// files, batches and statuses) at Groq's base URL.
pub const NAMES: [&str; 6] = ["openai", "anthropic", "mistral", "gemini", "groq", "sim"];

/// Where provider `name`'s API key comes from, as a user sets it.
pub fn api_key_source(name: &str) -> &'static str {
    match name {
        "anthropic" => "ANTHROPIC_API_KEY (or provider.anthropic.api_key_file)",
        "mistral" => "MISTRAL_API_KEY (or provider.mistral.api_key_file)",
        "gemini" => "GEMINI_API_KEY (or provider.gemini.api_key_file)",
        "groq" => "GROQ_API_KEY (or provider.groq.api_key_file)",
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
        _ => None,
    }
}

/// The temperatures provider `name` takes: OpenAI 0 to 2; none for Anthropic, whose current
/// Messages API (the official SDK's `MessageCreateParams`, 1.0 to 2.15) declares no
/// `temperature`.
pub fn temperature_range(name: &str) -> Option<std::ops::RangeInclusive<f64>> {
    match name {
        "anthropic" => None,
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
        _ => None,
    }
}
