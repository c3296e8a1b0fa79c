//! Result lines → rows: `rowsmith_merger::merge::merge_lines` (and through it
//! `validate::parse_line` / `parse_anthropic_line`) on arbitrary result files.
//!
//! Input layout (see fuzz/README.md): byte 0 flags (bit 0: Anthropic format, else OpenAI;
//! bits 1-2: the batch's end: completed, expired, cancelled, failed), then raw bytes cut at
//! `\x1e` into parts: `--field` specs (cut at `\x1f`) | the shard's request custom ids
//! (whitespace-separated) | result files….
//!
//! Invariants: merging never fails on well-formed requests; exactly one row per request with
//! an `r<n>` id, in request order; a good row has one value per field, a failed row none and
//! a reason; the tally counts the rows; every good line's values have their field's type;
//! and (when every line is JSON) each row is the first answer for it, or the batch's reason
//! for a row without one, with duplicates and unknown lines counted.
#![no_main]

use std::collections::{HashMap, HashSet};

use libfuzzer_sys::fuzz_target;
use rowsmith_merger::merge::merge_lines;
use rowsmith_merger::validate::{LineFormat, LineResult};
use rowsmith_contract::messages::{BatchEnded, ShardKey};
use rowsmith_dataplane::render::row_index_of;
use rowsmith_contract::spec::{FieldSpec, FieldType, parse_field};
use serde_json::Value;

fn check_values(values: &[String], fields: &[FieldSpec]) {
    assert_eq!(values.len(), fields.len(), "one value per field");
    for (value, field) in values.iter().zip(fields) {
        match field.field_type {
            FieldType::String => {}
            FieldType::Number => assert!(
                serde_json::from_str::<Value>(value).is_ok_and(|v| v.is_number()),
                "{:?}: {value:?} is not a number",
                field.name
            ),
            FieldType::Boolean => assert!(value == "true" || value == "false", "{value:?}"),
            FieldType::Array => assert!(
                serde_json::from_str::<Value>(value).is_ok_and(|v| v.is_array()),
                "{:?}: {value:?} is not an array",
                field.name
            ),
            FieldType::Enum => assert!(
                field.values.as_deref().unwrap_or_default().contains(value),
                "{:?}: {value:?} is not one of {:?}",
                field.name,
                field.values
            ),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|b| *b == 0x1e);
    let fields_text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let mut fields: Vec<FieldSpec> = fields_text
        .split('\x1f')
        .filter_map(|f| parse_field(f).ok())
        .collect();
    if fields.is_empty() {
        fields.push(parse_field("title:string").expect("a valid field"));
    }
    let ids_text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let ids: Vec<&str> = ids_text.split_ascii_whitespace().collect();
    let result_files: Vec<&[u8]> = parts.collect();

    let provider = if flags & 1 != 0 { "anthropic" } else { "openai" };
    let (status, failure) = match (flags >> 1) & 3 {
        0 => ("completed", None),
        1 => ("expired", None),
        2 => ("cancelled", None),
        _ => ("failed", Some("the batch failed: input file invalid".to_owned())),
    };
    let ended = BatchEnded {
        key: ShardKey {
            job_id: "fuzz".into(),
            attempt: 1,
            shard: 0,
        },
        provider: provider.into(),
        batch_id: "batch_fuzz".into(),
        status: status.into(),
        output_path: None,
        errors_path: None,
        failure,
    };
    let mut requests = Vec::new();
    for id in &ids {
        requests.extend_from_slice(serde_json::json!({ "custom_id": id }).to_string().as_bytes());
        requests.push(b'\n');
    }

    let merged = match merge_lines(&requests, &result_files, &ended, &fields) {
        Ok(merged) => merged,
        Err(e) => panic!("merge_lines failed on well-formed requests: {e}"),
    };
    let _ = merged.anomalies.describe();

    // Exactly one row per request, in request order.
    let expected: Vec<i64> = ids.iter().filter_map(|id| row_index_of(id)).collect();
    let indexes: Vec<i64> = merged.rows.iter().map(|r| r.row_index).collect();
    assert_eq!(indexes, expected, "one row per request, in order");
    let (mut succeeded, mut failed, mut retryable) = (0, 0, 0);
    for row in &merged.rows {
        match &row.failure {
            None => {
                succeeded += 1;
                let values: Vec<String> = row
                    .values
                    .iter()
                    .map(|v| v.clone().expect("a good row has every value"))
                    .collect();
                check_values(&values, &fields);
            }
            Some(f) => {
                failed += 1;
                retryable += u64::from(f.retryable);
                assert!(row.values.is_empty(), "a failed row has no values");
                assert!(!f.reason.is_empty(), "a failure has a reason");
            }
        }
    }
    assert_eq!(
        (merged.tally.succeeded, merged.tally.failed, merged.tally.retryable),
        (succeeded, failed, retryable)
    );
    assert!(merged.anomalies.examples.len() <= 5);

    // Every line on its own.
    let format = LineFormat::of_provider(provider);
    let mut first: HashMap<i64, LineResult> = HashMap::new();
    let (mut unreadable, mut not_a_row, mut named) = (0u64, 0u64, Vec::new());
    for file in &result_files {
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match format.parse(line, &fields) {
                Some((row_index, result)) => {
                    if let Ok(values) = &result {
                        check_values(values, &fields);
                    }
                    named.push(row_index);
                    first.entry(row_index).or_insert(result);
                }
                None if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() => {
                    not_a_row += 1;
                }
                None => unreadable += 1,
            }
        }
    }
    assert_eq!(merged.anomalies.unreadable, unreadable);
    if unreadable > 0 {
        // An unreadable line may still name its row (salvaged): no exact oracle below.
        return;
    }

    // Each row: the first answer that names it, else the batch's reason.
    let missing_reason = match (&ended.failure, status) {
        (Some(_), _) => "batch_failed",
        (None, "expired") => "batch_expired",
        (None, "cancelled") => "cancelled",
        _ => "no_result",
    };
    let mut taken = HashSet::new();
    for row in &merged.rows {
        let answer = first
            .get(&row.row_index)
            .filter(|_| taken.insert(row.row_index));
        match answer {
            Some(Ok(values)) => {
                assert_eq!(row.failure, None, "row {}", row.row_index);
                let got: Vec<String> = row.values.iter().flatten().cloned().collect();
                assert_eq!(&got, values, "row {}", row.row_index);
            }
            Some(Err(failure)) => {
                assert_eq!(row.failure.as_ref(), Some(failure), "row {}", row.row_index)
            }
            None => assert_eq!(
                row.failure.as_ref().map(|f| f.reason.as_str()),
                Some(missing_reason),
                "row {}",
                row.row_index
            ),
        }
    }
    let requested: HashSet<i64> = expected.iter().copied().collect();
    let unknown = named.iter().filter(|i| !requested.contains(i)).count() as u64;
    let known_lines = named.len() as u64 - unknown;
    let answered = first.keys().filter(|i| requested.contains(i)).count() as u64;
    assert_eq!(merged.anomalies.unknown, unknown + not_a_row, "unknown lines");
    assert_eq!(merged.anomalies.duplicates, known_lines - answered, "duplicates");
});
