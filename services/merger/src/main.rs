//! `rowsmith-merger`: the merger service as its own process.

fn main() -> anyhow::Result<()> {
    rowsmith_runtime::service_main("rowsmith-merger", rowsmith_merger::run)
}
