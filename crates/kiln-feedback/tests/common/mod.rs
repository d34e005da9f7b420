//! Helpers the integration tests share.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

/// Writes `n` pairs to label (`p{i}`, `a{i}`, `b{i}`) as JSONL.
pub fn write_pairs(path: &Path, n: usize) {
    let s: String = (1..=n)
        .map(|i| {
            serde_json::json!({"prompt": format!("p{i}"), "completion_a": format!("a{i}"),
                               "completion_b": format!("b{i}")})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, s).unwrap();
}
