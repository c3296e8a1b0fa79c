//! Rendering one structured-output request line per row, and cutting the lines into shards
//! within the batch limits.
//!
//! The static parts of a request (model, system message, instructions, field descriptions,
//! the JSON schema) are serialized once per job; per row only the row's own text is escaped
//! and spliced in. Static text comes first in the user message so that the provider's prompt
//! cache can serve it.

use serde_json::{Map, Value, json};

use rowsmith_contract::providers::is_reasoning_model;
use rowsmith_contract::spec::{FieldSpec, FieldType, JobSpec};

pub const SYSTEM_MESSAGE: &str = "You are an AI assistant enhancing CSV data. Follow the user's \
instructions carefully to enhance multiple columns from a single row.";

/// Name of the structured output (the `json_schema.name` of a request).
pub const SCHEMA_NAME: &str = "row_enrichment";

/// The JSON schema the model's answer must follow: an object with every field required and no
/// other property (OpenAI strict mode).
pub fn field_schema(fields: &[FieldSpec]) -> Value {
    let mut properties = Map::new();
    for field in fields {
        let mut property = match field.field_type {
            FieldType::String => json!({"type": "string"}),
            FieldType::Number => json!({"type": "number"}),
            FieldType::Boolean => json!({"type": "boolean"}),
            FieldType::Array => json!({"type": "array", "items": {"type": "string"}}),
            FieldType::Enum => {
                json!({"type": "string", "enum": field.values.clone().unwrap_or_default()})
            }
        };
        if let (Some(description), Some(object)) = (&field.description, property.as_object_mut()) {
            object.insert("description".into(), Value::String(description.clone()));
        }
        properties.insert(field.name.clone(), property);
    }
    let required: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn field_descriptions(fields: &[FieldSpec]) -> String {
    let mut text = String::from("You need to generate the following fields:\n");
    for field in fields {
        let description = field.description.as_deref().unwrap_or("");
        match (&field.field_type, &field.values) {
            (FieldType::Enum, Some(values)) => text.push_str(&format!(
                "- {} (one of: {}): {description}\n",
                field.name,
                values.join(", ")
            )),
            (field_type, _) => text.push_str(&format!(
                "- {} ({}): {description}\n",
                field.name,
                field_type.as_str()
            )),
        }
    }
    text
}

/// Everything of an OpenAI batch line between the custom id and the user message's text.
fn openai_middle(spec: &JobSpec, static_open: &str) -> String {
    // Together's chat completions take the allowance as `max_tokens` (its SDK declares no
    // `max_completion_tokens`).
    let tokens_key = match spec.provider.as_str() {
        "together" => "max_tokens",
        _ => "max_completion_tokens",
    };
    let body_open = chat_body_open(spec, tokens_key);
    let system = serde_json::to_string(SYSTEM_MESSAGE).unwrap_or_default();
    format!(
        "\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{body_open},\
         \"messages\":[{{\"role\":\"system\",\"content\":{system}}},\
         {{\"role\":\"user\",\"content\":{static_open}"
    )
}

/// The same for a Mistral batch line: `{custom_id, body}` (no method or url; the endpoint is
/// the job's), the body a Mistral chat completion (`max_tokens`, `response_format`
/// json_schema).
fn mistral_middle(spec: &JobSpec, static_open: &str) -> String {
    let body_open = chat_body_open(spec, "max_tokens");
    let system = serde_json::to_string(SYSTEM_MESSAGE).unwrap_or_default();
    format!(
        "\",\"body\":{body_open},\
         \"messages\":[{{\"role\":\"system\",\"content\":{system}}},\
         {{\"role\":\"user\",\"content\":{static_open}"
    )
}

/// A chat completion body without its closing brace and without `messages`, which goes last
/// so that the row's text can be spliced at the end of the line; `tokens_key` names the
/// output allowance.
fn chat_body_open(spec: &JobSpec, tokens_key: &str) -> String {
    let mut body = Map::new();
    body.insert("model".into(), Value::String(spec.model.clone()));
    // Unset: 0 for repeatable answers, except on reasoning models, which take none.
    let temperature = match spec.options.temperature {
        Some(temperature) => Some(temperature),
        None if is_reasoning_model(&spec.model) => None,
        None => Some(0.0),
    };
    if let Some(temperature) = temperature {
        body.insert("temperature".into(), json!(temperature));
    }
    if let Some(tokens) = spec.options.max_output_tokens {
        body.insert(tokens_key.into(), json!(tokens));
    }
    body.insert(
        "response_format".into(),
        json!({
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": true, "schema": field_schema(&spec.fields)},
        }),
    );
    let body_fields = serde_json::to_string(&Value::Object(body)).unwrap_or_default();
    body_fields[..body_fields.len() - 1].to_owned()
}

/// The fields' schema in Gemini's `responseSchema` dialect (the OpenAPI 3.0 subset: upper-case
/// types, `propertyOrdering` so the answer keeps the `--field` order). Gemini batches take it
/// where `responseJsonSchema` is reported to give malformed answers.
pub fn gemini_schema(fields: &[FieldSpec]) -> Value {
    let mut properties = Map::new();
    for field in fields {
        let mut property = match field.field_type {
            FieldType::String => json!({"type": "STRING"}),
            FieldType::Number => json!({"type": "NUMBER"}),
            FieldType::Boolean => json!({"type": "BOOLEAN"}),
            FieldType::Array => json!({"type": "ARRAY", "items": {"type": "STRING"}}),
            FieldType::Enum => json!({
                "type": "STRING",
                "format": "enum",
                "enum": field.values.clone().unwrap_or_default(),
            }),
        };
        if let (Some(description), Some(object)) = (&field.description, property.as_object_mut()) {
            object.insert("description".into(), Value::String(description.clone()));
        }
        properties.insert(field.name.clone(), property);
    }
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    json!({
        "type": "OBJECT",
        "properties": properties,
        "required": names,
        "propertyOrdering": names,
    })
}

/// Everything of a Gemini batch line (`{key, request}`, a GenerateContentRequest without the
/// model, which the job names) between the key and the user part's text: the system
/// instruction, then `generationConfig` with the JSON answer's schema, then `contents` last.
fn gemini_middle(spec: &JobSpec, static_open: &str) -> String {
    let mut config = Map::new();
    config.insert("responseMimeType".into(), json!("application/json"));
    config.insert("responseSchema".into(), gemini_schema(&spec.fields));
    config.insert(
        "temperature".into(),
        json!(spec.options.temperature.unwrap_or(0.0)),
    );
    if let Some(tokens) = spec.options.max_output_tokens {
        config.insert("maxOutputTokens".into(), json!(tokens));
    }
    let request = json!({
        "systemInstruction": {"parts": [{"text": SYSTEM_MESSAGE}]},
        "generationConfig": Value::Object(config),
    });
    let request_fields = serde_json::to_string(&request).unwrap_or_default();
    let request_open = &request_fields[..request_fields.len() - 1];
    format!(
        "\",\"request\":{request_open},\"contents\":[{{\"role\":\"user\",\"parts\":[{{\"text\":{static_open}"
    )
}

pub use rowsmith_contract::spec::ANTHROPIC_MAX_TOKENS;

/// Everything of an Anthropic Message Batches request between the custom id and the user
/// message's text: structured output by a forced tool whose input schema is the fields'.
fn anthropic_middle(spec: &JobSpec, static_open: &str) -> String {
    let mut params = Map::new();
    params.insert("model".into(), Value::String(spec.model.clone()));
    claude_params(spec, &mut params);
    let params_fields = serde_json::to_string(&Value::Object(params)).unwrap_or_default();
    let params_open = &params_fields[..params_fields.len() - 1];
    format!(
        "\",\"params\":{params_open},\"messages\":[{{\"role\":\"user\",\"content\":{static_open}"
    )
}

/// Everything of a Bedrock batch record (`{recordId, modelInput}`, Claude's InvokeModel body,
/// which names no model: the job does) between the record id and the user message's text:
/// the same forced tool as Anthropic's, under Bedrock's `anthropic_version`.
fn bedrock_middle(spec: &JobSpec, static_open: &str) -> String {
    let mut input = Map::new();
    input.insert(
        "anthropic_version".into(),
        json!(rowsmith_contract::providers::BEDROCK_ANTHROPIC_VERSION),
    );
    claude_params(spec, &mut input);
    if let Some(temperature) = spec.options.temperature {
        input.insert("temperature".into(), json!(temperature));
    }
    let input_fields = serde_json::to_string(&Value::Object(input)).unwrap_or_default();
    let input_open = &input_fields[..input_fields.len() - 1];
    format!(
        "\",\"modelInput\":{input_open},\"messages\":[{{\"role\":\"user\",\"content\":{static_open}"
    )
}

/// The parameters of a Claude Messages request other than the model and the messages:
/// `max_tokens`, the system prompt and the forced tool.
fn claude_params(spec: &JobSpec, params: &mut Map<String, Value>) {
    let max_tokens = spec
        .options
        .max_output_tokens
        .unwrap_or(ANTHROPIC_MAX_TOKENS);
    params.insert("max_tokens".into(), json!(max_tokens));
    // No `temperature`: the current Messages API declares none (a spec that sets one is
    // refused at submit).
    params.insert("system".into(), Value::String(SYSTEM_MESSAGE.into()));
    params.insert(
        "tools".into(),
        json!([{
            "name": SCHEMA_NAME,
            "description": "Record the fields generated for this row.",
            "input_schema": field_schema(&spec.fields),
        }]),
    );
    params.insert(
        "tool_choice".into(),
        json!({"type": "tool", "name": SCHEMA_NAME}),
    );
}

/// How most providers' lines open: the custom id, whose row index follows.
const CUSTOM_ID_HEAD: &[u8] = b"{\"custom_id\":\"r";

/// A job's request line with the row's parts left open; built once per job.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// `{"custom_id":"r` (Gemini: `{"key":"r`) — the row index follows.
    head: Vec<u8>,
    /// From the end of the custom id to the opening quote and static text of the user message.
    middle: Vec<u8>,
    /// After the user message's closing quote to the end of the line (with `\n`).
    tail: Vec<u8>,
    /// Positions (in the table's columns) of the target columns, with their names.
    targets: Vec<(usize, String)>,
    /// Positions of the context columns, with their names.
    context: Vec<(usize, String)>,
}

impl RequestTemplate {
    /// `columns` are the table's columns in order (without `_row_index`).
    pub fn new(spec: &JobSpec, columns: &[String]) -> Self {
        let position = |name: &String| columns.iter().position(|c| c == name);
        let targets = spec
            .target_columns
            .iter()
            .filter_map(|name| position(name).map(|i| (i, name.clone())))
            .collect();
        let context = match &spec.context_columns {
            Some(names) => names
                .iter()
                .filter_map(|n| position(n).map(|i| (i, n.clone())))
                .collect(),
            None => columns
                .iter()
                .enumerate()
                .filter(|(_, c)| !spec.target_columns.contains(c))
                .map(|(i, c)| (i, c.clone()))
                .collect(),
        };
        let static_text = format!(
            "Instructions: {}\n\n{}\nRow data to enhance:\n",
            spec.instructions,
            field_descriptions(&spec.fields)
        );
        let static_json = serde_json::to_string(&static_text).unwrap_or_default();
        let static_open = &static_json[..static_json.len() - 1];
        let (head, middle, tail): (&[u8], String, &[u8]) = match spec.provider.as_str() {
            "anthropic" => (
                CUSTOM_ID_HEAD,
                anthropic_middle(spec, static_open),
                b"}]}}\n",
            ),
            "mistral" => (CUSTOM_ID_HEAD, mistral_middle(spec, static_open), b"}]}}\n"),
            "bedrock" => (
                b"{\"recordId\":\"r",
                bedrock_middle(spec, static_open),
                b"}]}}\n",
            ),
            // The text part, the parts, the content, the contents, the request, the line.
            "gemini" => (
                b"{\"key\":\"r",
                gemini_middle(spec, static_open),
                b"}]}]}}\n",
            ),
            _ => (CUSTOM_ID_HEAD, openai_middle(spec, static_open), b"}]}}\n"),
        };
        Self {
            head: head.to_vec(),
            middle: middle.into_bytes(),
            tail: tail.to_vec(),
            targets,
            context,
        }
    }

    /// Identifies everything of a request but the row's text (provider, model, parameters,
    /// system message, instructions, schema, column names): rows of two jobs with the same
    /// fingerprint and the same body hash make the same request.
    pub fn fingerprint(&self, provider: &str) -> String {
        let mut bytes = provider.as_bytes().to_vec();
        bytes.push(0);
        bytes.extend_from_slice(&self.middle);
        bytes.push(0);
        bytes.extend_from_slice(&self.tail);
        for (_, name) in self.targets.iter().chain(&self.context) {
            bytes.push(0);
            bytes.extend_from_slice(name.as_bytes());
        }
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
    }

    /// Checks the cells a request is made of: none larger than `max_cell_bytes`, none with
    /// a NUL byte (a sign of a binary or mis-encoded file).
    pub fn check_cells<'a>(
        &self,
        cell: &impl Fn(usize) -> Option<&'a str>,
        max_cell_bytes: u64,
    ) -> Result<(), String> {
        for (i, name) in self.targets.iter().chain(&self.context) {
            let Some(value) = cell(*i) else { continue };
            if value.len() as u64 > max_cell_bytes {
                return Err(format!(
                    "column {name:?} holds {} bytes, more than limits.max_cell_bytes \
                     ({max_cell_bytes}); shorten it or leave the column out of the request",
                    value.len()
                ));
            }
            if memchr::memchr(0, value.as_bytes()).is_some() {
                return Err(format!(
                    "column {name:?} contains a NUL byte: the file is binary or mis-encoded; \
                     remove NULs (e.g. `tr -d '\\000'`) or export the table again"
                ));
            }
        }
        Ok(())
    }

    /// Appends the request line of one row to `out` and returns a hash of its body (equal
    /// bodies, equal hashes: the row's text is all that differs within a job); `None`, with
    /// nothing appended, when every target cell is empty. `cell(i)` gives column `i`'s value.
    pub fn render<'a>(
        &self,
        row_index: i64,
        cell: impl Fn(usize) -> Option<&'a str>,
        scratch: &mut String,
        escaped: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Option<u128> {
        if self
            .targets
            .iter()
            .all(|(i, _)| cell(*i).is_none_or(str::is_empty))
        {
            return None;
        }
        scratch.clear();
        for (i, name) in &self.targets {
            scratch.push_str(name);
            scratch.push_str(": ");
            scratch.push_str(cell(*i).unwrap_or(""));
            scratch.push('\n');
        }
        scratch.push_str("\nRow context: ");
        let mut first = true;
        for (i, name) in &self.context {
            let Some(value) = cell(*i) else { continue };
            if !first {
                scratch.push_str(", ");
            }
            first = false;
            scratch.push_str(name);
            scratch.push_str(": ");
            scratch.push_str(value);
        }
        // No row index in the text: identical rows make identical requests, sent once; the
        // custom id carries the row.
        scratch.push('\n');
        escaped.clear();
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *escaped, scratch.as_str());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(row_index.to_string().as_bytes());
        out.extend_from_slice(&self.middle);
        out.extend_from_slice(&escaped[1..]);
        out.extend_from_slice(&self.tail);
        Some(xxhash_rust::xxh3::xxh3_128(escaped))
    }
}

/// The row index of a custom id (`r<row_index>`).
pub fn row_index_of(custom_id: &str) -> Option<i64> {
    let digits = custom_id.strip_prefix('r')?;
    // Exactly what `r{row_index}` writes: no sign, no leading zero.
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec::builder("in.csv", "Write a \"title\".")
            .with_id("j")
            .with_targets(["description"])
            .with_field_texts([
                "title:string:short",
                "category:enum(toys|tools)",
                "tags:array",
            ])
            .expect("f")
    }

    #[test]
    fn a_rendered_line_is_a_valid_openai_batch_request() {
        let columns = vec![
            "sku".to_owned(),
            "description".to_owned(),
            "brand".to_owned(),
        ];
        let template = RequestTemplate::new(&spec(), &columns);
        let cells = [Some("00501"), Some("A \"red\" ball,\nround ✓"), None];
        let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
        let hash = template.render(7, |i| cells[i], &mut scratch, &mut escaped, &mut out);
        assert!(hash.is_some());
        assert_eq!(out.last(), Some(&b'\n'));
        let line: Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(line["custom_id"], "r7");
        assert_eq!(line["url"], "/v1/chat/completions");
        assert_eq!(line["body"]["model"], "gpt-4o-mini");
        let schema = &line["body"]["response_format"]["json_schema"];
        assert_eq!(schema["strict"], true);
        assert_eq!(schema["schema"]["additionalProperties"], false);
        assert_eq!(
            schema["schema"]["required"],
            json!(["title", "category", "tags"])
        );
        assert_eq!(
            schema["schema"]["properties"]["category"]["enum"],
            json!(["toys", "tools"])
        );
        let user = line["body"]["messages"][1]["content"]
            .as_str()
            .expect("user message");
        assert!(
            user.starts_with("Instructions: Write a \"title\"."),
            "{user}"
        );
        assert!(user.contains("- category (one of: toys, tools)"));
        assert!(user.contains("description: A \"red\" ball,\nround ✓\n"));
        assert!(user.ends_with("Row context: sku: 00501\n"), "{user}");
        assert_eq!(line["body"]["messages"][0]["content"], SYSTEM_MESSAGE);
        // The same row text elsewhere in the table is the same request: same hash.
        let mut again = Vec::new();
        assert_eq!(
            template.render(9, |i| cells[i], &mut scratch, &mut escaped, &mut again),
            hash
        );
        let other = [Some("00502"), Some("A \"red\" ball,\nround ✓"), None];
        assert_ne!(
            template.render(9, |i| other[i], &mut scratch, &mut escaped, &mut again),
            hash
        );
    }

    /// The request of row 0 of a one-column table, as JSON.
    fn rendered(spec: &JobSpec) -> Value {
        let columns = vec!["description".to_owned()];
        let template = RequestTemplate::new(spec, &columns);
        let cells = [Some("a ball")];
        let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
        template
            .render(0, |i| cells[i], &mut scratch, &mut escaped, &mut out)
            .expect("rendered");
        serde_json::from_slice(&out).expect("valid json")
    }

    #[test]
    fn schema_properties_keep_the_field_order_the_user_gave() {
        let line = rendered(&spec());
        let properties = &line["body"]["response_format"]["json_schema"]["schema"]["properties"];
        let names: Vec<&String> = properties.as_object().expect("object").keys().collect();
        assert_eq!(names, ["title", "category", "tags"]);
    }

    #[test]
    fn temperature_goes_only_where_the_model_takes_it() {
        // OpenAI chat model, unset: 0, for repeatable answers.
        assert_eq!(rendered(&spec())["body"]["temperature"], json!(0.0));
        // A reasoning model, unset: none.
        let reasoning = spec().with_provider("openai", "o3-mini");
        assert!(rendered(&reasoning)["body"].get("temperature").is_none());
        // Anthropic: never (its current API declares none).
        let anthropic = spec().with_provider("anthropic", "claude-3-5-haiku-latest");
        let line = rendered(&anthropic);
        assert!(line["params"].get("temperature").is_none(), "{line}");
        assert_eq!(line["params"]["max_tokens"], json!(ANTHROPIC_MAX_TOKENS));
    }

    #[test]
    fn a_together_line_is_openais_with_the_allowance_as_max_tokens() {
        let mut together =
            spec().with_provider("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo");
        together.options.max_output_tokens = Some(256);
        let line = rendered(&together);
        assert_eq!(line["url"], "/v1/chat/completions");
        assert_eq!(line["body"]["max_tokens"], 256);
        assert!(line["body"].get("max_completion_tokens").is_none());
        assert_eq!(line["body"]["response_format"]["type"], "json_schema");
    }

    #[test]
    fn a_mistral_line_is_custom_id_and_body_only() {
        let mut mistral = spec().with_provider("mistral", "mistral-small-latest");
        mistral.options.max_output_tokens = Some(256);
        let line = rendered(&mistral);
        let keys: Vec<&String> = line.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["custom_id", "body"]);
        assert_eq!(line["body"]["model"], "mistral-small-latest");
        assert_eq!(line["body"]["max_tokens"], 256);
        assert!(line["body"].get("max_completion_tokens").is_none());
        assert_eq!(line["body"]["response_format"]["type"], "json_schema");
        assert_eq!(line["body"]["messages"][1]["role"], "user");
    }

    #[test]
    fn a_bedrock_line_is_record_id_and_claudes_invoke_model_body_without_the_model() {
        let mut bedrock =
            spec().with_provider("bedrock", "anthropic.claude-3-5-haiku-20241022-v1:0");
        let line = rendered(&bedrock);
        let keys: Vec<&String> = line.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["recordId", "modelInput"]);
        assert_eq!(line["recordId"], "r0");
        let input = &line["modelInput"];
        assert_eq!(input["anthropic_version"], "bedrock-2023-05-31");
        assert!(input.get("model").is_none(), "the job names the model");
        assert!(input.get("temperature").is_none(), "unset, none is sent");
        assert_eq!(input["max_tokens"], json!(ANTHROPIC_MAX_TOKENS));
        assert_eq!(input["tool_choice"]["type"], "tool");
        assert_eq!(input["tools"][0]["name"], input["tool_choice"]["name"]);
        let properties = input["tools"][0]["input_schema"]["properties"]
            .as_object()
            .expect("schema");
        assert_eq!(
            properties.keys().collect::<Vec<_>>(),
            ["title", "category", "tags"]
        );
        assert_eq!(input["messages"][0]["role"], "user");
        assert!(
            input["messages"][0]["content"]
                .as_str()
                .expect("text")
                .contains("a ball")
        );
        // A temperature the user sets is sent (Bedrock's Claude body takes 0 to 1).
        bedrock.options.temperature = Some(0.3);
        assert_eq!(rendered(&bedrock)["modelInput"]["temperature"], json!(0.3));
    }

    #[test]
    fn a_gemini_line_is_key_and_a_generate_content_request_without_the_model() {
        let mut gemini = spec().with_provider("gemini", "gemini-2.5-flash");
        gemini.options.max_output_tokens = Some(300);
        let line = rendered(&gemini);
        let keys: Vec<&String> = line.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["key", "request"]);
        assert_eq!(line["key"], "r0");
        assert_eq!(row_index_of(line["key"].as_str().expect("key")), Some(0));
        let request = &line["request"];
        assert!(request.get("model").is_none(), "the job names the model");
        assert_eq!(
            request["systemInstruction"]["parts"][0]["text"],
            SYSTEM_MESSAGE
        );
        let config = &request["generationConfig"];
        assert_eq!(config["responseMimeType"], "application/json");
        assert_eq!(config["maxOutputTokens"], 300);
        assert_eq!(config["temperature"], 0.0);
        let schema = &config["responseSchema"];
        assert_eq!(schema["type"], "OBJECT");
        assert_eq!(
            schema["propertyOrdering"],
            json!(["title", "category", "tags"])
        );
        assert_eq!(
            schema["properties"]["category"]["enum"],
            json!(["toys", "tools"])
        );
        assert_eq!(schema["properties"]["tags"]["items"]["type"], "STRING");
        let user = &request["contents"][0];
        assert_eq!(user["role"], "user");
        let text = user["parts"][0]["text"].as_str().expect("text");
        assert!(
            text.ends_with("description: a ball\n\nRow context: \n"),
            "{text:?}"
        );
    }

    #[test]
    fn rows_with_empty_targets_are_skipped() {
        let columns = vec!["description".to_owned()];
        let template = RequestTemplate::new(&spec(), &columns);
        let (mut scratch, mut escaped, mut out) = (String::new(), Vec::new(), Vec::new());
        assert!(
            template
                .render(0, |_| None, &mut scratch, &mut escaped, &mut out)
                .is_none()
        );
        assert!(
            template
                .render(1, |_| Some(""), &mut scratch, &mut escaped, &mut out)
                .is_none()
        );
        assert!(out.is_empty());
        assert_eq!(row_index_of("r42"), Some(42));
        assert_eq!(row_index_of("x42"), None);
        assert_eq!(row_index_of("r0"), Some(0));
        for odd in ["r+5", "r05", "r", "r-1", "r 5"] {
            assert_eq!(row_index_of(odd), None, "{odd}");
        }
    }
}
