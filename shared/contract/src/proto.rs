//! JSON Schemas of every message and record, generated from the Rust types, and an AsyncAPI
//! document of the subjects. `proto/` holds the committed copies; a test fails when they drift
//! (run with `ROWSMITH_UPDATE_PROTO=1` to rewrite them).

use serde_json::{Value, json};

use crate::events::Event;
use crate::messages::{BatchEnded, BatchSubmitted, JobSuspended, ResumeJob, ShardReady, subjects};
use crate::records::{JobRecord, QuotaRecord, ShardRecord};
use crate::spec::JobSpec;

/// `(file name, schema)` of every message and record.
pub fn schemas() -> Vec<(&'static str, Value)> {
    let schema = |s: schemars::Schema| s.to_value();
    vec![
        (
            "job-spec.schema.json",
            schema(schemars::schema_for!(JobSpec)),
        ),
        (
            "shard-ready.schema.json",
            schema(schemars::schema_for!(ShardReady)),
        ),
        (
            "batch-submitted.schema.json",
            schema(schemars::schema_for!(BatchSubmitted)),
        ),
        (
            "batch-ended.schema.json",
            schema(schemars::schema_for!(BatchEnded)),
        ),
        (
            "resume-job.schema.json",
            schema(schemars::schema_for!(ResumeJob)),
        ),
        (
            "job-suspended.schema.json",
            schema(schemars::schema_for!(JobSuspended)),
        ),
        ("event.schema.json", schema(schemars::schema_for!(Event))),
        (
            "job-record.schema.json",
            schema(schemars::schema_for!(JobRecord)),
        ),
        (
            "shard-record.schema.json",
            schema(schemars::schema_for!(ShardRecord)),
        ),
        (
            "quota-record.schema.json",
            schema(schemars::schema_for!(QuotaRecord)),
        ),
    ]
}

/// The AsyncAPI document: each subject, who publishes it and its payload schema.
pub fn asyncapi() -> Value {
    let channel = |subject: &str, schema: &str, description: &str| {
        json!({
            "address": subject,
            "description": description,
            "messages": {"message": {"payload": {"$ref": format!("./{schema}")}}},
        })
    };
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "rowsmith",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Subjects of rowsmith's services on NATS JetStream. Every publish \
                            carries Nats-Msg-Id; work subjects are on stream ROWSMITH_WORK \
                            (WorkQueue), events on ROWSMITH_EVENTS (Limits).",
        },
        "channels": {
            "jobsSubmit": channel(subjects::JOBS_SUBMIT, "job-spec.schema.json",
                "a user submits a job (Nats-Msg-Id = job_id); consumed by ingest"),
            "shardsReady": channel(subjects::SHARDS_READY, "shard-ready.schema.json",
                "ingest or merger (retries) has a request shard ready; consumed by submitter"),
            "batchesSubmitted": channel(subjects::BATCHES_SUBMITTED, "batch-submitted.schema.json",
                "the submitter created a provider batch; consumed by the poller"),
            "batchesEnded": channel(subjects::BATCHES_ENDED, "batch-ended.schema.json",
                "a batch ended and its files are stored; consumed by the merger"),
            "jobsResume": channel(subjects::JOBS_RESUME, "resume-job.schema.json",
                "a user continues a suspended job; consumed by the merger"),
            "jobsSuspended": channel(subjects::JOBS_SUSPENDED, "job-suspended.schema.json",
                "a service suspended a job; the merger writes its partial outputs"),
            "events": channel("rowsmith.events.{job_id}.{kind}", "event.schema.json",
                "what happened to a job; for people, watch and progress bars"),
        },
    })
}

/// Every generated file: the schemas and `asyncapi.json`.
pub fn files() -> Vec<(&'static str, String)> {
    let pretty = |value: &Value| serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    let mut files: Vec<(&'static str, String)> = schemas()
        .iter()
        .map(|(name, schema)| (*name, pretty(schema)))
        .collect();
    files.push(("asyncapi.json", pretty(&asyncapi())));
    files
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn asyncapi_yaml_lists_every_subject_and_its_schemas_exist() {
        use crate::messages::subjects;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let text = std::fs::read_to_string(dir.join("asyncapi.yaml")).expect("asyncapi.yaml");
        for subject in [
            subjects::JOBS_SUBMIT,
            subjects::SHARDS_READY,
            subjects::BATCHES_SUBMITTED,
            subjects::BATCHES_ENDED,
            subjects::JOBS_RESUME,
            subjects::JOBS_SUSPENDED,
        ] {
            assert!(
                text.contains(&format!("address: {subject}\n")),
                "{subject} is not a channel address in proto/asyncapi.yaml"
            );
        }
        let events = format!("address: {}.{{job_id}}.{{kind}}", subjects::EVENTS_PREFIX);
        assert!(text.contains(&events), "no {events}");
        for kind in crate::events::EventKind::ALL {
            assert!(
                text.contains(kind.as_str()),
                "event kind {} missing",
                kind.as_str()
            );
        }
        let mut referenced = 0;
        for part in text.split("$ref: './").skip(1) {
            let file = part.split('\'').next().expect("file name");
            if file.ends_with(".json") {
                referenced += 1;
                assert!(
                    dir.join(file).exists(),
                    "proto/{file} is referenced but missing"
                );
            }
        }
        assert!(referenced >= 5, "only {referenced} schema references");
    }

    #[test]
    fn committed_proto_files_match_the_types() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let update = std::env::var_os("ROWSMITH_UPDATE_PROTO").is_some();
        let mut stale = Vec::new();
        for (name, text) in files() {
            let path = dir.join(name);
            if update {
                std::fs::write(&path, &text).expect("write proto file");
                continue;
            }
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "proto/ is out of date for {stale:?}; run ROWSMITH_UPDATE_PROTO=1 cargo test -p rowsmith-contract proto"
        );
    }
}
