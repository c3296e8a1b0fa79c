//! The fake model: a deterministic answer that follows the request's JSON schema and is
//! derived from the row's text, so that results differ per row.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// One result line: an answer (the output file), or an error (the error file, where the API
/// keeps one).
pub(crate) enum Line {
    Output(String),
    Error(String),
}

/// The row's own text in a rendered user message: the values of the `column: value` lines
/// that follow "Row data to enhance:".
fn row_text(user_message: &str) -> String {
    let start = user_message
        .find("Row data to enhance:\n")
        .map(|i| i + 21)
        .unwrap_or(0);
    let rest = &user_message[start..];
    let end = rest.find("\n\nRow context:").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .map(|line| {
            line.split_once(": ")
                .map(|(_, value)| value)
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() > 2)
        .map(str::to_lowercase)
        .collect()
}

/// Answers a user message with a JSON object valid against `schema`.
pub fn answer(schema: &Value, user_message: &str) -> Value {
    let text = row_text(user_message);
    let text = text.as_str();
    let digest = Sha256::digest(text.as_bytes());
    let seed = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    let row_words = words(text);
    let mut answer = Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (index, (name, property)) in properties.iter().enumerate() {
        let mix =
            seed.rotate_left(index as u32 * 7) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        answer.insert(name.clone(), value_for(property, mix, text, &row_words));
    }
    Value::Object(answer)
}

fn value_for(property: &Value, mix: u64, text: &str, row_words: &[String]) -> Value {
    if let Some(values) = property
        .get("enum")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
    {
        return values[(mix % values.len() as u64) as usize].clone();
    }
    match property.get("type").and_then(Value::as_str) {
        Some("number") => json!((mix % 100_000) as f64 / 100.0),
        Some("integer") => json!(mix % 1000),
        Some("boolean") => json!(mix.is_multiple_of(2)),
        Some("array") => {
            let mut tags: Vec<&str> = Vec::new();
            for word in row_words {
                if !tags.contains(&word.as_str()) {
                    tags.push(word);
                }
                if tags.len() == 3 {
                    break;
                }
            }
            if tags.is_empty() {
                tags.push("item");
            }
            json!(tags)
        }
        Some("object") => answer(property, &format!("Row data to enhance:\nvalue: {text}")),
        _ => {
            let line = text.lines().next().unwrap_or("");
            let title: String = line
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(60)
                .collect();
            json!(if title.is_empty() {
                "untitled".to_owned()
            } else {
                title
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_follow_the_schema_and_differ_per_row() {
        let schema = json!({"type": "object", "properties": {
            "title": {"type": "string"}, "category": {"type": "string", "enum": ["a", "b", "c"]},
            "in_stock": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
            "price": {"type": "number"}}});
        let one = answer(
            &schema,
            "Instructions: x\nRow data to enhance:\ndescription: A red ball\n\nRow context: sku: 1",
        );
        let two = answer(
            &schema,
            "Instructions: x\nRow data to enhance:\ndescription: Green garden hose\n\nRow context: sku: 2",
        );
        assert_eq!(one["title"], "A red ball");
        assert!(["a", "b", "c"].contains(&one["category"].as_str().expect("enum")));
        assert!(one["in_stock"].is_boolean() && one["price"].is_number());
        assert_eq!(one["tags"], json!(["red", "ball"]));
        assert_ne!(one, two);
    }
}
