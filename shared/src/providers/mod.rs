//! Provider batch APIs behind one trait (DESIGN.md §5), and the registry that picks the client
//! for a job's `provider`.

pub mod openai;

use std::future::Future;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::messages::ShardKey;
use crate::storage::{StorageError, Store};

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
    #[error("provider {0:?} is not configured; providers are: sim, openai")]
    Unknown(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ProviderError {
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
    /// Creates the batch for an uploaded file, tagged with the shard key.
    fn create(
        &self,
        key: &ShardKey,
        file_id: &str,
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

/// The configured providers; `sim` is an OpenAI-compatible client aimed at the simulator.
#[derive(Debug, Clone)]
pub struct Providers {
    openai: OpenAiClient,
    sim: OpenAiClient,
}

impl Providers {
    pub fn from_settings(settings: &Settings) -> Result<Self, ProviderError> {
        let openai_settings = &settings.provider.openai;
        let openai = OpenAiClient::new(
            "openai",
            &openai_settings.base_url,
            openai_settings.api_key.clone(),
            openai_settings.timeout,
        )?;
        let sim = OpenAiClient::new(
            "sim",
            &settings.provider.sim.base_url,
            None,
            openai_settings.timeout,
        )?;
        Ok(Self { openai, sim })
    }

    pub fn get(&self, name: &str) -> Result<&OpenAiClient, ProviderError> {
        match name {
            "openai" => Ok(&self.openai),
            "sim" => Ok(&self.sim),
            other => Err(ProviderError::Unknown(other.to_owned())),
        }
    }
}
