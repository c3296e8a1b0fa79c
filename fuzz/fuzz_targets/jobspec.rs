//! JobSpec decoding: `serde_json::from_slice::<JobSpec>` on arbitrary bytes, then
//! `validate()` and `validate_limits(&LimitsSettings::default())`.
//!
//! Invariants: a decoded spec serializes and decodes back to itself (floats within rounding)
//! and validates the same way; a valid spec has a valid job id, and the spec of every attempt
//! (the fallback's on the last) is valid too; a valid spec within the limits whose fields do
//! not collide with its columns renders a row into one line of valid JSON with its custom id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rowsmith_config::LimitsSettings;
use rowsmith_dataplane::render::RequestTemplate;
use rowsmith_contract::spec::{JobSpec, is_valid_job_id};
use serde_json::Value;

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a == b || (a - b).abs() <= a.abs().max(b.abs()) * 1e-15,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<JobSpec>(data) else {
        return;
    };
    let valid = spec.validate();
    let within_limits = spec.validate_limits(&LimitsSettings::default());

    // Round trip (JobSpecs are stored in job records and sent over NATS as JSON).
    let json = serde_json::to_vec(&spec).expect("a JobSpec serializes");
    let mut back: JobSpec = match serde_json::from_slice(&json) {
        Ok(back) => back,
        Err(e) => panic!(
            "a serialized JobSpec does not decode ({e}): {}",
            String::from_utf8_lossy(&json)
        ),
    };
    assert!(close(spec.options.temperature, back.options.temperature));
    assert!(close(spec.options.budget_usd, back.options.budget_usd));
    back.options.temperature = spec.options.temperature;
    back.options.budget_usd = spec.options.budget_usd;
    assert_eq!(back, spec, "round trip");
    assert_eq!(back.validate(), valid);

    if valid.is_err() {
        return;
    }
    assert!(is_valid_job_id(spec.id()), "{:?}", spec.job_id);
    let last = spec.options.max_attempts.max(1);
    for attempt in [1, last] {
        let attempt_spec = spec.for_attempt(attempt);
        assert_eq!(
            attempt_spec.validate(),
            Ok(()),
            "the spec of attempt {attempt} of a valid spec"
        );
    }
    if within_limits.is_err() {
        return;
    }

    // Render one row with every target and context column present and non-empty.
    let mut columns: Vec<String> = Vec::new();
    for name in spec
        .target_columns
        .iter()
        .chain(spec.context_columns.iter().flatten())
    {
        if !columns.contains(name) {
            columns.push(name.clone());
        }
    }
    if spec.validate_columns(&columns).is_err() {
        return;
    }
    for attempt in [1, last] {
        let attempt_spec = spec.for_attempt(attempt);
        let template = RequestTemplate::new(&attempt_spec, &columns);
        let cell = |_: usize| Some("A red \"ball\",\nround ✓");
        assert_eq!(template.check_cells(&cell, 1024), Ok(()));
        let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
        let hash = template.render(3, cell, &mut scratch, &mut escaped, &mut out);
        assert!(hash.is_some(), "a row with non-empty targets renders");
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let line: Value = match serde_json::from_slice(&out) {
            Ok(line) => line,
            Err(e) => panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)),
        };
        assert_eq!(line["custom_id"], "r3");
        let request = if attempt_spec.provider == "anthropic" {
            &line["params"]
        } else {
            &line["body"]
        };
        assert_eq!(request["model"], Value::String(attempt_spec.model.clone()));
    }
});
