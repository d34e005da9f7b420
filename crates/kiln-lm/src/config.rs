//! `Gpt2Config`: the fields of a Hugging Face GPT-2 `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{LmError, Result};

fn d_vocab() -> usize {
    50257
}
fn d_positions() -> usize {
    1024
}
fn d_embd() -> usize {
    768
}
fn d_layer() -> usize {
    12
}
fn d_head() -> usize {
    12
}
fn d_pdrop() -> f64 {
    0.1
}
fn d_eps() -> f64 {
    1e-5
}
fn d_init() -> f64 {
    0.02
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_true() -> bool {
    true
}
fn d_token() -> Option<u32> {
    Some(50256)
}
fn d_model_type() -> String {
    "gpt2".into()
}

/// GPT-2 hyper-parameters, read from and written to Hugging Face's `config.json`
/// (missing fields take transformers' `GPT2Config` defaults, i.e. GPT-2 small;
/// fields kiln does not use are ignored on read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size (50257).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Longest sequence (learned positions, 1024).
    #[serde(default = "d_positions")]
    pub n_positions: usize,
    /// Model width (768).
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    /// Transformer blocks (12).
    #[serde(default = "d_layer")]
    pub n_layer: usize,
    /// Attention heads (12); must divide `n_embd`.
    #[serde(default = "d_head")]
    pub n_head: usize,
    /// MLP width (`None`: 4 * n_embd).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// MLP activation: `gelu_new` (tanh approximation, GPT-2's), `gelu` (erf),
    /// `relu`, `silu`/`swish`.
    #[serde(default = "d_act")]
    pub activation_function: String,
    /// Dropout after residual branches.
    #[serde(default = "d_pdrop")]
    pub resid_pdrop: f64,
    /// Dropout on the embeddings.
    #[serde(default = "d_pdrop")]
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "d_pdrop")]
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// Std of the normal initialisation of fresh weights.
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    /// Divide attention scores by sqrt(head size).
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores by (layer index + 1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The LM head shares the token embedding.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Beginning-of-text token.
    #[serde(default = "d_token")]
    pub bos_token_id: Option<u32>,
    /// End-of-text token.
    #[serde(default = "d_token")]
    pub eos_token_id: Option<u32>,
    /// Always `gpt2`.
    #[serde(default = "d_model_type")]
    pub model_type: String,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self::gpt2_small()
    }
}

/// The most parameters a config may describe (2^40, ~1.1e12: far past any
/// GPT-2, well inside `usize` on 64-bit machines).
pub const MAX_PARAMS: u128 = 1 << 40;

impl Gpt2Config {
    /// GPT-2 small (124M): 12 layers, 12 heads, width 768.
    pub fn gpt2_small() -> Self {
        Self {
            vocab_size: d_vocab(),
            n_positions: d_positions(),
            n_embd: d_embd(),
            n_layer: d_layer(),
            n_head: d_head(),
            n_inner: None,
            activation_function: d_act(),
            resid_pdrop: d_pdrop(),
            embd_pdrop: d_pdrop(),
            attn_pdrop: d_pdrop(),
            layer_norm_epsilon: d_eps(),
            initializer_range: d_init(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            tie_word_embeddings: true,
            bos_token_id: d_token(),
            eos_token_id: d_token(),
            model_type: d_model_type(),
        }
    }

    /// A small model for training from scratch on a laptop-sized corpus.
    pub fn tiny(vocab_size: usize, n_positions: usize) -> Self {
        Self {
            vocab_size,
            n_positions,
            n_embd: 128,
            n_layer: 4,
            n_head: 4,
            bos_token_id: None,
            eos_token_id: None,
            ..Self::gpt2_small()
        }
    }

    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LmError::file(path, e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LmError::file(path, format!("not valid JSON: {e}")))?;
        if let Some(t) = value.get("model_type").and_then(|v| v.as_str()) {
            if t != "gpt2" {
                return Err(LmError::file(
                    path,
                    format!(
                        "model_type is {t:?}; kiln-lm reads GPT-2 models (model_type \"gpt2\")"
                    ),
                ));
            }
        }
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| LmError::file(path, format!("not a GPT-2 config: {e}")))?;
        cfg.validate()
            .map_err(|e| LmError::file(path, e.to_string()))?;
        Ok(cfg)
    }

    /// MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks the sizes fit together (and the model's parameter count stays
    /// within [`MAX_PARAMS`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(LmError::config("GPT-2 config", f, m));
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if v == 0 {
                return bad(f, "must be at least 1".into());
            }
        }
        let params = self.params_u128();
        if params > MAX_PARAMS {
            return bad(
                "vocab_size, n_positions, n_embd, n_layer, n_inner",
                format!(
                    "these sizes make a model of {params} parameters; kiln builds at most \
                     2^40 (about 1.1e12)"
                ),
            );
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(
                "n_head",
                format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd),
            );
        }
        for (f, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(f, format!("must be in [0, 1), got {p}"));
            }
        }
        if Activation::parse(&self.activation_function).is_none() {
            return bad(
                "activation_function",
                format!(
                    "{:?} is not supported; expected gelu_new, gelu_pytorch_tanh, gelu, relu or silu",
                    self.activation_function
                ),
            );
        }
        if let Some(t) = self.eos_token_id {
            if t as usize >= self.vocab_size {
                return bad(
                    "eos_token_id",
                    format!("{t} is outside the vocabulary 0..{}", self.vocab_size),
                );
            }
        }
        Ok(())
    }

    /// The parameter count (tied head counted once); `usize::MAX` when it
    /// does not fit, which [`Self::validate`] refuses.
    pub fn num_params(&self) -> usize {
        usize::try_from(self.params_u128()).unwrap_or(usize::MAX)
    }

    /// The parameter count without overflow: sizes come from files, and a
    /// product of them must never wrap to a small, plausible number.
    fn params_u128(&self) -> u128 {
        let u = |v: usize| v as u128;
        let (c, i) = (u(self.n_embd), u(self.inner()));
        let mul = |a: u128, b: u128| a.saturating_mul(b);
        let block = [
            mul(4, c),
            mul(mul(c, 3), c),
            mul(3, c),
            mul(c, c),
            c,
            mul(c, i),
            i,
            mul(i, c),
            c,
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add);
        let embed = mul(u(self.vocab_size), c);
        let head = if self.tie_word_embeddings { 0 } else { embed };
        [
            embed,
            mul(u(self.n_positions), c),
            mul(u(self.n_layer), block),
            mul(2, c),
            head,
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add)
    }

    /// About how many bytes one f32 training step holds at its peak per
    /// sequence of `t` tokens, on top of the weights and optimizer state:
    /// the forward pass's activations that the backward pass reads, and the
    /// gradients in flight. `lm_head`: logits over the vocabulary are made
    /// (language modelling, DPO), not only hidden states (reward and value
    /// heads).
    ///
    /// The peak falls either at the head (every block's saved activations
    /// plus logits, log-probabilities and their gradient: about 4 floats
    /// per vocabulary entry) or in the backward pass through the blocks
    /// (their activations plus the gradients of one block's). Each term's
    /// weights were measured with a counting allocator on models from 1 to
    /// 12 blocks, widths 64 to 768 and vocabularies of 512 to 50,257; the
    /// estimate lies within 0.85 to 1.25 times the measured peak
    /// (`tests/activation_memory.rs` checks three of them).
    pub fn training_bytes_per_sequence(&self, t: usize, lm_head: bool) -> u64 {
        let scored = if lm_head { t } else { 0 };
        self.training_bytes(t, scored, 8)
    }

    /// [`Self::training_bytes_per_sequence`] for a row of `t` tokens whose
    /// logits are made at `scored` positions only (a completion after its
    /// prompt: DPO's and the online trainers' log-probabilities).
    /// `temperature_scaled`: the logits are divided by a sampling
    /// temperature first, which keeps one more copy of them and of their
    /// gradient (about 6.5 floats per vocabulary entry instead of 4,
    /// measured as the others; `kiln-rlhf`'s `tests/activation_memory.rs`
    /// checks it).
    pub fn training_bytes_per_rollout(
        &self,
        t: usize,
        scored: usize,
        temperature_scaled: bool,
    ) -> u64 {
        let half_floats = if temperature_scaled { 13 } else { 8 };
        self.training_bytes(t, scored.min(t), half_floats)
    }

    /// Bytes of a row of `t` tokens with logits at `scored` of them, each
    /// holding `head_halves / 2` floats per vocabulary entry at the head.
    fn training_bytes(&self, t: usize, scored: usize, head_halves: u128) -> u64 {
        let u = |v: usize| v as u128;
        let (c, i, l, t) = (u(self.n_embd), u(self.inner()), u(self.n_layer), u(t));
        let attn = u(self.n_head).saturating_mul(t);
        let mul = u128::saturating_mul;
        // Logit floats of the row: per vocabulary entry, per scored token.
        let logits = mul(u(self.vocab_size), u(scored));
        let sum = |xs: [u128; 3]| xs.into_iter().fold(0u128, u128::saturating_add);
        // Floats per token of the blocks: saved by the forward pass, and
        // with one block's gradients in the backward pass.
        let block_fwd = sum([mul(6, c), mul(2, i), attn]);
        let block_bwd = sum([mul(16, c), mul(3, i), mul(attn, 6) / 5]);
        // The row's floats at the head, and in the blocks' backward pass.
        let at_head = sum([mul(mul(l, block_fwd), t), mul(head_halves, logits) / 2, 0]);
        let in_blocks = sum([mul(mul(l, block_bwd), t), logits, 0]);
        let floats = at_head.max(in_blocks).saturating_add(mul(mul(8, c), t));
        u64::try_from(mul(floats, 4)).unwrap_or(u64::MAX)
    }

    /// Writes `config.json` in the form transformers reads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "architectures".into(),
                serde_json::json!(["GPT2LMHeadModel"]),
            );
            o.insert("torch_dtype".into(), serde_json::json!("float32"));
            o.insert("use_cache".into(), serde_json::json!(true));
        }
        v
    }
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`/`gelu_pytorch_tanh`: the tanh approximation GPT-2 uses.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    /// `relu`.
    Relu,
    /// `silu`/`swish`.
    Silu,
}

impl Activation {
    /// Parses transformers' `activation_function` names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_124m_parameters() {
        assert_eq!(Gpt2Config::gpt2_small().num_params(), 124_439_808);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = Gpt2Config::tiny(100, 32);
        c.n_head = 3;
        assert!(c.validate().unwrap_err().to_string().contains("n_head"));
        let mut c = Gpt2Config::tiny(100, 32);
        c.activation_function = "swiglu".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("activation_function"));
    }
}
