//! What a job will cost before anything is sent: requests and shards from the same rendering
//! ingest does, input tokens counted with the model's tokenizer on a sample of the rendered
//! requests, output tokens expected from the field schema, and the price at batch and at
//! synchronous rates from `[prices]`.
//!
//! Token counts: OpenAI models use their real tokenizer (tiktoken: `o200k_base` for the
//! gpt-4o / o-series family, the model's own where tiktoken knows it). Anthropic publishes no
//! offline tokenizer: its counts are `o200k_base` counts plus 15 %, an approximation. Up to
//! [`SAMPLE`] requests are tokenized exactly (all of them in a small job); larger jobs
//! extrapolate the sample's mean, which the estimate says.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::table::RenderStats;
use rowsmith_config::Price;
use rowsmith_contract::spec::{FieldType, JobSpec};

/// Requests tokenized exactly; beyond this the mean of a uniform sample is used.
pub const SAMPLE: usize = 1000;

/// OpenAI's minimum prompt length for prompt caching, in tokens.
const PROMPT_CACHE_MIN_TOKENS: u64 = 1024;

/// A uniform sample of the rendered request lines (reservoir sampling, deterministic).
#[derive(Debug, Clone)]
pub struct Sampler {
    seen: u64,
    state: u64,
    lines: Vec<Vec<u8>>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            seen: 0,
            state: 0x9E37_79B9_7F4A_7C15,
            lines: Vec::new(),
        }
    }
}

impl Sampler {
    pub fn offer(&mut self, line: &[u8]) {
        self.seen += 1;
        if self.lines.len() < SAMPLE {
            self.lines.push(line.to_vec());
            return;
        }
        // xorshift64*: enough randomness for a sample, and the same job samples the same.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let pick = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) % self.seen;
        if let Ok(pick) = usize::try_from(pick)
            && pick < SAMPLE
        {
            self.lines[pick] = line.to_vec();
        }
    }

    pub fn lines(&self) -> &[Vec<u8>] {
        &self.lines
    }
}

/// Tokens of one request, and of its static prefix (what prompt caching could serve).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RequestTokens {
    total: u64,
    prefix: u64,
}

fn tokenizer(model: &str) -> &'static tiktoken_rs::CoreBPE {
    use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => tiktoken_rs::cl100k_base_singleton(),
        Some(Tokenizer::P50kBase) => tiktoken_rs::p50k_base_singleton(),
        Some(Tokenizer::R50kBase | Tokenizer::Gpt2) => tiktoken_rs::r50k_base_singleton(),
        _ => tiktoken_rs::o200k_base_singleton(),
    }
}

fn tokens(bpe: &tiktoken_rs::CoreBPE, text: &str) -> u64 {
    bpe.encode_ordinary(text).len() as u64
}

/// Counts the input tokens of one rendered request line (OpenAI or Anthropic shape).
fn request_tokens(line: &[u8], anthropic: bool, bpe: &tiktoken_rs::CoreBPE) -> RequestTokens {
    let Ok(request) = serde_json::from_slice::<Value>(line) else {
        return RequestTokens::default();
    };
    // Anthropic's request under `params`, Bedrock's under `modelInput`, OpenAI's under `body`.
    let body = match ["params", "modelInput"]
        .iter()
        .find(|k| !request[**k].is_null())
    {
        Some(key) if anthropic => &request[*key],
        _ => &request["body"],
    };
    let mut total = 3; // the reply's priming
    let mut prefix = 0;
    if let Some(system) = body["system"].as_str() {
        total += 4 + tokens(bpe, system);
        prefix += 4 + tokens(bpe, system);
    }
    for message in body["messages"].as_array().into_iter().flatten() {
        let content = message["content"].as_str().unwrap_or_default();
        let count = 4 + tokens(bpe, content);
        total += count;
        match content.find("Row data to enhance:\n") {
            Some(end) => prefix += 4 + tokens(bpe, &content[..end]),
            None => prefix += count,
        }
    }
    // The schema the answer must follow is part of the prompt too.
    for schema in [&body["response_format"], &body["tools"]] {
        if !schema.is_null() {
            let text = schema.to_string();
            total += tokens(bpe, &text);
            prefix += tokens(bpe, &text);
        }
    }
    if anthropic {
        // No offline tokenizer for Claude models: o200k_base plus 15 %.
        total += total * 15 / 100;
        prefix += prefix * 15 / 100;
    }
    RequestTokens { total, prefix }
}

/// Output tokens a row's answer is expected to take, from the field types (a heuristic:
/// JSON punctuation and the field names, plus ~24 tokens a string, 16 an array, 4 a number,
/// 3 an enum value, 1 a boolean).
pub fn expected_output_tokens(spec: &JobSpec) -> u64 {
    2 + spec
        .fields
        .iter()
        .map(|field| {
            4 + match field.field_type {
                FieldType::String => 24,
                FieldType::Array => 16,
                FieldType::Number => 4,
                FieldType::Enum => 3,
                FieldType::Boolean => 1,
            }
        })
        .sum::<u64>()
}

/// Dollars with cents, or four decimals under a dollar.
pub fn dollars(value: f64) -> String {
    match value < 1.0 {
        true => format!("${value:.4}"),
        false => format!("${value:.2}"),
    }
}

/// The estimate of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub provider: String,
    pub model: String,
    pub rows: u64,
    pub skipped_rows: u64,
    /// Rows whose request repeats an earlier row's (sent once).
    pub duplicate_rows: u64,
    /// Rows the result cache answers: not sent, free.
    pub cached_rows: u64,
    pub requests: u64,
    pub shards: u32,
    pub request_bytes: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Requests tokenized exactly (the rest extrapolated from them).
    pub sampled_requests: u64,
    /// `o200k_base`, `cl100k_base`, … or `approximation (o200k_base + 15%)` for Anthropic.
    pub tokenizer: String,
    /// USD at the batch price; `None` when `[prices]` has no entry for the model.
    pub cost_batch_usd: Option<f64>,
    pub cost_sync_usd: Option<f64>,
    /// Tokens of the static prefix every request shares (system, instructions, fields).
    pub prompt_prefix_tokens: u64,
    /// What prompt caching could save at the synchronous price when the prefix is long
    /// enough to be cached (OpenAI: 1,024 tokens); `None` when it is not, or not priced.
    pub prompt_cache_savings_usd: Option<f64>,
}

impl Estimate {
    /// Estimates a job from its rendering statistics and a sample of its request lines.
    pub fn new(
        spec: &JobSpec,
        stats: &RenderStats,
        sample: &Sampler,
        price: Option<&Price>,
    ) -> Self {
        let anthropic = matches!(spec.provider.as_str(), "anthropic" | "bedrock");
        let bpe = tokenizer(if anthropic { "gpt-4o" } else { &spec.model });
        let counted: Vec<RequestTokens> = sample
            .lines()
            .iter()
            .map(|line| request_tokens(line, anthropic, bpe))
            .collect();
        let mean = |f: fn(&RequestTokens) -> u64| -> f64 {
            match counted.len() {
                0 => 0.0,
                n => counted.iter().map(f).sum::<u64>() as f64 / n as f64,
            }
        };
        let input_tokens = (mean(|t| t.total) * stats.requests as f64).round() as u64;
        let prompt_prefix_tokens = mean(|t| t.prefix).round() as u64;
        let output_tokens = expected_output_tokens(spec) * stats.requests;
        let usd = |tokens: u64, per_mtok: f64| tokens as f64 / 1e6 * per_mtok;
        let cost_sync = price
            .map(|p| usd(input_tokens, p.input_per_mtok) + usd(output_tokens, p.output_per_mtok));
        let cost_batch = price.zip(cost_sync).map(|(p, sync)| sync * p.batch_factor);
        let prompt_cache_savings_usd =
            match price.and_then(|p| p.cached_input_per_mtok.map(|c| (p, c))) {
                Some((p, cached)) if prompt_prefix_tokens >= PROMPT_CACHE_MIN_TOKENS => Some(usd(
                    prompt_prefix_tokens * stats.requests.saturating_sub(1),
                    p.input_per_mtok - cached,
                )),
                _ => None,
            };
        let tokenizer = if anthropic {
            "approximation (o200k_base + 15%)".to_owned()
        } else {
            tiktoken_rs::tokenizer::get_tokenizer(&spec.model)
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|| "O200kBase (model unknown to tiktoken)".into())
        };
        Self {
            provider: spec.provider.clone(),
            model: spec.model.clone(),
            rows: stats.rows,
            skipped_rows: stats.skipped,
            duplicate_rows: stats.duplicates,
            cached_rows: stats.cached,
            requests: stats.requests,
            shards: stats.shards,
            request_bytes: stats.bytes,
            input_tokens,
            output_tokens,
            sampled_requests: counted.len() as u64,
            tokenizer,
            cost_batch_usd: cost_batch,
            cost_sync_usd: cost_sync,
            prompt_prefix_tokens,
            prompt_cache_savings_usd,
        }
    }

    /// One line for events and errors.
    pub fn summary(&self) -> String {
        let cost = match (self.cost_batch_usd, self.cost_sync_usd) {
            (Some(batch), Some(sync)) => {
                format!(
                    "{} at batch price ({} synchronous)",
                    dollars(batch),
                    dollars(sync)
                )
            }
            _ => format!(
                "no price for model {:?} (add [prices.\"{}\"])",
                self.model, self.model
            ),
        };
        format!(
            "{} requests in {} shards, ~{} input and ~{} output tokens: {cost}",
            self.requests, self.shards, self.input_tokens, self.output_tokens
        )
    }

    /// The table `rowsmith estimate` prints.
    pub fn table(&self) -> String {
        let money = |v: Option<f64>| v.map_or("no price".to_owned(), dollars);
        let sampled = if self.sampled_requests < self.requests {
            format!(" (from {} sampled requests)", self.sampled_requests)
        } else {
            String::new()
        };
        let rows = [
            (
                "provider / model",
                format!("{} / {}", self.provider, self.model),
            ),
            ("rows", self.rows.to_string()),
            ("skipped (empty targets)", self.skipped_rows.to_string()),
            ("repeats of another row", self.duplicate_rows.to_string()),
            (
                "answered from the cache",
                format!("{} (free)", self.cached_rows),
            ),
            ("requests", self.requests.to_string()),
            ("shards", self.shards.to_string()),
            ("request bytes", self.request_bytes.to_string()),
            ("input tokens", format!("{}{sampled}", self.input_tokens)),
            ("tokenizer", self.tokenizer.clone()),
            ("output tokens (expected)", self.output_tokens.to_string()),
            ("cost at batch price", money(self.cost_batch_usd)),
            ("cost at synchronous price", money(self.cost_sync_usd)),
            (
                "shared prompt prefix",
                format!("{} tokens", self.prompt_prefix_tokens),
            ),
            (
                "prompt-cache savings (sync)",
                match self.prompt_cache_savings_usd {
                    Some(v) => format!("up to {}", dollars(v)),
                    None => format!(
                        "none (prefix under {PROMPT_CACHE_MIN_TOKENS} tokens or not priced)"
                    ),
                },
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::RequestTemplate;

    fn spec(provider: &str) -> JobSpec {
        JobSpec::builder("inputs/x.csv", "Write a title.")
            .with_id("e")
            .with_targets(["description"])
            .with_field_texts(["title:string"])
            .expect("field")
            .with_provider(provider, "gpt-4o-mini")
    }

    #[test]
    fn tokens_are_counted_with_the_models_tokenizer_and_priced() {
        let spec = spec("openai");
        let columns = vec!["description".to_owned()];
        let template = RequestTemplate::new(&spec, &columns);
        let mut sampler = Sampler::default();
        let (mut scratch, mut escaped, mut line) = (String::new(), Vec::new(), Vec::new());
        let texts = [
            "a red ball",
            "a blue kite with a long tail and many colours",
        ];
        for (i, text) in texts.iter().enumerate() {
            line.clear();
            template.render(
                i as i64,
                |_| Some(*text),
                &mut scratch,
                &mut escaped,
                &mut line,
            );
            sampler.offer(&line);
        }
        let stats = RenderStats {
            rows: 2,
            requests: 2,
            shards: 1,
            bytes: 1000,
            ..Default::default()
        };
        let price = Price {
            input_per_mtok: 0.15,
            output_per_mtok: 0.60,
            cached_input_per_mtok: Some(0.075),
            batch_factor: 0.5,
        };
        let estimate = Estimate::new(&spec, &stats, &sampler, Some(&price));
        let bpe = tiktoken_rs::o200k_base_singleton();
        // The row text alone is part of the count, so the longer row costs more tokens.
        let one = request_tokens(&sampler.lines()[0], false, bpe).total;
        let two = request_tokens(&sampler.lines()[1], false, bpe).total;
        assert!(two > one && one > 20, "{one} {two}");
        assert_eq!(estimate.input_tokens, one + two);
        assert_eq!(estimate.output_tokens, 2 * (2 + 4 + 24));
        let sync = (one + two) as f64 / 1e6 * 0.15 + estimate.output_tokens as f64 / 1e6 * 0.60;
        assert!((estimate.cost_sync_usd.expect("priced") - sync).abs() < 1e-12);
        assert!((estimate.cost_batch_usd.expect("priced") - sync / 2.0).abs() < 1e-12);
        assert_eq!(
            estimate.prompt_cache_savings_usd, None,
            "a short prefix is not cached"
        );
        assert!(estimate.table().contains("cost at batch price"));
    }

    #[test]
    fn a_large_job_is_sampled_uniformly() {
        let mut sampler = Sampler::default();
        for i in 0..50_000u32 {
            sampler.offer(i.to_string().as_bytes());
        }
        assert_eq!(sampler.lines().len(), SAMPLE);
        let late = sampler
            .lines()
            .iter()
            .filter(|l| {
                std::str::from_utf8(l)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|n| n >= 25_000)
            })
            .count();
        assert!(
            (300..700).contains(&late),
            "{late} of the sample from the second half"
        );
    }
}
