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

/// The providers a job may name.
pub const NAMES: [&str; 3] = ["openai", "anthropic", "sim"];

/// The batch limits of the provider called `name`; `None` for a name rowsmith does not know.
pub fn batch_limits(name: &str) -> Option<Limits> {
    match name {
        "openai" | "sim" => Some(OPENAI),
        "anthropic" => Some(ANTHROPIC),
        _ => None,
    }
}
