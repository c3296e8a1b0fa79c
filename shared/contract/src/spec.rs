//! The JobSpec a user submits, its checks, and the `--field` grammar of the command line.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a user asks for: one structured-output request per row of `input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `[A-Za-z0-9_-]{1,64}`; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `file:///abs/path.csv`, or a key relative to the store root (`inputs/…`).
    pub input: String,
    /// What the model is to do with each row.
    pub instructions: String,
    /// Columns whose values the model works on; a row whose targets are all empty is skipped.
    pub target_columns: Vec<String>,
    /// Columns given as context; `null` means every non-target column, `[]` none.
    #[serde(default)]
    pub context_columns: Option<Vec<String>>,
    /// The new columns to produce.
    pub fields: Vec<FieldSpec>,
    /// `openai`, `anthropic`, `mistral`, `gemini`, `groq`, `bedrock`, `together` or `sim`
    /// (`providers::NAMES`).
    #[serde(default = "default_provider")]
    pub provider: String,
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default)]
    pub options: JobOptions,
    /// Where the last attempt's rows go instead (another provider or model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// The provider and model of a job's last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub provider: String,
    pub model: String,
}

fn default_provider() -> String {
    "sim".to_owned()
}

/// Empty: the provider's default model (`providers::default_model`), filled in by ingest and
/// the CLI.
fn default_model() -> String {
    String::new()
}

/// One new column and the type its values must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The allowed values of an `enum` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Boolean,
    Array,
    Enum,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Array => "array",
            FieldType::Enum => "enum",
        }
    }
}

/// Knobs of one job; every one has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct JobOptions {
    pub max_attempts: u32,
    pub max_requests_per_batch: u64,
    pub max_batch_bytes: u64,
    /// OpenAI only (0 to 2), sent as set. Unset: OpenAI chat models get 0 (repeatable
    /// answers), reasoning models none. Anthropic's current API takes none.
    pub temperature: Option<f64>,
    pub output_formats: Vec<String>,
    pub budget_usd: Option<f64>,
    /// Output tokens one answer may use (Anthropic `max_tokens`, default 1024; OpenAI
    /// `max_completion_tokens`, default the model's). A retry attempt doubles it, up to the
    /// deployment's `limits.max_output_tokens`, so a truncated answer gets room to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            max_requests_per_batch: 50_000,
            max_batch_bytes: 200_000_000,
            temperature: None,
            output_formats: vec!["csv".to_owned(), "parquet".to_owned()],
            budget_usd: None,
            max_output_tokens: None,
        }
    }
}

/// A spec that cannot run; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

const PROVIDERS: [&str; 8] = crate::providers::NAMES;
const OUTPUT_FORMATS: [&str; 3] = ["csv", "parquet", "jsonl"];

/// Whether `id` is a valid job id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A Bedrock job names a Claude model: the only request body rowsmith renders for Bedrock.
fn validate_bedrock_model(provider: &str, model: &str) -> Result<(), SpecError> {
    if provider != "bedrock" || crate::providers::is_bedrock_claude(model) {
        return Ok(());
    }
    Err(SpecError(format!(
        "model {model:?} is not a Claude model on Bedrock: rowsmith sends Bedrock Claude's \
         request body only; name a model id such as anthropic.claude-3-5-haiku-20241022-v1:0 \
         or an inference profile such as us.anthropic.claude-3-5-haiku-20241022-v1:0"
    )))
}

fn is_valid_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
        && !name.starts_with("_row")
}

/// The most attempts a job may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

/// The provider and model of a spec built with [`JobSpec::builder`] until told otherwise.
pub const DEFAULT_PROVIDER: &str = "sim";
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

impl JobSpec {
    /// A spec of `input` with `instructions` and nothing else yet: no id, columns or fields,
    /// the simulator as provider, default options. The one way code and tests build a spec.
    pub fn builder(input: impl Into<String>, instructions: impl Into<String>) -> JobSpec {
        JobSpec {
            job_id: None,
            input: input.into(),
            instructions: instructions.into(),
            target_columns: Vec::new(),
            context_columns: None,
            fields: Vec::new(),
            provider: DEFAULT_PROVIDER.into(),
            model: DEFAULT_MODEL.into(),
            options: JobOptions::default(),
            fallback: None,
        }
    }

    /// The provider's default model when the spec names none (an empty `model`).
    pub fn with_default_model(mut self) -> JobSpec {
        if self.model.trim().is_empty()
            && let Some(model) = crate::providers::default_model(&self.provider)
        {
            self.model = model.to_owned();
        }
        self
    }

    pub fn with_id(mut self, job_id: impl Into<String>) -> JobSpec {
        self.job_id = Some(job_id.into());
        self
    }

    pub fn with_targets<S: Into<String>>(
        mut self,
        columns: impl IntoIterator<Item = S>,
    ) -> JobSpec {
        self.target_columns = columns.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_context<S: Into<String>>(
        mut self,
        columns: impl IntoIterator<Item = S>,
    ) -> JobSpec {
        self.context_columns = Some(columns.into_iter().map(Into::into).collect());
        self
    }

    pub fn with_fields(mut self, fields: impl IntoIterator<Item = FieldSpec>) -> JobSpec {
        self.fields = fields.into_iter().collect();
        self
    }

    /// Fields in the `--field` grammar (`name:type[:description]`).
    pub fn with_field_texts<'a>(
        self,
        fields: impl IntoIterator<Item = &'a str>,
    ) -> Result<JobSpec, SpecError> {
        let fields = fields
            .into_iter()
            .map(parse_field)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.with_fields(fields))
    }

    pub fn with_provider(
        mut self,
        provider: impl Into<String>,
        model: impl Into<String>,
    ) -> JobSpec {
        self.provider = provider.into();
        self.model = model.into();
        self
    }

    pub fn with_options(mut self, options: JobOptions) -> JobSpec {
        self.options = options;
        self
    }

    /// The spec of attempt `attempt`: the fallback's provider and model on the last attempt.
    pub fn for_attempt(&self, attempt: u32) -> JobSpec {
        let mut spec = self.clone();
        if let Some(fallback) = &self.fallback
            && attempt >= self.options.max_attempts
            && attempt > 1
        {
            spec.provider = fallback.provider.clone();
            spec.model = fallback.model.clone();
        }
        spec
    }

    /// The output-token allowance of attempt `attempt` (1-based): the job's own on the first,
    /// doubled on each retry (truncated answers get room) up to `cap`. `None` leaves the
    /// provider's default (OpenAI: the model's maximum, which a retry cannot raise).
    pub fn output_tokens_for_attempt(&self, attempt: u32, cap: u32) -> Option<u32> {
        let base = match (self.options.max_output_tokens, self.provider.as_str()) {
            (Some(tokens), _) => tokens,
            (None, "anthropic" | "bedrock") => ANTHROPIC_MAX_TOKENS,
            (None, _) => return None,
        };
        let doubled = u64::from(base) << attempt.saturating_sub(1).min(16);
        Some(doubled.min(u64::from(cap.max(base))) as u32)
    }

    /// The job id, which `validate` guarantees is present and valid.
    pub fn id(&self) -> &str {
        self.job_id.as_deref().unwrap_or_default()
    }

    /// Checks the spec against the deployment's limits (`[limits]`).
    pub fn validate_limits(&self, limits: &LimitsSettings) -> Result<(), SpecError> {
        if self.instructions.len() > limits.max_instruction_bytes {
            return Err(SpecError(format!(
                "instructions are {} bytes, more than limits.max_instruction_bytes ({}); they \
                 go into every request: shorten them",
                self.instructions.len(),
                limits.max_instruction_bytes
            )));
        }
        if let Some(tokens) = self.options.max_output_tokens
            && tokens > limits.max_output_tokens
        {
            return Err(SpecError(format!(
                "options.max_output_tokens is {tokens}, more than limits.max_output_tokens ({}); \
                 ask for fewer",
                limits.max_output_tokens
            )));
        }
        if self.fields.len() > limits.max_fields {
            return Err(SpecError(format!(
                "{} fields, more than limits.max_fields ({}); split them over several jobs",
                self.fields.len(),
                limits.max_fields
            )));
        }
        Ok(())
    }

    /// Checks what can be checked without reading the table.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_basics()?;
        self.validate_provider()?;
        let mut seen = BTreeSet::new();
        for field in &self.fields {
            validate_field(field, &mut seen)?;
        }
        self.validate_options()
    }

    /// The id, and that input, instructions, targets and fields are there at all.
    fn validate_basics(&self) -> Result<(), SpecError> {
        let fail = |message: String| Err(SpecError(message));
        match &self.job_id {
            None => return fail("job_id is missing".into()),
            Some(id) if !is_valid_job_id(id) => {
                return fail(format!(
                    "job_id {id:?} is invalid: use 1 to 64 of A-Z a-z 0-9 _ -"
                ));
            }
            Some(_) => {}
        }
        if self.input.trim().is_empty() {
            return fail("input is empty: give a file:// URL or a store key".into());
        }
        if self.instructions.trim().is_empty() {
            return fail(
                "instructions are empty: say what the model should do with each row".into(),
            );
        }
        if self.target_columns.is_empty() {
            return fail("target_columns is empty: name at least one column to work on".into());
        }
        if self.fields.is_empty() {
            return fail("fields is empty: name at least one field to produce".into());
        }
        Ok(())
    }

    /// The provider and model, and the fallback's.
    fn validate_provider(&self) -> Result<(), SpecError> {
        let fail = |message: String| Err(SpecError(message));
        if !PROVIDERS.contains(&self.provider.as_str()) {
            return fail(format!(
                "provider {:?} is unknown; providers are: {}",
                self.provider,
                PROVIDERS.join(", ")
            ));
        }
        if self.model.trim().is_empty() {
            return fail("model is empty".into());
        }
        self.validate_temperature(&self.provider, &self.model)?;
        validate_bedrock_model(&self.provider, &self.model)?;
        if let Some(fallback) = &self.fallback {
            self.validate_temperature(&fallback.provider, &fallback.model)?;
            validate_bedrock_model(&fallback.provider, &fallback.model)?;
        }
        self.validate_structured_output_limits()?;
        if let Some(fallback) = &self.fallback {
            if !PROVIDERS.contains(&fallback.provider.as_str()) {
                return fail(format!(
                    "fallback provider {:?} is unknown; providers are: {}",
                    fallback.provider,
                    PROVIDERS.join(", ")
                ));
            }
            if fallback.model.trim().is_empty() {
                return fail("fallback model is empty".into());
            }
            if self.options.max_attempts < 2 {
                return fail("a fallback needs options.max_attempts of at least 2".into());
            }
        }
        Ok(())
    }

    /// `options.temperature` within what `provider` takes, and not set for a model that takes
    /// none.
    fn validate_temperature(&self, provider: &str, model: &str) -> Result<(), SpecError> {
        let Some(temperature) = self.options.temperature else {
            return Ok(());
        };
        let Some(range) = crate::providers::temperature_range(provider) else {
            return Err(SpecError(format!(
                "options.temperature is set, but {provider}'s API takes no temperature; leave \
                 it unset"
            )));
        };
        if !range.contains(&temperature) {
            return Err(SpecError(format!(
                "options.temperature is {temperature}; {provider} takes {} to {}",
                range.start(),
                range.end()
            )));
        }
        if !matches!(provider, "anthropic" | "bedrock")
            && crate::providers::is_reasoning_model(model)
        {
            return Err(SpecError(format!(
                "options.temperature is set, but {model} is a reasoning model and takes none; \
                 leave it unset"
            )));
        }
        Ok(())
    }

    /// The enum fields within OpenAI Structured Outputs' limits, for the providers that speak
    /// its format: 1,000 values in all, and no more than 15,000 characters of values in one
    /// enum of over 250 values.
    fn validate_structured_output_limits(&self) -> Result<(), SpecError> {
        use crate::providers::{
            OPENAI_LARGE_ENUM, OPENAI_LARGE_ENUM_CHARS, OPENAI_MAX_ENUM_VALUES,
        };
        let speaks_openai = |provider: &str| matches!(provider, "openai" | "sim");
        if !speaks_openai(&self.provider)
            && !self
                .fallback
                .as_ref()
                .is_some_and(|f| speaks_openai(&f.provider))
        {
            return Ok(());
        }
        let values = |field: &FieldSpec| field.values.as_deref().unwrap_or_default().to_vec();
        let total: usize = self.fields.iter().map(|f| values(f).len()).sum();
        if total > OPENAI_MAX_ENUM_VALUES {
            return Err(SpecError(format!(
                "the enum fields have {total} values in all; OpenAI structured output takes at \
                 most {OPENAI_MAX_ENUM_VALUES}: use fewer values, or a string field"
            )));
        }
        for field in &self.fields {
            let values = values(field);
            let chars: usize = values.iter().map(|v| v.chars().count()).sum();
            if values.len() > OPENAI_LARGE_ENUM && chars > OPENAI_LARGE_ENUM_CHARS {
                return Err(SpecError(format!(
                    "enum field {:?} has {} values of {chars} characters in all; OpenAI \
                     structured output takes at most {OPENAI_LARGE_ENUM_CHARS} characters in \
                     an enum of over {OPENAI_LARGE_ENUM} values: shorten or drop values",
                    field.name,
                    values.len()
                )));
            }
        }
        Ok(())
    }

    fn validate_options(&self) -> Result<(), SpecError> {
        let fail = |message: String| Err(SpecError(message));
        let options = &self.options;
        if !(1..=MAX_ATTEMPTS).contains(&options.max_attempts) {
            return fail(format!(
                "options.max_attempts is {}; it must be 1 to {MAX_ATTEMPTS} (every attempt \
                 re-sends the rows that failed, and each is paid for)",
                options.max_attempts
            ));
        }
        if options.max_requests_per_batch == 0 {
            return fail("options.max_requests_per_batch must be at least 1".into());
        }
        let bedrock = std::iter::once(self.provider.as_str())
            .chain(self.fallback.as_ref().map(|f| f.provider.as_str()))
            .any(|provider| provider == "bedrock");
        let least = 2 * crate::providers::BEDROCK_MIN_RECORDS;
        if bedrock && options.max_requests_per_batch < least {
            return fail(format!(
                "options.max_requests_per_batch is {}; with Bedrock it must be at least {least} \
                 (twice its minimum of {} records per job, so that a short last shard can be \
                 made up from the one before)",
                options.max_requests_per_batch,
                crate::providers::BEDROCK_MIN_RECORDS
            ));
        }
        if options.max_batch_bytes < 10_000 {
            return fail("options.max_batch_bytes must be at least 10000".into());
        }
        for format in &options.output_formats {
            if !OUTPUT_FORMATS.contains(&format.as_str()) {
                return fail(format!(
                    "output format {format:?} is unknown; formats are: {}",
                    OUTPUT_FORMATS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Checks the spec against the table's columns.
    pub fn validate_columns(&self, columns: &[String]) -> Result<(), SpecError> {
        let listing = || columns.join(", ");
        let check = |kind: &str, names: &[String]| -> Result<(), SpecError> {
            for name in names {
                if !columns.contains(name) {
                    return Err(SpecError(format!(
                        "{kind} column {name:?} not found; columns are: {}",
                        listing()
                    )));
                }
            }
            Ok(())
        };
        check("target", &self.target_columns)?;
        if let Some(context) = &self.context_columns {
            check("context", context)?;
        }
        for field in &self.fields {
            if columns.contains(&field.name) {
                return Err(SpecError(format!(
                    "field {:?} collides with a column of the table; rename the field",
                    field.name
                )));
            }
        }
        Ok(())
    }
}

/// One field: its name, once among `seen`, and values exactly when it is an enum.
fn validate_field<'a>(field: &'a FieldSpec, seen: &mut BTreeSet<&'a str>) -> Result<(), SpecError> {
    let fail = |message: String| Err(SpecError(message));
    if !is_valid_field_name(&field.name) {
        return fail(format!(
            "field name {:?} is invalid: start with a letter or _, then letters, digits \
         or _ (at most 64), and not _row…",
            field.name
        ));
    }
    if !seen.insert(field.name.as_str()) {
        return fail(format!("field {:?} is given twice", field.name));
    }
    match (field.field_type, &field.values) {
        (FieldType::Enum, None) => {
            return fail(format!(
                "enum field {:?} has no values: give them as enum(a|b|c)",
                field.name
            ));
        }
        (FieldType::Enum, Some(values)) if values.iter().all(|v| v.is_empty()) => {
            return fail(format!(
                "enum field {:?} has no values: give them as enum(a|b|c)",
                field.name
            ));
        }
        (other, Some(_)) if other != FieldType::Enum => {
            return fail(format!(
                "field {:?} has values but type {}: only enum fields take values",
                field.name,
                other.as_str()
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Parses the `--field` grammar: `NAME:TYPE[:DESCRIPTION]`, TYPE one of `string`, `number`,
/// `boolean`, `array`, `enum(a|b|c)`.
pub fn parse_field(text: &str) -> Result<FieldSpec, SpecError> {
    let (name, rest) = text.split_once(':').ok_or_else(|| {
        SpecError(format!(
            "field {text:?} has no type: write NAME:TYPE[:DESCRIPTION]"
        ))
    })?;
    let (type_text, description) = if let Some(after_enum) = rest.strip_prefix("enum(") {
        let close = after_enum.find(')').ok_or_else(|| {
            SpecError(format!("field {text:?}: enum( has no closing parenthesis"))
        })?;
        let tail = &after_enum[close + 1..];
        let description = match tail.strip_prefix(':') {
            Some(d) => Some(d),
            None if tail.is_empty() => None,
            None => {
                return Err(SpecError(format!(
                    "field {text:?}: expected ':' after enum(...)"
                )));
            }
        };
        (&rest[..close + 6], description)
    } else {
        match rest.split_once(':') {
            Some((t, d)) => (t, Some(d)),
            None => (rest, None),
        }
    };
    let (field_type, values) = match type_text {
        "string" => (FieldType::String, None),
        "number" => (FieldType::Number, None),
        "boolean" => (FieldType::Boolean, None),
        "array" => (FieldType::Array, None),
        t if t.starts_with("enum(") && t.ends_with(')') => {
            let values: Vec<String> = t[5..t.len() - 1]
                .split('|')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect();
            (FieldType::Enum, Some(values))
        }
        other => {
            return Err(SpecError(format!(
                "field {name:?} has unknown type {other:?}; types are: string, number, boolean, \
                 array, enum(a|b|c)"
            )));
        }
    };
    Ok(FieldSpec {
        name: name.trim().to_owned(),
        field_type,
        description: description
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        values,
    })
}

/// What a job may ask of the services; each limit is refused with its own message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Input file size, after decompression for `.gz`.
    pub max_input_bytes: u64,
    pub max_rows: u64,
    /// Bytes of one cell of a target or context column.
    pub max_cell_bytes: u64,
    pub max_columns: usize,
    pub max_fields: usize,
    pub max_instruction_bytes: usize,
    /// The most output tokens one answer may be allowed: a retry of truncated answers doubles
    /// the allowance up to this, and a job's `options.max_output_tokens` may not ask more.
    pub max_output_tokens: u32,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_input_bytes: 20 * 1024 * 1024 * 1024,
            max_rows: 10_000_000,
            max_cell_bytes: 1024 * 1024,
            max_columns: 2_000,
            max_fields: 100,
            max_instruction_bytes: 100 * 1024,
            max_output_tokens: 8192,
        }
    }
}

/// The answer allowance of an Anthropic request when the job sets none (its API requires one).
pub const ANTHROPIC_MAX_TOKENS: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec::builder("inputs/a.csv", "do it")
            .with_id("job-1")
            .with_targets(["description"])
            .with_field_texts(["title:string"])
            .expect("field")
            .with_provider("sim", "m")
    }

    #[test]
    fn field_grammar_covers_every_type() {
        let f = parse_field("category:enum(toys|tools|garden):best shelf").expect("enum");
        assert_eq!(f.field_type, FieldType::Enum);
        assert_eq!(
            f.values.as_deref(),
            Some(&["toys".into(), "tools".into(), "garden".into()][..])
        );
        assert_eq!(f.description.as_deref(), Some("best shelf"));
        let f = parse_field("seo_title:string:SEO title: short").expect("string");
        assert_eq!(
            (f.field_type, f.description.as_deref()),
            (FieldType::String, Some("SEO title: short"))
        );
        assert_eq!(
            parse_field("n:number").expect("n").field_type,
            FieldType::Number
        );
        assert_eq!(
            parse_field("b:boolean").expect("b").field_type,
            FieldType::Boolean
        );
        assert_eq!(
            parse_field("t:array:tags").expect("t").field_type,
            FieldType::Array
        );
        assert!(parse_field("x:text").unwrap_err().0.contains("types are"));
        assert!(parse_field("x").unwrap_err().0.contains("NAME:TYPE"));
    }

    #[test]
    fn missing_column_error_lists_the_columns() {
        let columns = vec!["id".to_owned(), "title".to_owned()];
        let error = spec().validate_columns(&columns).unwrap_err();
        assert_eq!(
            error.0,
            "target column \"description\" not found; columns are: id, title"
        );
    }

    #[test]
    fn attempts_are_bounded_because_each_is_paid_for() {
        let mut s = spec();
        s.options.max_attempts = MAX_ATTEMPTS;
        assert!(s.validate().is_ok());
        s.options.max_attempts = 1_000;
        let error = s.validate().unwrap_err().0;
        assert!(
            error.contains("max_attempts is 1000; it must be 1 to 10"),
            "{error}"
        );
        s.options.max_attempts = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn bad_specs_say_what_to_fix() {
        let mut s = spec();
        s.job_id = Some("../etc".into());
        assert!(s.validate().unwrap_err().0.contains("job_id"));
        let mut s = spec();
        s.fields = vec![FieldSpec {
            name: "c".into(),
            field_type: FieldType::Enum,
            description: None,
            values: None,
        }];
        assert!(s.validate().unwrap_err().0.contains("has no values"));
        let mut s = spec();
        s.provider = "acme".into();
        assert!(s.validate().unwrap_err().0.contains("providers are"));
        let mut s = spec();
        s.fields.push(parse_field("title:number").expect("f"));
        assert!(s.validate().unwrap_err().0.contains("given twice"));
        assert!(spec().validate().is_ok());
    }

    #[test]
    fn a_spec_without_a_model_gets_its_providers_default() {
        let json = r#"{"job_id":"j","input":"inputs/a.csv","instructions":"do it",
            "target_columns":["description"],"fields":[{"name":"t","type":"string"}],
            "provider":"anthropic"}"#;
        let parsed: JobSpec = serde_json::from_str(json).expect("spec");
        assert_eq!(parsed.model, "");
        let filled = parsed.with_default_model();
        assert_eq!(filled.model, "claude-3-5-haiku-latest");
        assert!(filled.validate().is_ok());
        let openai = spec().with_provider("openai", "").with_default_model();
        assert_eq!(openai.model, "gpt-4o-mini");
        // A model given is kept.
        assert_eq!(spec().with_default_model().model, "m");
    }

    #[test]
    fn temperature_is_checked_against_the_provider_and_the_model() {
        let with = |provider: &str, model: &str, t: f64| {
            let mut s = spec().with_provider(provider, model);
            s.options.temperature = Some(t);
            s.validate().map_err(|e| e.0)
        };
        let error = with("openai", "gpt-4o-mini", 2.5).unwrap_err();
        assert!(
            error.contains("options.temperature is 2.5; openai takes 0 to 2"),
            "{error}"
        );
        assert!(with("openai", "gpt-4o-mini", 1.5).is_ok());
        let error = with("anthropic", "claude-3-5-haiku-latest", 0.7).unwrap_err();
        assert!(
            error.contains("anthropic's API takes no temperature"),
            "{error}"
        );
        assert!(with("openai", "gpt-4o", f64::NAN).is_err());
        let error = with("openai", "o3-mini", 0.0).unwrap_err();
        assert!(error.contains("reasoning model"), "{error}");
        // Unset is fine everywhere.
        assert!(spec().with_provider("openai", "o3-mini").validate().is_ok());
    }

    #[test]
    fn enum_fields_beyond_structured_outputs_limits_are_refused_for_openai() {
        let enum_of = |name: &str, count: usize, width: usize| {
            let values: Vec<String> = (0..count).map(|i| format!("{i:0width$}")).collect();
            parse_field(&format!("{name}:enum({})", values.join("|"))).expect("field")
        };
        let mut s = spec().with_provider("openai", "gpt-4o-mini");
        s.fields = vec![enum_of("a", 600, 3), enum_of("b", 401, 3)];
        let error = s.validate().unwrap_err().0;
        assert!(error.contains("1001 values in all"), "{error}");
        s.fields = vec![enum_of("a", 600, 3), enum_of("b", 400, 3)];
        assert!(s.validate().is_ok(), "1,000 values are allowed");
        // 300 values of 60 characters: 18,000 characters in one enum of over 250 values.
        s.fields = vec![enum_of("long", 300, 60)];
        let error = s.validate().unwrap_err().0;
        assert!(error.contains("18000 characters"), "{error}");
        // Anthropic's tool schema is not held to OpenAI's limits.
        s.provider = "anthropic".into();
        s.model = "claude-3-5-haiku-latest".into();
        assert!(s.validate().is_ok());
    }
}
