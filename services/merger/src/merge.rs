//! One shard's result lines turned into rows, joined on `custom_id` (never on order): every
//! request gets exactly one row, good or failed with a reason. Pure, so the handler and the
//! benchmark run the same code.

use std::collections::HashMap;

use serde::Deserialize;

use rowsmith_shared::messages::BatchEnded;
use rowsmith_shared::render::row_index_of;
use rowsmith_shared::spec::FieldSpec;
use rowsmith_shared::table::{RowFailure, RowResult};

use crate::validate::{LineFormat, LineResult};

/// Rows of one shard attempt by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardTally {
    pub succeeded: u64,
    pub failed: u64,
    /// Of `failed`, those another attempt may fix.
    pub retryable: u64,
}

#[derive(Debug)]
pub struct MergedShard {
    /// One row per request, in request order.
    pub rows: Vec<RowResult>,
    pub tally: ShardTally,
    /// Result lines that named no request of the shard (or could not be read).
    pub ignored: u64,
}

#[derive(Deserialize)]
struct RequestId<'a> {
    #[serde(borrow)]
    custom_id: std::borrow::Cow<'a, str>,
}

/// Merges the result files of an ended batch against its request file.
pub fn merge_lines(
    requests: &[u8],
    result_files: &[&[u8]],
    ended: &BatchEnded,
    fields: &[FieldSpec],
) -> Result<MergedShard, serde_json::Error> {
    let mut expected = Vec::new();
    for line in requests.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let id: RequestId = serde_json::from_slice(line)?;
        if let Some(row_index) = row_index_of(&id.custom_id) {
            expected.push(row_index);
        }
    }
    let mut results: HashMap<i64, Option<LineResult>> =
        expected.iter().map(|i| (*i, None)).collect();
    let format = LineFormat::of_provider(&ended.provider);
    let mut ignored = 0u64;
    for file in result_files {
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match format.parse(line, fields) {
                Some((row_index, result)) => match results.get_mut(&row_index) {
                    // A duplicated custom_id keeps its first answer.
                    Some(slot @ None) => *slot = Some(result),
                    Some(Some(_)) => {}
                    None => ignored += 1,
                },
                None => ignored += 1,
            }
        }
    }
    let missing = missing_failure(ended);
    let mut rows = Vec::with_capacity(expected.len());
    let mut tally = ShardTally::default();
    for row_index in expected {
        let row = match results.get_mut(&row_index).and_then(Option::take) {
            Some(Ok(values)) => {
                tally.succeeded += 1;
                RowResult {
                    row_index,
                    failure: None,
                    values: values.into_iter().map(Some).collect(),
                }
            }
            Some(Err(failure)) => {
                tally.failed += 1;
                tally.retryable += u64::from(failure.retryable);
                RowResult {
                    row_index,
                    failure: Some(failure),
                    values: Vec::new(),
                }
            }
            None => {
                tally.failed += 1;
                tally.retryable += u64::from(missing.retryable);
                RowResult {
                    row_index,
                    failure: Some(missing.clone()),
                    values: Vec::new(),
                }
            }
        };
        rows.push(row);
    }
    Ok(MergedShard {
        rows,
        tally,
        ignored,
    })
}

/// Why a request with no result line failed: the batch's own failure or end.
fn missing_failure(ended: &BatchEnded) -> RowFailure {
    let (reason, message) = match (&ended.failure, ended.status.as_str()) {
        (Some(failure), _) => ("batch_failed", failure.clone()),
        (None, "expired") => (
            "batch_expired",
            "the batch expired before this row was done".to_owned(),
        ),
        (None, "cancelled") => (
            "cancelled",
            "the batch was cancelled before this row was done".to_owned(),
        ),
        _ => (
            "no_result",
            "the provider returned no line for this row".to_owned(),
        ),
    };
    RowFailure {
        reason: reason.to_owned(),
        message,
        retryable: true,
    }
}

#[cfg(test)]
mod tests {
    use rowsmith_shared::messages::ShardKey;
    use rowsmith_shared::spec::parse_field;

    use super::*;

    fn ended(status: &str) -> BatchEnded {
        BatchEnded {
            key: ShardKey {
                job_id: "j".into(),
                attempt: 1,
                shard: 0,
            },
            provider: "openai".into(),
            batch_id: "b".into(),
            status: status.into(),
            output_path: None,
            errors_path: None,
            failure: None,
        }
    }

    fn answer(custom_id: &str, title: &str) -> String {
        serde_json::json!({"custom_id": custom_id, "response": {"status_code": 200, "body": {"choices": [
            {"finish_reason": "stop", "message": {"content": format!("{{\"title\":\"{title}\"}}")}}]}}, "error": null})
        .to_string()
    }

    #[test]
    fn rows_join_on_custom_id_and_every_request_gets_exactly_one_row() {
        let fields = vec![parse_field("title:string").expect("field")];
        let requests = b"{\"custom_id\":\"r3\"}\n{\"custom_id\":\"r5\"}\n{\"custom_id\":\"r9\"}\n";
        // Out of order, one duplicate, one unknown id, one request without a line.
        let output = [
            answer("r9", "nine"),
            answer("r3", "three"),
            answer("r3", "again"),
            answer("r77", "stray"),
        ]
        .join("\n");
        let merged = merge_lines(requests, &[output.as_bytes()], &ended("completed"), &fields)
            .expect("merge");
        let indexes: Vec<i64> = merged.rows.iter().map(|r| r.row_index).collect();
        assert_eq!(indexes, [3, 5, 9]);
        assert_eq!(
            merged.rows[0].values,
            [Some("three".to_owned())],
            "the first answer of a duplicate wins"
        );
        assert_eq!(
            merged.rows[1].failure.as_ref().map(|f| f.reason.as_str()),
            Some("no_result")
        );
        assert_eq!(merged.rows[2].values, [Some("nine".to_owned())]);
        assert_eq!(
            merged.tally,
            ShardTally {
                succeeded: 2,
                failed: 1,
                retryable: 1
            }
        );
        assert_eq!(merged.ignored, 1);
    }

    #[test]
    fn requests_of_an_expired_batch_without_a_line_are_expired() {
        let fields = vec![parse_field("title:string").expect("field")];
        let merged = merge_lines(b"{\"custom_id\":\"r1\"}\n", &[], &ended("expired"), &fields)
            .expect("merge");
        assert_eq!(
            merged.rows[0].failure.as_ref().map(|f| f.reason.as_str()),
            Some("batch_expired")
        );
    }
}
