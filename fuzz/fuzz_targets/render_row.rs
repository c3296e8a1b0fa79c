//! CSV row → request line: `RequestTemplate::new` + `check_cells` + `render` on arbitrary
//! column names, cells, target/context columns, instructions and `--field` specs.
//!
//! Input layout (see fuzz/README.md): byte 0 flags, byte 1 a small `max_cell_bytes`, bytes
//! 2..10 the row index (i64 LE), then UTF-8 (lossy) text cut at `\x1e` into parts:
//! column names | cells | target columns | context columns | instructions | model | fields…
//! (names and cells within a part cut at `\x1f`; a cell that is exactly `\x18` is absent,
//! as a Parquet NULL is).
//!
//! Invariants: `check_cells` fails exactly when a target or context cell is too large or
//! holds a NUL; `render` skips exactly the rows whose targets are all empty; a rendered line
//! is one line of valid JSON with `custom_id` `r<row_index>`, the spec's model, the fields'
//! schema, and a user message that decodes to the instructions and the row's own text; the
//! same row under another index renders the same body and the same hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rowsmith_dataplane::render::{RequestTemplate, row_index_of};
use rowsmith_contract::spec::{JobOptions, JobSpec, parse_field};
use serde_json::Value;

const ABSENT: &str = "\x18";

fn split(part: Option<&str>) -> Vec<String> {
    match part {
        Some(text) => text.split('\x1f').map(str::to_owned).collect(),
        None => Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let flags = data[0];
    let max_cell_bytes = if flags & 0x10 != 0 {
        u64::from(data[1])
    } else {
        1024 * 1024
    };
    let mut index_bytes = [0u8; 8];
    index_bytes.copy_from_slice(&data[2..10]);
    let row_index = i64::from_le_bytes(index_bytes);
    let text = String::from_utf8_lossy(&data[10..]);
    let mut parts = text.split('\x1e');

    let columns = split(parts.next());
    let cells: Vec<Option<String>> = split(parts.next())
        .into_iter()
        .map(|c| (c != ABSENT).then_some(c))
        .collect();
    let mut target_columns = split(parts.next());
    if target_columns.is_empty() {
        target_columns = columns.iter().take(1).cloned().collect();
    }
    let context_part = split(parts.next());
    let context_columns = (flags & 0x04 != 0).then_some(context_part);
    let instructions = parts.next().unwrap_or("Summarize").to_owned();
    let model = match parts.next() {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => "gpt-4o-mini".to_owned(),
    };
    let mut fields: Vec<_> = parts.filter_map(|f| parse_field(f).ok()).collect();
    if fields.is_empty() {
        fields.push(parse_field("title:string:a title").expect("a valid field"));
    }
    let provider = match flags & 0x03 {
        0 => "openai",
        1 => "anthropic",
        _ => "sim",
    };
    let temperature = (flags & 0x08 == 0).then_some(f64::from(flags >> 5) / 4.0);
    let spec = JobSpec {
        job_id: Some("fuzz".into()),
        input: "inputs/fuzz.csv".into(),
        instructions,
        target_columns,
        context_columns,
        fields,
        provider: provider.into(),
        model,
        options: JobOptions {
            temperature,
            ..JobOptions::default()
        },
        fallback: None,
    };

    let cell = |i: usize| cells.get(i).and_then(|c| c.as_deref());
    let template = RequestTemplate::new(&spec, &columns);

    // The columns the template should use, by the documented rules: a name's first column;
    // context `null` = every column that is not a target.
    let position = |name: &String| columns.iter().position(|c| c == name);
    let targets: Vec<(usize, &String)> = spec
        .target_columns
        .iter()
        .filter_map(|n| position(n).map(|i| (i, n)))
        .collect();
    let context: Vec<(usize, &String)> = match &spec.context_columns {
        Some(names) => names
            .iter()
            .filter_map(|n| position(n).map(|i| (i, n)))
            .collect(),
        None => columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !spec.target_columns.contains(c))
            .collect(),
    };

    // check_cells: refused exactly when a used cell is too large or holds a NUL.
    let checked = template.check_cells(&cell, max_cell_bytes);
    let bad_cell = targets.iter().chain(&context).any(|(i, _)| {
        cell(*i).is_some_and(|v| v.len() as u64 > max_cell_bytes || v.contains('\0'))
    });
    assert_eq!(checked.is_err(), bad_cell, "check_cells: {checked:?}");

    let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
    let hash = template.render(row_index, cell, &mut scratch, &mut escaped, &mut out);
    let all_targets_empty = targets
        .iter()
        .all(|(i, _)| cell(*i).is_none_or(str::is_empty));
    assert_eq!(hash.is_none(), all_targets_empty, "skipped iff every target is empty");
    let Some(hash) = hash else {
        assert!(out.is_empty(), "a skipped row appends nothing");
        return;
    };

    // One line of valid JSON.
    assert_eq!(out.last(), Some(&b'\n'), "a line ends with \\n");
    assert_eq!(
        out.iter().filter(|b| **b == b'\n').count(),
        1,
        "exactly one line: {}",
        String::from_utf8_lossy(&out)
    );
    let line: Value = match serde_json::from_slice(&out) {
        Ok(line) => line,
        Err(e) => panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)),
    };
    let custom_id = line["custom_id"].as_str().expect("custom_id is a string");
    assert_eq!(custom_id, format!("r{row_index}"));
    assert_eq!(row_index_of(custom_id), Some(row_index));

    let (request, user) = if provider == "anthropic" {
        let params = &line["params"];
        assert_eq!(params["tools"][0]["input_schema"]["additionalProperties"], false);
        (params, &params["messages"][0])
    } else {
        assert_eq!(line["method"], "POST");
        assert_eq!(line["url"], "/v1/chat/completions");
        let body = &line["body"];
        assert_eq!(body["messages"][0]["role"], "system");
        (body, &body["messages"][1])
    };
    assert_eq!(request["model"], Value::String(spec.model.clone()));
    match temperature {
        Some(t) => assert_eq!(request["temperature"].as_f64(), Some(t)),
        None => assert!(request.get("temperature").is_none()),
    }
    let schema = if provider == "anthropic" {
        &request["tools"][0]["input_schema"]
    } else {
        &request["response_format"]["json_schema"]["schema"]
    };
    let names: Vec<&str> = spec.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(schema["required"], serde_json::json!(names));
    for name in &names {
        assert!(schema["properties"].get(*name).is_some(), "no property {name:?}");
    }

    // The user message decodes to the instructions, then the row's own text.
    assert_eq!(user["role"], "user");
    let content = user["content"].as_str().expect("user content is a string");
    let mut row_text = String::new();
    for (i, name) in &targets {
        row_text.push_str(&format!("{name}: {}\n", cell(*i).unwrap_or("")));
    }
    let context_text: Vec<String> = context
        .iter()
        .filter_map(|(i, name)| cell(*i).map(|v| format!("{name}: {v}")))
        .collect();
    row_text.push_str(&format!("\nRow context: {}\n", context_text.join(", ")));
    assert!(
        content.starts_with(&format!("Instructions: {}\n\n", spec.instructions)),
        "{content:?}"
    );
    assert!(
        content.ends_with(&format!("\nRow data to enhance:\n{row_text}")),
        "{content:?} does not end with the row text {row_text:?}"
    );

    // The same row under another index: the same body, the same hash.
    let other_index = row_index.wrapping_add(1);
    let mut again = Vec::new();
    let hash_again = template.render(other_index, cell, &mut scratch, &mut escaped, &mut again);
    assert_eq!(hash_again, Some(hash));
    let mut line_again: Value = serde_json::from_slice(&again).expect("valid JSON again");
    assert_eq!(line_again["custom_id"], format!("r{other_index}"));
    line_again["custom_id"] = line["custom_id"].clone();
    assert_eq!(line_again, line, "only the custom id differs");
});
