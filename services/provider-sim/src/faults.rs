//! Fault injection: which requests of a batch fail, and how, chosen by a hash of the request
//! so that a run is repeatable and a test can know which rows were made to fail.

use rowsmith_config::SimFaults;
use sha2::{Digest, Sha256};

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Answer,
    /// HTTP 500 in the error file; retryable.
    ServerError,
    /// HTTP 400 in the error file; permanent.
    BadRequest,
    InvalidJson,
    SchemaViolation,
    /// `finish_reason: length` with a cut-off answer.
    Length,
    /// `message.refusal`; permanent.
    Refusal,
}

impl Fate {
    /// Whether every attempt of the row meets the same fate.
    pub fn is_permanent(self) -> bool {
        matches!(self, Fate::BadRequest | Fate::Refusal)
    }
}

/// A number in [0, 1) from the hash of `parts`.
fn unit(parts: &[&str]) -> f64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let value = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    (value >> 11) as f64 / (1u64 << 53) as f64
}

/// The fate of request `custom_id` of `job_id`'s attempt `attempt`, in batch `batch_id`.
pub fn fate(
    faults: &SimFaults,
    job_id: &str,
    attempt: u32,
    batch_id: &str,
    custom_id: &str,
) -> Fate {
    let permanent = unit(&[job_id, custom_id, "permanent"]);
    if permanent < faults.bad_request_rate {
        return Fate::BadRequest;
    }
    if permanent < faults.bad_request_rate + faults.refusal_rate {
        return Fate::Refusal;
    }
    if attempt > faults.retryable_until_attempt {
        return Fate::Answer;
    }
    let draw = unit(&[batch_id, custom_id, "retryable"]);
    let mut threshold = 0.0;
    for (rate, fate) in [
        (faults.server_error_rate, Fate::ServerError),
        (faults.invalid_json_rate, Fate::InvalidJson),
        (faults.schema_violation_rate, Fate::SchemaViolation),
        (faults.length_rate, Fate::Length),
    ] {
        threshold += rate;
        if draw < threshold {
            return fate;
        }
    }
    Fate::Answer
}

/// `fate`, unless the answer needs more output tokens (`faults.answer_tokens`) than the
/// request allows (`allowed`): then it is cut off.
pub fn with_room(faults: &SimFaults, allowed: Option<u64>, fate: Fate) -> Fate {
    match (faults.answer_tokens, allowed, fate) {
        (Some(needed), Some(allowed), Fate::Answer) if allowed < needed => Fate::Length,
        _ => fate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_met_and_permanent_faults_repeat_across_attempts() {
        let faults = SimFaults {
            server_error_rate: 0.05,
            invalid_json_rate: 0.02,
            bad_request_rate: 0.01,
            ..SimFaults::default()
        };
        let ids: Vec<String> = (0..20_000).map(|i| format!("r{i}")).collect();
        let first: Vec<Fate> = ids
            .iter()
            .map(|id| fate(&faults, "j", 1, "batch_a", id))
            .collect();
        let count = |fates: &[Fate], wanted: Fate| {
            fates.iter().filter(|f| **f == wanted).count() as f64 / 20_000.0
        };
        assert!((count(&first, Fate::ServerError) - 0.05).abs() < 0.01);
        assert!((count(&first, Fate::InvalidJson) - 0.02).abs() < 0.01);
        assert!((count(&first, Fate::BadRequest) - 0.01).abs() < 0.005);
        let second: Vec<Fate> = ids
            .iter()
            .map(|id| fate(&faults, "j", 2, "batch_b", id))
            .collect();
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a.is_permanent(), b.is_permanent());
            assert!(
                b.is_permanent() || *b == Fate::Answer,
                "retryable faults only on attempt 1"
            );
        }
    }
}
