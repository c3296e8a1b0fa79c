//! One shard's result lines turned into rows, joined on `custom_id` (never on order): every
//! request gets exactly one row, good or failed with a reason. Pure, so the handler and the
//! benchmark run the same code.

use std::collections::HashMap;

use serde::Deserialize;

use rowsmith_contract::messages::BatchEnded;
use rowsmith_contract::spec::FieldSpec;
use rowsmith_dataplane::render::row_index_of;
use rowsmith_dataplane::table::{RowFailure, RowResult};

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
    pub anomalies: Anomalies,
}

/// Result lines that did not fit the requests: reported, never fatal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Anomalies {
    /// Lines that are not JSON (a row they still name fails as `invalid_json`).
    pub unreadable: u64,
    /// Lines whose custom_id is not a request of the shard (ignored).
    pub unknown: u64,
    /// Further lines for a custom_id that already had one (the first is kept).
    pub duplicates: u64,
    /// A few of the offending custom ids, for the message.
    pub examples: Vec<String>,
}

impl Anomalies {
    pub fn is_empty(&self) -> bool {
        self.unreadable + self.unknown + self.duplicates == 0
    }

    fn example(&mut self, id: String) {
        if self.examples.len() < 5 {
            self.examples.push(id);
        }
    }

    /// What a user reads in the job's events.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.unreadable > 0 {
            parts.push(format!("{} not valid JSON", self.unreadable));
        }
        if self.unknown > 0 {
            parts.push(format!(
                "{} with a custom_id the shard never sent (ignored)",
                self.unknown
            ));
        }
        if self.duplicates > 0 {
            parts.push(format!(
                "{} repeating a custom_id (the first answer kept)",
                self.duplicates
            ));
        }
        let examples = match self.examples.is_empty() {
            true => String::new(),
            false => format!("; e.g. {}", self.examples.join(", ")),
        };
        format!("result lines: {}{examples}", parts.join(", "))
    }
}

/// The custom id (`id_field`) of a line that is not JSON, if it still shows one.
fn salvage_custom_id(line: &[u8], id_field: &str) -> Option<i64> {
    let text = std::str::from_utf8(line).ok()?;
    let quoted = format!("\"{id_field}\"");
    let start = text.find(&quoted)? + quoted.len();
    let rest = text[start..].trim_start().strip_prefix(':')?.trim_start();
    let id = rest.strip_prefix('"')?.split('"').next()?;
    row_index_of(id)
}

#[derive(Deserialize)]
struct RequestId<'a> {
    /// Gemini's lines call it `key`, Bedrock's `recordId`.
    #[serde(borrow, alias = "key", alias = "recordId")]
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
    let mut anomalies = Anomalies::default();
    for file in result_files {
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut readable = true;
            let (row_index, result) = match format.parse(line, fields) {
                Some(parsed) => parsed,
                None if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() => {
                    anomalies.unknown += 1;
                    continue;
                }
                None => {
                    anomalies.unreadable += 1;
                    readable = false;
                    let Some(row_index) = salvage_custom_id(line, format.id_field()) else {
                        continue;
                    };
                    anomalies.example(format!("r{row_index}"));
                    let failure = RowFailure {
                        reason: "invalid_json".to_owned(),
                        message: "the provider's result line for this row is not valid JSON"
                            .to_owned(),
                        retryable: true,
                    };
                    (row_index, Err(failure))
                }
            };
            match results.get_mut(&row_index) {
                Some(slot @ None) => *slot = Some(result),
                // An unreadable line is counted once, as unreadable.
                _ if !readable => {}
                // A duplicated custom_id keeps its first answer.
                Some(Some(_)) => {
                    anomalies.duplicates += 1;
                    anomalies.example(format!("r{row_index}"));
                }
                None => {
                    anomalies.unknown += 1;
                    anomalies.example(format!("r{row_index}"));
                }
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
        anomalies,
    })
}

/// Fills the failed rows of `merged` with the good answers of the shard attempt's orphan
/// batches (second batches that were cancelled, whose finished answers were paid for).
/// Lines of the orphans that are unreadable, unknown or failed change nothing. Returns how
/// many rows were filled.
pub fn fill_from_orphans(
    merged: &mut MergedShard,
    orphan_files: &[&[u8]],
    provider: &str,
    fields: &[FieldSpec],
) -> u64 {
    let failed: HashMap<i64, usize> = merged
        .rows
        .iter()
        .enumerate()
        .filter(|(_, row)| row.failure.is_some())
        .map(|(at, row)| (row.row_index, at))
        .collect();
    if failed.is_empty() {
        return 0;
    }
    let format = LineFormat::of_provider(provider);
    let mut filled = 0;
    for file in orphan_files {
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Some((row_index, Ok(values))) = format.parse(line, fields) else {
                continue;
            };
            let Some(&at) = failed.get(&row_index) else {
                continue;
            };
            let row = &mut merged.rows[at];
            let Some(failure) = row.failure.take() else {
                continue;
            };
            merged.tally.failed -= 1;
            merged.tally.retryable -= u64::from(failure.retryable);
            merged.tally.succeeded += 1;
            row.values = values.into_iter().map(Some).collect();
            filled += 1;
        }
    }
    filled
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
    use rowsmith_contract::messages::ShardKey;
    use rowsmith_contract::spec::parse_field;

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
        assert_eq!(merged.anomalies.unknown, 1);
        assert_eq!(merged.anomalies.duplicates, 1);
    }

    #[test]
    fn unreadable_unknown_and_repeated_lines_are_counted_and_named() {
        let fields = vec![parse_field("title:string").expect("field")];
        let requests = b"{\"custom_id\":\"r0\"}\n{\"custom_id\":\"r1\"}\n{\"custom_id\":\"r2\"}\n";
        let output = [
            answer("r0", "zero"),
            "{\"custom_id\": \"r1\", \"response\": {\"status_code\": 200, \"bo".to_owned(),
            answer("r99999", "stray"),
            answer("r2", "two"),
            answer("r2", "again"),
        ]
        .join("\n");
        let merged = merge_lines(requests, &[output.as_bytes()], &ended("completed"), &fields)
            .expect("merge");
        assert_eq!(merged.rows[0].values, [Some("zero".to_owned())]);
        let failure = merged.rows[1].failure.as_ref().expect("r1 failed");
        assert_eq!(failure.reason, "invalid_json");
        assert!(failure.retryable);
        assert_eq!(merged.rows[2].values, [Some("two".to_owned())]);
        let anomalies = &merged.anomalies;
        assert_eq!(
            (
                anomalies.unreadable,
                anomalies.unknown,
                anomalies.duplicates
            ),
            (1, 1, 1)
        );
        let text = anomalies.describe();
        for part in [
            "1 not valid JSON",
            "r1",
            "r99999",
            "r2",
            "never sent",
            "first answer kept",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // An unreadable line naming an already answered row counts once, as unreadable.
        let again = format!("{output}\n{{\"custom_id\": \"r0\", \"resp");
        let merged = merge_lines(requests, &[again.as_bytes()], &ended("completed"), &fields)
            .expect("merge");
        let anomalies = &merged.anomalies;
        assert_eq!(
            (
                anomalies.unreadable,
                anomalies.unknown,
                anomalies.duplicates
            ),
            (2, 1, 1)
        );
        assert_eq!(merged.rows[0].values, [Some("zero".to_owned())]);
    }

    #[test]
    fn an_orphan_fills_only_the_rows_the_recorded_batch_failed() {
        let fields = vec![parse_field("title:string").expect("field")];
        let requests = b"{\"custom_id\":\"r0\"}\n{\"custom_id\":\"r1\"}\n{\"custom_id\":\"r2\"}\n";
        // The recorded batch answered r0 and expired before r1 and r2.
        let output = answer("r0", "zero");
        let mut merged =
            merge_lines(requests, &[output.as_bytes()], &ended("expired"), &fields).expect("merge");
        assert_eq!(merged.tally.failed, 2);
        // The orphan answered r0 (already good: kept as it was) and r1; not r2; and a stray.
        let orphan = [
            answer("r0", "other zero"),
            answer("r1", "one"),
            "{\"custom_id\": \"r2\", \"resp".to_owned(),
            answer("r42", "stray"),
        ]
        .join("\n");
        let filled = fill_from_orphans(&mut merged, &[orphan.as_bytes()], "openai", &fields);
        assert_eq!(filled, 1);
        assert_eq!(merged.rows[0].values, [Some("zero".to_owned())]);
        assert_eq!(merged.rows[1].values, [Some("one".to_owned())]);
        assert!(merged.rows[1].failure.is_none());
        assert_eq!(
            merged.rows[2].failure.as_ref().map(|f| f.reason.as_str()),
            Some("batch_expired")
        );
        assert_eq!(
            merged.tally,
            ShardTally {
                succeeded: 2,
                failed: 1,
                retryable: 1
            }
        );
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
