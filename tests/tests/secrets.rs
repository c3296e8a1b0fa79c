//! A whole job at trace log level with a recognisable fake API key: the key appears in no
//! log line, event, KV record or stored file. Its own test binary, so that it can install the
//! process-wide log subscriber that captures every service's logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rowsmith_contract::records::JobState;
use rowsmith_contract::spec::JobSpec;
use rowsmith_tests::Stack;
use secrecy::SecretString;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_key_is_in_no_log_event_record_or_file() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .init();
    // Built at run time so that nothing key-shaped is committed.
    let key = format!("rowsmith-fake-key-{}", nuid::next());
    let key_for_settings = key.clone();
    let stack = Stack::start_with(move |settings| {
        settings.provider.openai.api_key = Some(SecretString::from(key_for_settings));
    })
    .await;
    let mut csv = String::from("sku,description\n");
    for i in 0..20 {
        csv.push_str(&format!("{i},item {i}\n"));
    }
    let input = stack.upload_input("secret.csv", csv.into_bytes()).await;
    let spec = JobSpec::builder(input, "Write a title.")
        .with_id("secret")
        .with_targets(["description"])
        .with_field_texts(["title:string"])
        .expect("field")
        .with_provider("openai", "gpt-4o-mini");
    stack.submit(&spec).await;
    let job = stack.wait_for_end("secret", Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);

    let logs = String::from_utf8_lossy(&captured.0.lock().expect("logs")).into_owned();
    assert!(logs.contains("batch submitted"), "trace logs were captured");
    assert!(!logs.contains(&key), "the key is in the logs");

    let events = stack
        .events_until("secret", rowsmith_contract::events::EventKind::Completed)
        .await;
    for event in &events {
        assert!(
            !serde_json::to_string(event).expect("json").contains(&key),
            "the key is in an event"
        );
    }
    let mut keys = stack.bus.kv.keys().await.expect("keys");
    while let Some(name) = keys.next().await {
        let name = name.expect("key");
        let value = stack
            .bus
            .kv
            .get(&name)
            .await
            .expect("get")
            .unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&value).contains(&key),
            "the key is in KV record {name}"
        );
    }
    let mut files = 0;
    for entry in walk(stack.store_dir.path()) {
        files += 1;
        let bytes = std::fs::read(&entry).expect("read");
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&key),
            "the key is in {}",
            entry.display()
        );
    }
    assert!(files > 5, "the store was searched ({files} files)");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
