//! Text: token blocks for causal language modelling, a procedural review
//! corpus with known sentiment (`synthetic-reviews`), and preference pairs in
//! JSONL (TRL's `prompt`/`chosen`/`rejected`, standard or conversational).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use kiln_core::rng::SeededRng;
use kiln_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};

// ---------------------------------------------------------------- blocks

/// Token ids packed into fixed-length training blocks.
///
/// Documents are concatenated (with an optional separator such as
/// `<|endoftext|>` after each) and cut into windows of `block_size + 1`
/// tokens with stride `block_size`, so block `i` gives inputs `w[..T]` and
/// next-token targets `w[1..]` and every token but the first is a target once.
/// The incomplete tail is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBlocks {
    tokens: Vec<u32>,
    block_size: usize,
}

impl TokenBlocks {
    /// Packs already tokenized documents.
    pub fn pack(
        docs: impl IntoIterator<Item = Vec<u32>>,
        block_size: usize,
        separator: Option<u32>,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(DataError::config("block_size", "must be at least 1"));
        }
        let mut tokens = Vec::new();
        for d in docs {
            tokens.extend_from_slice(&d);
            if let Some(s) = separator {
                tokens.push(s);
            }
        }
        Ok(Self { tokens, block_size })
    }

    /// Tokenizes `texts` (one document each) and packs them.
    pub fn from_texts<S: AsRef<str>>(
        tokenizer: &Tokenizer,
        texts: &[S],
        block_size: usize,
        separator: Option<u32>,
    ) -> Result<Self> {
        let docs = texts
            .iter()
            .map(|t| encode(tokenizer, t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Self::pack(docs, block_size, separator)
    }

    /// Tokenizes whole files (one document each).
    pub fn from_files(
        tokenizer: &Tokenizer,
        paths: &[PathBuf],
        block_size: usize,
        separator: Option<u32>,
    ) -> Result<Self> {
        let mut docs = Vec::with_capacity(paths.len());
        for p in paths {
            let text = read_text(p)?;
            docs.push(encode(tokenizer, &text).map_err(|e| at_file(p, e))?);
        }
        Self::pack(docs, block_size, separator)
    }

    /// Tokenizes a file line by line (each non-empty line a document).
    pub fn from_lines(
        tokenizer: &Tokenizer,
        path: &Path,
        block_size: usize,
        separator: Option<u32>,
    ) -> Result<Self> {
        let text = read_text(path)?;
        let docs = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| encode(tokenizer, l).map_err(|e| at_file(path, e)))
            .collect::<Result<Vec<_>>>()?;
        Self::pack(docs, block_size, separator)
    }

    /// Tokens per block (inputs; windows hold one more).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All packed tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.block_size
    }

    /// Whether there is not a single block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `i`: `block_size + 1` tokens.
    pub fn window(&self, i: usize) -> Option<&[u32]> {
        (i < self.len()).then(|| &self.tokens[i * self.block_size..(i + 1) * self.block_size + 1])
    }

    /// Inputs and targets `[B, block_size]` (u32) for blocks `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let t = self.block_size;
        let mut x = Vec::with_capacity(indices.len() * t);
        let mut y = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            let w = self.window(i).ok_or_else(|| {
                DataError::config("block index", format!("{i} out of range 0..{}", self.len()))
            })?;
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        let b = indices.len();
        Ok((
            Tensor::from_vec(x, (b, t), device)?,
            Tensor::from_vec(y, (b, t), device)?,
        ))
    }

    /// The batches of one epoch, in a seeded shuffled order (the last batch may be smaller).
    pub fn batches<'a>(
        &'a self,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        device: &'a Device,
    ) -> impl Iterator<Item = Result<(Tensor, Tensor)>> + 'a {
        let order = SeededRng::derive(seed, &[epoch]).permutation(self.len());
        let bs = batch_size.max(1);
        let chunks: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
        chunks.into_iter().map(move |c| self.batch(&c, device))
    }
}

/// Reads a UTF-8 text file; a missing file or bytes that are not UTF-8 are
/// errors naming the file (and the line of the first bad byte).
pub fn read_text(path: &Path) -> Result<String> {
    let mut bytes = crate::error::read_file(path, "expected a UTF-8 text file")?;
    // A byte-order mark (Notepad writes one) is not text: left in, it would
    // become the first token of the first document.
    if bytes.starts_with(BOM) {
        bytes.drain(..BOM.len());
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        DataError::format(
            path,
            format!("line {line}"),
            "UTF-8 text",
            format!("a byte that is not UTF-8 at byte {at}; convert the file to UTF-8"),
        )
    })
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| DataError::Tokenizer(e.to_string()))
}

fn at_file(path: &Path, e: DataError) -> DataError {
    match e {
        DataError::Tokenizer(m) => DataError::Tokenizer(format!("{}: {m}", path.display())),
        other => other,
    }
}

// ---------------------------------------------------------------- reviews

/// A procedurally written review whose sentiment is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The review.
    pub text: String,
    /// Positive (true) or negative.
    pub positive: bool,
    /// Stars, 1..=5 (4-5 positive, 1-2 negative).
    pub rating: u8,
    /// What is reviewed.
    pub subject: String,
}

impl Review {
    /// 1 for positive, 0 for negative.
    pub fn label(&self) -> usize {
        usize::from(self.positive)
    }
}

const PRODUCTS: &[&str] = &[
    "headphones",
    "blender",
    "backpack",
    "desk lamp",
    "coffee maker",
    "running shoes",
    "phone case",
    "keyboard",
    "water bottle",
    "rain jacket",
    "toaster",
    "tent",
];
const MOVIES: &[&str] = &[
    "thriller",
    "comedy",
    "documentary",
    "space opera",
    "period drama",
    "animated film",
    "horror movie",
    "musical",
    "detective story",
    "war film",
];
const POS_PRODUCT: &[&str] = &[
    "It works perfectly and feels solid.",
    "The build quality is excellent.",
    "Setup took two minutes and it has been reliable ever since.",
    "It is quiet, light and easy to clean.",
    "Worth every penny.",
    "The battery lasts for days.",
    "It arrived early and well packed.",
];
const NEG_PRODUCT: &[&str] = &[
    "It broke after a week.",
    "The build quality is poor and it feels cheap.",
    "Setup was a nightmare and it keeps failing.",
    "It is loud, heavy and hard to clean.",
    "A waste of money.",
    "The battery dies within hours.",
    "It arrived late and damaged.",
];
const POS_MOVIE: &[&str] = &[
    "The acting is superb.",
    "The story kept me hooked until the end.",
    "Beautifully shot, with a wonderful score.",
    "The characters feel real and the dialogue is sharp.",
    "I laughed and cried, and I would watch it again.",
    "The pacing is just right.",
];
const NEG_MOVIE: &[&str] = &[
    "The acting is wooden.",
    "The story is predictable and I was bored halfway through.",
    "Badly shot, with a grating score.",
    "The characters are flat and the dialogue is clumsy.",
    "I checked my phone the whole time.",
    "The pacing drags terribly.",
];
const POS_OPEN: &[&str] = &[
    "I love this",
    "What a great",
    "Really happy with this",
    "An excellent",
];
const NEG_OPEN: &[&str] = &[
    "I regret buying this",
    "What a disappointing",
    "Really unhappy with this",
    "A terrible",
];
const POS_CLOSE: &[&str] = &[
    "Highly recommended.",
    "Five stars from me.",
    "I would buy it again.",
    "Go for it.",
];
const NEG_CLOSE: &[&str] = &[
    "Avoid it.",
    "Not recommended.",
    "I want my money back.",
    "Skip this one.",
];

fn pick<'a>(rng: &mut SeededRng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len())]
}

/// One review of the given sentiment, drawn from `rng`.
pub fn synthetic_review(positive: bool, rng: &mut SeededRng) -> Review {
    let movie = rng.bernoulli(0.5);
    let subject = pick(rng, if movie { MOVIES } else { PRODUCTS });
    let body = match (movie, positive) {
        (false, true) => POS_PRODUCT,
        (false, false) => NEG_PRODUCT,
        (true, true) => POS_MOVIE,
        (true, false) => NEG_MOVIE,
    };
    let open = pick(rng, if positive { POS_OPEN } else { NEG_OPEN });
    let close = pick(rng, if positive { POS_CLOSE } else { NEG_CLOSE });
    let n = 1 + rng.below(2);
    let mut idx = rng.permutation(body.len());
    idx.truncate(n);
    let mut text = format!("{open} {subject}.");
    for i in idx {
        text.push(' ');
        text.push_str(body[i]);
    }
    text.push(' ');
    text.push_str(close);
    let rating = if positive {
        4 + rng.below(2) as u8
    } else {
        1 + rng.below(2) as u8
    };
    Review {
        text,
        positive,
        rating,
        subject: subject.to_string(),
    }
}

/// `n` reviews (`synthetic-reviews`), alternating positive and negative
/// (even indices positive), deterministic in `seed`.
pub fn synthetic_reviews(n: usize, seed: u64) -> Vec<Review> {
    (0..n)
        .map(|i| synthetic_review(i % 2 == 0, &mut SeededRng::derive(seed, &[i as u64])))
        .collect()
}

// ---------------------------------------------------------------- sources

/// A text corpus named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSource {
    /// `synthetic-reviews[:N]`: N procedural reviews (default 2000).
    SyntheticReviews(usize),
    /// `lines:PATH`: every non-empty line of a file is a document.
    Lines(PathBuf),
    /// `files:PATH`: a file, or every `.txt` file of a folder (sorted, hidden ones left out), one document each.
    Files(PathBuf),
}

/// The most reviews `synthetic-reviews:N` writes (about 150 MB of text).
pub const MAX_SYNTHETIC_REVIEWS: usize = 1_000_000;

/// The names [`TextSource`] accepts, for help texts.
pub const TEXT_SOURCES: &str = "synthetic-reviews[:N], lines:PATH, files:PATH";

impl std::str::FromStr for TextSource {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("lines:").filter(|p| !p.is_empty()) {
            return Ok(Self::Lines(p.into()));
        }
        if let Some(p) = s.strip_prefix("files:").filter(|p| !p.is_empty()) {
            return Ok(Self::Files(p.into()));
        }
        if s == "synthetic-reviews" {
            return Ok(Self::SyntheticReviews(2000));
        }
        if let Some(n) = s.strip_prefix("synthetic-reviews:") {
            let bad = || {
                DataError::config(
                    "text corpus",
                    format!(
                        "expected synthetic-reviews:N with N in 1..={MAX_SYNTHETIC_REVIEWS}, found {s:?}"
                    ),
                )
            };
            let n: usize = n.parse().map_err(|_| bad())?;
            if !(1..=MAX_SYNTHETIC_REVIEWS).contains(&n) {
                return Err(bad());
            }
            return Ok(Self::SyntheticReviews(n));
        }
        Err(DataError::config(
            "text corpus",
            format!("unknown corpus {s:?}; expected one of {TEXT_SOURCES}"),
        ))
    }
}

impl TextSource {
    /// The documents (reviews are drawn from `seed`).
    pub fn load(&self, seed: u64) -> Result<Vec<String>> {
        match self {
            Self::SyntheticReviews(n) => Ok(synthetic_reviews(*n, seed)
                .into_iter()
                .map(|r| r.text)
                .collect()),
            Self::Lines(p) => {
                let text = read_text(p)?;
                Ok(text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect())
            }
            Self::Files(p) => {
                let files = if p.is_dir() {
                    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                        .map_err(|e| DataError::io(p, e))?
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.extension().is_some_and(|x| x == "txt"))
                        // Hidden files are not documents (macOS's `._a.txt`
                        // AppleDouble files), as in image folders; a run's
                        // fingerprint of the folder leaves them out too.
                        .filter(|f| {
                            f.file_name()
                                .is_some_and(|n| !n.as_encoded_bytes().starts_with(b"."))
                        })
                        .collect();
                    v.sort();
                    v
                } else {
                    vec![p.clone()]
                };
                if files.is_empty() {
                    return Err(DataError::format(
                        p,
                        "text files",
                        "at least one .txt file",
                        "none",
                    ));
                }
                files.iter().map(|f| read_text(f)).collect()
            }
        }
    }
}

// ---------------------------------------------------------------- preferences

/// One chat message: kiln-prompt's type, so that pairs render through its
/// chat templates without conversion (extra keys such as `name` are kept).
pub use kiln_prompt::Message;

/// A prompt or completion: plain text (TRL's standard form) or messages
/// (the conversational form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    /// Plain text.
    Text(String),
    /// Chat messages.
    Chat(Vec<Message>),
}

impl Turns {
    /// The text, with chat messages joined as `role: content` lines.
    pub fn to_plain(&self) -> String {
        match self {
            Turns::Text(t) => t.clone(),
            Turns::Chat(m) => m
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A preference pair: for `prompt`, `chosen` was preferred over `rejected`.
/// Without a prompt (TRL's implicit-prompt form) the completions hold the
/// whole conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The prompt, if explicit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Turns>,
    /// The preferred completion.
    pub chosen: Turns,
    /// The other completion.
    pub rejected: Turns,
    /// How strongly `chosen` is preferred (TRL's optional `margin` column,
    /// subtracted inside the reward model's Bradley-Terry loss); a finite number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn turns(v: &Value, field: &str) -> std::result::Result<Turns, String> {
    match v {
        Value::String(s) => Ok(Turns::Text(s.clone())),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                let get = |k: &str| -> std::result::Result<String, String> {
                    match m.get(k) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(other) => Err(format!(
                            "field `{field}`[{i}].{k}: expected a string, found {}",
                            kind(other)
                        )),
                        None => Err(format!(
                            "field `{field}`[{i}]: expected a message {{\"role\", \"content\"}}, found {} without `{k}`",
                            kind(m)
                        )),
                    }
                };
                let mut msg = Message::new(get("role")?, get("content")?);
                if let Value::Object(o) = m {
                    for (k, v) in o.iter().filter(|(k, _)| !matches!(k.as_str(), "role" | "content")) {
                        msg.extra.insert(k.clone(), v.clone());
                    }
                }
                out.push(msg);
            }
            Ok(Turns::Chat(out))
        }
        other => Err(format!(
            "field `{field}`: expected a string or a list of {{\"role\", \"content\"}} messages, found {}",
            kind(other)
        )),
    }
}

fn parse_pair(line: &str) -> std::result::Result<PreferencePair, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = &v else {
        return Err(format!("expected a JSON object, found {}", kind(&v)));
    };
    let need = |k: &str| -> std::result::Result<Turns, String> {
        let f = obj.get(k).ok_or_else(|| {
            format!("missing field `{k}` (expected `prompt`, `chosen`, `rejected`)")
        })?;
        turns(f, k)
    };
    let chosen = need("chosen")?;
    let rejected = need("rejected")?;
    let prompt = match obj.get("prompt") {
        None => None,
        Some(Value::Null) => {
            return Err(
                "field `prompt`: expected a string or a list of {\"role\", \"content\"} \
                 messages, found null; leave the field out for TRL's implicit-prompt form \
                 (the completions then hold the whole conversation)"
                    .into(),
            )
        }
        Some(p) => Some(turns(p, "prompt")?),
    };
    if matches!(chosen, Turns::Text(_)) != matches!(rejected, Turns::Text(_)) {
        return Err("`chosen` and `rejected` must both be text or both be message lists".into());
    }
    if chosen == rejected {
        return Err(
            "chosen and rejected are the same, so the pair trains on nothing; fix the row or \
             remove it"
                .into(),
        );
    }
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(m) if m.is_finite() => Some(m),
            _ => {
                return Err(format!(
                    "field `margin`: expected a finite number, found {n}"
                ))
            }
        },
        Some(other) => {
            return Err(format!(
                "field `margin`: expected a number, found {}",
                kind(other)
            ))
        }
    };
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        margin,
    })
}

/// The UTF-8 byte order mark some editors write at the start of a file.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Parses preference pairs from JSONL text; `path` names the source in errors
/// (`file:line: what was wrong`). Blank lines are skipped, and so is a UTF-8
/// byte order mark at the start. A line that is not UTF-8 is an error naming
/// the line and the byte offset (in the whole text) of the first bad byte.
///
/// Each row needs `chosen` and `rejected` (both text or both message lists,
/// and not the same) and may have `prompt` (text or messages; left out for
/// TRL's implicit-prompt form, never `null`) and a finite `margin`.
pub fn parse_preferences(reader: impl BufRead, path: &Path) -> Result<Vec<PreferencePair>> {
    Ok(parse_numbered_preferences(reader, path)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// [`parse_preferences`], each pair with its 1-based line number in the
/// text (blank lines and all), for callers that report on pairs later.
pub fn parse_numbered_preferences(
    mut reader: impl BufRead,
    path: &Path,
) -> Result<Vec<(usize, PreferencePair)>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let (mut line_no, mut offset) = (0usize, 0usize);
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let mut bytes = &buf[..];
        let mut start = offset;
        offset += n;
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b.strip_suffix(b"\r").unwrap_or(b);
        }
        if line_no == 1 {
            if let Some(b) = bytes.strip_prefix(BOM) {
                bytes = b;
                start += BOM.len();
            }
        }
        let line = std::str::from_utf8(bytes).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            msg: format!(
                "not UTF-8 text: a byte that is not UTF-8 at byte {}; convert the file to UTF-8",
                start + e.valid_up_to()
            ),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let pair = parse_pair(line).map_err(|msg| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        })?;
        out.push((line_no, pair));
    }
    Ok(out)
}

/// Reads a JSONL file of preference pairs.
pub fn read_preferences(path: &Path) -> Result<Vec<PreferencePair>> {
    let f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
                hint: "expected a JSONL file with prompt/chosen/rejected per line".into(),
            }
        } else {
            DataError::io(path, e)
        }
    })?;
    parse_preferences(std::io::BufReader::new(f), path)
}

/// Writes preference pairs as JSONL (through a temporary file renamed into place).
pub fn write_preferences(path: &Path, pairs: &[PreferencePair]) -> Result<()> {
    let mut s = String::new();
    for p in pairs {
        let line = serde_json::to_string(p)
            .map_err(|e| DataError::config("preference pair", e.to_string()))?;
        s.push_str(&line);
        s.push('\n');
    }
    crate::util::write_atomic(path, s.as_bytes())
}

/// `n` preference pairs built from synthetic reviews: the prompt asks for a
/// positive review of a subject; the positive review is chosen, a negative one
/// rejected. A ready-made, download-free set for reward-model and DPO demos.
pub fn synthetic_preferences(n: usize, seed: u64) -> Vec<PreferencePair> {
    (0..n)
        .map(|i| {
            let mut rng = SeededRng::derive(seed, &[0x9e7, i as u64]);
            let good = synthetic_review(true, &mut rng);
            let mut bad = synthetic_review(false, &mut rng);
            // same subject, opposite sentiment
            let mut tries = 0;
            while bad.subject != good.subject && tries < 64 {
                bad = synthetic_review(false, &mut rng);
                tries += 1;
            }
            PreferencePair {
                prompt: Some(Turns::Text(format!(
                    "Write a short review of the {}.",
                    good.subject
                ))),
                chosen: Turns::Text(good.text),
                rejected: Turns::Text(bad.text),
                margin: None,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn blocks_shift_targets_by_one() {
        let tb = TokenBlocks::pack(vec![vec![1, 2, 3], vec![4, 5, 6, 7]], 3, Some(0)).unwrap();
        // tokens: 1 2 3 0 4 5 6 7 0  -> windows [1 2 3 0] [0 4 5 6]
        assert_eq!(tb.len(), 2);
        assert_eq!(tb.window(1), Some(&[0, 4, 5, 6][..]));
        let (x, y) = tb.batch(&[0, 1], &Device::Cpu).unwrap();
        assert_eq!(
            x.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3], vec![0, 4, 5]]
        );
        assert_eq!(
            y.to_vec2::<u32>().unwrap(),
            vec![vec![2, 3, 0], vec![4, 5, 6]]
        );
        assert!(tb.batch(&[2], &Device::Cpu).is_err());
        let n: usize = tb
            .batches(1, 0, 0, &Device::Cpu)
            .map(|b| b.unwrap().0.dims()[0])
            .sum();
        assert_eq!(n, 2);
    }

    #[test]
    fn text_sources_parse_and_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.txt"), "second").unwrap();
        std::fs::write(dir.path().join("a.txt"), "first\n\nstill first").unwrap();
        std::fs::write(dir.path().join("skip.md"), "no").unwrap();
        // macOS's AppleDouble file beside a.txt: hidden, not a document.
        std::fs::write(dir.path().join("._a.txt"), b"\x00\x05\x16\x07").unwrap();
        let files: TextSource = format!("files:{}", dir.path().display()).parse().unwrap();
        assert_eq!(
            files.load(0).unwrap(),
            vec!["first\n\nstill first", "second"]
        );
        let lines: TextSource = format!("lines:{}", dir.path().join("a.txt").display())
            .parse()
            .unwrap();
        assert_eq!(lines.load(0).unwrap(), vec!["first", "still first"]);
        // Notepad's byte-order mark is not part of the first document.
        std::fs::write(dir.path().join("c.txt"), "\u{feff}bom first\nnext").unwrap();
        let bom: TextSource = format!("lines:{}", dir.path().join("c.txt").display())
            .parse()
            .unwrap();
        assert_eq!(bom.load(0).unwrap(), vec!["bom first", "next"]);
        let syn: TextSource = "synthetic-reviews:6".parse().unwrap();
        assert_eq!(syn.load(1).unwrap().len(), 6);
        assert_eq!(
            "synthetic-reviews".parse::<TextSource>().unwrap(),
            TextSource::SyntheticReviews(2000)
        );
        for bad in ["books", "lines:", "synthetic-reviews:x"] {
            assert!(bad.parse::<TextSource>().is_err(), "{bad}");
        }
        let missing: TextSource = "lines:/nonexistent/kiln.txt".parse().unwrap();
        assert!(missing
            .load(0)
            .unwrap_err()
            .to_string()
            .contains("kiln.txt"));
    }

    #[test]
    fn reviews_are_deterministic_and_labelled() {
        let a = synthetic_reviews(50, 3);
        assert_eq!(a, synthetic_reviews(50, 3));
        for r in &a {
            let pos = POS_CLOSE.iter().any(|c| r.text.ends_with(c));
            assert_eq!(pos, r.positive, "{}", r.text);
            assert!(if r.positive {
                r.rating >= 4
            } else {
                r.rating <= 2
            });
        }
        assert_ne!(a[0].text, a[2].text);
    }

    #[test]
    fn preference_lines_parse_in_both_forms_and_errors_name_the_line() {
        let src = r#"{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}

{"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "No."}]}
{"chosen": "user: hi\nassistant: hello", "rejected": "user: hi\nassistant: go away"}
"#;
        let p = parse_preferences(src.as_bytes(), Path::new("p.jsonl")).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].prompt, Some(Turns::Text("Say hi".into())));
        assert!(matches!(&p[1].chosen, Turns::Chat(m) if m[0].role == "assistant"));
        assert_eq!(p[2].prompt, None);
        assert!(p.iter().all(|p| p.margin.is_none()));
        let with_margin = r#"{"chosen": "a", "rejected": "b", "margin": 1.5}"#;
        let m = parse_preferences(with_margin.as_bytes(), Path::new("p.jsonl")).unwrap();
        assert_eq!(m[0].margin, Some(1.5));
        let bad = [
            (
                "{\"prompt\": \"x\", \"chosen\": \"a\"}\n",
                "missing field `rejected`",
            ),
            ("{\"chosen\": 3, \"rejected\": \"a\"}\n", "found a number"),
            (
                "{\"chosen\": [{\"role\": \"user\"}], \"rejected\": \"a\"}",
                "without `content`",
            ),
            ("not json\n", "invalid JSON"),
            ("[1]\n", "expected a JSON object"),
            (
                "{\"chosen\": \"a\", \"rejected\": \"b\", \"margin\": \"big\"}",
                "field `margin`: expected a number, found a string",
            ),
        ];
        for (line, want) in bad {
            let src = format!("{}\n{line}", r#"{"chosen": "a", "rejected": "b"}"#);
            let e = parse_preferences(src.as_bytes(), Path::new("p.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("p.jsonl:2: ") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_byte_order_mark_at_the_start_of_a_preference_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.jsonl");
        std::fs::write(
            &path,
            "\u{feff}{\"prompt\": \"Say hi\", \"chosen\": \"Hi!\", \"rejected\": \"No.\"}\r\n",
        )
        .unwrap();
        let p = read_preferences(&path).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].prompt, Some(Turns::Text("Say hi".into())));
        // a line holding only the mark is blank; line numbers count it
        let src = "\u{feff}\n\n{\"chosen\": \"a\", \"rejected\": \"b\"}\n";
        let n = parse_numbered_preferences(src.as_bytes(), Path::new("p.jsonl")).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].0, 3);
        // only at the very start: elsewhere it is not JSON
        let src = "{\"chosen\": \"a\", \"rejected\": \"b\"}\n\u{feff}{\"chosen\": \"a\", \"rejected\": \"b\"}";
        let e = parse_preferences(src.as_bytes(), Path::new("p.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.jsonl:2: invalid JSON"), "{e}");
    }

    #[test]
    fn preference_text_that_is_not_utf8_names_the_line_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        // line 2 starts at byte 33; the bad byte is its 13th, byte 45
        let mut bytes = b"{\"chosen\": \"a\", \"rejected\": \"b\"}\n".to_vec();
        assert_eq!(bytes.len(), 33);
        bytes.extend_from_slice(b"{\"chosen\": \"\xff\", \"rejected\": \"b\"}\n");
        std::fs::write(&path, &bytes).unwrap();
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl:2: ") && e.contains("UTF-8") && e.contains("at byte 45"),
            "{e}"
        );
    }

    #[test]
    fn null_prompt_is_an_error_naming_the_line_and_field() {
        let src = "{\"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": null, \"chosen\": \"a\", \"rejected\": \"b\"}\n";
        let e = parse_preferences(src.as_bytes(), Path::new("p.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.jsonl:2: ")
                && e.contains("field `prompt`")
                && e.contains("found null"),
            "{e}"
        );
    }

    #[test]
    fn identical_chosen_and_rejected_is_an_error_naming_the_line() {
        for row in [
            r#"{"prompt": "x", "chosen": "same", "rejected": "same"}"#,
            r#"{"chosen": "user: hi\nassistant: same", "rejected": "user: hi\nassistant: same"}"#,
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}], "rejected": [{"role": "assistant", "content": "yo"}]}"#,
        ] {
            let src = format!("{}\n\n{row}\n", r#"{"chosen": "a", "rejected": "b"}"#);
            let e = parse_preferences(src.as_bytes(), Path::new("p.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("p.jsonl:3: ") && e.contains("chosen and rejected are the same"),
                "{e}"
            );
        }
        // differing only in a message's extra keys is a different pair
        let row = r#"{"chosen": [{"role": "assistant", "content": "yo", "name": "a"}], "rejected": [{"role": "assistant", "content": "yo"}]}"#;
        assert_eq!(
            parse_preferences(row.as_bytes(), Path::new("p.jsonl"))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn chat_messages_are_kiln_prompts_and_keep_extra_keys() {
        // One Message type across kiln: a pair's messages render through
        // kiln-prompt's chat templates as they are, tool-call keys included.
        let src = r#"{"prompt": [{"role": "user", "content": "hi", "name": "ann"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "no"}]}"#;
        let p = parse_preferences(src.as_bytes(), Path::new("p.jsonl")).unwrap();
        let Some(Turns::Chat(m)) = &p[0].prompt else {
            panic!("chat prompt expected")
        };
        let want: kiln_prompt::Message = kiln_prompt::Message::new("user", "hi");
        assert_eq!((&m[0].role, &m[0].content), (&want.role, &want.content));
        assert_eq!(m[0].extra.get("name"), Some(&Value::String("ann".into())));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        write_preferences(&path, &p).unwrap();
        assert_eq!(read_preferences(&path).unwrap(), p);
    }

    #[test]
    fn synthetic_preferences_round_trip_through_jsonl() {
        let pairs = synthetic_preferences(8, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        write_preferences(&path, &pairs).unwrap();
        assert_eq!(read_preferences(&path).unwrap(), pairs);
        for p in &pairs {
            let (Turns::Text(c), Turns::Text(r)) = (&p.chosen, &p.rejected) else {
                panic!("text form expected")
            };
            assert!(POS_CLOSE.iter().any(|x| c.ends_with(x)));
            assert!(NEG_CLOSE.iter().any(|x| r.ends_with(x)));
        }
        assert!(read_preferences(&dir.path().join("nope.jsonl")).is_err());
    }
}
