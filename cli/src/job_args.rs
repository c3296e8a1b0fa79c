//! The flags that describe a job (submit, enrich, render) and how they become a JobSpec.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use rowsmith_contract::spec::{JobSpec, parse_field};
use rowsmith_store::{Store, layout};

#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// The table: a local path (uploaded to the store), file:///abs/path, or a store key.
    pub input: String,
    /// What to do with each row; @FILE reads it from a file.
    #[arg(long)]
    pub instructions: Option<String>,
    /// Column(s) the model works on (repeat or list).
    #[arg(long = "target", num_args = 1..)]
    pub targets: Vec<String>,
    /// A new column: NAME:TYPE[:DESCRIPTION], TYPE one of string, number, boolean, array,
    /// enum(a|b|c).
    #[arg(long = "field")]
    pub fields: Vec<String>,
    /// openai, anthropic, mistral, gemini, groq, bedrock, together or sim.
    #[arg(long)]
    pub provider: Option<String>,
    /// The model (default: the provider's, gpt-4o-mini for openai and sim,
    /// claude-3-5-haiku-latest for anthropic, mistral-small-latest for mistral,
    /// gemini-2.5-flash for gemini, openai/gpt-oss-20b for groq,
    /// anthropic.claude-3-5-haiku-20241022-v1:0 for bedrock,
    /// meta-llama/Llama-3.3-70B-Instruct-Turbo for together).
    #[arg(long)]
    pub model: Option<String>,
    /// Sampling temperature, openai 0 to 2 (anthropic's API takes none). Unset: 0 on OpenAI
    /// chat models, none on reasoning models.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Columns given as context (default: every non-target column).
    #[arg(long = "context", num_args = 1..)]
    pub context: Option<Vec<String>>,
    /// Give no context columns at all.
    #[arg(long, conflicts_with = "context")]
    pub no_context: bool,
    /// The job's id ([A-Za-z0-9_-]{1,64}); generated when absent.
    #[arg(long)]
    pub job_id: Option<String>,
    /// A JobSpec JSON file; flags given as well override its values.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Requests per batch, at most the provider's own limit.
    #[arg(long)]
    pub max_requests_per_batch: Option<u64>,
    /// Refuse the job, before any batch is sent, when its estimated cost at batch price is
    /// over this many US dollars (see `rowsmith estimate`).
    #[arg(long)]
    pub budget_usd: Option<f64>,
}

impl JobArgs {
    /// The JobSpec these flags describe, checked; the input is not touched.
    pub fn to_spec(&self) -> anyhow::Result<JobSpec> {
        let mut spec = match &self.spec {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read spec file {}", path.display()))?;
                serde_json::from_str::<JobSpec>(&text).with_context(|| {
                    format!("spec file {} is not a valid JobSpec", path.display())
                })?
            }
            None => JobSpec::builder("", ""),
        };
        spec.input = self.input.clone();
        if let Some(instructions) = &self.instructions {
            spec.instructions = match instructions.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read instructions file {file}"))?,
                None => instructions.clone(),
            };
        }
        if !self.targets.is_empty() {
            spec.target_columns = self.targets.clone();
        }
        if !self.fields.is_empty() {
            spec.fields = self
                .fields
                .iter()
                .map(|f| parse_field(f))
                .collect::<Result<_, _>>()?;
        }
        if let Some(provider) = &self.provider {
            spec.provider = provider.clone();
        }
        match &self.model {
            Some(model) => spec.model = model.clone(),
            // Another provider without a model: that provider's default, not the spec's.
            None if self.provider.is_some() => spec.model.clear(),
            None => {}
        }
        let mut spec = spec.with_default_model();
        if let Some(temperature) = self.temperature {
            spec.options.temperature = Some(temperature);
        }
        if self.no_context {
            spec.context_columns = Some(Vec::new());
        } else if let Some(context) = &self.context {
            spec.context_columns = Some(context.clone());
        }
        if let Some(budget) = self.budget_usd {
            spec.options.budget_usd = Some(budget);
        }
        if let Some(max) = self.max_requests_per_batch {
            spec.options.max_requests_per_batch = max;
        }
        if let Some(job_id) = &self.job_id {
            spec.job_id = Some(job_id.clone());
        }
        if spec.job_id.is_none() {
            spec.job_id = Some(format!("job-{}", nuid::next().to_string().to_lowercase()));
        }
        if spec.instructions.trim().is_empty() {
            bail!("--instructions is missing: say what the model should do with each row");
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// Where a job's input is to be found in the store, and the local file to upload there first
/// (none for `file://` URLs and store keys, which pass through).
#[derive(Debug)]
pub struct StagedInput {
    pub key: String,
    local: Option<PathBuf>,
}

impl StagedInput {
    /// Streams the local file to its key (multipart, never whole in memory), unless an object
    /// of the same content is there already.
    pub async fn upload(&self, store: &Store) -> anyhow::Result<()> {
        let Some(path) = &self.local else {
            return Ok(());
        };
        if store.exists(&self.key).await? {
            return Ok(());
        }
        store
            .upload(&self.key, path)
            .await
            .with_context(|| format!("cannot upload {}", path.display()))
    }
}

/// Plans staging a local input under `inputs/<job_id>/<content hash>/<name>`; nothing is
/// uploaded yet (see [`StagedInput::upload`]).
pub async fn stage_input(store: &Store, job_id: &str, input: &str) -> anyhow::Result<StagedInput> {
    if input.contains("://") {
        return Ok(StagedInput {
            key: input.to_owned(),
            local: None,
        });
    }
    let path = Path::new(input);
    if !path.is_file() {
        if store.exists(input).await.unwrap_or(false) {
            return Ok(StagedInput {
                key: input.to_owned(),
                local: None,
            });
        }
        bail!(
            "input {input:?} is neither a file here nor a key in the store {}",
            store.url()
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input.csv".into());
    let hash = content_hash(path.to_owned())
        .await
        .with_context(|| format!("cannot read {input}"))?;
    Ok(StagedInput {
        key: layout::upload(job_id, &hash, &name),
        local: Some(path.to_owned()),
    })
}

/// The first 16 hex digits of the file's SHA-256, read in a stream.
async fn content_hash(path: PathBuf) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(&path)?;
        std::io::copy(&mut file, &mut hasher)?;
        let digest = hasher.finalize();
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    })
    .await
    .map_err(std::io::Error::other)?
}
