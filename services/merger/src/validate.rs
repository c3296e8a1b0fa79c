//! Result lines of the OpenAI batch format, checked against the job's fields.
//!
//! A line is either a response (`response.status_code` 200 and a chat completion whose
//! message content is the JSON answer), an HTTP error (`error: null`, the error in
//! `response.body.error`), or a line-level error (`response: null`, top-level `error`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use rowsmith_contract::spec::{FieldSpec, FieldType};
use rowsmith_dataplane::render::row_index_of;
use rowsmith_dataplane::table::RowFailure;

#[derive(Debug, Deserialize)]
struct ResultLine {
    custom_id: Option<String>,
    #[serde(default)]
    response: Option<ResponsePart>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ResponsePart {
    #[serde(default)]
    status_code: u16,
    #[serde(default)]
    body: Value,
}

/// What one result line says about its row.
pub type LineResult = Result<Vec<String>, RowFailure>;

/// A failure another attempt may fix.
fn failure(reason: &str, message: impl Into<String>) -> RowFailure {
    RowFailure {
        reason: reason.to_owned(),
        message: message.into(),
        retryable: true,
    }
}

/// A failure no retry fixes (the request is invalid, or the model refuses it).
fn permanent(reason: &str, message: impl Into<String>) -> RowFailure {
    RowFailure {
        reason: reason.to_owned(),
        message: message.into(),
        retryable: false,
    }
}

/// Parses one line; `None` when the line names no row (it is then logged and ignored).
pub fn parse_line(line: &[u8], fields: &[FieldSpec]) -> Option<(i64, LineResult)> {
    if let Ok(fast) = serde_json::from_slice::<FastLine>(line) {
        let row_index = row_index_of(fast.custom_id.as_deref()?)?;
        return Some((row_index, fast_result(fast, fields)));
    }
    // Lines of an unusual shape (an error given as a string, a body that is not an object)
    // go the tolerant way.
    let parsed: ResultLine = serde_json::from_slice(line).ok()?;
    let row_index = row_index_of(parsed.custom_id.as_deref()?)?;
    Some((row_index, line_result(parsed, fields)))
}

/// The common shapes of an OpenAI result line, borrowed from the line: no tree is built.
#[derive(Deserialize)]
struct FastLine<'a> {
    #[serde(default, borrow)]
    custom_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    response: Option<FastResponse<'a>>,
    #[serde(default, borrow)]
    error: Option<FastError<'a>>,
}

#[derive(Deserialize)]
struct FastResponse<'a> {
    #[serde(default)]
    status_code: u16,
    #[serde(default, borrow)]
    body: Option<FastBody<'a>>,
}

#[derive(Deserialize)]
struct FastBody<'a> {
    #[serde(default, borrow)]
    choices: Vec<FastChoice<'a>>,
    #[serde(default, borrow)]
    error: Option<FastError<'a>>,
}

#[derive(Deserialize)]
struct FastChoice<'a> {
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<FastMessage<'a>>,
}

#[derive(Deserialize)]
struct FastMessage<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FastError<'a> {
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

fn fast_result(line: FastLine<'_>, fields: &[FieldSpec]) -> LineResult {
    if let Some(error) = line.error {
        let code = match error.code.as_deref().unwrap_or("error") {
            "batch_cancelled" => "cancelled",
            code => code,
        };
        return Err(failure(code, error.message.as_deref().unwrap_or("")));
    }
    let Some(response) = line.response else {
        return Err(failure(
            "no_result",
            "the line has neither a response nor an error",
        ));
    };
    let body = response.body.unwrap_or(FastBody {
        choices: Vec::new(),
        error: None,
    });
    if response.status_code != 200 {
        let message = body
            .error
            .as_ref()
            .and_then(|e| e.message.as_deref())
            .unwrap_or("no message");
        let text = format!("HTTP {}: {message}", response.status_code);
        return Err(match response.status_code {
            408 | 409 | 429 | 500..=599 => failure("http_error", text),
            _ => permanent("http_error", text),
        });
    }
    let Some(choice) = body.choices.into_iter().next() else {
        return Err(failure("invalid_json", "the response has no choices"));
    };
    let message = choice.message.unwrap_or(FastMessage {
        content: None,
        refusal: None,
    });
    if let Some(refusal) = message.refusal {
        return Err(permanent("refusal", refusal));
    }
    match choice.finish_reason.as_deref() {
        Some("content_filter") => {
            return Err(permanent(
                "content_filter",
                "the provider's content filter withheld the answer",
            ));
        }
        Some("length") => {
            return Err(failure(
                "truncated",
                "the answer was cut off at the token limit (finish_reason: length)",
            ));
        }
        _ => {}
    }
    let Some(content) = message.content else {
        return Err(failure(
            "invalid_json",
            "the response has no message content",
        ));
    };
    validate_answer(&content, fields)
}

/// The result-line format of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    OpenAi,
    Anthropic,
    Gemini,
    Bedrock,
}

impl LineFormat {
    pub fn of_provider(provider: &str) -> Self {
        match provider {
            "anthropic" => LineFormat::Anthropic,
            "gemini" => LineFormat::Gemini,
            "bedrock" => LineFormat::Bedrock,
            _ => LineFormat::OpenAi,
        }
    }

    /// The field that names a line's row.
    pub fn id_field(self) -> &'static str {
        match self {
            LineFormat::Gemini => "key",
            LineFormat::Bedrock => "recordId",
            _ => "custom_id",
        }
    }

    pub fn parse(self, line: &[u8], fields: &[FieldSpec]) -> Option<(i64, LineResult)> {
        match self {
            LineFormat::OpenAi => parse_line(line, fields),
            LineFormat::Anthropic => parse_anthropic_line(line, fields),
            LineFormat::Gemini => parse_gemini_line(line, fields),
            LineFormat::Bedrock => parse_bedrock_line(line, fields),
        }
    }
}

/// Parses one line of a Bedrock job's `.jsonl.out` file: the `recordId`, the echoed
/// `modelInput`, and either `modelOutput` (Claude's Messages response) or an `error`
/// (`errorCode`, `errorMessage`) in its place. Bedrock does not retry a record itself.
pub fn parse_bedrock_line(line: &[u8], fields: &[FieldSpec]) -> Option<(i64, LineResult)> {
    let parsed: Value = serde_json::from_slice(line).ok()?;
    let row_index = row_index_of(parsed.get("recordId")?.as_str()?)?;
    let outcome = match (parsed.get("error"), parsed.get("modelOutput")) {
        (Some(error), _) if error.is_object() => {
            let code = error.get("errorCode").and_then(Value::as_i64).unwrap_or(0);
            let message = error
                .get("errorMessage")
                .and_then(Value::as_str)
                .unwrap_or("");
            let text = format!("{code}: {message}");
            // Throttled, timed out or failed inside Bedrock: another attempt may succeed;
            // a refused body (400, 403, 404, 422) will not.
            Err(
                if matches!(code, 408 | 424 | 429 | 500..=599) || code == 0 {
                    failure("http_error", text)
                } else {
                    permanent("invalid_request", text)
                },
            )
        }
        (_, Some(output)) if output.is_object() => anthropic_message(output, fields),
        _ => Err(failure(
            "no_result",
            "the record has neither a modelOutput nor an error",
        )),
    };
    Some((row_index, outcome))
}

/// Parses one line of a Gemini batch's responses file: the top-level `key` and either a
/// `response` (a GenerateContentResponse) or a `google.rpc.Status` under `error` (some
/// implementers read `status`: both are taken).
pub fn parse_gemini_line(line: &[u8], fields: &[FieldSpec]) -> Option<(i64, LineResult)> {
    let parsed: Value = serde_json::from_slice(line).ok()?;
    let key = parsed
        .get("key")
        .or_else(|| parsed.pointer("/metadata/key"))?
        .as_str()?;
    let row_index = row_index_of(key)?;
    let status = ["error", "status"]
        .iter()
        .filter_map(|name| parsed.get(*name))
        .find(|status| status.is_object());
    let outcome = match (status, parsed.get("response")) {
        (Some(status), _) => Err(gemini_status_failure(status)),
        (None, Some(response)) => gemini_response(response, fields),
        (None, None) => Err(failure(
            "no_result",
            "the line has neither a response nor an error",
        )),
    };
    Some((row_index, outcome))
}

/// A per-request `google.rpc.Status`: its code (HTTP-like or gRPC), status name and message.
fn gemini_status_failure(status: &Value) -> RowFailure {
    let code = status.get("code").and_then(Value::as_i64).unwrap_or(0);
    let name = status.get("status").and_then(Value::as_str).unwrap_or("");
    let message = status.get("message").and_then(Value::as_str).unwrap_or("");
    let text = format!("{code} {name}: {message}");
    // Retryable: unavailable, deadline, exhausted, internal (HTTP or gRPC numbering).
    let retryable = matches!(code, 408 | 429 | 500..=599 | 4 | 8 | 13 | 14)
        || matches!(
            name,
            "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "RESOURCE_EXHAUSTED" | "INTERNAL"
        );
    if retryable || code == 0 {
        failure("http_error", text)
    } else {
        permanent("invalid_request", text)
    }
}

fn gemini_response(response: &Value, fields: &[FieldSpec]) -> LineResult {
    let Some(candidate) = response.pointer("/candidates/0") else {
        let reason = response
            .pointer("/promptFeedback/blockReason")
            .and_then(Value::as_str)
            .unwrap_or("no candidates");
        return Err(permanent(
            "content_filter",
            format!("the prompt was blocked ({reason})"),
        ));
    };
    match candidate.get("finishReason").and_then(Value::as_str) {
        None | Some("STOP" | "FINISH_REASON_UNSPECIFIED") => {}
        Some("MAX_TOKENS") => {
            return Err(failure(
                "truncated",
                "the answer was cut off at maxOutputTokens (finishReason: MAX_TOKENS)",
            ));
        }
        Some(
            reason @ ("SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII"
            | "IMAGE_SAFETY"),
        ) => {
            return Err(permanent(
                "content_filter",
                format!("the provider withheld the answer (finishReason: {reason})"),
            ));
        }
        Some(other) => {
            return Err(failure(
                "invalid_json",
                format!("the answer ended with finishReason {other}"),
            ));
        }
    }
    let text: String = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                // Thought summaries are not the answer.
                .filter(|part| part.get("thought").and_then(Value::as_bool) != Some(true))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if text.is_empty() {
        return Err(failure("invalid_json", "the answer has no text part"));
    }
    validate_answer(&text, fields)
}

/// Parses one Anthropic results line: `{"custom_id", "result": {"type": succeeded | errored |
/// canceled | expired, …}}`, the error nested twice (`result.error.error.type`).
pub fn parse_anthropic_line(line: &[u8], fields: &[FieldSpec]) -> Option<(i64, LineResult)> {
    let parsed: Value = serde_json::from_slice(line).ok()?;
    let row_index = row_index_of(parsed.get("custom_id")?.as_str()?)?;
    let result = &parsed["result"];
    let outcome = match result["type"].as_str() {
        Some("succeeded") => anthropic_message(&result["message"], fields),
        Some("errored") => {
            let kind = result
                .pointer("/error/error/type")
                .and_then(Value::as_str)
                .unwrap_or("error");
            let message = result
                .pointer("/error/error/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            let text = format!("{kind}: {message}");
            Err(match kind {
                "invalid_request_error"
                | "permission_error"
                | "authentication_error"
                | "billing_error" => permanent("invalid_request", text),
                _ => failure("http_error", text),
            })
        }
        Some("canceled") => Err(failure(
            "cancelled",
            "the batch was cancelled before this row was done",
        )),
        Some("expired") => Err(failure(
            "batch_expired",
            "the batch expired before this row was done",
        )),
        _ => Err(failure("no_result", "the line has no known result type")),
    };
    Some((row_index, outcome))
}

fn anthropic_message(message: &Value, fields: &[FieldSpec]) -> LineResult {
    let content = message["content"].as_array().cloned().unwrap_or_default();
    let text = || {
        content
            .iter()
            .filter_map(|c| (c["type"] == "text").then(|| c["text"].as_str()).flatten())
            .collect::<Vec<_>>()
            .join("")
    };
    match message["stop_reason"].as_str() {
        Some("refusal") => return Err(permanent("refusal", text())),
        Some("max_tokens") => {
            return Err(failure("truncated", "the answer was cut off at max_tokens"));
        }
        _ => {}
    }
    if let Some(input) = content
        .iter()
        .find(|c| c["type"] == "tool_use")
        .map(|c| &c["input"])
    {
        let Some(object) = input.as_object() else {
            return Err(failure(
                "invalid_json",
                "the tool input is not a JSON object",
            ));
        };
        return validate_object(
            object.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            fields,
        );
    }
    validate_answer(&text(), fields)
}

fn line_result(line: ResultLine, fields: &[FieldSpec]) -> LineResult {
    if let Some(error) = line.error.filter(|e| !e.is_null()) {
        let code = match error.get("code").and_then(Value::as_str).unwrap_or("error") {
            "batch_cancelled" => "cancelled",
            code => code,
        };
        let message = error.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(failure(code, message));
    }
    let Some(response) = line.response else {
        return Err(failure(
            "no_result",
            "the line has neither a response nor an error",
        ));
    };
    if response.status_code != 200 {
        let message = response
            .body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        let text = format!("HTTP {}: {message}", response.status_code);
        return Err(match response.status_code {
            408 | 409 | 429 | 500..=599 => failure("http_error", text),
            _ => permanent("http_error", text),
        });
    }
    let choice = response
        .body
        .pointer("/choices/0")
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(refusal) = choice.pointer("/message/refusal").and_then(Value::as_str) {
        return Err(permanent("refusal", refusal));
    }
    if choice.get("finish_reason").and_then(Value::as_str) == Some("content_filter") {
        return Err(permanent(
            "content_filter",
            "the provider's content filter withheld the answer",
        ));
    }
    if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
        return Err(failure(
            "truncated",
            "the answer was cut off at the token limit (finish_reason: length)",
        ));
    }
    let Some(content) = choice.pointer("/message/content").and_then(Value::as_str) else {
        return Err(failure(
            "invalid_json",
            "the response has no message content",
        ));
    };
    validate_answer(content, fields)
}

/// Checks the model's answer against the fields; the values come back as text in field order.
pub fn validate_answer(content: &str, fields: &[FieldSpec]) -> LineResult {
    let answer: BTreeMap<String, Value> = serde_json::from_str(content).map_err(|e| {
        failure(
            "invalid_json",
            format!("the answer is not a JSON object: {e}"),
        )
    })?;
    validate_object(answer, fields)
}

/// Checks a parsed answer against the fields; the values come back as text in field order.
pub fn validate_object(answer: BTreeMap<String, Value>, fields: &[FieldSpec]) -> LineResult {
    let mut values = Vec::with_capacity(fields.len());
    for field in fields {
        let Some(value) = answer.get(&field.name) else {
            return Err(failure(
                "missing_field",
                format!("field {:?} is missing", field.name),
            ));
        };
        let wrong_type = || {
            failure(
                "wrong_type",
                format!(
                    "field {:?} should be {} but is {value}",
                    field.name,
                    field.field_type.as_str()
                ),
            )
        };
        let text = match field.field_type {
            FieldType::String => value.as_str().ok_or_else(wrong_type)?.to_owned(),
            FieldType::Number => match value {
                Value::Number(number) => number.to_string(),
                _ => return Err(wrong_type()),
            },
            FieldType::Boolean => value.as_bool().ok_or_else(wrong_type)?.to_string(),
            FieldType::Array => match value {
                Value::Array(_) => value.to_string(),
                _ => return Err(wrong_type()),
            },
            FieldType::Enum => {
                let text = value.as_str().ok_or_else(wrong_type)?;
                let allowed = field.values.as_deref().unwrap_or_default();
                if !allowed.iter().any(|v| v == text) {
                    return Err(failure(
                        "not_in_enum",
                        format!(
                            "field {:?} is {text:?}, not one of: {}",
                            field.name,
                            allowed.join(", ")
                        ),
                    ));
                }
                text.to_owned()
            }
        };
        values.push(text);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use rowsmith_contract::spec::parse_field;
    use serde_json::json;

    use super::*;

    fn fields() -> Vec<FieldSpec> {
        [
            "title:string",
            "category:enum(toys|tools)",
            "in_stock:boolean",
            "tags:array",
            "price:number",
        ]
        .iter()
        .map(|f| parse_field(f).expect("field"))
        .collect()
    }

    fn response_line(custom_id: &str, content: &str, finish_reason: &str) -> Vec<u8> {
        json!({"id": "batch_req_1", "custom_id": custom_id, "response": {"status_code": 200, "request_id": "x",
            "body": {"choices": [{"index": 0, "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": content, "refusal": null}}]}}, "error": null})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_valid_answer_yields_text_values_in_field_order() {
        let content = r#"{"price": 12.5, "tags": ["a","b"], "in_stock": true, "category": "toys", "title": "Ball"}"#;
        let (row, result) =
            parse_line(&response_line("r41", content, "stop"), &fields()).expect("line");
        assert_eq!(row, 41);
        assert_eq!(
            result.expect("valid"),
            ["Ball", "toys", "true", "[\"a\",\"b\"]", "12.5"]
        );
    }

    #[test]
    fn each_kind_of_bad_answer_gets_its_reason() {
        let reason = |line: Vec<u8>| {
            parse_line(&line, &fields())
                .expect("line")
                .1
                .unwrap_err()
                .reason
        };
        let good = r#"{"title":"t","category":"toys","in_stock":true,"tags":[],"price":1}"#;
        assert_eq!(
            reason(response_line("r1", "{not json", "stop")),
            "invalid_json"
        );
        assert_eq!(
            reason(response_line("r1", r#"{"title":"t"}"#, "stop")),
            "missing_field"
        );
        assert_eq!(
            reason(response_line(
                "r1",
                &good.replace("true", "\"yes\""),
                "stop"
            )),
            "wrong_type"
        );
        assert_eq!(
            reason(response_line(
                "r1",
                &good.replace("\"toys\"", "\"food\""),
                "stop"
            )),
            "not_in_enum"
        );
        assert_eq!(reason(response_line("r1", good, "length")), "truncated");
        let http_error = json!({"custom_id": "r2", "response": {"status_code": 500,
            "body": {"error": {"message": "server error", "type": "server_error"}}}, "error": null});
        assert_eq!(reason(http_error.to_string().into_bytes()), "http_error");
        let expired = json!({"custom_id": "r3", "response": null,
            "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}});
        assert_eq!(reason(expired.to_string().into_bytes()), "batch_expired");
        assert!(parse_line(b"garbage", &fields()).is_none());
    }

    #[test]
    fn anthropic_lines_of_every_type_are_understood() {
        let parse = |line: Value| {
            parse_anthropic_line(line.to_string().as_bytes(), &fields()).expect("line")
        };
        let good = json!({"custom_id": "r7", "result": {"type": "succeeded", "message": {
            "content": [{"type": "tool_use", "id": "t", "name": "row_enrichment", "input":
                {"title": "T", "category": "tools", "in_stock": false, "tags": ["x"], "price": 3}}],
            "stop_reason": "tool_use"}}});
        let (row, result) = parse(good);
        assert_eq!(row, 7);
        assert_eq!(
            result.expect("valid"),
            ["T", "tools", "false", "[\"x\"]", "3"]
        );
        let errored = |kind: &str| {
            json!({"custom_id": "r1", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": kind, "message": "m"}, "request_id": null}}})
        };
        let invalid = parse(errored("invalid_request_error")).1.unwrap_err();
        assert_eq!(
            (invalid.reason.as_str(), invalid.retryable),
            ("invalid_request", false)
        );
        assert!(parse(errored("overloaded_error")).1.unwrap_err().retryable);
        let expired = parse(json!({"custom_id": "r2", "result": {"type": "expired"}}))
            .1
            .unwrap_err();
        assert_eq!(
            (expired.reason.as_str(), expired.retryable),
            ("batch_expired", true)
        );
        let canceled = parse(json!({"custom_id": "r3", "result": {"type": "canceled"}}))
            .1
            .unwrap_err();
        assert_eq!(canceled.reason, "cancelled");
        let refusal = json!({"custom_id": "r4", "result": {"type": "succeeded", "message": {
            "content": [{"type": "text", "text": "No."}], "stop_reason": "refusal"}}});
        assert!(!parse(refusal).1.unwrap_err().retryable);
        let text_json = json!({"custom_id": "r5", "result": {"type": "succeeded", "message": {
            "content": [{"type": "text", "text": "{broken"}], "stop_reason": "end_turn"}}});
        assert_eq!(parse(text_json).1.unwrap_err().reason, "invalid_json");
    }

    #[test]
    fn server_errors_and_bad_answers_are_retryable_refusals_and_bad_requests_are_not() {
        let retryable = |line: Value| {
            parse_line(line.to_string().as_bytes(), &fields())
                .expect("line")
                .1
                .unwrap_err()
                .retryable
        };
        let http = |status: u16| {
            json!({"custom_id": "r2", "response": {"status_code": status,
            "body": {"error": {"message": "m"}}}, "error": null})
        };
        assert!(retryable(http(500)));
        assert!(retryable(http(429)));
        assert!(!retryable(http(400)));
        let refusal = json!({"custom_id": "r1", "response": {"status_code": 200, "body": {"choices": [{
            "finish_reason": "stop", "message": {"content": null, "refusal": "I can't help with that."}}]}}, "error": null});
        assert!(!retryable(refusal));
        let invalid: Value =
            serde_json::from_slice(&response_line("r1", "{oops", "stop")).expect("json");
        assert!(retryable(invalid));
    }

    #[test]
    fn bedrock_lines_give_the_tool_input_or_the_records_error() {
        let parse = |value: Value| {
            parse_bedrock_line(value.to_string().as_bytes(), &fields()).expect("parsed")
        };
        let input = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10});
        let good = json!({"recordId": "r7", "modelInput": input, "modelOutput": {
            "type": "message", "role": "assistant", "stop_reason": "tool_use", "content": [
                {"type": "tool_use", "id": "t", "name": "row", "input":
                    {"title": "Ball", "category": "toys", "in_stock": true, "tags": [], "price": 2}}]}});
        let (row, values) = parse(good);
        assert_eq!(row, 7);
        assert_eq!(values.expect("answer"), ["Ball", "toys", "true", "[]", "2"]);
        let refused = parse(json!({"recordId": "r1", "modelInput": input,
            "error": {"errorCode": 400, "errorMessage": "model: Extra inputs are not permitted"}}));
        let failure = refused.1.expect_err("error");
        assert_eq!(failure.reason, "invalid_request");
        assert!(!failure.retryable);
        assert!(
            failure.message.contains("Extra inputs"),
            "{}",
            failure.message
        );
        let throttled = parse(json!({"recordId": "r2", "modelInput": input,
            "error": {"errorCode": 429, "errorMessage": "Too many requests"}}));
        assert!(throttled.1.expect_err("error").retryable);
        let cut = parse(
            json!({"recordId": "r3", "modelInput": input, "modelOutput": {
            "type": "message", "stop_reason": "max_tokens", "content": []}}),
        );
        assert_eq!(cut.1.expect_err("cut").reason, "truncated");
        let neither = parse(json!({"recordId": "r4", "modelInput": input}));
        assert_eq!(neither.1.expect_err("none").reason, "no_result");
    }

    #[test]
    fn gemini_lines_give_the_answer_or_the_reason_it_has_none() {
        let good = r#"{"title":"Ball","category":"toys","in_stock":true,"tags":["a"],"price":2}"#;
        let answer = |text: &str, finish: &str| {
            json!({"key": "r7", "response": {"candidates": [{"content": {"role": "model",
                "parts": [{"text": text}]}, "finishReason": finish}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5}}})
            .to_string()
            .into_bytes()
        };
        let parse = |line: Vec<u8>| parse_gemini_line(&line, &fields()).expect("line");
        let (row, result) = parse(answer(good, "STOP"));
        assert_eq!(row, 7);
        assert_eq!(
            result.expect("valid"),
            ["Ball", "toys", "true", "[\"a\"]", "2"]
        );
        let failed = |line: Vec<u8>| parse(line).1.unwrap_err();
        let cut = failed(answer(&good[..20], "MAX_TOKENS"));
        assert_eq!((cut.reason.as_str(), cut.retryable), ("truncated", true));
        let withheld = failed(answer("", "SAFETY"));
        assert_eq!(
            (withheld.reason.as_str(), withheld.retryable),
            ("content_filter", false)
        );
        let blocked = failed(
            json!({"key": "r7", "response": {"promptFeedback": {"blockReason": "OTHER"}}})
                .to_string()
                .into_bytes(),
        );
        assert_eq!(blocked.reason, "content_filter");
        assert!(blocked.message.contains("OTHER"), "{}", blocked.message);
        // Per-request errors under either name; a server error is worth another attempt.
        for name in ["error", "status"] {
            let refused = failed(
                json!({"key": "r7", name: {"code": 400, "status": "INVALID_ARGUMENT",
                    "message": "bad schema"}})
                .to_string()
                .into_bytes(),
            );
            assert_eq!(
                (refused.reason.as_str(), refused.retryable),
                ("invalid_request", false)
            );
            assert!(refused.message.contains("bad schema"));
            let busy = failed(
                json!({"key": "r7", name: {"code": 503, "status": "UNAVAILABLE", "message": "x"}})
                    .to_string()
                    .into_bytes(),
            );
            assert!(busy.retryable);
        }
        // A key that is not one rowsmith wrote names no row.
        assert!(parse_gemini_line(br#"{"key":"r07","response":{}}"#, &fields()).is_none());
    }
}
