//! Byte-level BPE tokenizers through the `tokenizers` crate: load Hugging Face's
//! `tokenizer.json`, and train a GPT-2-style tokenizer on a local corpus.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{LmError, Result};

/// GPT-2's end-of-text token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A tokenizer with the end-of-text id resolved.
#[derive(Debug, Clone)]
pub struct Gpt2Tokenizer {
    inner: Tokenizer,
    eos: Option<u32>,
}

fn tk<E: std::fmt::Display>(e: E) -> LmError {
    LmError::Tokenizer(e.to_string())
}

impl Gpt2Tokenizer {
    /// Wraps a `tokenizers` tokenizer.
    pub fn new(inner: Tokenizer) -> Self {
        let eos = inner.token_to_id(END_OF_TEXT);
        Self { inner, eos }
    }

    /// Reads Hugging Face's `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(LmError::file(path, "tokenizer file not found"));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| LmError::file(path, format!("cannot read it as UTF-8 text: {e}")))?;
        // tokenizers 0.23 panics instead of returning an error when a part it
        // buffers (the decoder) is not valid JSON: its decoder deserializer
        // `expect`s that parse (found by the `tokenizer` fuzz target: a syntax
        // error, then a number beyond f64's range). Parsing the whole file
        // into a `Value` first (which, unlike `IgnoredAny`, range-checks
        // numbers) makes such a file a plain error that says where; the parse
        // stays behind `catch_unwind` for other panics.
        serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
            LmError::file(
                path,
                format!("not a valid tokenizer.json: expected JSON, {e}"),
            )
        })?;
        let parsed = std::panic::catch_unwind(|| text.parse::<Tokenizer>()).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("the parser panicked");
            LmError::file(path, format!("not a valid tokenizer.json: {why}"))
        })?;
        let inner =
            parsed.map_err(|e| LmError::file(path, format!("not a valid tokenizer.json: {e}")))?;
        Ok(Self::new(inner))
    }

    /// Trains a GPT-2-style byte-level BPE tokenizer (no prefix space, the 256
    /// byte symbols as the initial alphabet, so any text encodes) on `texts`,
    /// with `<|endoftext|>` as special token 0.
    pub fn train<S: AsRef<str> + Sync>(texts: &[S], vocab_size: usize) -> Result<Self> {
        if vocab_size < 257 {
            return Err(LmError::config(
                "tokenizer",
                "vocab_size",
                format!("must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}"),
            ));
        }
        if texts.is_empty() {
            return Err(LmError::Tokenizer("cannot train on an empty corpus".into()));
        }
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        tok.train(&mut trainer, texts.iter().map(|s| s.as_ref()))
            .map_err(tk)?;
        tok.add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
            .map_err(tk)?;
        Ok(Self::new(tok))
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(tk)?;
        kiln_core::files::write_atomic(path, json.as_bytes())
            .map_err(|e| LmError::file(path, e.to_string()))
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tk)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tk)
    }

    /// The end-of-text id, if the vocabulary has `<|endoftext|>`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The id of `token`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// An incremental decoder that returns text only once it is complete UTF-8
    /// (byte-level tokens can split a character).
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }
}

/// Turns generated ids into text pieces as they arrive (see [`Gpt2Tokenizer::stream`]).
#[derive(Debug)]
pub struct TokenStream<'a> {
    tok: &'a Gpt2Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl TokenStream<'_> {
    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        // A trailing replacement character means a multi-byte character is still
        // incomplete; wait for the next token.
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text.get(self.emitted..).map(str::to_string);
        self.emitted = text.len();
        Ok(piece)
    }

    /// Whatever is still held back (at the end of generation).
    pub fn flush(&mut self) -> Result<Option<String>> {
        let text = self.tok.decode(&self.ids)?;
        if text.len() <= self.emitted {
            return Ok(None);
        }
        let piece = text.get(self.emitted..).map(str::to_string);
        self.emitted = text.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_round_trips_any_text_and_has_eos_zero() {
        let corpus: Vec<String> = (0..50)
            .map(|i| format!("review {i}: a great film, great cast, I loved it"))
            .collect();
        let t = Gpt2Tokenizer::train(&corpus, 300).unwrap();
        assert_eq!(t.eos_id(), Some(0));
        assert!(t.vocab_size() > 257 && t.vocab_size() <= 300);
        for s in ["a great film", "unseen wörds ☕ 🚀\n\ttabs"] {
            let ids = t.encode(s).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), s);
        }
        // Merges were learned: a frequent word is shorter than its bytes.
        assert!(t.encode("great").unwrap().len() < 5);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        t.save(&p).unwrap();
        let back = Gpt2Tokenizer::from_file(&p).unwrap();
        assert_eq!(
            back.encode("loved it").unwrap(),
            t.encode("loved it").unwrap()
        );
    }

    #[test]
    fn stream_holds_back_split_characters() {
        let corpus = vec!["abc abc abc".to_string(); 10];
        let t = Gpt2Tokenizer::train(&corpus, 260).unwrap();
        let ids = t.encode("a☕b").unwrap();
        let mut s = t.stream();
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = s.push(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'));
                out.push_str(&p);
            }
        }
        if let Some(p) = s.flush().unwrap() {
            out.push_str(&p);
        }
        assert_eq!(out, "a☕b");
    }

    #[test]
    fn a_file_tokenizers_panics_on_is_an_error() {
        // A non-string key inside "decoder": tokenizers 0.23 `expect`s its
        // decoder helper to parse and panics (found by prop_lm).
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-gpt2/tokenizer.json");
        let text = std::fs::read_to_string(fixture).unwrap();
        let at = text.find("\"decoder\"").unwrap();
        let brace = at + text[at..].find('{').unwrap() + 1;
        let bad = format!("{}7: 1, {}", &text[..brace], &text[brace..]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, bad).unwrap();
        let e = Gpt2Tokenizer::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not a valid tokenizer.json"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, "{not json").unwrap();
        let e = Gpt2Tokenizer::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not a valid"),
            "{e}"
        );
    }
}
