//! The rollout engine of the online trainers (GRPO, RLOO, PPO): batched,
//! KV-cached sampling from a kiln-lm GPT-2 that records what the update
//! needs, and the teacher-forced pass that recomputes it.
//!
//! **Log-probabilities.** Each sampled token's log-probability is taken from
//! `log_softmax(logits / temperature)`, the distribution TRL's trainers
//! score (top-k / top-p truncation only shapes the draw, as in TRL). The
//! teacher-forced [`token_logps`] over the same tokens at the same
//! temperature gives the same numbers (to float rounding), so the first
//! update of each rollout starts at a policy ratio of exactly 1 when the
//! old log-probs come from that pass.
//!
//! **Speed.** Prompts are left-padded into one batch and decoded with the
//! KV cache; rows that finish (EOS) leave the batch at once (their cache
//! rows are dropped), so a batch where most completions are short pays for
//! the long ones only. Rollout time is measured on its own
//! ([`Rollout::seconds`]) so trainers report it beside update time.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::rng::SeededRng;
use kiln_lm::generate::{pick, process_logits};
use kiln_lm::{GenerationConfig, Gpt2, KvCache};

use crate::error::{Result, RlhfError};
use crate::logps::CompletionBatch;

/// Sampled completions of a batch of prompts.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Prompt ids of each row.
    pub prompts: Vec<Vec<u32>>,
    /// Completion ids of each row (EOS included when generation ended on it).
    pub completions: Vec<Vec<u32>>,
    /// Per completion token, `log_softmax(logits / temperature)` at the token.
    pub logprobs: Vec<Vec<f32>>,
    /// Whether each completion ended with EOS (its last id is EOS).
    pub eos: Vec<bool>,
    /// Seconds spent sampling.
    pub seconds: f64,
}

impl Rollout {
    /// Rows.
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// Completion tokens in all.
    pub fn tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
    }

    /// Completion lengths.
    pub fn lengths(&self) -> Vec<usize> {
        self.completions.iter().map(Vec::len).collect()
    }

    /// `[R, T]` completion ids right-padded with `pad` and the `[R, T]` mask
    /// (1 on real completion tokens, EOS included; 0 on padding), `T` the
    /// longest completion: TRL's `completion_ids` and `completion_mask`.
    pub fn padded(&self, pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
        let r = self.len();
        let t = self.completions.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![pad; r * t];
        let mut mask = vec![0f32; r * t];
        for (i, c) in self.completions.iter().enumerate() {
            ids[i * t..i * t + c.len()].copy_from_slice(c);
            mask[i * t..i * t + c.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        Ok((
            Tensor::from_vec(ids, (r, t), device)?,
            Tensor::from_vec(mask, (r, t), device)?,
        ))
    }

    /// The `(prompt, completion)` rows, for a [`TokenBatch`].
    pub fn rows(&self) -> Vec<(&[u32], &[u32])> {
        self.prompts
            .iter()
            .zip(&self.completions)
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect()
    }

    /// The sampled log-probabilities, flat in row order (the layout of a
    /// [`TokenBatch`]).
    pub fn flat_logprobs(&self) -> Vec<f32> {
        self.logprobs.iter().flatten().copied().collect()
    }
}

/// `log_softmax(logits / t)[i]`, computed as [`token_logps`] computes it
/// when the policy is scored: the logits times `1 / t` in f32 (candle's
/// division by a scalar), then `kiln_core::ops::log_softmax_at`, the row
/// computation of `token_logprobs` (its `exp` in SIMD lanes, f64 sums). A
/// scalar f64 `exp` per vocabulary entry had taken ~3% of a 16-row rollout.
fn tempered_logprob(logits: &[f32], i: usize, t: f64) -> f32 {
    if t == 1.0 {
        return kiln_core::ops::log_softmax_at(logits, i);
    }
    let inv = (1.0 / t) as f32;
    let scaled: Vec<f32> = logits.iter().map(|&s| s * inv).collect();
    kiln_core::ops::log_softmax_at(&scaled, i)
}

/// Samples one completion per prompt (`prompts` are token ids, any lengths,
/// each at least one token) as one KV-cached batch. `cfg.temperature` must
/// be above 0 (a policy gradient needs a stochastic policy); repetition
/// penalty, top-k and top-p shape the draw; stop strings are not supported
/// (use EOS). Row `i` draws from its own stream seeded by `cfg.seed` and `i`.
pub fn rollout(model: &Gpt2, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Rollout> {
    let t0 = Instant::now();
    cfg.validate()?;
    if cfg.temperature <= 0.0 {
        return Err(RlhfError::config(
            "rollout",
            "temperature",
            "online RL samples from the policy: use a temperature above 0",
        ));
    }
    if !cfg.stop.is_empty() {
        return Err(RlhfError::config(
            "rollout",
            "stop",
            "stop strings are not supported in rollouts; end completions with EOS",
        ));
    }
    let mcfg = model.config();
    let b = prompts.len();
    if b == 0 {
        return Err(RlhfError::Input("no prompts to roll out".into()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(RlhfError::Input(format!("prompt {i} is empty")));
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= mcfg.vocab_size) {
            return Err(RlhfError::Input(format!(
                "prompt {i} has token id {t}, outside the vocabulary 0..{}",
                mcfg.vocab_size
            )));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= mcfg.n_positions {
        return Err(RlhfError::Input(format!(
            "a prompt of {longest} tokens leaves no room in the context of {}",
            mcfg.n_positions
        )));
    }
    let eos = cfg.eos_token_id.or(mcfg.eos_token_id);
    let stop_on = if cfg.ignore_eos { None } else { eos };
    let banned = if cfg.ignore_eos { eos } else { None };
    let pad = eos.unwrap_or(0);
    let mut flat = Vec::with_capacity(b * longest);
    for p in prompts {
        flat.extend(std::iter::repeat_n(pad, longest - p.len()));
        flat.extend_from_slice(p);
    }
    let dev = model.device();
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut cache = KvCache::with_left_padding(mcfg.n_layer, pads);
    let input = Tensor::from_vec(flat, (b, longest), dev)?;
    let mut logits = model.forward_cached(&input, &mut cache, false)?;
    let mut rngs: Vec<SeededRng> = (0..b)
        .map(|i| SeededRng::derive(cfg.seed, &[i as u64]))
        .collect();
    let mut completions = vec![Vec::new(); b];
    let mut logprobs = vec![Vec::new(); b];
    let mut ended = vec![false; b];
    // Rows still decoding, in cache order.
    let mut active: Vec<usize> = (0..b).collect();
    let temp = cfg.temperature;
    let room = mcfg.n_positions - longest;
    for step in 0..cfg.max_new_tokens.min(room) {
        let all: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (k, &r) in active.iter().enumerate() {
            let raw = &all[k];
            let mut scores = raw.clone();
            if cfg.repetition_penalty != 1.0 {
                let seen: Vec<u32> = prompts[r].iter().chain(&completions[r]).copied().collect();
                process_logits(&mut scores, &seen, cfg);
            } else {
                process_logits(&mut scores, &[], cfg);
            }
            if let Some(e) = banned.filter(|&e| (e as usize) < scores.len()) {
                scores[e as usize] = f32::NEG_INFINITY;
            }
            let t = pick(&scores, false, &mut rngs[r]);
            completions[r].push(t);
            logprobs[r].push(tempered_logprob(raw, t as usize, temp));
            if Some(t) == stop_on {
                ended[r] = true;
            } else {
                keep.push(k);
                next.push(t);
            }
        }
        if keep.is_empty() || step + 1 == cfg.max_new_tokens.min(room) {
            break;
        }
        if keep.len() < active.len() {
            cache.select_rows(&keep)?;
            active = keep.iter().map(|&k| active[k]).collect();
        }
        let n = next.len();
        let ids = Tensor::from_vec(next, (n, 1), dev)?;
        logits = model.forward_cached(&ids, &mut cache, false)?;
    }
    Ok(Rollout {
        prompts: prompts.to_vec(),
        completions,
        logprobs,
        eos: ended,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A teacher-forced batch of `(prompt, completion)` rows: kiln's
/// [`CompletionBatch`] (logits only at completion positions) plus each
/// completion token's row, in the flat `[N]` layout every per-token
/// quantity of the online trainers uses (row 0's tokens, then row 1's, ...).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// The positions, targets and per-row segments.
    pub batch: CompletionBatch,
    /// `owner[n]`: the row of completion token `n`.
    pub owner: Vec<usize>,
}

impl TokenBatch {
    /// Builds the batch; `pad` fills the right.
    pub fn new(rows: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        let batch = CompletionBatch::new(rows, pad, device)?;
        let owner = batch
            .tokens
            .iter()
            .enumerate()
            .flat_map(|(r, &n)| std::iter::repeat_n(r, n))
            .collect();
        Ok(Self { batch, owner })
    }

    /// Completion tokens in all (`N`).
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// Whether the batch has no completion token.
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.batch.rows()
    }

    /// A per-row value spread over the row's tokens: `[N]`.
    pub fn per_token(&self, per_row: &[f64], device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.owner.iter().map(|&r| per_row[r] as f32).collect();
        Ok(Tensor::from_vec(v, self.len(), device)?)
    }
}

/// Per-token outputs of a teacher-forced pass.
#[derive(Debug, Clone)]
pub struct TokenLogps {
    /// `[N]` `log_softmax(logits / temperature)` at each completion token
    /// (differentiable unless the pass was detached).
    pub logps: Tensor,
    /// `[N]` entropy of `softmax(logits / temperature)` at each position,
    /// when asked for (detached).
    pub entropy: Option<Tensor>,
    /// `[N, C]` the final hidden states at the positions (what a value head
    /// reads).
    pub hidden: Tensor,
}

/// Teacher-forced per-token log-probabilities of `batch` under `model` at
/// `temperature` (`train` turns dropout on; online RL keeps it off, as TRL
/// does, so that the ratio starts at 1).
pub fn token_logps(
    model: &Gpt2,
    batch: &TokenBatch,
    temperature: f64,
    train: bool,
    entropy: bool,
) -> Result<TokenLogps> {
    let b = &batch.batch;
    let h = model.hidden_states(&b.inputs, train)?;
    let (r, l, c) = h.dims3()?;
    let hidden = h.reshape((r * l, c))?.index_select(&b.positions, 0)?;
    let mut logits = model.logits(&hidden)?;
    if temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let logps = kiln_core::ops::token_logprobs(&logits, &b.targets)?;
    let entropy = if entropy {
        Some(kiln_core::ops::token_entropy(&logits.detach())?)
    } else {
        None
    };
    Ok(TokenLogps {
        logps,
        entropy,
        hidden,
    })
}

/// Sums an `[N]` per-token tensor per row: `[R]`.
pub fn row_sums(batch: &TokenBatch, per_token: &Tensor) -> Result<Tensor> {
    Ok(batch
        .batch
        .segments
        .matmul(&per_token.unsqueeze(1)?)?
        .squeeze(1)?)
}
