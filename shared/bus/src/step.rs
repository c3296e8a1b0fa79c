//! What the worker loop does with a failed step: retry it later while it may pass and
//! deliveries remain, else stop the job with the reason.

use std::time::Duration;

use rowsmith_contract::records::{JobRecord, job_key};
pub use rowsmith_contract::step::{Retryable, StepError};

use crate::lifecycle::stop_job;
use crate::{Bus, BusError, Delivery, Outcome, retry_delay};

impl Retryable for BusError {
    /// Every NATS error may pass later, except a record that does not decode.
    fn is_retryable(&self) -> bool {
        !matches!(self, BusError::Decode { .. })
    }
}

/// A blocking task that panicked or was cancelled.
pub fn blocking_failed(error: tokio::task::JoinError) -> StepError {
    StepError::Internal(format!("blocking task failed: {error}"))
}

/// Turns a step's error into the message's fate: retry later when it may pass and
/// deliveries remain, else stop the job with the reason (failed while nothing was sent,
/// suspended after) and terminate the message.
pub async fn settle(bus: &Bus, job_id: &str, delivery: &Delivery, error: StepError) -> Outcome {
    if error.is_retryable() && !delivery.last {
        let after = retry_delay(delivery.delivered);
        tracing::warn!(job_id, delivered = delivery.delivered, %error, ?after, "step failed, will retry");
        return Outcome::Retry { after };
    }
    let reason = if error.is_retryable() {
        format!("{error} (gave up after {} deliveries)", delivery.delivered)
    } else {
        error.to_string()
    };
    match stop_job(bus, job_id, &reason).await {
        Ok(_) => Outcome::Terminate { reason },
        // The failure could not be recorded: keep the message so that it is not lost.
        Err(record_error) => {
            tracing::error!(job_id, %record_error, %reason, "could not stop the job");
            Outcome::Retry {
                after: Duration::from_secs(5),
            }
        }
    }
}

/// Reads a job's record; a job without one is an error of the step.
pub async fn require_job(bus: &Bus, job_id: &str) -> Result<JobRecord, StepError> {
    match bus.read::<JobRecord>(&job_key(job_id)).await? {
        Some((job, _)) => Ok(job),
        None => Err(StepError::Job(format!("job {job_id} has no record"))),
    }
}
