//! `rowsmith`: the command line. Data goes to stdout, messages to stderr.
//!
//! Exit codes: 0 success; 1 the job ended but did not complete (failed or cancelled);
//! 2 the command could not do its work (bad arguments or input, NATS or store unreachable).

mod commands;
mod job_args;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rowsmith",
    version,
    about = "Enrich every row of a large table with an LLM through the providers' batch APIs",
    after_help = "Examples:\n  rowsmith up --sim\n  rowsmith enrich examples/products.csv \\\n      --instructions 'Write an SEO title and pick a category' --target description \\\n      --field 'seo_title:string:SEO title' --field 'category:enum(toys|tools|garden)' \\\n      --out enriched.csv\n  rowsmith estimate examples/products.csv --instructions @prompt.txt --target description \\\n      --field 'seo_title:string' --model gpt-4o-mini --budget-usd 5\n  rowsmith render examples/products.csv --instructions @prompt.txt --target description \\\n      --field 'tags:array' --out-dir /tmp/shards\n\nExit codes: 0 success, 1 the job failed or was cancelled, 2 error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service (and the simulator with --sim) in this process.
    Up(commands::up::Args),
    /// Submit a job and print its id.
    Submit(commands::submit::Args),
    /// Submit, watch until the job ends, and write the enriched table.
    Enrich(commands::enrich::Args),
    /// Show a job's progress until it ends or is suspended; exit 0 only when it completed.
    Watch(commands::watch::Args),
    /// Show a job's record.
    Status(commands::status::Args),
    /// List jobs.
    List(commands::list::Args),
    /// Write a job's outputs to a file or directory (partial for a cancelled or suspended job).
    Result(commands::result::Args),
    /// Write the request shards ingest would send, offline (no NATS needed).
    Render(commands::render::Args),
    /// Estimate rows, requests, shards, tokens and cost (batch vs. synchronous); nothing is
    /// submitted. Exit 1 when over --budget-usd.
    Estimate(commands::estimate::Args),
    /// Cancel a job: running batches are cancelled, finished rows kept.
    Cancel(commands::cancel::Args),
    /// Continue a suspended job after fixing the cause its error names; nothing already
    /// answered is sent again, batches still running are watched again.
    Resume(commands::resume::Args),
    /// Print a job's events (or every job's), oldest first; --follow to keep tailing.
    Events(commands::events::Args),
    /// Create or update the NATS streams and KV bucket (for services run with
    /// nats.ensure_topology = false).
    Setup(commands::setup::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up` sets up its own; every other command records spans (a job's trace starts at
    // `submit`) and logs warnings only.
    let _telemetry = match &cli.command {
        Command::Up(_) => None,
        _ => {
            let settings = rowsmith_config::Settings::from_env().unwrap_or_default();
            let log = rowsmith_config::LogSettings {
                level: "warn".into(),
                ..settings.log
            };
            Some(rowsmith_telemetry::init(
                &log,
                &settings.telemetry,
                "rowsmith",
            ))
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => commands::up::run(args).await,
            Command::Submit(args) => commands::submit::run(args).await,
            Command::Enrich(args) => commands::enrich::run(args).await,
            Command::Watch(args) => commands::watch::run(args).await,
            Command::Status(args) => commands::status::run(args).await,
            Command::List(args) => commands::list::run(args).await,
            Command::Result(args) => commands::result::run(args).await,
            Command::Render(args) => commands::render::run(args).await,
            Command::Estimate(args) => commands::estimate::run(args).await,
            Command::Cancel(args) => commands::cancel::run(args).await,
            Command::Resume(args) => commands::resume::run(args).await,
            Command::Events(args) => commands::events::run(args).await,
            Command::Setup(args) => commands::setup::run(args).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "rowsmith",
                    &mut std::io::stdout(),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
