//! # kiln-lm
//!
//! GPT-2 on kiln: loads Hugging Face checkpoints (any GPT-2-architecture
//! repository or local folder), generates fast with a KV cache (greedy,
//! temperature, top-k, top-p, repetition penalty, stop strings, batches of
//! prompts of different lengths), trains with a label mask and gradient-carrying
//! layers, tokenizes with byte-level BPE (and trains tokenizers), and writes
//! folders transformers loads back.
//!
//! ```no_run
//! use kiln_lm::{generate_text, Gpt2, GenerationConfig, ModelFiles};
//! # fn main() -> kiln_lm::Result<()> {
//! let files = ModelFiles::from_dir("path/to/gpt2".as_ref())?;
//! let model = Gpt2::from_files(&files, &kiln_core::Device::Cpu)?;
//! let tok = files.load_tokenizer()?;
//! let cfg = GenerationConfig { max_new_tokens: 20, ..Default::default() };
//! let out = generate_text(&model, &tok, "The meaning of life is", &cfg, None)?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

mod attend;
pub mod config;
pub mod error;
mod fewrows;
mod gemv;
pub mod generate;
pub mod model;
pub mod pretrained;
pub mod tokenizer;
pub mod train;

pub use config::Gpt2Config;
pub use error::{LmError, Result};
pub use generate::{
    generate_batch, generate_text, ContextCuts, FinishReason, Generation, GenerationConfig,
    LmGenerator,
};
pub use model::{Gpt2, KvCache};
pub use pretrained::{HubOptions, ModelFiles};
pub use tokenizer::{Gpt2Tokenizer, TokenStream, END_OF_TEXT};

/// The README's examples, compiled (and run unless marked `no_run`) as doctests, so
/// they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
