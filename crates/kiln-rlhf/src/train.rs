//! What the preference trainers share: Hugging Face `TrainingArguments`-style
//! settings, the optimizer and schedule built from them, reading and
//! splitting a preference file for a model, and the data order.

use std::path::Path;

use kiln_core::optim::{LrSchedule, OptimKind, Optimizer, ParamGroup};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_lm::{Gpt2Config, Gpt2Tokenizer, ModelFiles};
use kiln_prompt::ChatTemplate;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};
use crate::prefs::{chat_template_for, EncodedPair, PairEncoder, PreferenceData};

/// Refuses, before the run folder is made, micro-batches of
/// `batch_size` preference pairs whose training step does not fit in
/// `available` bytes (`None`: unknown, never refused). Each pair is two
/// sequences padded to the longest pair of `pairs`, the worst micro-batch;
/// `lm_head`: logits are made at the completions' tokens (DPO), not only
/// hidden states (a reward model). `fixed` is what does not grow with the batch (weights,
/// gradients, optimizer state, a reference model).
pub(crate) fn check_pairs_fit(
    what: &str,
    model: &Gpt2Config,
    pairs: &[EncodedPair],
    batch_size: usize,
    lm_head: bool,
    fixed: u64,
    available: Option<u64>,
) -> Result<()> {
    let longest = pairs.iter().map(EncodedPair::max_len).max().unwrap_or(0);
    // DPO's logits are made at the completions' tokens only.
    let completion = pairs
        .iter()
        .map(|p| p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(0);
    let per_sequence = match lm_head {
        true => model.training_bytes_per_rollout(longest, completion, false),
        false => model.training_bytes_per_sequence(longest, false),
    };
    let per_pair = per_sequence.saturating_mul(2);
    let name = format!(
        "this GPT-2 ({} layers of width {})",
        model.n_layer, model.n_embd
    );
    kiln_core::memory::check_batch_fits(
        &name,
        &format!("pair of sequences padded to {longest} tokens"),
        fixed,
        per_pair,
        batch_size.min(pairs.len()) as u64,
        available,
    )
    .map_err(|e| {
        let advice = match e.largest_batch() {
            0 => "not even one pair fits: use a shorter --max-length (longer pairs are dropped) or a smaller model".into(),
            n => format!(
                "--batch-size {n} or less fits (--grad-accum keeps the pairs per optimizer step), or use a shorter --max-length"
            ),
        };
        RlhfError::Config {
            what: what.into(),
            field: "batch_size".into(),
            msg: format!("{e}; {advice}; {}", kiln_core::memory::SKIP_HINT),
        }
    })
}

/// The update rule (transformers' `optim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Optim {
    /// AdamW with PyTorch's betas and epsilon (the default).
    #[default]
    Adamw,
    /// Plain SGD: the step is proportional to the gradient (tests use it to
    /// compare gradients through whole training steps).
    Sgd,
}

/// Training settings under transformers' `TrainingArguments` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingArgs {
    /// Passes over the training pairs (`num_train_epochs`).
    pub epochs: u64,
    /// Pairs per micro-batch (`per_device_train_batch_size`).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (`gradient_accumulation_steps`).
    pub grad_accum: usize,
    /// Peak learning rate (`learning_rate`).
    pub lr: f64,
    /// Decoupled weight decay on weights (not biases or layer norms).
    pub weight_decay: f64,
    /// Linear warm-up steps; then linear decay to 0 (transformers' default
    /// `linear` schedule).
    pub warmup_steps: u64,
    /// Gradient clipping (`max_grad_norm`; 0 turns it off).
    pub max_grad_norm: f64,
    /// The update rule.
    pub optim: Optim,
    /// Share of the pairs held out for evaluation after each epoch.
    pub eval_fraction: f64,
    /// Seed of the split, the data order, a fresh head and dropout.
    pub seed: u64,
}

impl Default for TrainingArgs {
    /// TRL's DPO defaults (learning rate 1e-6).
    fn default() -> Self {
        Self::with_lr(1e-6)
    }
}

impl TrainingArgs {
    /// Defaults with learning rate `lr` (TRL: 1e-6 for DPO, 1e-4 for reward models).
    pub fn with_lr(lr: f64) -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            lr,
            weight_decay: 0.0,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            optim: Optim::Adamw,
            eval_fraction: 0.1,
            seed: 0,
        }
    }

    /// Checks the values, naming the field (`what` names the trainer).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |f: &str, m: String| Err(RlhfError::config(what, f, m));
        if self.epochs == 0 {
            return bad("train.epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "train.batch_size/grad_accum",
                "both must be at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("train.lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "train.weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "train.max_grad_norm",
                format!("must be >= 0 (0 = off), got {}", self.max_grad_norm),
            );
        }
        if !(0.0..0.9).contains(&self.eval_fraction) {
            return bad(
                "train.eval_fraction",
                format!("must be in [0, 0.9), got {}", self.eval_fraction),
            );
        }
        Ok(())
    }

    /// Pairs per optimizer step.
    pub fn pairs_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// The optimizer over `vs` (no weight decay on biases and layer norms,
    /// as transformers' `Trainer`).
    pub fn optimizer(&self, vs: &VarStore) -> Result<Optimizer> {
        let (decay, no_decay): (Vec<_>, Vec<_>) = vs
            .vars()
            .into_iter()
            .partition(|(n, _)| n.ends_with(".weight") && !n.contains(".ln_"));
        let kind = match self.optim {
            Optim::Adamw => OptimKind::adamw(),
            Optim::Sgd => OptimKind::sgd(0.0, false),
        };
        Ok(Optimizer::new(
            kind,
            vec![
                ParamGroup::new(decay, self.lr).weight_decay(self.weight_decay),
                ParamGroup::new(no_decay, self.lr),
            ],
        )?)
    }

    /// transformers' linear schedule over `total` steps.
    pub fn schedule(&self, total: u64) -> LrSchedule {
        LrSchedule::LinearWarmup {
            warmup: self.warmup_steps,
            total,
        }
    }

    /// Optimizer steps per epoch over `n` pairs (the last one may be short).
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        n.div_ceil(self.pairs_per_step()) as u64
    }

    /// The pairs of each optimizer step of `epoch` from step `start` on: a
    /// permutation drawn from `(seed, epoch)`, cut into steps.
    pub fn epoch_steps(&self, n: usize, epoch: u64, start: usize) -> Vec<Vec<usize>> {
        SeededRng::derive(self.seed, &[0xD0, epoch])
            .permutation(n)
            .chunks(self.pairs_per_step())
            .skip(start)
            .map(<[usize]>::to_vec)
            .collect()
    }
}

/// Preference pairs read for a model: its tokenizer, chat template and the
/// train / held-out split.
#[derive(Debug, Clone)]
pub struct PreferenceSplit {
    /// The model's tokenizer.
    pub tokenizer: Gpt2Tokenizer,
    /// The chat template used for conversational pairs, if any.
    pub chat: Option<ChatTemplate>,
    /// Training pairs.
    pub train: Vec<EncodedPair>,
    /// Held-out pairs.
    pub eval: Vec<EncodedPair>,
    /// Counts of what was read and dropped (`pairs` emptied).
    pub stats: PreferenceData,
    /// The length limit applied (the smaller of `max_length` and the
    /// model's context).
    pub max_length: usize,
    /// The padding id (EOS, TRL's default).
    pub pad: u32,
}

/// Reads `prefs` for the model in `model_dir`: tokenizer from the folder,
/// chat template from `chat_template` or the folder, pairs over
/// `min(max_length, n_positions)` dropped and counted, a shuffled split
/// holding out `eval_fraction`.
pub fn read_split(
    prefs: &Path,
    model_dir: &Path,
    chat_template: Option<&str>,
    max_length: usize,
    eval_fraction: f64,
    seed: u64,
) -> Result<PreferenceSplit> {
    let files = ModelFiles::from_dir(model_dir)?;
    let tokenizer = files.load_tokenizer()?;
    let cfg = kiln_lm::Gpt2Config::from_file(&files.config)?;
    let chat = chat_template_for(model_dir, chat_template)?;
    let limit = max_length.min(cfg.n_positions);
    let mut data = PairEncoder::new(&tokenizer, chat.as_ref(), limit).read(prefs)?;
    if data.pairs.is_empty() {
        return Err(RlhfError::file(
            prefs,
            format!(
                "no usable pairs: {} (the model's context is {} tokens)",
                data.describe(limit),
                cfg.n_positions
            ),
        ));
    }
    let order = SeededRng::derive(seed, &[0x5917]).permutation(data.pairs.len());
    let mut pairs: Vec<EncodedPair> = order.iter().map(|&i| data.pairs[i].clone()).collect();
    let mut k = (pairs.len() as f64 * eval_fraction).round() as usize;
    if eval_fraction > 0.0 && k == 0 && pairs.len() >= 2 {
        k = 1;
    }
    let k = k.min(pairs.len() - 1);
    let eval = pairs.split_off(pairs.len() - k);
    data.pairs.clear();
    let pad = tokenizer.eos_id().or(cfg.eos_token_id).unwrap_or(0);
    Ok(PreferenceSplit {
        tokenizer,
        chat,
        train: pairs,
        eval,
        stats: data,
        max_length: limit,
        pad,
    })
}

/// Writes the chat template beside a saved model (`chat_template.jinja`, read
/// by transformers and kiln-prompt), so the folder renders conversations
/// as the training data was.
pub fn save_chat_template(dir: &Path, chat: Option<&ChatTemplate>) -> Result<()> {
    if let Some(c) = chat {
        let p = dir.join("chat_template.jinja");
        kiln_core::files::write_atomic(&p, c.source().as_bytes())
            .map_err(|e| RlhfError::file(&p, e.to_string()))?;
    }
    Ok(())
}

/// Completion tokens that a pair's chosen row predicts (all of them unless
/// the prompt is empty, when the first has no context).
pub fn predicted(prompt: &[u32], completion: &[u32]) -> usize {
    completion.len() - usize::from(prompt.is_empty() && !completion.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pair(prompt: usize, chosen: usize, rejected: usize) -> EncodedPair {
        EncodedPair {
            prompt: vec![1; prompt],
            chosen: vec![2; chosen],
            rejected: vec![3; rejected],
            margin: None,
            line: 0,
        }
    }

    /// DPO on GPT-2 small with pairs up to 1024 tokens: each pair is two
    /// sequences of the longest pair's length, about 3.7 GiB; a batch of 8
    /// holds the 3 pairs there are (11 GiB), refused on a 10 GiB machine
    /// with the batch size that fits. A reward model (no logits) needs less
    /// per pair.
    #[test]
    fn pair_batches_too_large_for_memory_are_refused_with_one_that_fits() {
        let m = Gpt2Config::gpt2_small();
        let pairs = vec![pair(24, 1000, 10), pair(10, 20, 30), pair(5, 5, 5)];
        let fixed = m.num_params() as u64 * 16;
        let per_pair = 2 * m.training_bytes_per_rollout(1024, 1000, false);
        let e = check_pairs_fit("DPO", &m, &pairs, 8, true, fixed, Some(10 << 30))
            .unwrap_err()
            .to_string();
        // Three pairs: a batch of 8 holds 3.
        assert!(
            e.contains("on batches of 3 pairs of sequences padded to 1024 tokens"),
            "{e}"
        );
        let fits = ((10u64 << 30) - fixed) / per_pair;
        assert_eq!(fits, 3 - 1, "{e}");
        assert!(
            e.starts_with("DPO field `batch_size`: not enough memory"),
            "{e}"
        );
        assert!(
            e.contains("--batch-size 2 or less fits (--grad-accum"),
            "{e}"
        );
        check_pairs_fit("DPO", &m, &pairs, 2, true, fixed, Some(10 << 30)).unwrap();
        check_pairs_fit("DPO", &m, &pairs, 8, true, fixed, None).unwrap();
        // Without logits: about 10% less per pair.
        let reward_pair = 2 * m.training_bytes_per_sequence(1024, false);
        assert!(
            reward_pair < per_pair * 95 / 100,
            "{reward_pair} {per_pair}"
        );
        let three = fixed + 3 * reward_pair;
        check_pairs_fit("reward model", &m, &pairs, 8, false, fixed, Some(three)).unwrap();
        check_pairs_fit("reward model", &m, &pairs, 8, false, fixed, Some(three - 1)).unwrap_err();
        let e = check_pairs_fit("DPO", &m, &pairs, 1, true, fixed, Some(fixed + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not even one pair fits"), "{e}");
    }
}
