//! DuckDB's memory: long cells go through ingest, render, merge and finalize under a small
//! `duckdb.memory_limit`, and a table that cannot fit says which setting to raise.

use std::time::Duration;

use rowsmith_runtime::ServiceSettings;

use rowsmith_contract::records::JobState;
use rowsmith_contract::spec::{JobOptions, JobSpec};
use rowsmith_tests::Stack;

/// `rows` articles whose `body` is 5 to 20 KB of text with commas, quotes and line breaks.
fn articles(rows: usize) -> Vec<[String; 3]> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..rows)
        .map(|row| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let length = 5_000 + (seed % 15_000) as usize;
            let words = [
                "council",
                "said,",
                "\"record\"",
                "growth",
                "\n",
                "über",
                "rates",
            ];
            let mut body = format!("Story {row}: ");
            let mut word = row;
            while body.len() < length {
                body.push_str(words[word % words.len()]);
                body.push(' ');
                word += 5;
            }
            [format!("a{row:05}"), format!("Headline {row}"), body]
        })
        .collect()
}

/// `rows` rows whose `body` is 3 MB.
fn wide_rows(rows: usize) -> Vec<[String; 3]> {
    (0..rows)
        .map(|row| {
            [
                format!("a{row}"),
                format!("Headline {row}"),
                "word ".repeat(600_000),
            ]
        })
        .collect()
}

fn to_csv(rows: &[[String; 3]]) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(["id", "headline", "body"])
        .expect("header");
    for row in rows {
        writer.write_record(row).expect("row");
    }
    writer.into_inner().expect("csv bytes")
}

fn summarize(job_id: &str, input: &str) -> JobSpec {
    JobSpec::builder(input, "Summarize the article in one sentence.")
        .with_id(job_id)
        .with_targets(["body"])
        .with_context(["headline"])
        .with_field_texts(["summary:string:one sentence"])
        .expect("field")
        .with_options(JobOptions {
            output_formats: vec!["csv".into(), "parquet".into()],
            ..JobOptions::default()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_articles_complete_under_a_128_mib_duckdb_limit() {
    // A default Parquet row group (122,880 rows) would hold this whole ~50 MB table, per
    // thread, in memory it cannot spill.
    let stack = Stack::start_with(|settings| {
        settings.duckdb.memory_limit = Some("128MiB".into());
        settings.duckdb.threads = Some(2);
    })
    .await;
    let rows = articles(4_000);
    let input = stack.upload_input("articles.csv", to_csv(&rows)).await;
    stack.submit(&summarize("articles", &input)).await;
    let job = stack
        .wait_for_end("articles", Duration::from_secs(240))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let ((header, enriched), (_, failures)) = stack.output_tables(&job).await;
    assert_eq!(header, ["id", "headline", "body", "summary"]);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(enriched.len(), rows.len());
    for (out, row) in enriched.iter().zip(&rows) {
        assert_eq!(
            out[..3],
            row[..],
            "row {} comes back whole, in order",
            row[0]
        );
        assert!(!out[3].is_empty(), "row {} has its summary", row[0]);
    }
    assert!(job.outputs.enriched_parquet.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_too_large_for_the_memory_limit_fails_naming_the_setting_to_raise() {
    let stack = Stack::start_with(|settings| {
        settings.duckdb.memory_limit = Some("64MiB".into());
        settings.duckdb.threads = Some(1);
    })
    .await;
    // 3 MB cells: one chunk of DuckDB's rows is already more than 64 MiB.
    let rows = wide_rows(48);
    let input = stack.upload_input("huge.csv", to_csv(&rows)).await;
    stack.submit(&summarize("huge", &input)).await;
    let job = stack.wait_for_end("huge", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("raise duckdb.memory_limit (ROWSMITH_DUCKDB__MEMORY_LIMIT"),
        "{error}"
    );
    assert!(!error.contains("keep only the columns"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merger_out_of_memory_suspends_the_job_and_resume_with_more_completes_it_paying_once() {
    // Ingest has room; the merger gets too little to write the outputs of 3 MB cells.
    let stack = Stack::start_services(
        |settings| {
            settings.duckdb.memory_limit = Some("1GiB".into());
            settings.limits.max_cell_bytes = 4 * 1024 * 1024;
        },
        &["ingest", "submitter", "poller"],
    )
    .await;
    let rows = wide_rows(48);
    let input = stack.upload_input("wide.csv", to_csv(&rows)).await;
    let mut small = stack.settings.clone();
    small.duckdb.memory_limit = Some("64MiB".into());
    small.duckdb.threads = Some(1);
    let first_merger = tokio_util::sync::CancellationToken::new();
    let merger = tokio::spawn(rowsmith_merger::run(
        rowsmith_merger::Config::from_settings(small),
        first_merger.clone(),
    ));
    stack.submit(&summarize("wide", &input)).await;
    let suspended = stack
        .wait_for("wide", Duration::from_secs(120), |job| {
            job.state == JobState::Suspended || job.state.is_terminal()
        })
        .await;
    assert_eq!(
        suspended.state,
        JobState::Suspended,
        "{:?}",
        suspended.error
    );
    let error = suspended.error.unwrap_or_default();
    assert!(error.contains("duckdb.memory_limit"), "{error}");
    // The operator raises the merger's memory and resumes the job.
    first_merger.cancel();
    merger.await.expect("join").expect("merger");
    stack.start_service("merger");
    rowsmith_bus::lifecycle::request_resume(&stack.bus, "wide")
        .await
        .expect("resume")
        .expect("a suspended job");
    let job = stack.wait_for_end("wide", Duration::from_secs(120)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let ((_, enriched), (_, failures)) = stack.output_tables(&job).await;
    assert_eq!(enriched.len(), 48);
    assert!(failures.is_empty(), "{failures:?}");
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 1, "{stats}");
    assert_eq!(
        stats["requests_answered"], 48,
        "nothing was sent twice: {stats}"
    );
}
