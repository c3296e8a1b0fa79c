//! `rowsmith estimate`: what a job would cost, from the same rendering ingest does; nothing
//! is submitted.

use std::process::ExitCode;

use rowsmith_dataplane::estimate::{Estimate, dollars};
use rowsmith_store::Store;

use crate::job_args::JobArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub job: JobArgs,
    /// Print the estimate as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::settings()?;
    let spec = args.job.to_spec()?;
    let scratch = tempfile::tempdir()?;
    // Rows the result cache can answer are free: look in the configured store.
    let cache = match settings.cache.enabled {
        true => match Store::open(&settings.store) {
            Ok(store) => Some(store),
            Err(error) => {
                eprintln!("warning: the result cache is not consulted: {error}");
                None
            }
        },
        false => None,
    };
    let (prepared, _) =
        super::render::render_offline(&settings, &spec, scratch.path(), cache.as_ref()).await?;
    let estimate = Estimate::new(
        &spec,
        &prepared.stats,
        &prepared.sample,
        settings.price(&spec.model),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&estimate)?);
    } else {
        print!("{}", estimate.table());
    }
    // A provider with a minimum per batch (Bedrock: 100 records) refuses a job whose only
    // shard is below it; ingest would too, before anything is sent.
    let min = rowsmith_contract::providers::batch_limits(&spec.provider)
        .map_or(1, |limits| limits.min_requests);
    if let [only] = prepared.sizes.as_slice()
        && only.requests < min
    {
        eprintln!(
            "too few requests: {} takes at least {min} per batch job and this one has {}; the \
             job would be refused: use another provider for so few rows",
            spec.provider, only.requests
        );
        return Ok(ExitCode::from(1));
    }
    if let Some(budget) = spec.options.budget_usd {
        match estimate.cost_batch_usd {
            Some(cost) if cost > budget => {
                eprintln!(
                    "over budget: {} at batch price is more than --budget-usd {}; the job would \
                     be refused",
                    dollars(cost),
                    dollars(budget)
                );
                return Ok(ExitCode::from(1));
            }
            Some(cost) => eprintln!("within budget: {} of {}", dollars(cost), dollars(budget)),
            None => {
                eprintln!(
                    "no price for model {:?}: add [prices.\"{}\"] to check a budget",
                    spec.model, spec.model
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
