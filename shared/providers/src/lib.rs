//! Provider batch APIs behind one trait (DESIGN.md §5), and the registry that picks the client
//! for a job's `provider`.

pub mod anthropic;
pub mod bedrock;
pub mod gemini;
pub mod http;
pub mod mistral;
pub mod openai;
pub mod together;

use std::future::Future;

use bytes::Bytes;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use rowsmith_config::ProviderSettings;
use rowsmith_contract::messages::ShardKey;
use rowsmith_store::layout::ResultPaths;
use rowsmith_store::{StorageError, Store};

pub use anthropic::AnthropicClient;
pub use bedrock::BedrockClient;
pub use gemini::GeminiClient;
pub use mistral::MistralClient;
pub use openai::OpenAiClient;
pub use together::TogetherClient;

pub use rowsmith_contract::providers::Limits;

/// The cause a [`ProviderError`] keeps whole.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The span in which a batch for one shard attempt may have been created (a creation claim's,
/// in Unix ms on this side's clock), and what it holds: what reconciliation looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateWindow {
    pub since_ms: i64,
    pub until_ms: i64,
    pub request_count: u64,
    /// The provider file the shard attempt was uploaded as, when it was: a provider that
    /// hands back a file it already holds (Together, by checksum) finds batches by it.
    pub file_id: Option<String>,
}

impl CreateWindow {
    /// How far the provider's clock may be off ours, when nothing measured it.
    pub const CLOCK_SKEW_MS: i64 = 120_000;
    /// How far off a measured offset may still be: the HTTP `Date` header counts whole
    /// seconds, and the answer takes a while to arrive.
    pub const MEASURED_SKEW_MS: i64 = 2_500;

    /// Whether a batch the provider says was created at `created_ms` (its clock) falls in
    /// the window, given the provider's clock runs `offset_ms` ahead of ours.
    pub fn admits(&self, created_ms: i64, offset_ms: i64) -> bool {
        let ours = created_ms - offset_ms;
        ours >= self.since_ms - Self::MEASURED_SKEW_MS
            && ours <= self.until_ms + Self::MEASURED_SKEW_MS
    }

    /// Whether a listing newest first has gone past the window (generous: it only decides
    /// when to stop reading pages).
    pub fn is_before(&self, created_ms: i64) -> bool {
        created_ms < self.since_ms - Self::CLOCK_SKEW_MS
    }
}

/// How far ahead of ours the provider's clock runs (ms), from a response's `Date` header.
pub fn clock_offset_ms(response: &reqwest::Response, received_ms: i64) -> Option<i64> {
    let date = response
        .headers()
        .get(reqwest::header::DATE)?
        .to_str()
        .ok()?;
    let at =
        time::OffsetDateTime::parse(date, &time::format_description::well_known::Rfc2822).ok()?;
    let provider_ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()?;
    // The header is cut to the second: its middle is the best guess.
    Some(provider_ms + 500 - received_ms)
}

/// A shard's request lines: in memory, or an object of the store that an upload reads as it
/// sends (a streamed body, or one chunk at a time), so that a shard of hundreds of MB is never
/// held whole to be uploaded.
#[derive(Debug, Clone)]
pub enum ShardLines {
    Bytes(Bytes),
    Object {
        store: Store,
        key: String,
        size: u64,
    },
}

impl From<Bytes> for ShardLines {
    fn from(bytes: Bytes) -> Self {
        ShardLines::Bytes(bytes)
    }
}

impl ShardLines {
    /// The lines of object `key` (its size read from the store; nothing else yet).
    pub async fn object(store: &Store, key: &str) -> Result<Self, StorageError> {
        Ok(ShardLines::Object {
            store: store.clone(),
            key: key.to_owned(),
            size: store.size(key).await?,
        })
    }

    pub fn len(&self) -> u64 {
        match self {
            ShardLines::Bytes(bytes) => bytes.len() as u64,
            ShardLines::Object { size, .. } => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of the lines in memory (for the APIs that take the requests in the create call).
    pub async fn bytes(&self) -> Result<Bytes, ProviderError> {
        match self {
            ShardLines::Bytes(bytes) => Ok(bytes.clone()),
            ShardLines::Object { store, key, .. } => Ok(store.get_bytes(key).await?),
        }
    }

    /// Bytes `range` of the lines.
    pub async fn range(&self, range: std::ops::Range<u64>) -> Result<Bytes, ProviderError> {
        match self {
            ShardLines::Bytes(bytes) => Ok(bytes.slice(range.start as usize..range.end as usize)),
            ShardLines::Object { store, key, .. } => Ok(store.get_range(key, range).await?),
        }
    }

    /// The lines chunk by chunk, read from the store as they are asked for (each call reads
    /// afresh, so a request made of them may be sent again).
    pub fn chunks(&self) -> futures::stream::BoxStream<'static, Result<Bytes, StorageError>> {
        use futures::{StreamExt, TryStreamExt};
        match self {
            ShardLines::Bytes(bytes) => {
                futures::stream::once(std::future::ready(Ok(bytes.clone()))).boxed()
            }
            ShardLines::Object { store, key, .. } => {
                let (store, key) = (store.clone(), key.clone());
                futures::stream::once(async move { store.stream(&key).await })
                    .try_flatten()
                    .boxed()
            }
        }
    }

    /// The lines as a request body, read as it is sent (see [`ShardLines::chunks`]).
    pub fn body(&self) -> reqwest::Body {
        match self {
            ShardLines::Bytes(bytes) => reqwest::Body::from(bytes.clone()),
            ShardLines::Object { .. } => reqwest::Body::wrap_stream(self.chunks()),
        }
    }
}

/// A provider batch, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    pub id: String,
}

/// Where a batch is in its life, in the provider's words mapped onto one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchState {
    Validating,
    InProgress,
    Finalizing,
    Cancelling,
    Completed,
    Expired,
    Failed,
    Cancelled,
    /// A status this client does not know; treated as not finished.
    Other(String),
}

impl BatchState {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Expired | Self::Failed | Self::Cancelled
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Cancelling => "cancelling",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Other(other) => other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStatus {
    pub state: BatchState,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Batch-level errors (validation failures), as `code: message` lines.
    pub errors: Vec<String>,
}

/// The result files of an ended batch, as store keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultFiles {
    pub output_path: Option<String>,
    pub errors_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider} answered HTTP {status} to {operation}: {message}")]
    Http {
        provider: String,
        operation: &'static str,
        status: u16,
        message: String,
    },
    #[error("{provider} could not be reached for {operation}: {source}")]
    Transport {
        provider: String,
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("{provider} answered {operation} with something unexpected: {source}")]
    Decode {
        provider: String,
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    /// A call that creates something failed in a way that does not say whether it took
    /// effect (a timeout, a dropped connection, a 5xx, an unreadable answer): look before
    /// trying again.
    #[error("{provider} did not confirm {operation}; it may have taken effect: {source}")]
    Unconfirmed {
        provider: String,
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    #[error(
        "provider {name:?} is not configured; providers are: {list}",
        name = .0,
        list = rowsmith_contract::providers::NAMES.join(", ")
    )]
    Unknown(String),
    /// No API key: nothing is sent without one.
    #[error(
        "no API key for {provider}: set {} for the submitter and the poller; nothing was sent",
        rowsmith_contract::providers::api_key_source(provider)
    )]
    NoKey { provider: String },
    /// The uploaded input a create names is gone (Gemini deletes files 48 h after upload):
    /// nothing was created; the shard is uploaded again.
    #[error("{provider} no longer holds the uploaded input {file_id}: {message}")]
    InputGone {
        provider: String,
        file_id: String,
        message: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// No call goes out without an API key: `NoKey` for `provider` when `key` is unset.
pub(crate) fn require_key(provider: &str, key: &Option<SecretString>) -> Result<(), ProviderError> {
    match key {
        Some(_) => Ok(()),
        None => Err(ProviderError::NoKey {
            provider: provider.to_owned(),
        }),
    }
}

impl ProviderError {
    /// What a user does about an error that no retry fixes, when there is something to say:
    /// a refused API key names the key to fix.
    pub fn what_to_do(&self) -> Option<String> {
        let ProviderError::Http {
            provider, status, ..
        } = self
        else {
            return None;
        };
        if !matches!(status, 401 | 403) {
            return None;
        }
        let key = rowsmith_contract::providers::api_key_source(provider);
        Some(format!(
            "the {provider} API key was refused (rotated or revoked?): set a valid key in {key} \
             for the poller and the submitter"
        ))
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Http {
                status, message, ..
            } => {
                matches!(status, 408 | 409 | 429 | 500..=599)
                    && !message.contains("insufficient_quota")
            }
            ProviderError::Transport { .. }
            | ProviderError::Unconfirmed { .. }
            | ProviderError::Storage(_) => true,
            ProviderError::Decode { .. }
            | ProviderError::InputGone { .. }
            | ProviderError::Unknown(_)
            | ProviderError::NoKey { .. } => false,
        }
    }
}

impl ProviderError {
    /// The same failure of a call that creates something, said as "may have taken effect"
    /// unless it proves the call was refused (a 4xx other than 408).
    pub fn unconfirmed(self) -> Self {
        let (provider, operation, source) = match self {
            ProviderError::Http {
                provider,
                operation,
                status,
                message,
            } if status == 408 || status >= 500 => (
                provider,
                operation,
                BoxError::from(format!("HTTP {status}: {message}")),
            ),
            ProviderError::Transport {
                provider,
                operation,
                source,
            }
            | ProviderError::Decode {
                provider,
                operation,
                source,
            } => (provider, operation, source),
            other => return other,
        };
        ProviderError::Unconfirmed {
            provider,
            operation,
            source,
        }
    }

    /// Whether the create failed because its uploaded input is gone (upload again).
    pub fn is_input_gone(&self) -> bool {
        matches!(self, ProviderError::InputGone { .. })
    }

    /// Whether the failed call may have taken effect.
    pub fn is_unconfirmed(&self) -> bool {
        matches!(self, ProviderError::Unconfirmed { .. })
    }
}

/// One provider's batch API.
pub trait BatchProvider: Send + Sync {
    fn name(&self) -> &str;
    fn limits(&self) -> Limits;
    /// Uploads a shard's request lines; returns the provider's file id.
    fn upload(
        &self,
        key: &ShardKey,
        lines: ShardLines,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send;
    /// Creates the batch for an uploaded file (or, where the provider takes requests inline,
    /// for `lines`, read only by those providers), tagged with the shard key where the provider keeps metadata; `model` is
    /// the attempt's (providers whose lines name no model take it from here).
    fn create(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
        lines: ShardLines,
    ) -> impl Future<Output = Result<BatchRef, ProviderError>> + Send;
    /// The batches that may have been created for this shard attempt within `window`,
    /// oldest first: by the shard key in their metadata where the provider keeps metadata,
    /// else by creation time and request count (see the provider's own notes). Creation is
    /// claimed so that only one create runs per window; see the submitter.
    fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> impl Future<Output = Result<Vec<BatchRef>, ProviderError>> + Send;
    /// Whether batches carry the shard key (metadata); without it, one create at a time per
    /// provider keeps reconciliation unambiguous.
    fn tags_batches(&self) -> bool;
    fn status(
        &self,
        batch: &BatchRef,
    ) -> impl Future<Output = Result<BatchStatus, ProviderError>> + Send;
    /// Stores the ended batch's output and error files at `into`.
    fn download(
        &self,
        status: &BatchStatus,
        store: &Store,
        into: &ResultPaths,
    ) -> impl Future<Output = Result<ResultFiles, ProviderError>> + Send;
    fn cancel(&self, batch: &BatchRef) -> impl Future<Output = Result<(), ProviderError>> + Send;
}

/// One configured provider client.
#[derive(Debug, Clone)]
pub enum Provider {
    OpenAi(OpenAiClient),
    Anthropic(AnthropicClient),
    Mistral(MistralClient),
    Gemini(GeminiClient),
    Bedrock(BedrockClient),
    Together(TogetherClient),
}

macro_rules! delegate {
    ($self:ident, $client:ident => $call:expr) => {
        match $self {
            Provider::OpenAi($client) => $call,
            Provider::Anthropic($client) => $call,
            Provider::Mistral($client) => $call,
            Provider::Gemini($client) => $call,
            Provider::Bedrock($client) => $call,
            Provider::Together($client) => $call,
        }
    };
}

impl Provider {
    /// Whether this client holds an API key.
    pub fn has_key(&self) -> bool {
        delegate!(self, client => client.has_key())
    }
}

impl BatchProvider for Provider {
    fn name(&self) -> &str {
        delegate!(self, client => client.name())
    }
    fn limits(&self) -> Limits {
        delegate!(self, client => client.limits())
    }
    async fn upload(&self, key: &ShardKey, lines: ShardLines) -> Result<String, ProviderError> {
        delegate!(self, client => client.upload(key, lines).await)
    }
    async fn create(
        &self,
        key: &ShardKey,
        model: &str,
        file_id: &str,
        lines: ShardLines,
    ) -> Result<BatchRef, ProviderError> {
        delegate!(self, client => client.create(key, model, file_id, lines).await)
    }
    async fn find(
        &self,
        key: &ShardKey,
        window: &CreateWindow,
    ) -> Result<Vec<BatchRef>, ProviderError> {
        delegate!(self, client => client.find(key, window).await)
    }
    fn tags_batches(&self) -> bool {
        delegate!(self, client => client.tags_batches())
    }
    async fn status(&self, batch: &BatchRef) -> Result<BatchStatus, ProviderError> {
        delegate!(self, client => client.status(batch).await)
    }
    async fn download(
        &self,
        status: &BatchStatus,
        store: &Store,
        into: &ResultPaths,
    ) -> Result<ResultFiles, ProviderError> {
        delegate!(self, client => client.download(status, store, into).await)
    }
    async fn cancel(&self, batch: &BatchRef) -> Result<(), ProviderError> {
        delegate!(self, client => client.cancel(batch).await)
    }
}

/// The configured providers; `sim` is an OpenAI-compatible client aimed at the simulator.
#[derive(Debug, Clone)]
pub struct Providers {
    openai: Provider,
    anthropic: Provider,
    mistral: Provider,
    gemini: Provider,
    groq: Provider,
    bedrock: Provider,
    together: Provider,
    sim: Provider,
}

impl Providers {
    pub fn from_settings(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        let openai_settings = &settings.openai;
        let openai = OpenAiClient::new(
            "openai",
            &openai_settings.base_url,
            openai_settings.api_key.clone(),
            openai_settings.timeout,
        )?
        .with_azure_api_version(openai_settings.azure_api_version.clone());
        let anthropic_settings = &settings.anthropic;
        let anthropic = AnthropicClient::new(
            &anthropic_settings.base_url,
            anthropic_settings.api_key.clone(),
            anthropic_settings.timeout,
        )?;
        // The simulator checks that a key is sent, as the real API does; any key will do.
        let sim = OpenAiClient::new(
            "sim",
            &settings.sim.base_url,
            Some(SecretString::from("sk-sim")),
            openai_settings.timeout,
        )?;
        let mistral_settings = &settings.mistral;
        let mistral = MistralClient::new(
            &mistral_settings.base_url,
            mistral_settings.api_key.clone(),
            mistral_settings.timeout,
        )?;
        let gemini_settings = &settings.gemini;
        let gemini = GeminiClient::new(
            &gemini_settings.base_url,
            gemini_settings.api_key.clone(),
            gemini_settings.timeout,
            gemini_settings.inline_max_bytes,
        )?;
        // Groq speaks OpenAI's Batch API as it is: the OpenAI client at Groq's base URL.
        let groq_settings = &settings.groq;
        let groq = OpenAiClient::new(
            "groq",
            &groq_settings.base_url,
            groq_settings.api_key.clone(),
            groq_settings.timeout,
        )?;
        let bedrock = BedrockClient::new(&settings.bedrock)?;
        let together_settings = &settings.together;
        let together = TogetherClient::new(
            &together_settings.base_url,
            together_settings.api_key.clone(),
            together_settings.timeout,
        )?;
        Ok(Self {
            together: Provider::Together(together),
            bedrock: Provider::Bedrock(bedrock),
            gemini: Provider::Gemini(gemini),
            groq: Provider::OpenAi(groq),
            openai: Provider::OpenAi(openai),
            anthropic: Provider::Anthropic(anthropic),
            mistral: Provider::Mistral(mistral),
            sim: Provider::OpenAi(sim),
        })
    }

    /// The providers whose clients hold an API key (the simulator always does).
    pub fn with_keys(&self) -> Vec<&'static str> {
        let mut names = vec!["sim"];
        if self.openai.has_key() {
            names.push("openai");
        }
        if self.anthropic.has_key() {
            names.push("anthropic");
        }
        if self.mistral.has_key() {
            names.push("mistral");
        }
        if self.gemini.has_key() {
            names.push("gemini");
        }
        if self.groq.has_key() {
            names.push("groq");
        }
        if self.bedrock.has_key() {
            names.push("bedrock");
        }
        if self.together.has_key() {
            names.push("together");
        }
        names
    }

    pub fn get(&self, name: &str) -> Result<&Provider, ProviderError> {
        match name {
            "openai" => Ok(&self.openai),
            "anthropic" => Ok(&self.anthropic),
            "mistral" => Ok(&self.mistral),
            "gemini" => Ok(&self.gemini),
            "groq" => Ok(&self.groq),
            "bedrock" => Ok(&self.bedrock),
            "together" => Ok(&self.together),
            "sim" => Ok(&self.sim),
            other => Err(ProviderError::Unknown(other.to_owned())),
        }
    }
}

impl rowsmith_contract::step::Retryable for ProviderError {
    fn is_retryable(&self) -> bool {
        ProviderError::is_retryable(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_call_goes_out_without_an_api_key() {
        // Nothing listens on this port: a call that went out would fail with Transport.
        let settings = ProviderSettings {
            openai: rowsmith_config::OpenAiSettings {
                base_url: "http://127.0.0.1:9/v1".into(),
                ..Default::default()
            },
            anthropic: rowsmith_config::AnthropicSettings {
                base_url: "http://127.0.0.1:9".into(),
                ..Default::default()
            },
            mistral: rowsmith_config::MistralSettings {
                base_url: "http://127.0.0.1:9/v1".into(),
                ..Default::default()
            },
            gemini: rowsmith_config::GeminiSettings {
                base_url: "http://127.0.0.1:9".into(),
                ..Default::default()
            },
            groq: rowsmith_config::OpenAiSettings {
                base_url: "http://127.0.0.1:9/v1".into(),
                ..Default::default()
            },
            together: rowsmith_config::OpenAiSettings {
                base_url: "http://127.0.0.1:9/v1".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let providers = Providers::from_settings(&settings).expect("providers");
        assert_eq!(providers.with_keys(), ["sim"]);
        let batch = BatchRef { id: "b".into() };
        for name in [
            "openai",
            "anthropic",
            "mistral",
            "gemini",
            "groq",
            "bedrock",
            "together",
        ] {
            let error = providers
                .get(name)
                .expect("provider")
                .status(&batch)
                .await
                .expect_err("no key");
            assert!(matches!(error, ProviderError::NoKey { .. }), "{error:?}");
            assert!(!error.is_retryable());
            assert!(error.to_string().contains("nothing was sent"), "{error}");
        }
    }
}
