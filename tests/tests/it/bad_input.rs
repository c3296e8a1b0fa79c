//! Hostile and broken input (issue 7): each bad job fails alone with a message that says what
//! was wrong and what to do, while a good job submitted with them completes.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use rowsmith_contract::events::EventKind;
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::JobState;
use rowsmith_tests::Stack;

const BAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/bad");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{BAD}/{name}")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn rows_csv(rows: usize) -> Vec<u8> {
    let mut text = String::from("sku,description\n");
    for i in 0..rows {
        text.push_str(&format!("{i:05},\"Item {i}, a sturdy thing\"\n"));
    }
    text.into_bytes()
}

/// A JobSpec as JSON, so tests can break it in ways the Rust type would not allow.
fn spec_json(job_id: &str, input: &str) -> Value {
    json!({
        "job_id": job_id,
        "input": input,
        "instructions": "Write a title.",
        "target_columns": ["description"],
        "fields": [{"name": "title", "type": "string", "description": "a title"}],
        "provider": "sim",
        "model": "gpt-4o-mini"
    })
}

struct Case {
    job_id: &'static str,
    spec: Value,
    /// Parts of the job's error message.
    expect: &'static [&'static str],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_fails_its_own_job_with_a_clear_message() {
    let stack = Stack::start_with(|settings| {
        settings.limits.max_rows = 5_000;
        settings.limits.max_input_bytes = 64 * 1024 * 1024;
        settings.limits.max_fields = 8;
        settings.ingest.concurrency = 4;
    })
    .await;
    let mut uploads: Vec<(&str, Vec<u8>)> = [
        "empty.csv",
        "header_only.csv",
        "bom.csv",
        "crlf.csv",
        "mixed_line_endings.csv",
        "ragged.csv",
        "unterminated_quote.csv",
        "latin1.csv",
        "nul_bytes.csv",
        "duplicate_header.csv",
        "not_parquet.parquet",
        "truncated.csv.gz",
    ]
    .into_iter()
    .map(|name| (name, fixture(name)))
    .collect();
    // The large ones are generated, not committed.
    let mut huge = b"sku,description\n1,\"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 50 * 1024 * 1024));
    huge.extend_from_slice(b"\"\n2,ok\n");
    uploads.push(("huge_cell.csv", huge));
    let mut big = b"sku,description\n1,".to_vec();
    big.extend(std::iter::repeat_n(b'y', 1536 * 1024));
    big.extend_from_slice(b"\n2,ok\n");
    uploads.push(("big_cell.csv", big));
    let header: Vec<String> = (0..9_999)
        .map(|i| format!("c{i}"))
        .chain(["description".to_owned()])
        .collect();
    let row: Vec<&str> = std::iter::repeat_n("v", 10_000).collect();
    let wide = format!("{}\n{}\n", header.join(","), row.join(","));
    uploads.push(("wide.csv", wide.into_bytes()));
    let mut bomb_text = b"sku,description\n".to_vec();
    bomb_text.extend(
        std::iter::repeat_n(b"1,aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n".as_slice(), 3_000_000).flatten(),
    );
    uploads.push(("bomb.csv.gz", gzip(&bomb_text)));
    let whole = gzip(&rows_csv(2_000));
    uploads.push(("cut.csv.gz", whole[..whole.len() / 2].to_vec()));
    uploads.push(("many.csv", rows_csv(6_000)));
    uploads.push(("good.csv", rows_csv(50)));
    let mut keys = std::collections::HashMap::new();
    for (name, bytes) in uploads {
        keys.insert(name, stack.upload_input(name, bytes).await);
    }
    let input = |name: &str| keys[name].clone();
    let with = |job_id: &str, name: &str, change: &dyn Fn(&mut Value)| {
        let mut spec = spec_json(job_id, &input(name));
        change(&mut spec);
        spec
    };
    let none = |_: &mut Value| {};
    let cases = vec![
        Case {
            job_id: "bad-empty",
            spec: with("bad-empty", "empty.csv", &none),
            expect: &["empty.csv", "empty (0 bytes)", "header row"],
        },
        Case {
            job_id: "bad-header-only",
            spec: with("bad-header-only", "header_only.csv", &none),
            expect: &["no data rows", "sku, description"],
        },
        Case {
            job_id: "bad-ragged",
            spec: with("bad-ragged", "ragged.csv", &none),
            expect: &["ragged.csv", "fields where the header has 3", "line"],
        },
        Case {
            job_id: "bad-quote",
            spec: with("bad-quote", "unterminated_quote.csv", &none),
            expect: &["never closed", "line 3"],
        },
        Case {
            job_id: "bad-latin1",
            spec: with("bad-latin1", "latin1.csv", &none),
            expect: &["not UTF-8", "iconv"],
        },
        Case {
            job_id: "bad-nul",
            spec: with("bad-nul", "nul_bytes.csv", &none),
            expect: &["NUL byte", "column \"description\"", "data row"],
        },
        Case {
            job_id: "bad-dup-header",
            spec: with("bad-dup-header", "duplicate_header.csv", &none),
            expect: &["\"description\" appears twice", "rename one"],
        },
        Case {
            job_id: "bad-parquet",
            spec: with("bad-parquet", "not_parquet.parquet", &none),
            expect: &["not a Parquet file"],
        },
        Case {
            job_id: "bad-gzip",
            spec: with("bad-gzip", "truncated.csv.gz", &none),
            expect: &["not a complete gzip file", "gzip -t"],
        },
        Case {
            job_id: "bad-cut-gzip",
            spec: with("bad-cut-gzip", "cut.csv.gz", &none),
            expect: &["not a complete gzip file"],
        },
        Case {
            job_id: "bad-bomb",
            spec: with("bad-bomb", "bomb.csv.gz", &none),
            expect: &["expands to more than", "limits.max_input_bytes"],
        },
        Case {
            job_id: "bad-huge-cell",
            spec: with("bad-huge-cell", "huge_cell.csv", &none),
            expect: &["huge_cell.csv", "limits.max_cell_bytes"],
        },
        Case {
            job_id: "bad-big-cell",
            spec: with("bad-big-cell", "big_cell.csv", &none),
            expect: &["data row 1", "more than limits.max_cell_bytes"],
        },
        Case {
            job_id: "bad-wide",
            spec: with("bad-wide", "wide.csv", &none),
            expect: &["10000 columns", "limits.max_columns"],
        },
        Case {
            job_id: "bad-many-rows",
            spec: with("bad-many-rows", "many.csv", &none),
            expect: &["6000 rows", "limits.max_rows"],
        },
        Case {
            job_id: "bad-target",
            spec: with("bad-target", "good.csv", &|s| {
                s["target_columns"] = json!(["descripton"])
            }),
            expect: &["\"descripton\" not found", "sku, description"],
        },
        Case {
            job_id: "bad-collide",
            spec: with("bad-collide", "good.csv", &|s| {
                s["fields"] = json!([{"name": "sku", "type": "string"}])
            }),
            expect: &["\"sku\"", "rename"],
        },
        Case {
            job_id: "bad-type",
            spec: with("bad-type", "good.csv", &|s| {
                s["fields"] = json!([{"name": "n", "type": "integer"}])
            }),
            expect: &["JobSpec is invalid", "integer"],
        },
        Case {
            job_id: "bad-enum",
            spec: with("bad-enum", "good.csv", &|s| {
                s["fields"] = json!([{"name": "c", "type": "enum", "values": []}])
            }),
            expect: &["has no values", "enum(a|b|c)"],
        },
        Case {
            job_id: "bad-no-instructions",
            spec: with("bad-no-instructions", "good.csv", &|s| {
                s["instructions"] = json!("  ")
            }),
            expect: &["instructions are empty"],
        },
        Case {
            job_id: "bad-long-instructions",
            spec: with("bad-long-instructions", "good.csv", &|s| {
                s["instructions"] = json!("x".repeat(200 * 1024))
            }),
            expect: &["204800 bytes", "limits.max_instruction_bytes"],
        },
        Case {
            job_id: "bad-many-fields",
            spec: with("bad-many-fields", "good.csv", &|s| {
                s["fields"] = json!(
                    (0..9)
                        .map(|i| json!({"name": format!("f{i}"), "type": "string"}))
                        .collect::<Vec<_>>()
                )
            }),
            expect: &["9 fields", "limits.max_fields"],
        },
        Case {
            job_id: "bad-provider",
            spec: with("bad-provider", "good.csv", &|s| {
                s["provider"] = json!("foo")
            }),
            expect: &["provider \"foo\" is unknown", "openai"],
        },
        Case {
            job_id: "bad-unknown-field",
            spec: with("bad-unknown-field", "good.csv", &|s| {
                s["temprature"] = json!(0.2)
            }),
            expect: &["unknown field `temprature`"],
        },
        Case {
            job_id: "bad-outside",
            spec: spec_json("bad-outside", "file:///etc/passwd"),
            expect: &["is not allowed", "store.allowed_inputs"],
        },
    ];
    let good = ["good.csv", "bom.csv", "crlf.csv", "mixed_line_endings.csv"];
    for (i, name) in good.iter().enumerate() {
        let mut spec = spec_json(&format!("good-{i}"), &input(name));
        if *name != "good.csv" {
            spec["target_columns"] = json!(["description"]);
        }
        stack
            .bus
            .publish(subjects::JOBS_SUBMIT, &format!("good-{i}"), &spec)
            .await
            .expect("publish");
    }
    for case in &cases {
        stack
            .bus
            .publish(subjects::JOBS_SUBMIT, case.job_id, &case.spec)
            .await
            .expect("publish");
    }
    // Messages that cannot become a job at all: terminated, nothing recorded.
    for (id, body) in [
        ("garbage", b"{\"job_id\": \"half".to_vec()),
        (
            "climb",
            serde_json::to_vec(&spec_json("../../etc", &input("good.csv"))).expect("json"),
        ),
    ] {
        stack
            .bus
            .client
            .publish(subjects::JOBS_SUBMIT, body.into())
            .await
            .expect("publish raw");
        let _ = id;
    }

    let mut report = Vec::new();
    for case in &cases {
        let job = stack
            .wait_for_end(case.job_id, Duration::from_secs(180))
            .await;
        let error = job.error.clone().unwrap_or_default();
        assert_eq!(job.state, JobState::Failed, "{}: {error}", case.job_id);
        for part in case.expect {
            assert!(
                error.contains(part),
                "{}: {part:?} not in {error:?}",
                case.job_id
            );
        }
        let events = stack.events_until(case.job_id, EventKind::Failed).await;
        let failed = events.last().expect("failed event");
        assert!(
            failed.message.contains(case.expect[0]),
            "{}: event {:?}",
            case.job_id,
            failed.message
        );
        report.push(format!("{:<22} {error}", case.job_id));
    }
    for (i, name) in good.iter().enumerate() {
        let job = stack
            .wait_for_end(&format!("good-{i}"), Duration::from_secs(180))
            .await;
        assert_eq!(job.state, JobState::Completed, "{}: {:?}", name, job.error);
        assert!(job.counts.succeeded >= 3, "{}: {:?}", name, job.counts);
    }
    let keys = stack.bus.kv.keys().await.expect("keys");
    let keys: Vec<String> = futures::StreamExt::collect::<Vec<_>>(keys)
        .await
        .into_iter()
        .map(|k| k.expect("key"))
        .collect();
    assert!(
        !keys.iter().any(|k| k.contains("etc") || k.contains("half")),
        "{keys:?}"
    );
    // The work stream drains: nothing undecodable is redelivered forever.
    let mut stream = stack
        .bus
        .js
        .get_stream("ROWSMITH_WORK")
        .await
        .expect("stream");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let messages = stream.info().await.expect("info").state.messages;
        if messages == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{messages} messages stuck in the work stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_formulas_are_escaped_in_csv_and_the_input_cells_are_not() {
    let stack = Stack::start().await;
    // The simulator's model titles a row with its first line: a row can steer the output,
    // as a real model's can be steered.
    let descriptions = [
        "=HYPERLINK(\"http://evil.example\",\"click\")",
        "+1+2",
        "-3.5",
        "@SUM(A1:A9)",
        "plain words",
        "=1",
    ];
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["sku", "description"]).expect("header");
    for (i, d) in descriptions.iter().enumerate() {
        writer
            .write_record([format!("{i}"), d.to_string()])
            .expect("row");
    }
    let input = stack
        .upload_input("formulas.csv", writer.into_inner().expect("csv"))
        .await;
    let spec = spec_json("formulas", &input);
    stack
        .bus
        .publish(subjects::JOBS_SUBMIT, "formulas", &spec)
        .await
        .expect("publish");
    let job = stack
        .wait_for_end("formulas", Duration::from_secs(60))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let ((header, rows), _) = stack.output_tables(&job).await;
    assert_eq!(header, ["sku", "description", "title"]);
    let titles: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(
        titles,
        [
            "'=HYPERLINK(\"http://evil.example\",\"click\")",
            "'+1+2",
            "-3.5",
            "'@SUM(A1:A9)",
            "plain words",
            "'=1"
        ]
    );
    let originals: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(originals, descriptions, "input cells are never altered");
}
