//! Gemini's wire rules as its proto-JSON parser applies them (field names in either spelling,
//! unknown fields refused, the `responseSchema` dialect), and the result line the simulator
//! writes for one `{key, request}` line.

use serde_json::{Map, Value, json};

use crate::faults::Fate;
use crate::model::Line;

/// A proto-JSON field name in lowerCamelCase (the parser takes both spellings).
pub(crate) fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The first field of `object` not among `known` (lowerCamelCase names).
pub(crate) fn unknown_field<'a>(object: &'a Map<String, Value>, known: &[&str]) -> Option<&'a str> {
    object
        .keys()
        .find(|key| !known.contains(&camel(key).as_str()))
        .map(String::as_str)
}

pub(crate) fn unknown_name(field: &str, at: &str) -> String {
    format!("Invalid JSON payload received. Unknown name \"{field}\" at '{at}': Cannot find field.")
}

pub(crate) fn field<'a>(object: &'a Value, camel_name: &str) -> Option<&'a Value> {
    let object = object.as_object()?;
    object
        .iter()
        .find(|(key, _)| camel(key) == camel_name)
        .map(|(_, value)| value)
}

const REQUEST_FIELDS: &[&str] = &[
    "model",
    "contents",
    "systemInstruction",
    "generationConfig",
    "safetySettings",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
];

const GENERATION_CONFIG_FIELDS: &[&str] = &[
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "mediaResolution",
];

/// `responseSchema`'s dialect: the OpenAPI 3.0 subset of Gemini's `Schema` message.
const SCHEMA_FIELDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
    "additionalProperties",
];

const SCHEMA_TYPES: &[&str] = &[
    "TYPE_UNSPECIFIED",
    "STRING",
    "NUMBER",
    "INTEGER",
    "BOOLEAN",
    "ARRAY",
    "OBJECT",
    "NULL",
];

fn check_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Some(object) = schema.as_object() else {
        return Err(format!("{at}: a schema is an object"));
    };
    if let Some(name) = unknown_field(object, SCHEMA_FIELDS) {
        return Err(unknown_name(name, at));
    }
    if let Some(kind) = field(schema, "type") {
        let known = kind.as_str().is_some_and(|k| SCHEMA_TYPES.contains(&k));
        if !known {
            return Err(format!(
                "Invalid value at '{at}.type' ({}), expected one of {}",
                kind,
                SCHEMA_TYPES.join(", ")
            ));
        }
    }
    let properties = field(schema, "properties").and_then(Value::as_object);
    if let Some(properties) = properties {
        for (name, property) in properties {
            check_schema(property, &format!("{at}.properties[{name}]"))?;
        }
    }
    if let Some(ordering) = field(schema, "propertyOrdering").and_then(Value::as_array) {
        let named = |name: &Value| {
            name.as_str()
                .is_some_and(|n| properties.is_some_and(|p| p.contains_key(n)))
        };
        if !ordering.iter().all(named) {
            return Err(format!(
                "{at}.property_ordering: every name must be a property of the schema"
            ));
        }
    }
    if let Some(items) = field(schema, "items") {
        check_schema(items, &format!("{at}.items"))?;
    }
    Ok(())
}

/// A GenerateContentRequest as the service parses it; `Err` is the per-request 400.
fn check_request(request: &Value) -> Result<(), String> {
    let Some(object) = request.as_object() else {
        return Err("request: a GenerateContentRequest object is required".into());
    };
    if let Some(name) = unknown_field(object, REQUEST_FIELDS) {
        return Err(unknown_name(name, "request"));
    }
    let contents = field(request, "contents").and_then(Value::as_array);
    if contents.is_none_or(Vec::is_empty) {
        return Err("* GenerateContentRequest.contents: contents is not specified".into());
    }
    for content in contents.into_iter().flatten() {
        let parts = field(content, "parts").and_then(Value::as_array);
        if parts.is_none_or(Vec::is_empty) {
            return Err(
                "* GenerateContentRequest.contents.parts: contents.parts must not be empty".into(),
            );
        }
        if let Some(role) = field(content, "role").and_then(Value::as_str)
            && !matches!(role, "user" | "model")
        {
            return Err(format!(
                "Please use a valid role: user, model (not {role:?})."
            ));
        }
    }
    let Some(config) = field(request, "generationConfig") else {
        return Ok(());
    };
    let Some(config_object) = config.as_object() else {
        return Err("request.generation_config: an object is required".into());
    };
    if let Some(name) = unknown_field(config_object, GENERATION_CONFIG_FIELDS) {
        return Err(unknown_name(name, "request.generation_config"));
    }
    let schema = field(config, "responseSchema");
    if schema.is_some() && field(config, "responseJsonSchema").is_some() {
        return Err("response_schema and response_json_schema cannot both be set".into());
    }
    if let Some(schema) = schema {
        let mime = field(config, "responseMimeType").and_then(Value::as_str);
        if !matches!(mime, Some("application/json" | "text/x.enum")) {
            return Err(
                "response_mime_type must be application/json or text/x.enum when response_schema is set".into(),
            );
        }
        check_schema(schema, "request.generation_config.response_schema")?;
    }
    if let Some(t) = field(config, "temperature").and_then(Value::as_f64)
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("temperature must be in [0, 2], got {t}"));
    }
    Ok(())
}

/// A `responseSchema` with its types in lower case: the JSON schema the fake model reads.
fn as_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value) {
                        ("type", Value::String(kind)) => Value::String(kind.to_lowercase()),
                        _ => as_json_schema(value),
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(as_json_schema).collect()),
        other => other.clone(),
    }
}

/// The result line of one `{key, request}` line, shaped by its fate: `{key, response}` with
/// the fake model's JSON answer, or `{key, error}` (a `google.rpc.Status`).
/// `error_name` is the field that holds a request's error (`error`, or `status`).
pub(crate) fn answer_line(index: usize, line: &Value, fate: Fate, error_name: &str) -> Line {
    let key = &line["key"];
    let request = &line["request"];
    let error = |code: u16, status: &str, message: &str| {
        Line::Error(
            json!({"key": key, error_name: {"code": code, "message": message, "status": status}})
                .to_string(),
        )
    };
    if let Err(message) = check_request(request) {
        return error(400, "INVALID_ARGUMENT", &message);
    }
    match fate {
        Fate::ServerError => {
            return error(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in \
                 https://developers.generativeai.google/guide/troubleshooting",
            );
        }
        Fate::BadRequest => {
            return error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            );
        }
        _ => {}
    }
    let schema = field(request, "generationConfig")
        .and_then(|config| field(config, "responseSchema"))
        .map(as_json_schema)
        .unwrap_or(json!({}));
    let user: String = field(request, "contents")
        .and_then(Value::as_array)
        .and_then(|contents| {
            contents
                .iter()
                .rev()
                .find(|c| field(c, "role").and_then(Value::as_str) != Some("model"))
        })
        .and_then(|content| field(content, "parts"))
        .and_then(Value::as_array)
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default();
    let mut answer = crate::model::answer(&schema, &user);
    let prompt_tokens = (request.to_string().len() / 4) as u64;
    let full = answer.to_string();
    let (text, finish) = match fate {
        Fate::InvalidJson => (full[..full.len() / 2].to_owned(), "STOP"),
        Fate::SchemaViolation => {
            if let Some(object) = answer.as_object_mut() {
                let first = object.keys().next().cloned();
                if let Some(first) = first {
                    object.remove(&first);
                }
            }
            (answer.to_string(), "STOP")
        }
        Fate::Length => (full[..full.len() / 3].to_owned(), "MAX_TOKENS"),
        Fate::Refusal => {
            return Line::Output(
                json!({"key": key, "response": {
                    "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}],
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "responseId": format!("resp-{index}")}})
                .to_string(),
            );
        }
        _ => (full, "STOP"),
    };
    let candidates_tokens = (text.len() / 4) as u64;
    Line::Output(
        json!({"key": key, "response": {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                            "finishReason": finish, "index": 0}],
            "usageMetadata": {"promptTokenCount": prompt_tokens,
                              "candidatesTokenCount": candidates_tokens,
                              "totalTokenCount": prompt_tokens + candidates_tokens},
            "responseId": format!("resp-{index}")}})
        .to_string(),
    )
}

/// Checks a batch file as the service does before running it: every line a JSON object of
/// `key` (a string, unique) and `request` (an object), nothing else. A failure fails the batch.
pub(crate) fn validate_file(bytes: &[u8]) -> (u64, Option<Vec<Value>>) {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let fail = |line: u64, message: String| {
        Some(vec![
            json!({"code": "INVALID_ARGUMENT", "message": message, "line": line}),
        ])
    };
    for (number, line) in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .enumerate()
    {
        total += 1;
        let at = number as u64 + 1;
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(line) else {
            return (total, fail(at, format!("line {at} is not a JSON object")));
        };
        if let Some(name) = unknown_field(&object, &["key", "request"]) {
            return (total, fail(at, unknown_name(name, "line")));
        }
        let Some(key) = object.get("key").and_then(Value::as_str) else {
            return (total, fail(at, format!("line {at} has no string key")));
        };
        if !seen.insert(key.to_owned()) {
            return (
                total,
                fail(at, format!("line {at}: key {key:?} is used twice")),
            );
        }
        if !object.get("request").is_some_and(Value::is_object) {
            return (total, fail(at, format!("line {at} has no request object")));
        }
    }
    if total == 0 {
        return (0, fail(0, "the input file is empty".into()));
    }
    (total, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(request: Value) -> Value {
        json!({"key": "r1", "request": request})
    }

    fn refused(request: Value) -> String {
        match answer_line(0, &line(request), Fate::Answer, "error") {
            Line::Error(text) => {
                let line: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(line["error"]["code"], 400, "{text}");
                line["error"]["message"]
                    .as_str()
                    .expect("message")
                    .to_owned()
            }
            Line::Output(text) => panic!("answered: {text}"),
        }
    }

    #[test]
    fn requests_outside_the_proto_are_refused_per_line() {
        let contents =
            json!([{"role": "user", "parts": [{"text": "Row data to enhance:\ntitle: a ball"}]}]);
        let schema = json!({"type": "OBJECT", "properties": {"title": {"type": "STRING"}},
                            "required": ["title"], "propertyOrdering": ["title"]});
        let good = json!({"contents": contents, "generationConfig": {
            "responseMimeType": "application/json", "responseSchema": schema}});
        let Line::Output(text) = answer_line(0, &line(good.clone()), Fate::Answer, "error") else {
            panic!("refused a good request");
        };
        let answer: Value = serde_json::from_str(&text).expect("json");
        let inner = answer
            .pointer("/response/candidates/0/content/parts/0/text")
            .and_then(Value::as_str)
            .expect("text");
        assert_eq!(
            serde_json::from_str::<Value>(inner).expect("json")["title"],
            "a ball"
        );
        let mut unknown = good.clone();
        unknown["temperature"] = json!(0);
        assert!(refused(unknown).contains("Unknown name \"temperature\""));
        let mut lower = good.clone();
        lower["generationConfig"]["responseSchema"]["type"] = json!("object");
        assert!(refused(lower).contains(".type"));
        let mut extra = good.clone();
        extra["generationConfig"]["responseSchema"]["patternProperties"] = json!({});
        assert!(refused(extra).contains("patternProperties"));
        let mut both = good.clone();
        both["generationConfig"]["responseJsonSchema"] = json!({"type": "object"});
        assert!(refused(both).contains("cannot both"));
        let mut no_mime = good.clone();
        no_mime["generationConfig"]
            .as_object_mut()
            .expect("config")
            .remove("responseMimeType");
        assert!(refused(no_mime).contains("response_mime_type"));
        assert!(refused(json!({"contents": []})).contains("contents is not specified"));
        // Snake case is the proto's own spelling, and is taken.
        let snake = json!({"contents": contents, "generation_config": {"max_output_tokens": 5}});
        assert!(matches!(
            answer_line(0, &line(snake), Fate::Answer, "error"),
            Line::Output(_)
        ));
    }

    #[test]
    fn a_malformed_file_fails_the_batch() {
        assert!(
            validate_file(b"{\"key\":\"r1\",\"request\":{}}\n")
                .1
                .is_none()
        );
        for bad in [
            &b"not json\n"[..],
            b"{\"request\":{}}\n",
            b"{\"key\":\"r1\",\"request\":{}}\n{\"key\":\"r1\",\"request\":{}}\n",
            b"{\"key\":\"r1\",\"request\":{},\"custom_id\":\"x\"}\n",
            b"",
        ] {
            assert!(
                validate_file(bad).1.is_some(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
