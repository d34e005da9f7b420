//! The pairs to label: JSONL with `prompt`, `completion_a`, `completion_b`
//! (what `cargo xtask rlhf sample --pairs` writes) and an optional `id`.
//! A pair without an id is named by its line number. Ids travel in URLs, so
//! they are restricted to a safe alphabet ([`valid_id`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FeedbackError, Result};

/// One of a pair's two completions (defined with the pairs; the answer
/// store re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// `completion_a`.
    A,
    /// `completion_b`.
    B,
}

/// One pair to label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The pair's id (its `id` field, else its 1-based line number).
    pub id: String,
    /// The prompt as the file gave it: a string or a list of `{role, content}` messages.
    pub prompt: serde_json::Value,
    /// The first completion.
    pub completion_a: String,
    /// The second completion.
    pub completion_b: String,
}

impl Item {
    /// The prompt as text for display: a string as is, messages as `role: content` lines.
    pub fn prompt_text(&self) -> String {
        match &self.prompt {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(msgs) => msgs
                .iter()
                .map(|m| {
                    format!(
                        "{}: {}",
                        m["role"].as_str().unwrap_or("?"),
                        m["content"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            other => other.to_string(),
        }
    }

    /// Completion `a` or `b`.
    pub fn completion(&self, side: Side) -> &str {
        match side {
            Side::A => &self.completion_a,
            Side::B => &self.completion_b,
        }
    }
}

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a safe item id: 1 to [`MAX_ID_LEN`] ASCII letters, digits,
/// `-`, `_` or `.`, and not `.`/`..`-like (so an id can never climb a path
/// or smuggle a separator into a URL).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.contains("..")
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Why an id is refused, for error messages.
pub fn id_rule() -> String {
    format!(
        "ids are 1 to {MAX_ID_LEN} ASCII letters, digits, '-', '_' or '.', not starting with '.' \
         and without '..'"
    )
}

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: char = '\u{feff}';

/// Decodes a pairs file's bytes as UTF-8 without its byte order mark; a
/// bad byte is an error naming its line (`path` names the file), so the
/// user can find it in their own file.
pub fn decode<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        FeedbackError::line(
            path,
            line,
            format!("invalid UTF-8 at byte {col} of the line (a pairs file must be UTF-8)"),
        )
    })?;
    Ok(text.strip_prefix(BOM).unwrap_or(text))
}

/// Parses a pairs file's bytes: [`decode`], then [`parse_items`].
pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Vec<Item>> {
    parse_items(decode(bytes, path)?, path)
}

/// Parses a pairs file's text (`path` names it in errors); a leading byte
/// order mark is skipped.
pub fn parse_items(text: &str, path: &Path) -> Result<Vec<Item>> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    let mut items: Vec<Item> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |m: String| FeedbackError::line(path, n, m);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        let text_field = |k: &str| -> Result<String> {
            match obj.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(err(format!("field `{k}` must be a string"))),
                None => Err(err(format!(
                    "missing field `{k}` (expected prompt, completion_a, completion_b as \
                     `cargo xtask rlhf sample --pairs` writes)"
                ))),
            }
        };
        let prompt = match obj.get("prompt") {
            Some(p @ serde_json::Value::String(_)) => p.clone(),
            Some(p @ serde_json::Value::Array(msgs))
                if msgs
                    .iter()
                    .all(|m| m["role"].is_string() && m["content"].is_string()) =>
            {
                p.clone()
            }
            Some(_) => {
                return Err(err(
                    "field `prompt` must be a string or a list of {role, content} messages".into(),
                ))
            }
            None => return Err(err("missing field `prompt`".into())),
        };
        let id = match obj.get("id") {
            None => n.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(x)) => x.to_string(),
            Some(_) => return Err(err("field `id` must be a string or a number".into())),
        };
        if !valid_id(&id) {
            return Err(err(format!("id {id:?} is not a valid id: {}", id_rule())));
        }
        if let Some(prev) = seen.insert(id.clone(), n) {
            return Err(err(format!("id {id:?} is already used on line {prev}")));
        }
        items.push(Item {
            id,
            prompt,
            completion_a: text_field("completion_a")?,
            completion_b: text_field("completion_b")?,
        });
    }
    if items.is_empty() {
        return Err(FeedbackError::Invalid(format!(
            "{}: no pairs (expected JSONL with prompt, completion_a, completion_b)",
            path.display()
        )));
    }
    Ok(items)
}

/// Reads a pairs file.
pub fn read_items(path: &Path) -> Result<Vec<Item>> {
    let bytes = std::fs::read(path).map_err(|e| FeedbackError::io(path, e))?;
    parse_bytes(&bytes, path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_bad_lines_are_checked() {
        let p = Path::new("p.jsonl");
        let ok = "{\"prompt\":\"Q\",\"completion_a\":\"x\",\"completion_b\":\"y\"}\n\n\
                  {\"id\":\"k-2\",\"prompt\":[{\"role\":\"user\",\"content\":\"hi\"}],\"completion_a\":\"x\",\"completion_b\":\"y\"}\n";
        let items = parse_items(ok, p).unwrap();
        assert_eq!(items[0].id, "1");
        assert_eq!(items[1].id, "k-2");
        assert_eq!(items[1].prompt_text(), "user: hi");
        for (bad, want) in [
            (
                "{\"prompt\":\"Q\",\"completion_a\":\"x\"}",
                "p.jsonl:1: missing field `completion_b`",
            ),
            (
                "{\"id\":\"../x\",\"prompt\":\"Q\",\"completion_a\":\"x\",\"completion_b\":\"y\"}",
                "p.jsonl:1: id \"../x\" is not a valid id",
            ),
            ("[1]", "p.jsonl:1: expected a JSON object"),
            (
                "{\"prompt\":3,\"completion_a\":\"x\",\"completion_b\":\"y\"}",
                "p.jsonl:1: field `prompt` must be",
            ),
            ("{oops", "p.jsonl:1: invalid JSON"),
        ] {
            let e = parse_items(bad, p).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let dup = "{\"id\":\"a\",\"prompt\":\"Q\",\"completion_a\":\"x\",\"completion_b\":\"y\"}\n"
            .repeat(2);
        let e = parse_items(&dup, p).unwrap_err().to_string();
        assert_eq!(e, "p.jsonl:2: id \"a\" is already used on line 1");
        for id in [
            "a/b",
            "..",
            ".x",
            "a\\b",
            "a%2F",
            "",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(!valid_id(id), "{id}");
        }
        assert!(valid_id("item-7.v2_x"));
    }

    /// A byte order mark is skipped (with CRLF line ends too); a bad UTF-8
    /// byte names its line and column.
    #[test]
    fn a_bom_is_skipped_and_bad_utf8_names_its_line() {
        let p = Path::new("p.jsonl");
        let line = "{\"prompt\":\"Q\",\"completion_a\":\"x\",\"completion_b\":\"y\"}\r\n";
        let bom = format!("\u{feff}{line}{line}");
        let items = parse_bytes(bom.as_bytes(), p).unwrap();
        assert_eq!((items.len(), items[0].prompt_text().as_str()), (2, "Q"));
        assert_eq!(parse_items(&bom, p).unwrap(), items);
        let mut bad = format!("{line}{line}").into_bytes();
        let at = line.len() + 11; // the second prompt, `Q`
        bad[at] = 0xff;
        let e = parse_bytes(&bad, p).unwrap_err().to_string();
        assert!(
            e.starts_with("p.jsonl:2: invalid UTF-8 at byte 12 of the line"),
            "{e}"
        );
    }
}
