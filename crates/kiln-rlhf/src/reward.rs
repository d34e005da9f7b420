//! The reward model: a GPT-2 backbone and a scalar head, in Hugging Face's
//! `GPT2ForSequenceClassification` layout (`transformer.*` and
//! `score.weight [1, n_embd]`, no bias, `num_labels = 1`), so a folder kiln
//! writes loads in transformers and the other way round.
//!
//! **Which token is scored.** The score is the head applied to the final
//! hidden state of each sequence's last real token, found from the
//! attention mask, so it works with right or left padding and with
//! `pad == eos` (TRL appends EOS to every text completion and pads with EOS:
//! the score is read at that appended EOS). transformers' own pooling looks
//! for the last token that is not `pad_token_id`, which with `pad == eos`
//! is the token *before* the EOS; kiln follows the mask.
//!
//! **Padding does not change a score.** A padded batch is realigned so that
//! each row's real tokens sit at positions `0..len`: the scores equal
//! transformers' on a right-padded batch, and on a left-padded batch when
//! transformers is given position ids from the mask (as its `generate`
//! builds them). transformers' default call on a left-padded batch numbers
//! positions from the first padding column, so its scores change with the
//! amount of padding; kiln's do not.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use kiln_core::vars::{SharedRng, VarStore};
use kiln_lm::{Gpt2, Gpt2Config, Gpt2Tokenizer, ModelFiles};

use crate::error::{Result, RlhfError};
use crate::models::{check_all_used, load_weights, store_of};

/// The head's tensor name.
pub const SCORE_WEIGHT: &str = "score.weight";

/// A GPT-2 reward model (see the module notes).
#[derive(Debug, Clone)]
pub struct RewardModel {
    backbone: Gpt2,
    score: Tensor,
    pad_token_id: u32,
}

impl RewardModel {
    /// Builds the model from `vb` with Hugging Face's names
    /// (`transformer.*`, `score.weight`). A fresh head is drawn from
    /// N(0, `initializer_range`) as transformers initialises it. The
    /// backbone's LM head is not part of a reward model: `cfg` is used with
    /// tied embeddings. Dropout (training mode only) draws from `rng`.
    pub fn new(
        cfg: &Gpt2Config,
        vb: VarBuilder<'_>,
        rng: SharedRng,
        pad_token_id: u32,
    ) -> Result<Self> {
        let cfg = Gpt2Config {
            tie_word_embeddings: true,
            ..cfg.clone()
        };
        let backbone = Gpt2::new(&cfg, vb.clone(), rng)?;
        let score = vb.get_with_hints(
            (1, cfg.n_embd),
            SCORE_WEIGHT,
            Init::Randn {
                mean: 0.0,
                stdev: cfg.initializer_range,
            },
        )?;
        if pad_token_id as usize >= cfg.vocab_size {
            return Err(RlhfError::config(
                "reward model",
                "pad_token_id",
                format!(
                    "{pad_token_id} is outside the vocabulary 0..{}",
                    cfg.vocab_size
                ),
            ));
        }
        Ok(Self {
            backbone,
            score,
            pad_token_id,
        })
    }

    /// The backbone (its LM head is the tied embedding, unused here).
    pub fn backbone(&self) -> &Gpt2 {
        &self.backbone
    }

    /// The head's weight `[1, n_embd]`.
    pub fn score_weight(&self) -> &Tensor {
        &self.score
    }

    /// The padding id (transformers' `config.pad_token_id`).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        self.backbone.config()
    }

    /// Scores of token sequences (any lengths, each at least one token):
    /// `[B]`. `train` turns dropout on.
    pub fn scores_of(&self, seqs: &[&[u32]], train: bool) -> Result<Tensor> {
        if seqs.is_empty() {
            return Err(RlhfError::Input("no sequences to score".into()));
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(RlhfError::Input(format!("sequence {i} is empty")));
        }
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut flat = Vec::with_capacity(b * t);
        let mut last = Vec::with_capacity(b);
        for (i, s) in seqs.iter().enumerate() {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(self.pad_token_id, t - s.len()));
            last.push((i * t + s.len() - 1) as u32);
        }
        let dev = self.backbone.device();
        let ids = Tensor::from_vec(flat, (b, t), dev)?;
        let h = self.backbone.hidden_states(&ids, train)?;
        let c = h.dim(2)?;
        let h = h
            .reshape((b * t, c))?
            .index_select(&Tensor::from_vec(last, b, dev)?, 0)?;
        Ok(h.matmul(&self.score.t()?)?.squeeze(1)?)
    }

    /// Scores of a padded batch `ids [B, T]` with its attention mask
    /// `[B, T]` (1 on real tokens, left or right padding): `[B]`. A row
    /// whose real tokens are not contiguous, or that has none, is an error.
    pub fn scores(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        if ids.dims() != mask.dims() || ids.rank() != 2 {
            return Err(RlhfError::Input(format!(
                "ids {:?} and attention mask {:?} must both be [B, T]",
                ids.dims(),
                mask.dims()
            )));
        }
        let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mask: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
        let mut rows = Vec::with_capacity(ids.len());
        for (r, (row, m)) in ids.iter().zip(&mask).enumerate() {
            let on: Vec<usize> = (0..m.len()).filter(|&j| m[j] != 0.0).collect();
            let (Some(&first), Some(&last)) = (on.first(), on.last()) else {
                return Err(RlhfError::Input(format!(
                    "row {r} of the attention mask has no tokens"
                )));
            };
            if last - first + 1 != on.len() {
                return Err(RlhfError::Input(format!(
                    "row {r} of the attention mask has holes; expected left or right padding"
                )));
            }
            rows.push(&row[first..=last]);
        }
        self.scores_of(&rows, train)
    }

    /// Scores many sequences in eval mode, `batch` at a time.
    pub fn score_all(&self, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            out.extend(self.scores_of(&refs, false)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Every weight under its Hugging Face name.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut v = self.backbone.named_weights();
        v.push((SCORE_WEIGHT.to_string(), self.score.clone()));
        v
    }

    /// `config.json` for transformers' `GPT2ForSequenceClassification`.
    pub fn hf_config(&self) -> serde_json::Value {
        let mut v = self.config().to_hf_json();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "architectures".into(),
                serde_json::json!(["GPT2ForSequenceClassification"]),
            );
            o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            o.insert("pad_token_id".into(), self.pad_token_id.into());
        }
        v
    }

    /// Writes a folder transformers' `GPT2ForSequenceClassification` and
    /// [`RewardModel::load`] read: `config.json`, `model.safetensors`
    /// (atomically), and the tokenizer files when a tokenizer is given.
    pub fn save_pretrained(&self, dir: &Path, tokenizer: Option<&Gpt2Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| RlhfError::file(dir, e.to_string()))?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let p = dir.join("model.safetensors");
        kiln_core::checkpoint::save_safetensors(&self.named_weights(), Some(meta), &p)
            .map_err(|e| RlhfError::file(&p, e.to_string()))?;
        write_json(&dir.join("config.json"), &self.hf_config())?;
        if let Some(t) = tokenizer {
            save_tokenizer(dir, t, self.config().n_positions)?;
        }
        Ok(())
    }

    /// Loads a `GPT2ForSequenceClassification` folder (kiln's or
    /// transformers'; `num_labels` must be 1) with its weights as trainable
    /// variables in the returned store.
    pub fn load(dir: &Path, device: &Device, seed: u64) -> Result<(Self, VarStore)> {
        let files = ModelFiles::from_dir(dir)?;
        let raw = read_json(&files.config)?;
        // A language model given as the reward model: say what it is, not
        // that its (absent, default 2) num_labels is wrong.
        let lm_head = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .any(|x| x.ends_with("LMHeadModel") || x.ends_with("ForCausalLM"))
            });
        if lm_head {
            return Err(RlhfError::file(
                dir,
                "is a language model, not a reward model: pass the folder of an `rlhf reward` \
                 run (or a GPT2ForSequenceClassification with num_labels = 1)",
            ));
        }
        let labels = raw
            .get("id2label")
            .and_then(|v| v.as_object())
            .map(|o| o.len())
            .or_else(|| {
                raw.get("num_labels")
                    .and_then(|v| v.as_u64())
                    .map(|n| n as usize)
            })
            .unwrap_or(2);
        if labels != 1 {
            return Err(RlhfError::file(
                &files.config,
                format!("num_labels is {labels}; a reward model has one output (num_labels = 1)"),
            ));
        }
        let (cfg, tensors) = load_weights(&files, device)?;
        if !tensors.contains_key(SCORE_WEIGHT) {
            return Err(RlhfError::file(
                files.weights.first().cloned().unwrap_or_default(),
                "no `score.weight`: not a sequence-classification (reward) model; \
                 start one from a language model with RewardModel::from_lm",
            ));
        }
        let pad = pad_id(&raw, &cfg);
        let vs = store_of(&tensors, seed)?;
        let m = Self::new(&cfg, vs.builder(DType::F32, device), vs.rng().clone(), pad)?;
        check_all_used(&vs, &tensors, &files.config)?;
        Ok((m, vs))
    }

    /// A reward model whose backbone is a GPT-2 language model's (its LM
    /// head is dropped) and whose head is fresh (drawn with `seed`), as
    /// `AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)`.
    pub fn from_lm(dir: &Path, device: &Device, seed: u64) -> Result<(Self, VarStore)> {
        let files = ModelFiles::from_dir(dir)?;
        let raw = read_json(&files.config)?;
        let (cfg, mut tensors) = load_weights(&files, device)?;
        tensors.remove("lm_head.weight");
        tensors.remove(SCORE_WEIGHT);
        let pad = pad_id(&raw, &cfg);
        let vs = store_of(&tensors, seed)?;
        let m = Self::new(&cfg, vs.builder(DType::F32, device), vs.rng().clone(), pad)?;
        Ok((m, vs))
    }
}

/// `pad_token_id` from config.json, else EOS (TRL's default), else 0.
fn pad_id(raw: &serde_json::Value, cfg: &Gpt2Config) -> u32 {
    raw.get("pad_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32)
        .or(cfg.eos_token_id)
        .unwrap_or(0)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| RlhfError::file(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| RlhfError::file(path, format!("not valid JSON: {e}")))
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| RlhfError::file(path, e.to_string()))?;
    kiln_core::files::write_atomic(path, s.as_bytes())
        .map_err(|e| RlhfError::file(path, e.to_string()))
}

/// `tokenizer.json` and a `tokenizer_config.json` as kiln-lm's
/// `save_pretrained` writes them.
pub(crate) fn save_tokenizer(dir: &Path, t: &Gpt2Tokenizer, n_positions: usize) -> Result<()> {
    t.save(&dir.join("tokenizer.json"))?;
    let mut tc = serde_json::json!({
        "tokenizer_class": "GPT2TokenizerFast",
        "model_max_length": n_positions,
        "add_prefix_space": false,
    });
    if t.eos_id().is_some() {
        for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            tc[k] = kiln_lm::END_OF_TEXT.into();
        }
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)
}
