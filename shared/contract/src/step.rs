//! How a handler step fails, in the two classes the worker loop acts on: it may pass when run
//! again later (retried with a delay), or it cannot (the job stops with the reason). Every
//! library error type says which it is with [`Retryable`], so a handler uses `?` on all of
//! them and keeps the error whole as the source.

/// Whether running the step that failed with this error again later may succeed.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

/// Why a handler step did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A library's error, kept whole; `retryable` is its own verdict.
    #[error("{source}")]
    Failed {
        retryable: bool,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The job cannot go on; the message says what to fix.
    #[error("{0}")]
    Job(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl StepError {
    /// Whether running the step again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StepError::Failed { retryable, .. } => *retryable,
            StepError::Internal(_) => true,
            StepError::Job(_) => false,
        }
    }

    /// The library error this step failed with, when it is an `E`.
    pub fn cause<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            StepError::Failed { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }
}

impl<E> From<E> for StepError
where
    E: Retryable + std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        StepError::Failed {
            retryable: error.is_retryable(),
            source: Box::new(error),
        }
    }
}

/// A local file that could not be read or written: the disk may have room again later.
impl Retryable for std::io::Error {
    fn is_retryable(&self) -> bool {
        true
    }
}
