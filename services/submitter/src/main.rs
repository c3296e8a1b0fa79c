//! `rowsmith-submitter`: the submitter service as its own process.

fn main() -> anyhow::Result<()> {
    rowsmith_runtime::service_main("rowsmith-submitter", rowsmith_submitter::run)
}
