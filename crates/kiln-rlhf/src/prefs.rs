//! Preference data in TRL's forms, turned into token ids.
//!
//! Pairs are read by [`kiln_data::text::parse_preferences`] (standard,
//! conversational and implicit-prompt forms, an optional `margin`, file:line
//! errors). [`PairEncoder`] then does what TRL's trainers do before training:
//!
//! - an implicit prompt is extracted as TRL's `extract_prompt` does (the
//!   longest common prefix of the two completions, in characters for text,
//!   in messages for conversations, a trailing space left to the completions);
//! - text completions get the tokenizer's EOS appended unless they end with
//!   it; conversations are rendered with the model's chat template through
//!   kiln-prompt (the prompt with `add_generation_prompt`, prompt + completion
//!   without), and get no extra EOS (the template writes its own end tokens);
//! - the completion starts where the tokenized prompt and the tokenized
//!   prompt + completion diverge (TRL's `common_prefix_length`), so a token
//!   merged across the boundary is not counted twice;
//! - pairs longer than `max_length` are dropped and counted, never cut
//!   (TRL's DPO truncates; kiln refuses to train on half a completion).

use std::path::{Path, PathBuf};

use kiln_data::text::{Message, PreferencePair, Turns};
use kiln_lm::Gpt2Tokenizer;
use kiln_prompt::ChatTemplate;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};

/// A preference pair as token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodedPair {
    /// The prompt's tokens (may be empty for an implicit prompt with nothing
    /// in common).
    pub prompt: Vec<u32>,
    /// The chosen completion's tokens (EOS included for text).
    pub chosen: Vec<u32>,
    /// The rejected completion's tokens.
    pub rejected: Vec<u32>,
    /// The pair's margin, if the file gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// 1-based line in the source file (0 for pairs made in memory).
    pub line: usize,
}

impl EncodedPair {
    /// `prompt + chosen`: what a reward model scores.
    pub fn chosen_sequence(&self) -> Vec<u32> {
        [&self.prompt[..], &self.chosen[..]].concat()
    }

    /// `prompt + rejected`.
    pub fn rejected_sequence(&self) -> Vec<u32> {
        [&self.prompt[..], &self.rejected[..]].concat()
    }

    /// The longer of the two sequences.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }
}

/// Encoded pairs and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreferenceData {
    /// The pairs kept.
    pub pairs: Vec<EncodedPair>,
    /// Pairs whose prompt + completion was longer than `max_length`.
    pub dropped_too_long: usize,
    /// Pairs with an empty completion after tokenization.
    pub dropped_empty: usize,
    /// Pairs read.
    pub total: usize,
}

impl PreferenceData {
    /// Splits off the last `fraction` of the pairs (rounded, at least one
    /// pair when `fraction > 0` and there are two or more) as a held-out set.
    pub fn split(mut self, fraction: f64) -> (PreferenceData, Vec<EncodedPair>) {
        let n = self.pairs.len();
        let mut k = (n as f64 * fraction).round() as usize;
        if fraction > 0.0 && k == 0 && n >= 2 {
            k = 1;
        }
        let k = k.min(n.saturating_sub(1));
        let held = self.pairs.split_off(n - k);
        (self, held)
    }

    /// Pairs kept (read minus dropped; also when `pairs` was emptied for a report).
    pub fn kept(&self) -> usize {
        self.total - self.dropped_too_long - self.dropped_empty
    }

    /// One line for logs: `kept of total (n dropped: longer than max_length, ...)`.
    pub fn describe(&self, max_length: usize) -> String {
        let mut s = format!("{} of {} pairs", self.kept(), self.total);
        if self.dropped_too_long > 0 {
            s += &format!(
                "; {} dropped as longer than max_length {max_length}",
                self.dropped_too_long
            );
        }
        if self.dropped_empty > 0 {
            s += &format!("; {} dropped with an empty completion", self.dropped_empty);
        }
        s
    }
}

/// Reads a JSONL preference file: each pair with its 1-based line number.
pub fn read_pairs(path: &Path) -> Result<Vec<(usize, PreferencePair)>> {
    let file = std::fs::File::open(path).map_err(|e| {
        RlhfError::file(
            path,
            if e.kind() == std::io::ErrorKind::NotFound {
                "not found; expected a JSONL file with prompt/chosen/rejected per line".into()
            } else {
                e.to_string()
            },
        )
    })?;
    // kiln-data numbers the lines itself (a byte order mark skipped, invalid
    // UTF-8 named by line and byte).
    Ok(kiln_data::text::parse_numbered_preferences(
        std::io::BufReader::new(file),
        path,
    )?)
}

/// TRL's `extract_prompt` for a pair without a prompt: the longest common
/// prefix of the completions becomes the prompt (for text, a space right
/// before the first difference stays with the completions). A pair that
/// has a prompt is returned unchanged.
pub fn extract_prompt(pair: &PreferencePair) -> PreferencePair {
    if pair.prompt.is_some() {
        return pair.clone();
    }
    match (&pair.chosen, &pair.rejected) {
        (Turns::Text(c), Turns::Text(r)) => {
            let cc: Vec<char> = c.chars().collect();
            let rc: Vec<char> = r.chars().collect();
            let mut idx = cc.iter().zip(&rc).take_while(|(a, b)| a == b).count();
            if idx < cc.len().min(rc.len()) && idx > 0 && cc[idx - 1] == ' ' {
                idx -= 1;
            }
            let s = |v: &[char]| v.iter().collect::<String>();
            PreferencePair {
                prompt: Some(Turns::Text(s(&cc[..idx]))),
                chosen: Turns::Text(s(&cc[idx..])),
                rejected: Turns::Text(s(&rc[idx..])),
                margin: pair.margin,
            }
        }
        (Turns::Chat(c), Turns::Chat(r)) => {
            let idx = c.iter().zip(r).take_while(|(a, b)| a == b).count();
            PreferencePair {
                prompt: Some(Turns::Chat(c[..idx].to_vec())),
                chosen: Turns::Chat(c[idx..].to_vec()),
                rejected: Turns::Chat(r[idx..].to_vec()),
                margin: pair.margin,
            }
        }
        // parse_preferences refuses mixed completions; keep the pair as is.
        _ => pair.clone(),
    }
}

/// Length of the common prefix of two token sequences.
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Finds the chat template for a model folder: `override_` (a built-in name
/// such as `chatml`, or a path to a folder / `tokenizer_config.json` /
/// `.jinja` file) if given, else the folder's own template if it has one
/// (`chat_template.jinja`, `chat_template` in `tokenizer_config.json`, or
/// `chat_template.json`), else `None` (a base model: only text pairs work).
pub fn chat_template_for(
    model_dir: &Path,
    override_: Option<&str>,
) -> Result<Option<ChatTemplate>> {
    if let Some(o) = override_ {
        let p = Path::new(o);
        return Ok(Some(if p.exists() {
            ChatTemplate::from_path(p)?
        } else {
            ChatTemplate::builtin(o)?
        }));
    }
    let has = model_dir.join("chat_template.jinja").is_file()
        || model_dir.join("chat_template.json").is_file()
        || std::fs::read_to_string(model_dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("chat_template").is_some_and(|c| !c.is_null()));
    Ok(if has {
        Some(ChatTemplate::from_path(model_dir)?)
    } else {
        None
    })
}

/// Turns preference pairs into token ids as TRL's trainers do (see the
/// module notes).
#[derive(Debug, Clone)]
pub struct PairEncoder<'a> {
    tokenizer: &'a Gpt2Tokenizer,
    chat: Option<&'a ChatTemplate>,
    max_length: usize,
    source: PathBuf,
}

impl<'a> PairEncoder<'a> {
    /// An encoder for `tokenizer` that drops pairs over `max_length` tokens
    /// (prompt + the longer completion). `chat` renders conversational pairs.
    pub fn new(
        tokenizer: &'a Gpt2Tokenizer,
        chat: Option<&'a ChatTemplate>,
        max_length: usize,
    ) -> Self {
        Self {
            tokenizer,
            chat,
            max_length,
            source: PathBuf::from("<memory>"),
        }
    }

    /// Names the source file in errors.
    pub fn with_source(mut self, path: &Path) -> Self {
        self.source = path.to_path_buf();
        self
    }

    fn err(&self, line: usize, msg: impl Into<String>) -> RlhfError {
        RlhfError::Line {
            path: self.source.clone(),
            line,
            msg: msg.into(),
        }
    }

    /// Encodes one pair; `Ok(None)` when it is dropped (too long or empty;
    /// [`PairEncoder::encode_all`] counts them).
    pub fn encode(&self, pair: &PreferencePair, line: usize) -> Result<Option<EncodedPair>> {
        let pair = extract_prompt(pair);
        let prompt = pair.prompt.clone().unwrap_or(Turns::Text(String::new()));
        let tok = |s: &str| -> Result<Vec<u32>> {
            self.tokenizer
                .encode(s)
                .map_err(|e| self.err(line, e.to_string()))
        };
        let (p, pc, pr) = match (&prompt, &pair.chosen, &pair.rejected) {
            (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
                let eos = self.tokenizer.eos_id().and(Some(kiln_lm::END_OF_TEXT));
                let with_eos = |s: &str| match eos {
                    Some(e) if !s.ends_with(e) => format!("{s}{e}"),
                    _ => s.to_string(),
                };
                (
                    tok(p)?,
                    tok(&format!("{p}{}", with_eos(c)))?,
                    tok(&format!("{p}{}", with_eos(r)))?,
                )
            }
            (Turns::Chat(p), Turns::Chat(c), Turns::Chat(r)) => {
                let chat = self.chat.ok_or_else(|| {
                    self.err(
                        line,
                        "this pair is conversational but the model has no chat template; pass one \
                         (e.g. --chat-template chatml or a tokenizer_config.json)",
                    )
                })?;
                let render = |msgs: &[Message], gen: bool| -> Result<Vec<u32>> {
                    let text = chat
                        .render(msgs, gen)
                        .map_err(|e| self.err(line, e.to_string()))?;
                    tok(&text)
                };
                (
                    render(p, true)?,
                    render(&[p.as_slice(), c].concat(), false)?,
                    render(&[p.as_slice(), r].concat(), false)?,
                )
            }
            _ => {
                return Err(self.err(
                    line,
                    "the prompt and the completions must all be text or all be message lists",
                ))
            }
        };
        let n = common_prefix_length(&p, &pc).min(common_prefix_length(&p, &pr));
        let out = EncodedPair {
            prompt: p[..n].to_vec(),
            chosen: pc[n..].to_vec(),
            rejected: pr[n..].to_vec(),
            margin: pair.margin,
            line,
        };
        if out.chosen.is_empty() || out.rejected.is_empty() || out.max_len() > self.max_length {
            return Ok(None);
        }
        Ok(Some(out))
    }

    /// Encodes every pair, counting those dropped.
    pub fn encode_all(&self, pairs: &[(usize, PreferencePair)]) -> Result<PreferenceData> {
        let mut data = PreferenceData {
            total: pairs.len(),
            ..Default::default()
        };
        for (line, pair) in pairs {
            match self.encode(pair, *line)? {
                Some(p) => data.pairs.push(p),
                None => {
                    // Re-encode without the limit to tell the two reasons apart.
                    let unlimited = PairEncoder {
                        max_length: usize::MAX,
                        ..self.clone()
                    };
                    match unlimited.encode(pair, *line)? {
                        Some(_) => data.dropped_too_long += 1,
                        None => data.dropped_empty += 1,
                    }
                }
            }
        }
        Ok(data)
    }

    /// Reads and encodes a JSONL preference file.
    pub fn read(&self, path: &Path) -> Result<PreferenceData> {
        let pairs = read_pairs(path)?;
        self.clone().with_source(path).encode_all(&pairs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text_pair(p: Option<&str>, c: &str, r: &str) -> PreferencePair {
        PreferencePair {
            prompt: p.map(|p| Turns::Text(p.into())),
            chosen: Turns::Text(c.into()),
            rejected: Turns::Text(r.into()),
            margin: None,
        }
    }

    fn msg(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    /// The examples of TRL's `extract_prompt` docstring, and its space rule:
    /// `extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."})`
    /// gives `{'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'}`.
    #[test]
    fn implicit_prompts_are_extracted_as_trl_does() {
        let p = extract_prompt(&text_pair(None, "The sky is blue.", "The sky is green."));
        assert_eq!(p.prompt, Some(Turns::Text("The sky is".into())));
        assert_eq!(p.chosen, Turns::Text(" blue.".into()));
        assert_eq!(p.rejected, Turns::Text(" green.".into()));
        let chat = PreferencePair {
            prompt: None,
            chosen: Turns::Chat(vec![
                msg("user", "What color is the sky?"),
                msg("assistant", "It is blue."),
            ]),
            rejected: Turns::Chat(vec![
                msg("user", "What color is the sky?"),
                msg("assistant", "It is green."),
            ]),
            margin: Some(2.0),
        };
        let p = extract_prompt(&chat);
        assert_eq!(
            p.prompt,
            Some(Turns::Chat(vec![msg("user", "What color is the sky?")]))
        );
        assert_eq!(p.chosen, Turns::Chat(vec![msg("assistant", "It is blue.")]));
        assert_eq!(p.margin, Some(2.0));
        // An explicit prompt is kept.
        let q = text_pair(Some("Q"), "a", "b");
        assert_eq!(extract_prompt(&q), q);
        assert_eq!(common_prefix_length(&[1, 2, 3], &[1, 2, 4, 5]), 2);
    }
}
