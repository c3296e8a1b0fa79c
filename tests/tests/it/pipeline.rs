//! A table goes in, an enriched table comes out, through every service over JetStream.

use std::time::Duration;

use serde_json::Value;

use rowsmith_contract::events::EventKind;
use rowsmith_contract::records::JobState;
use rowsmith_contract::spec::JobSpec;
use rowsmith_tests::Stack;

const COLUMNS: [&str; 5] = ["sku", "name", "price", "description", "notes"];

pub fn spec(job_id: &str, input: &str, target: &str) -> JobSpec {
    JobSpec::builder(
        input,
        "Write an SEO title of at most 60 characters, pick a category, tags, price, stock.",
    )
    .with_id(job_id)
    .with_targets([target])
    .with_field_texts([
        "seo_title:string:SEO title",
        "category:enum(toys|tools|garden):best shelf",
        "in_stock:boolean",
        "tags:array:3 to 5 keywords",
        "price_eur:number",
    ])
    .expect("field")
}

/// Rows with quoted commas, embedded newlines, unicode, leading zeros and (every tenth row)
/// an empty description.
pub fn awkward_rows(count: usize) -> Vec<Vec<String>> {
    (0..count)
        .map(|i| {
            let description = if i % 10 == 7 {
                String::new()
            } else {
                format!(
                    "Produkt №{i}: a \"sturdy\", bright toy,\nwith a second line — ✓ {}",
                    "é".repeat(i % 4)
                )
            };
            vec![
                format!("{:05}", i * 7 % 1000),
                format!("Item {i}, deluxe"),
                format!("{}.{:02}", i % 90, (i * 13) % 100),
                description,
                if i % 3 == 0 {
                    String::new()
                } else {
                    format!("  padded {i}  ")
                },
            ]
        })
        .collect()
}

pub fn to_csv(rows: &[Vec<String>]) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(COLUMNS).expect("header");
    for row in rows {
        writer.write_record(row).expect("row");
    }
    writer.into_inner().expect("csv bytes")
}

pub use rowsmith_tests::parse_csv as read_csv;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_awkward_rows_come_back_whole_in_order_with_typed_new_columns() {
    let stack = Stack::start().await;
    let rows = awkward_rows(1000);
    let input = stack.upload_input("awkward.csv", to_csv(&rows)).await;
    stack.submit(&spec("awkward", &input, "description")).await;
    let job = stack
        .wait_for_end("awkward", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);

    let enriched = stack
        .read_text(job.outputs.enriched_csv.as_deref().expect("csv output"))
        .await;
    let (header, out_rows) = read_csv(&enriched);
    assert_eq!(
        header,
        [
            "sku",
            "name",
            "price",
            "description",
            "notes",
            "seo_title",
            "category",
            "in_stock",
            "tags",
            "price_eur"
        ]
    );
    assert_eq!(out_rows.len(), rows.len(), "every input row once");
    for (index, (input_row, output_row)) in rows.iter().zip(&out_rows).enumerate() {
        assert_eq!(
            &output_row[..5],
            &input_row[..],
            "row {index}: original cells changed or reordered"
        );
        let new = &output_row[5..];
        if input_row[3].is_empty() {
            assert!(
                new.iter().all(String::is_empty),
                "skipped row {index} got values: {new:?}"
            );
            continue;
        }
        assert!(!new[0].is_empty(), "row {index}: empty seo_title");
        assert!(
            ["toys", "tools", "garden"].contains(&new[1].as_str()),
            "row {index}: category {}",
            new[1]
        );
        assert!(
            ["true", "false"].contains(&new[2].as_str()),
            "row {index}: in_stock {}",
            new[2]
        );
        let tags: Vec<String> = serde_json::from_str(&new[3])
            .unwrap_or_else(|_| panic!("row {index}: tags {}", new[3]));
        assert!(!tags.is_empty());
        new[4]
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("row {index}: price_eur {}", new[4]));
    }
    // Answers are derived from each row's text: rows differ.
    let titles: std::collections::HashSet<&String> = out_rows.iter().map(|r| &r[5]).collect();
    assert!(titles.len() > 800, "only {} distinct titles", titles.len());

    let manifest: Value = serde_json::from_str(
        &stack
            .read_text(job.outputs.manifest.as_deref().expect("manifest"))
            .await,
    )
    .expect("manifest json");
    assert_eq!(manifest["rows"]["total"], 1000);
    assert_eq!(manifest["rows"]["skipped"], 100);
    assert_eq!(manifest["rows"]["succeeded"], 900);
    assert_eq!(manifest["rows"]["failed"], 0);
    let failures = stack
        .read_text(job.outputs.failures_csv.as_deref().expect("failures"))
        .await;
    assert_eq!(read_csv(&failures).1.len(), 0);
    assert!(job.outputs.enriched_parquet.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_over_the_request_cap_makes_three_batches_and_one_table() {
    let stack = Stack::start().await;
    let rows: Vec<Vec<String>> = awkward_rows(2500)
        .into_iter()
        .map(|mut row| {
            row[3] = format!("{} product", row[1]);
            row
        })
        .collect();
    let input = stack.upload_input("big.csv", to_csv(&rows)).await;
    let mut job_spec = spec("three-shards", &input, "description");
    job_spec.options.max_requests_per_batch = 1000;
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for_end("three-shards", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.shards_per_attempt, [3]);
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 3);
    for shard in 0..3 {
        assert_eq!(
            stats["batches_per_shard"][format!("three-shards.1.{shard}")],
            1,
            "{stats}"
        );
    }
    let (_, out_rows) = read_csv(
        &stack
            .read_text(job.outputs.enriched_csv.as_deref().expect("csv"))
            .await,
    );
    assert_eq!(out_rows.len(), 2500);
    let skus: Vec<&String> = out_rows.iter().map(|r| &r[0]).collect();
    let expected: Vec<&String> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(skus, expected, "rows in input order across shards");
    assert!(
        out_rows.iter().all(|r| !r[5].is_empty()),
        "every row enriched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_target_column_fails_the_job_with_the_columns_and_the_next_job_completes() {
    let stack = Stack::start().await;
    let input = stack
        .upload_input("small.csv", to_csv(&awkward_rows(50)))
        .await;
    stack.submit(&spec("typo", &input, "descripton")).await;
    let failed = stack.wait_for_end("typo", Duration::from_secs(60)).await;
    assert_eq!(failed.state, JobState::Failed);
    let expected =
        "target column \"descripton\" not found; columns are: sku, name, price, description, notes";
    assert_eq!(failed.error.as_deref(), Some(expected));
    let events = stack.events_until("typo", EventKind::Failed).await;
    let last = events.last().expect("events");
    assert_eq!(last.kind, EventKind::Failed);
    assert!(last.message.contains(expected), "{}", last.message);

    stack
        .submit(&spec("after-typo", &input, "description"))
        .await;
    let good = stack
        .wait_for_end("after-typo", Duration::from_secs(60))
        .await;
    assert_eq!(good.state, JobState::Completed, "{:?}", good.error);
    assert_eq!(good.counts.rows_total, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_120k_row_openai_job_is_cut_at_the_provider_limit_into_three_shards() {
    let stack = Stack::start_with(|settings| settings.sim.rows_per_second = 200_000.0).await;
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["id", "description"]).expect("header");
    for i in 0..120_000 {
        writer
            .write_record([i.to_string(), format!("product {i}")])
            .expect("row");
    }
    let input = stack
        .upload_input("large.csv", writer.into_inner().expect("csv"))
        .await;
    let mut job_spec = spec("large", &input, "description");
    job_spec.provider = "openai".into();
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end("large", Duration::from_secs(300)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.shards_per_attempt,
        [3],
        "50,000 requests per OpenAI batch"
    );
    let sizes: Vec<u64> = {
        let mut sizes = Vec::new();
        for shard in 0..3 {
            let key = rowsmith_contract::messages::ShardKey {
                job_id: "large".into(),
                attempt: 1,
                shard,
            };
            let (record, _) = stack
                .bus
                .read::<rowsmith_contract::records::ShardRecord>(
                    &rowsmith_contract::records::shard_key(&key),
                )
                .await
                .expect("read")
                .expect("shard");
            sizes.push(record.request_count);
        }
        sizes
    };
    assert_eq!(sizes, [50_000, 50_000, 20_000]);
    assert_eq!(job.counts.succeeded, 120_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_services_ride_out_a_nats_restart_and_the_job_completes() {
    // With the default creation lease (10 minutes): wherever the restart falls, no shard
    // waits for a claim its delivery left behind.
    let mut stack = Stack::start_with(|settings| {
        settings.sim.rows_per_second = 500.0;
    })
    .await;
    let input = stack
        .upload_input("restart.csv", to_csv(&awkward_rows(1500)))
        .await;
    let mut job_spec = spec("restart", &input, "description");
    job_spec.options.max_requests_per_batch = 500;
    stack.submit(&job_spec).await;
    // Let the job get going, then restart the server (file storage keeps the streams).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stack
        .bus
        .read::<rowsmith_contract::records::JobRecord>(&rowsmith_contract::records::job_key(
            "restart",
        ))
        .await
        .ok()
        .flatten()
        .is_none_or(|(job, _)| job.state != JobState::Running)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never started running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.nats.restart();
    let job = stack
        .wait_for_end("restart", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (_, enriched) = read_csv(
        &stack
            .read_text(job.outputs.enriched_csv.as_deref().expect("csv"))
            .await,
    );
    assert_eq!(enriched.len(), 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_outage_between_a_create_and_its_record_neither_stalls_the_shard_nor_pays_twice() {
    // The default creation lease (10 minutes) and ack_wait (5 minutes): a delivery that gave
    // up on the record would leave the shard waiting that long.
    let mut stack = Stack::start_with(|settings| {
        settings.sim.faults.create_response_lost_every = Some(1);
        settings.sim.faults.create_response_lost_as = rowsmith_config::LostResponse::Slow;
        settings.sim.faults.slow_create = Duration::from_secs(2);
        // A KV write waits this long for NATS before it fails: shorter than the outage.
        settings.nats.request_timeout = Duration::from_secs(1);
    })
    .await;
    assert_eq!(stack.settings.creation.lease, Duration::from_secs(600));
    let input = stack
        .upload_input("outage.csv", to_csv(&awkward_rows(200)))
        .await;
    stack.submit(&spec("outage", &input, "description")).await;
    // The batch exists and its answer is held back 2 s: NATS goes down now, so the answer
    // arrives while the submitter cannot record it, and comes back 4 s later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stack.sim_stats().await["batches_created"] == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch was created"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack.nats.resume();
    let job = stack.wait_for_end("outage", Duration::from_secs(90)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let (enriched, _) = stack.output_tables(&job).await;
    assert_eq!(enriched.1.len(), 200);
    let stats = stack.sim_stats().await;
    assert_eq!(stats["batches_created"], 1, "{stats}");
    assert_eq!(
        stats["create_responses_lost"], 1,
        "the answer was held back: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_pollers_share_the_work_and_each_batch_ends_once() {
    let stack = Stack::start_services(
        |settings| settings.sim.rows_per_second = 2000.0,
        &[
            "ingest",
            "submitter",
            "poller",
            "poller",
            "poller",
            "merger",
        ],
    )
    .await;
    let input = stack
        .upload_input("pollers.csv", to_csv(&awkward_rows(3000)))
        .await;
    let mut job_spec = spec("pollers", &input, "description");
    job_spec.options.max_requests_per_batch = 300;
    stack.submit(&job_spec).await;
    let job = stack
        .wait_for_end("pollers", Duration::from_secs(120))
        .await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(
        job.counts.shards_ended, job.counts.shards_total,
        "every shard merged once"
    );
    assert_eq!(job.counts.succeeded, 2700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_rows_are_sent_once_and_share_the_answer() {
    let stack = Stack::start().await;
    let distinct: Vec<Vec<String>> = awkward_rows(700)
        .into_iter()
        .map(|mut row| {
            row[3] = format!("{} described", row[1]);
            row
        })
        .collect();
    // 30% of the table repeats earlier rows exactly.
    let mut rows = distinct.clone();
    for i in 0..300 {
        rows.insert((i * 7 + 5) % rows.len(), distinct[(i * 13) % 700].clone());
    }
    let input = stack.upload_input("dups.csv", to_csv(&rows)).await;
    stack.submit(&spec("dups", &input, "description")).await;
    let job = stack.wait_for_end("dups", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let stats = stack.sim_stats().await;
    assert_eq!(
        stats["requests_answered"], 700,
        "requests sent = distinct rows: {stats}"
    );
    assert_eq!(job.counts.rows_deduplicated, 300);
    assert_eq!(job.counts.succeeded, 1000);
    let (_, enriched) = read_csv(
        &stack
            .read_text(job.outputs.enriched_csv.as_deref().expect("csv"))
            .await,
    );
    assert_eq!(enriched.len(), 1000);
    let mut answer_of = std::collections::HashMap::new();
    for (input_row, output_row) in rows.iter().zip(&enriched) {
        assert_eq!(&output_row[..5], &input_row[..]);
        assert!(!output_row[5].is_empty());
        let first = answer_of
            .entry(input_row.clone())
            .or_insert_with(|| output_row[5..].to_vec());
        assert_eq!(
            first,
            &output_row[5..].to_vec(),
            "a repeated row has its first's answer"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &stack
            .read_text(job.outputs.manifest.as_deref().expect("manifest"))
            .await,
    )
    .expect("manifest");
    assert_eq!(manifest["rows"]["deduplicated"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jsonl_and_parquet_outputs_carry_typed_new_columns() {
    let stack = Stack::start().await;
    let input = stack
        .upload_input("formats.csv", to_csv(&awkward_rows(30)))
        .await;
    let mut job_spec = spec("formats", &input, "description");
    job_spec.options.output_formats = vec!["csv".into(), "parquet".into(), "jsonl".into()];
    stack.submit(&job_spec).await;
    let job = stack.wait_for_end("formats", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    let jsonl = stack
        .read_text(job.outputs.enriched_jsonl.as_deref().expect("jsonl output"))
        .await;
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 30);
    let enriched = lines
        .iter()
        .find(|l| !l["seo_title"].is_null())
        .expect("an enriched row");
    assert!(
        enriched["tags"].is_array()
            && enriched["price_eur"].is_number()
            && enriched["in_stock"].is_boolean(),
        "{enriched}"
    );
    assert_eq!(lines[0]["sku"], "00000", "original cells stay text");
    let parquet = stack
        .store
        .local_path(job.outputs.enriched_parquet.as_deref().expect("parquet"))
        .expect("local");
    let connection = rowsmith_dataplane::table::connect(&Default::default()).expect("duckdb");
    let types: String = connection
        .query_row(
            &format!(
                "SELECT typeof(tags) || ',' || typeof(price_eur) || ',' || typeof(in_stock) || ',' || typeof(sku) FROM read_parquet('{}') WHERE seo_title IS NOT NULL LIMIT 1",
                parquet.display()
            ),
            [],
            |row| row.get(0),
        )
        .expect("types");
    assert_eq!(types, "VARCHAR[],DOUBLE,BOOLEAN,VARCHAR");
}
