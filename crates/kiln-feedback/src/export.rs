//! `rlhf export`: the answers as TRL preference data or as raw rows.
//!
//! `trl` writes one row per item with a majority preference, in TRL's
//! field names (`prompt`, `chosen`, `rejected`, and `margin`: the mean of
//! the majority voters' margins, 1 better, 2 much better), which kiln-rlhf's
//! reward and DPO trainers read directly. As TRL's Chatbot Arena example
//! does, ties and both-bad are dropped, and so are items without a majority
//! or without any judgement; the summary says how many. A conversational
//! prompt (a message list) gets its completions as assistant messages.
//!
//! `raw` writes every answer in force, joined with its pair's texts.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::agreement::majorities;
use crate::error::{FeedbackError, Result};
use crate::server::TOKENS;
use crate::store::{Label, LabelDir, Side, ANSWERS, LOCK, PAIRS};

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// TRL's prompt/chosen/rejected/margin, one row per item with a majority preference.
    Trl,
    /// Every answer in force with its pair's texts.
    Raw,
}

/// What an export wrote and left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExportSummary {
    /// Rows written.
    pub rows: usize,
    /// Items dropped because the majority said tie (trl).
    pub ties: usize,
    /// Items dropped because the majority said both bad (trl).
    pub both_bad: usize,
    /// Items dropped because the votes were split evenly (trl).
    pub no_majority: usize,
    /// Items without any judgement (only skips, or unanswered) (trl).
    pub unlabelled: usize,
}

impl ExportSummary {
    /// One line for the terminal.
    pub fn describe(&self, format: Format) -> String {
        match format {
            Format::Raw => format!("{} answers", self.rows),
            Format::Trl => format!(
                "{} preference pairs; dropped {} ties, {} both-bad, {} without a majority, {} unlabelled",
                self.rows, self.ties, self.both_bad, self.no_majority, self.unlabelled
            ),
        }
    }
}

fn completion(prompt: &serde_json::Value, text: &str) -> serde_json::Value {
    if prompt.is_array() {
        serde_json::json!([{"role": "assistant", "content": text}])
    } else {
        serde_json::Value::String(text.to_string())
    }
}

/// The export's rows.
pub fn rows(dir: &LabelDir, format: Format) -> (Vec<serde_json::Value>, ExportSummary) {
    let mut sum = ExportSummary::default();
    let mut out = Vec::new();
    match format {
        Format::Trl => {
            for (m, it) in majorities(dir).iter().zip(&dir.items) {
                let (chosen, rejected) = match m.label {
                    Some(Label::A) => (Side::A, Side::B),
                    Some(Label::B) => (Side::B, Side::A),
                    Some(Label::Tie) => {
                        sum.ties += 1;
                        continue;
                    }
                    Some(Label::BothBad) => {
                        sum.both_bad += 1;
                        continue;
                    }
                    Some(Label::Skip) | None if m.votes.is_empty() => {
                        sum.unlabelled += 1;
                        continue;
                    }
                    Some(Label::Skip) | None => {
                        sum.no_majority += 1;
                        continue;
                    }
                };
                let mut row = serde_json::json!({
                    "prompt": it.prompt,
                    "chosen": completion(&it.prompt, it.completion(chosen)),
                    "rejected": completion(&it.prompt, it.completion(rejected)),
                });
                if let Some(x) = m.margin {
                    row["margin"] = serde_json::json!(x);
                }
                out.push(row);
            }
        }
        Format::Raw => {
            for a in dir.ledger.all() {
                let Some(it) = dir.item(&a.item) else {
                    continue;
                };
                let mut row = serde_json::to_value(a).unwrap_or_default();
                row["prompt"] = it.prompt.clone();
                row["completion_a"] = serde_json::json!(it.completion_a);
                row["completion_b"] = serde_json::json!(it.completion_b);
                out.push(row);
            }
        }
    }
    sum.rows = out.len();
    (out, sum)
}

/// The labelling folder's own files, which an export must never replace
/// (replacing the lock file would also let a second server in).
pub const OWN_FILES: &[&str] = &[ANSWERS, PAIRS, "agreement.json", TOKENS, LOCK];

/// Refuses an `out` that is one of the folder's [`OWN_FILES`] (however
/// the path is spelled: `./`, `..`, symlinked folders).
fn check_out(dir: &LabelDir, out: &Path) -> Result<()> {
    let Some(name) = out.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (Ok(parent), Ok(folder)) = (parent.canonicalize(), dir.dir.canonicalize()) else {
        // A missing folder: writing fails with its own error, and it is not `dir`.
        return Ok(());
    };
    if let Some(own) = OWN_FILES
        .iter()
        .find(|f| parent == folder && f.eq_ignore_ascii_case(name))
    {
        return Err(FeedbackError::Invalid(format!(
            "{} is the labelling folder's own {own}: the export would overwrite it; write the \
             export to another file (by default {})",
            out.display(),
            dir.dir.join("export-FORMAT.jsonl").display()
        )));
    }
    Ok(())
}

/// Writes the export to `out` (via a temporary file, so a reader never sees
/// half of it). `out` may lie in the labelling folder, as the default
/// `DIR/export-FORMAT.jsonl` does, but must not be one of its
/// [`OWN_FILES`] (the answers, the pairs, the agreement report, the tokens, the lock).
pub fn export(dir: &LabelDir, format: Format, out: &Path) -> Result<ExportSummary> {
    check_out(dir, out)?;
    let (rows, sum) = rows(dir, format);
    let tmp = out.with_extension("jsonl.tmp");
    let io = |e| FeedbackError::io(out, e);
    let mut f = std::fs::File::create(&tmp).map_err(|e| FeedbackError::io(&tmp, e))?;
    for r in &rows {
        writeln!(f, "{r}").map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(sum)
}
