//! Sampling from a policy, best-of-n against a reward model, and
//! reward-weighted fine-tuning: the chapter's `loss = lm_loss * reward` done
//! soundly.
//!
//! **Sampling.** Prompts are generated as batches with kiln-lm's KV-cached
//! [`generate_batch`]: the `n` samples of a prompt are `n` rows of one call
//! (each row has its own seeded stream, so they differ), several prompts per
//! call.
//!
//! **Best-of-n.** `n` samples per prompt in one batched call, each scored by
//! the reward model on `prompt + completion + EOS` (the text the reward
//! model was trained on), the best kept. Its KL to the sampling policy is
//! at most `log n - (n - 1)/n` (Stiennon et al. 2020; Beirami et al. 2024).
//!
//! **Reward-weighted fine-tuning** ([`train_rwft`]). Each iteration samples
//! `n` completions for each of a few prompts from the current policy,
//! scores them, and takes one step on the completions' negative
//! log-likelihood weighted by `softmax(reward / τ)` over each prompt's
//! samples (a token-weighted mean: `-Σ w log π(y|x) / Σ w |y|`). The chapter
//! multiplies the LM loss by a raw reward, whose sign and scale are
//! arbitrary (a negative reward *raises* the loss's pull the wrong way, a
//! constant shift changes the step size); the softmax makes the weights
//! positive, invariant to shifting the rewards, and τ sets how greedy the
//! update is (τ → 0: best-of-n distillation, τ → ∞: plain self-imitation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_core::optim::LrSchedule;
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use kiln_core::session::{Record, Session};
use kiln_lm::{generate_batch, Generation, GenerationConfig, Gpt2, Gpt2Tokenizer, ModelFiles};
use kiln_prompt::ChatTemplate;
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::logps::{completion_logps, CompletionBatch};
use crate::models::{load_weights, model_dir, policy_dir, trainable_from};
use crate::prefs::chat_template_for;
use crate::reward::RewardModel;
use crate::train::{save_chat_template, Optim, TrainingArgs};

/// Reads prompts: a `.jsonl` file of `{"prompt": text or messages}` lines
/// (TRL's prompt-only form; messages are rendered with `chat` and the
/// generation prompt), or any other file with one prompt per non-empty line.
pub fn read_prompts(path: &Path, chat: Option<&ChatTemplate>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| RlhfError::file(path, e.to_string()))?;
    // A byte order mark (Windows editors) is not part of the first prompt.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            out.push(line.to_string());
            continue;
        }
        let err = |msg: String| RlhfError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        match v.get("prompt") {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(serde_json::Value::Array(_)) => {
                let msgs: Vec<kiln_prompt::Message> = serde_json::from_value(v["prompt"].clone())
                    .map_err(|e| {
                    err(format!(
                        "field `prompt`: expected {{role, content}} messages: {e}"
                    ))
                })?;
                let chat = chat.ok_or_else(|| {
                    err("a conversational prompt needs a chat template (--chat-template)".into())
                })?;
                out.push(chat.render(&msgs, true).map_err(|e| err(e.to_string()))?);
            }
            _ => {
                return Err(err(
                    "expected an object with a `prompt` (a string or a list of messages)".into(),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(RlhfError::file(path, "no prompts in the file"));
    }
    Ok(out)
}

/// Samples `n` completions for every prompt, `batch` prompts per batched
/// call (`batch × n` rows). The generator's EOS is the tokenizer's unless
/// `cfg` names one. Deterministic in `cfg.seed` and `batch`.
pub fn sample_completions(
    model: &Gpt2,
    tok: &Gpt2Tokenizer,
    prompts: &[String],
    n: usize,
    cfg: &GenerationConfig,
    batch: usize,
) -> Result<Vec<Vec<Generation>>> {
    if n == 0 {
        return Err(RlhfError::config("sampling", "n", "must be at least 1"));
    }
    let mut cfg = cfg.clone();
    if cfg.eos_token_id.is_none() {
        cfg.eos_token_id = tok.eos_id().or(model.config().eos_token_id);
    }
    let seed = cfg.seed;
    let mut out = Vec::with_capacity(prompts.len());
    for (c, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let mut rows = Vec::with_capacity(chunk.len() * n);
        for p in chunk {
            let mut ids = tok.encode(p)?;
            if ids.is_empty() {
                ids.push(cfg.eos_token_id.unwrap_or(0));
            }
            rows.extend(std::iter::repeat_n(ids, n));
        }
        cfg.seed = SeededRng::derive(seed, &[0x5A, c as u64]).below(usize::MAX) as u64;
        let mut gens = generate_batch(model, &rows, &cfg, Some(tok), None)?.into_iter();
        for _ in chunk {
            out.push(gens.by_ref().take(n).collect());
        }
    }
    Ok(out)
}

/// Reward-model scores of `prompt + completion` texts, EOS appended as in
/// training (tokenized with the reward model's tokenizer).
pub fn score_texts(
    rm: &RewardModel,
    tok: &Gpt2Tokenizer,
    prompt: &str,
    completions: &[String],
    batch: usize,
) -> Result<Vec<f32>> {
    let eos = tok.eos_id().map(|_| kiln_lm::END_OF_TEXT).unwrap_or("");
    let seqs = completions
        .iter()
        .map(|c| {
            let mut ids = tok.encode(&format!("{prompt}{c}{eos}"))?;
            ids.truncate(rm.config().n_positions);
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    rm.score_all(&seqs, batch)
}

/// One sampled completion and its score.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    /// The completion's text (EOS not included).
    pub text: String,
    /// Its token ids (EOS included when generation ended on it).
    pub ids: Vec<u32>,
    /// The reward model's score.
    pub reward: f32,
    /// Its log-probability under the sampling policy.
    pub logprob: f32,
}

/// Best-of-n for one prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestOfN {
    /// The prompt.
    pub prompt: String,
    /// Every sample, in order.
    pub candidates: Vec<Candidate>,
    /// Index of the highest-scored one.
    pub best: usize,
}

impl BestOfN {
    /// The kept completion.
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.get(self.best)
    }
}

/// KL bound of best-of-n against the sampling policy: `log n - (n-1)/n`.
pub fn best_of_n_kl(n: usize) -> f64 {
    let n = n.max(1) as f64;
    n.ln() - (n - 1.0) / n
}

/// A reward model with the tokenizer its inputs are written with.
#[derive(Debug, Clone, Copy)]
pub struct RewardScorer<'a> {
    /// The reward model.
    pub model: &'a RewardModel,
    /// Its tokenizer.
    pub tokenizer: &'a Gpt2Tokenizer,
}

impl RewardScorer<'_> {
    /// [`score_texts`] with this model.
    pub fn score(&self, prompt: &str, completions: &[String], batch: usize) -> Result<Vec<f32>> {
        score_texts(self.model, self.tokenizer, prompt, completions, batch)
    }
}

/// Samples `n` completions per prompt (one batched call per `batch` prompts),
/// scores them with the reward model and keeps the best of each prompt.
pub fn best_of_n(
    policy: &Gpt2,
    tok: &Gpt2Tokenizer,
    scorer: &RewardScorer<'_>,
    prompts: &[String],
    n: usize,
    cfg: &GenerationConfig,
    batch: usize,
) -> Result<Vec<BestOfN>> {
    let gens = sample_completions(policy, tok, prompts, n, cfg, batch)?;
    let mut out = Vec::with_capacity(prompts.len());
    for (p, g) in prompts.iter().zip(gens) {
        let texts: Vec<String> = g.iter().map(|x| x.text.clone()).collect();
        let rewards = scorer.score(p, &texts, n)?;
        let candidates: Vec<Candidate> = g
            .into_iter()
            .zip(&rewards)
            .map(|(x, &r)| Candidate {
                logprob: x.logprobs.iter().sum(),
                text: x.text,
                ids: x.ids,
                reward: r,
            })
            .collect();
        let best = candidates
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.reward.total_cmp(&b.1.reward))
            .map(|(i, _)| i)
            .unwrap_or(0);
        out.push(BestOfN {
            prompt: p.clone(),
            candidates,
            best,
        });
    }
    Ok(out)
}

/// `softmax(rewards / tau)`.
pub fn softmax_weights(rewards: &[f32], tau: f64) -> Vec<f64> {
    let m = rewards.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = rewards
        .iter()
        .map(|&r| ((r as f64 - m) / tau).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Reward-weighted fine-tuning's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RwftConfig {
    /// Training prompts (see [`read_prompts`]).
    pub prompts: PathBuf,
    /// The starting policy (a GPT-2 folder or a kiln run folder).
    pub model: PathBuf,
    /// The reward model (a `GPT2ForSequenceClassification` folder or a
    /// `rlhf reward` run).
    pub reward_model: PathBuf,
    /// A chat template for conversational prompts.
    pub chat_template: Option<String>,
    /// Samples per prompt.
    pub n: usize,
    /// The softmax temperature τ of the weights.
    pub tau: f64,
    /// Prompts per iteration (one optimizer step each).
    pub prompts_per_iteration: usize,
    /// Iterations.
    pub iterations: u64,
    /// Sampling settings (the seed is derived per iteration).
    pub generation: GenerationConfig,
    /// Learning rate (AdamW, constant).
    pub lr: f64,
    /// Gradient clipping (0 = off).
    pub max_grad_norm: f64,
    /// Keep dropout on in the update.
    pub dropout: bool,
    /// Seed of the prompt order and the samples.
    pub seed: u64,
}

impl Default for RwftConfig {
    fn default() -> Self {
        Self {
            prompts: PathBuf::new(),
            model: PathBuf::new(),
            reward_model: PathBuf::new(),
            chat_template: None,
            n: 4,
            tau: 1.0,
            prompts_per_iteration: 8,
            iterations: 50,
            generation: GenerationConfig {
                max_new_tokens: 48,
                temperature: 1.0,
                ..Default::default()
            },
            lr: 1e-5,
            max_grad_norm: 1.0,
            dropout: false,
            seed: 0,
        }
    }
}

impl RwftConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(RlhfError::config("reward-weighted fine-tuning", f, m));
        for (f, p) in [
            ("prompts", &self.prompts),
            ("model", &self.model),
            ("reward_model", &self.reward_model),
        ] {
            if p.as_os_str().is_empty() {
                return bad(f, "give a path".into());
            }
        }
        if self.n < 2 {
            return bad(
                "n",
                format!(
                    "need at least 2 samples per prompt to weigh, got {}",
                    self.n
                ),
            );
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad("tau", format!("must be positive, got {}", self.tau));
        }
        if self.prompts_per_iteration == 0 || self.iterations == 0 {
            return bad(
                "prompts_per_iteration/iterations",
                "both must be at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("must be >= 0, got {}", self.max_grad_norm),
            );
        }
        if self.generation.temperature <= 0.0 {
            return bad(
                "generation.temperature",
                "sampling needs a temperature above 0".into(),
            );
        }
        self.generation.validate().map_err(|e| {
            RlhfError::config("reward-weighted fine-tuning", "generation", e.to_string())
        })
    }
}

/// The run kind of [`train_rwft`].
pub const RWFT_KIND: &str = "rwft";

/// Settings a resumed run may change.
pub const RWFT_MAY_CHANGE: &[&str] = &["iterations"];

/// The outcome of [`train_rwft`].
#[derive(Debug, Clone, Serialize)]
pub struct RwftReport {
    /// Means over the run's last 10 iterations.
    pub last: BTreeMap<String, f64>,
    /// Iterations done.
    pub iterations: u64,
    /// Whether the run stopped early.
    pub interrupted: bool,
    /// The trained policy, when the run finished.
    pub model_dir: Option<PathBuf>,
}

/// The reward-weighted loss of `rows` (prompt ids, completion ids) with
/// weights `w`: `-Σ w log π(y|x) / Σ w |y|`.
pub fn weighted_nll(
    policy: &Gpt2,
    rows: &[(&[u32], &[u32])],
    weights: &[f64],
    pad: u32,
    train: bool,
) -> Result<Tensor> {
    let batch = CompletionBatch::new(rows, pad, policy.device())?;
    let lp = completion_logps(policy, &batch, train)?;
    let denom: f64 = weights
        .iter()
        .zip(&lp.tokens)
        .map(|(w, &n)| w * n as f64)
        .sum::<f64>()
        .max(1e-12);
    let w: Vec<f32> = weights.iter().map(|&w| (w / denom) as f32).collect();
    let w = Tensor::from_vec(w, weights.len(), policy.device())?;
    Ok((lp.logps * w)?.sum_all()?.neg()?)
}

/// Reward-weighted fine-tuning on kiln-core's session (iterations of
/// sample → score → one weighted step; the policy is the trained part, the
/// reward model a frozen one). Writes `metrics.jsonl` (`loss`, `reward`,
/// `reward_std`, `completions/mean_length`), checkpoints and `model/`.
pub fn train_rwft(
    cfg: &RwftConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<RwftReport> {
    cfg.validate()?;
    let mdir = policy_dir(&cfg.model)?;
    let files = ModelFiles::from_dir(&mdir)?;
    let tok = files.load_tokenizer()?;
    let chat = chat_template_for(&mdir, cfg.chat_template.as_deref())?;
    let prompts = read_prompts(&cfg.prompts, chat.as_ref())?;
    let rdir = model_dir(&cfg.reward_model);
    let (rm, rm_vs) = RewardModel::load(&rdir, device, cfg.seed)?;
    let rm_tok = ModelFiles::from_dir(&rdir)?
        .load_tokenizer()
        .or_else(|_| Ok::<_, RlhfError>(tok.clone()))?;
    let (mcfg, tensors) = load_weights(&files, device)?;
    opts.check_kind(RWFT_KIND)?;
    if device.is_cpu() {
        // Each step trains on every prompt's n completions.
        let longest = prompts
            .iter()
            .map(|p| tok.encode(p).map(|ids| ids.len()))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let rows = crate::online::Rows {
            prompt: longest,
            completion: cfg.generation.max_new_tokens,
            // The weighted NLL reads the logits as they are.
            temperature_scaled: false,
            count: cfg.prompts_per_iteration.saturating_mul(cfg.n),
        };
        crate::online::update_fits("RWFT", &mcfg, rows, None, kiln_core::memory::available())?;
    }
    let run = opts.open("rwft", RWFT_KIND, cfg, RWFT_MAY_CHANGE)?;
    run.check_inputs(&[&cfg.prompts])?;
    let dir = run.dir().clone();
    let (policy, vs) = trainable_from(&mcfg, &tensors, device, cfg.seed, &files.config)?;
    drop(tensors);
    let args = TrainingArgs {
        lr: cfg.lr,
        optim: Optim::Adamw,
        ..TrainingArgs::with_lr(cfg.lr)
    };
    let opt = args.optimizer(&vs)?;
    let mut b = Session::builder(run, cfg.seed).part("policy", &vs, opt);
    if cfg.max_grad_norm > 0.0 {
        b = b.clip_grad_norm(cfg.max_grad_norm);
    }
    let mut b = b
        .frozen("reward", &rm_vs)
        .iterations(cfg.iterations)
        .observer(opts.observer());
    if let Some(n) = control.stop_at {
        b = b.stop_at(n);
    }
    let mut s = b.start()?;
    let pad = tok.eos_id().or(mcfg.eos_token_id).unwrap_or(0);
    let sched = LrSchedule::Constant;
    let end = s.run_iterations(|s| {
        sched.apply(s.opt_mut("policy")?);
        let np = prompts.len();
        let batch: Vec<String> = (0..cfg.prompts_per_iteration)
            .map(|k| {
                let pos = s.cursor as usize + k;
                let order =
                    SeededRng::derive(cfg.seed, &[0x9A55, (pos / np) as u64]).permutation(np);
                prompts[order[pos % np]].clone()
            })
            .collect();
        let mut gen = cfg.generation.clone();
        gen.seed = SeededRng::derive(cfg.seed, &[0x6E, s.iteration()]).below(usize::MAX) as u64;
        let gens = sample_completions(&policy, &tok, &batch, cfg.n, &gen, batch.len())?;
        let mut rows_ids = Vec::new();
        let mut weights = Vec::new();
        let mut all_r = Vec::new();
        let mut lens = Vec::new();
        for (p, g) in batch.iter().zip(&gens) {
            let texts: Vec<String> = g.iter().map(|x| x.text.clone()).collect();
            let r = score_texts(&rm, &rm_tok, p, &texts, cfg.n)?;
            weights.extend(softmax_weights(&r, cfg.tau));
            all_r.extend(r.iter().map(|&x| x as f64));
            let pid = tok.encode(p)?;
            for x in g {
                lens.push(x.ids.len() as f64);
                rows_ids.push((pid.clone(), x.ids.clone()));
            }
        }
        let rows: Vec<(&[u32], &[u32])> = rows_ids
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        let loss = weighted_nll(&policy, &rows, &weights, pad, cfg.dropout)?;
        let v = s.train_step("policy", &loss)?;
        s.cursor += cfg.prompts_per_iteration as u64;
        let mean = all_r.iter().sum::<f64>() / all_r.len().max(1) as f64;
        let var = all_r.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / all_r.len().max(1) as f64;
        Ok::<_, RlhfError>(
            Record::new(rows.len())
                .with("loss", v)
                .with("reward", mean)
                .with("reward_std", var.sqrt())
                .with(
                    "completions/mean_length",
                    lens.iter().sum::<f64>() / lens.len().max(1) as f64,
                ),
        )
    })?;
    let interrupted = !end.completed();
    let recs = kiln_core::run::read_metrics(&dir.join("metrics.jsonl"))?;
    let tail: Vec<_> = recs
        .iter()
        .filter(|r| r.split == "train")
        .rev()
        .take(10)
        .collect();
    let mut last = BTreeMap::new();
    for r in &tail {
        for (k, v) in &r.values {
            *last.entry(k.clone()).or_insert(0.0) += v / tail.len() as f64;
        }
    }
    let mut report = RwftReport {
        last,
        iterations: s.iteration(),
        interrupted,
        model_dir: None,
    };
    if !interrupted {
        let out = dir.join("model");
        policy.save_pretrained(&out, Some(&tok))?;
        save_chat_template(&out, chat.as_ref())?;
        report.model_dir = Some(out);
        let v = serde_json::to_value(&report)
            .map_err(|e| RlhfError::file(dir.path(), e.to_string()))?;
        s.finish(v)?;
    }
    Ok(report)
}

/// Mean of the per-sample sequence KL estimate `log π(y|x) - log π_ref(y|x)`
/// for samples `y ~ π`: `policy_logps` are the samples' log-probabilities
/// under the policy, `reference` scores `(prompt ids, completion ids)` rows.
pub fn sample_kl(
    reference: &Gpt2,
    rows: &[(&[u32], &[u32])],
    policy_logps: &[f64],
    pad: u32,
    batch: usize,
) -> Result<f64> {
    let mut total = 0.0;
    let mut n = 0usize;
    for (chunk, lp) in rows
        .chunks(batch.max(1))
        .zip(policy_logps.chunks(batch.max(1)))
    {
        let b = CompletionBatch::new(chunk, pad, reference.device())?;
        let r = completion_logps(reference, &b, false)?
            .logps
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (p, q) in lp.iter().zip(&r) {
            total += p - q;
            n += 1;
        }
    }
    Ok(total / n.max(1) as f64)
}
