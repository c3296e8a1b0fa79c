//! Printing jobs for people and for scripts.

use rowsmith_contract::records::JobRecord;

pub fn state_name(job: &JobRecord) -> String {
    serde_json::to_value(job.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A few lines a person reads.
pub fn summary(job: &JobRecord) -> String {
    let c = &job.counts;
    let mut text = format!(
        "job {}: {}\n  rows {} (skipped {}), succeeded {}, failed {}, pending {}\n  shards {}/{} ended, attempt {}",
        job.spec.id(),
        state_name(job),
        c.rows_total,
        c.rows_skipped,
        c.succeeded,
        c.failed,
        c.pending,
        c.shards_ended,
        c.shards_total,
        job.attempt
    );
    if let Some(error) = &job.error {
        text.push_str(&format!("\n  error: {error}"));
    }
    if let Some(csv) = &job.outputs.enriched_csv {
        text.push_str(&format!("\n  enriched: {csv}"));
    }
    if job.state == rowsmith_contract::records::JobState::Suspended {
        text.push_str(&format!(
            "\n  suspended: nothing new is sent; batches already out are still collected and \
             every answer is kept; partial outputs: `rowsmith result {0} --out DIR`\n  \
             fix the cause above, then `rowsmith resume {0}` (or `rowsmith cancel {0}`)",
            job.spec.id()
        ));
    }
    text
}
