//! `rowsmith-poller`: the poller service as its own process.

fn main() -> anyhow::Result<()> {
    rowsmith_runtime::service_main("rowsmith-poller", rowsmith_poller::run)
}
