//! `rowsmith-ingest`: the ingest service as its own process.

fn main() -> anyhow::Result<()> {
    rowsmith_runtime::service_main("rowsmith-ingest", rowsmith_ingest::run)
}
