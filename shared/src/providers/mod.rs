//! Provider batch APIs behind one trait (DESIGN.md §5), and the registry that picks the client
//! for a job's `provider`.

pub mod anthropic;
pub mod http;
pub mod openai;

use std::future::Future;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::messages::ShardKey;
use crate::storage::{StorageError, Store};

pub use anthropic::AnthropicClient;
pub use openai::OpenAiClient;

/// What one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: u64,
    pub max_bytes: u64,
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
    #[error("{provider} could not be reached for {operation}: {message}")]
    Transport {
        provider: String,
        operation: &'static str,
        message: String,
    },
    #[error("{provider} answered {operation} with something unexpected: {message}")]
    Decode {
        provider: String,
        operation: &'static str,
        message: String,
    },
    #[error("provider {0:?} is not configured; providers are: sim, openai, anthropic")]
    Unknown(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
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
        let key = match provider.as_str() {
            "anthropic" => "ANTHROPIC_API_KEY (or provider.anthropic.api_key_file)",
            _ => "OPENAI_API_KEY (or provider.openai.api_key_file)",
        };
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
            ProviderError::Transport { .. } | ProviderError::Storage(_) => true,
            ProviderError::Decode { .. } | ProviderError::Unknown(_) => false,
        }
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
        lines: Bytes,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send;
    /// Creates the batch for an uploaded file (or, where the provider takes requests inline,
    /// for `lines`), tagged with the shard key where the provider keeps metadata.
    fn create(
        &self,
        key: &ShardKey,
        file_id: &str,
        lines: Bytes,
    ) -> impl Future<Output = Result<BatchRef, ProviderError>> + Send;
    /// Looks for a batch already created for this shard key.
    fn find(
        &self,
        key: &ShardKey,
    ) -> impl Future<Output = Result<Option<BatchRef>, ProviderError>> + Send;
    fn status(
        &self,
        batch: &BatchRef,
    ) -> impl Future<Output = Result<BatchStatus, ProviderError>> + Send;
    /// Stores the ended batch's output and error files under the shard's result keys.
    fn download(
        &self,
        key: &ShardKey,
        status: &BatchStatus,
        store: &Store,
    ) -> impl Future<Output = Result<ResultFiles, ProviderError>> + Send;
    fn cancel(&self, batch: &BatchRef) -> impl Future<Output = Result<(), ProviderError>> + Send;
}

/// One configured provider client.
#[derive(Debug, Clone)]
pub enum Provider {
    OpenAi(OpenAiClient),
    Anthropic(AnthropicClient),
}

macro_rules! delegate {
    ($self:ident, $client:ident => $call:expr) => {
        match $self {
            Provider::OpenAi($client) => $call,
            Provider::Anthropic($client) => $call,
        }
    };
}

impl BatchProvider for Provider {
    fn name(&self) -> &str {
        delegate!(self, client => client.name())
    }
    fn limits(&self) -> Limits {
        delegate!(self, client => client.limits())
    }
    async fn upload(&self, key: &ShardKey, lines: Bytes) -> Result<String, ProviderError> {
        delegate!(self, client => client.upload(key, lines).await)
    }
    async fn create(
        &self,
        key: &ShardKey,
        file_id: &str,
        lines: Bytes,
    ) -> Result<BatchRef, ProviderError> {
        delegate!(self, client => client.create(key, file_id, lines).await)
    }
    async fn find(&self, key: &ShardKey) -> Result<Option<BatchRef>, ProviderError> {
        delegate!(self, client => client.find(key).await)
    }
    async fn status(&self, batch: &BatchRef) -> Result<BatchStatus, ProviderError> {
        delegate!(self, client => client.status(batch).await)
    }
    async fn download(
        &self,
        key: &ShardKey,
        status: &BatchStatus,
        store: &Store,
    ) -> Result<ResultFiles, ProviderError> {
        delegate!(self, client => client.download(key, status, store).await)
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
    sim: Provider,
}

impl Providers {
    pub fn from_settings(settings: &Settings) -> Result<Self, ProviderError> {
        let openai_settings = &settings.provider.openai;
        let openai = OpenAiClient::new(
            "openai",
            &openai_settings.base_url,
            openai_settings.api_key.clone(),
            openai_settings.timeout,
        )?
        .with_azure_api_version(openai_settings.azure_api_version.clone());
        let anthropic_settings = &settings.provider.anthropic;
        let anthropic = AnthropicClient::new(
            &anthropic_settings.base_url,
            anthropic_settings.api_key.clone(),
            anthropic_settings.timeout,
        )?;
        let sim = OpenAiClient::new(
            "sim",
            &settings.provider.sim.base_url,
            None,
            openai_settings.timeout,
        )?;
        Ok(Self {
            openai: Provider::OpenAi(openai),
            anthropic: Provider::Anthropic(anthropic),
            sim: Provider::OpenAi(sim),
        })
    }

    pub fn get(&self, name: &str) -> Result<&Provider, ProviderError> {
        match name {
            "openai" => Ok(&self.openai),
            "anthropic" => Ok(&self.anthropic),
            "sim" => Ok(&self.sim),
            other => Err(ProviderError::Unknown(other.to_owned())),
        }
    }
}
