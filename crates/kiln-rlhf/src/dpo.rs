//! The DPO trainer on kiln-core's [`Session`]: the policy is the trained
//! part, the reference a frozen one (a copy of the starting model), or its
//! log-probabilities are computed once before training and kept in the run
//! folder (`ref_logps.safetensors`, TRL's `precompute_ref_log_probs`).
//!
//! Each optimizer step takes `batch_size × grad_accum` pairs; every
//! micro-batch's loss is divided by the step's pair and chosen-token counts
//! ([`LossScale`]), so accumulation equals one big batch, per-token terms
//! included. Dropout is off unless asked for (TRL's `disable_dropout`).
//! Logged under TRL's names: `loss`, `rewards/chosen`, `rewards/rejected`,
//! `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
//! `logits/chosen`, `logits/rejected`, `grad_norm`, `learning_rate`; the
//! held-out pairs after each epoch under split `eval`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_core::image::plot_metrics;
use kiln_core::run::RunOptions;
use kiln_core::session::{Record, Session};
use kiln_lm::{Gpt2, ModelFiles};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};
use crate::logps::{pair_logps, PairLogps};
use crate::loss::{dpo_loss, DpoLossConfig, DpoLossOutput, LossScale};
use crate::models::{frozen_from, frozen_view, load_weights, policy_dir, store_of, trainable_from};
use crate::prefs::{EncodedPair, PreferenceData};
use crate::train::{predicted, read_split, save_chat_template, TrainingArgs};

/// The run kind in `config.toml`.
pub const RUN_KIND: &str = "dpo";

/// Settings a resumed run may change (`train.epochs`; the linear schedule
/// stretches to the new length).
pub const MAY_CHANGE_ON_RESUME: &[&str] = &["train.epochs"];

/// The run folder's file of precomputed reference log-probabilities.
pub const REF_LOGPS_FILE: &str = "ref_logps.safetensors";

/// Where the trained policy is written (a Hugging Face folder).
pub const MODEL_DIR: &str = "model";

/// DPO's settings (TRL's `DPOConfig` names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// The preference pairs (JSONL in TRL's forms).
    pub prefs: PathBuf,
    /// The starting policy and reference: a Hugging Face GPT-2 folder or a
    /// kiln run folder with a `model/` folder.
    pub model: PathBuf,
    /// A chat template for conversational pairs (`chatml`, `llama-3.1`, or a
    /// path); default: the model folder's own, if any.
    pub chat_template: Option<String>,
    /// Longest prompt + completion in tokens (longer pairs are dropped and
    /// counted); at most the model's context.
    pub max_length: usize,
    /// Keep the model's dropout on during training (TRL's `disable_dropout
    /// = False`).
    pub dropout: bool,
    /// Compute the reference's log-probabilities once, before training,
    /// instead of keeping a frozen copy of the model.
    pub precompute_ref_log_probs: bool,
    /// The loss.
    pub loss: DpoLossConfig,
    /// Optimisation.
    pub train: TrainingArgs,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            prefs: PathBuf::new(),
            model: PathBuf::new(),
            chat_template: None,
            max_length: 1024,
            dropout: false,
            precompute_ref_log_probs: false,
            loss: DpoLossConfig::default(),
            train: TrainingArgs::with_lr(1e-6),
        }
    }
}

impl DpoConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.prefs.as_os_str().is_empty() {
            return Err(RlhfError::config("DPO", "prefs", "give a preference file"));
        }
        if self.model.as_os_str().is_empty() {
            return Err(RlhfError::config("DPO", "model", "give a model folder"));
        }
        if self.max_length < 2 {
            return Err(RlhfError::config(
                "DPO",
                "max_length",
                format!("must be at least 2, got {}", self.max_length),
            ));
        }
        self.loss.validate()?;
        self.train.validate("DPO")
    }
}

/// Things a caller controls besides the config (not saved with the run).
#[derive(Debug, Clone, Copy, Default)]
pub struct Control {
    /// Stop as on Ctrl-C once this many optimizer steps are done in all
    /// (tests of exact resume; programs that train in slices).
    pub stop_at: Option<u64>,
}

/// The outcome of [`train_dpo`].
#[derive(Debug, Clone, Serialize)]
pub struct DpoReport {
    /// Means over the last epoch's steps, by TRL's names.
    pub train: BTreeMap<String, f64>,
    /// The held-out pairs after the last epoch.
    pub eval: Option<BTreeMap<String, f64>>,
    /// Pairs read, kept and dropped.
    pub data: PreferenceData,
    /// Training pairs.
    pub train_pairs: usize,
    /// Held-out pairs.
    pub eval_pairs: usize,
    /// Epochs completed.
    pub epochs: u64,
    /// Optimizer steps done.
    pub steps: u64,
    /// Training throughput (pairs per second).
    pub pairs_per_s: f64,
    /// Whether the run stopped early (Ctrl-C or [`Control::stop_at`]).
    pub interrupted: bool,
    /// The trained policy (a Hugging Face folder), when the run finished.
    pub model_dir: Option<PathBuf>,
}

/// Sums of a set of pairs' DPO metrics.
#[derive(Debug, Clone, Default)]
pub struct DpoStats {
    pairs: f64,
    loss: f64,
    rewards_chosen: f64,
    rewards_rejected: f64,
    accuracies: f64,
    logps_chosen: f64,
    logps_rejected: f64,
    logit_chosen: f64,
    logit_rejected: f64,
    tokens_chosen: f64,
    tokens_rejected: f64,
}

impl DpoStats {
    /// Adds a micro-batch: its (already scaled) loss and its pairs.
    pub fn add(&mut self, out: &DpoLossOutput, p: &PairLogps) -> Result<()> {
        let rc = out.chosen_rewards.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let rr = out
            .rejected_rewards
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let lc = p.logps.chosen.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let lr = p.logps.rejected.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.pairs += rc.len() as f64;
        self.loss += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.rewards_chosen += rc.iter().sum::<f64>();
        self.rewards_rejected += rr.iter().sum::<f64>();
        self.accuracies += rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64;
        self.logps_chosen += lc.iter().sum::<f64>();
        self.logps_rejected += lr.iter().sum::<f64>();
        self.logit_chosen += p.chosen_logit_sum;
        self.logit_rejected += p.rejected_logit_sum;
        self.tokens_chosen += p.chosen_tokens as f64;
        self.tokens_rejected += p.rejected_tokens as f64;
        Ok(())
    }

    /// TRL's metrics: `loss` (the sum of the scaled micro-batch losses),
    /// means per pair of the rewards, accuracies, margins and log-probs, and
    /// the mean logit per completion token.
    pub fn fields(&self) -> Vec<(String, f64)> {
        let n = self.pairs.max(1.0);
        vec![
            ("loss".into(), self.loss),
            ("rewards/chosen".into(), self.rewards_chosen / n),
            ("rewards/rejected".into(), self.rewards_rejected / n),
            ("rewards/accuracies".into(), self.accuracies / n),
            (
                "rewards/margins".into(),
                (self.rewards_chosen - self.rewards_rejected) / n,
            ),
            ("logps/chosen".into(), self.logps_chosen / n),
            ("logps/rejected".into(), self.logps_rejected / n),
            (
                "logits/chosen".into(),
                self.logit_chosen / self.tokens_chosen.max(1.0),
            ),
            (
                "logits/rejected".into(),
                self.logit_rejected / self.tokens_rejected.max(1.0),
            ),
        ]
    }
}

/// The scale of a set of pairs: their count and chosen tokens.
pub fn scale_of(pairs: &[&EncodedPair]) -> LossScale {
    LossScale {
        pairs: pairs.len() as f64,
        chosen_tokens: pairs
            .iter()
            .map(|p| predicted(&p.prompt, &p.chosen))
            .sum::<usize>() as f64,
    }
}

/// Where reference log-probabilities come from.
enum Reference {
    /// A frozen copy of the starting model.
    Model(Box<Gpt2>),
    /// Computed once: `(chosen, rejected)` per training and held-out pair.
    Precomputed {
        train: (Vec<f32>, Vec<f32>),
        eval: (Vec<f32>, Vec<f32>),
    },
}

#[derive(Clone, Copy)]
enum Set {
    Train,
    Eval,
}

impl Reference {
    /// `(chosen, rejected)` reference log-probs `[B]` of `pairs` (indices
    /// `idx` into the set).
    fn logps(
        &self,
        set: Set,
        idx: &[usize],
        pairs: &[&EncodedPair],
        pad: u32,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Model(m) => {
                let r = pair_logps(m, pairs, pad, false)?;
                Ok((r.logps.chosen.detach(), r.logps.rejected.detach()))
            }
            Self::Precomputed { train, eval } => {
                let (c, r) = match set {
                    Set::Train => train,
                    Set::Eval => eval,
                };
                let pick = |v: &[f32]| -> Result<Tensor> {
                    let x: Vec<f32> = idx.iter().map(|&i| v[i]).collect();
                    Ok(Tensor::from_vec(x, idx.len(), dev)?)
                };
                Ok((pick(c)?, pick(r)?))
            }
        }
    }
}

/// `(chosen, rejected)` log-probs of every pair under `model` (eval mode),
/// `batch` pairs at a time.
pub fn all_pair_logps(
    model: &Gpt2,
    pairs: &[EncodedPair],
    batch: usize,
    pad: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut c, mut r) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let p = pair_logps(model, &refs, pad, false)?;
        c.extend(p.logps.chosen.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        r.extend(p.logps.rejected.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok((c, r))
}

/// DPO metrics of `pairs` (eval mode), the loss averaged over all of them.
fn evaluate(
    cfg: &DpoConfig,
    policy: &Gpt2,
    reference: &Reference,
    pairs: &[EncodedPair],
    pad: u32,
) -> Result<DpoStats> {
    let all: Vec<&EncodedPair> = pairs.iter().collect();
    let scale = scale_of(&all);
    let mut st = DpoStats::default();
    let idx: Vec<usize> = (0..pairs.len()).collect();
    for chunk in idx.chunks(cfg.train.batch_size) {
        let ps: Vec<&EncodedPair> = chunk.iter().map(|&i| &pairs[i]).collect();
        let (rc, rr) = reference.logps(Set::Eval, chunk, &ps, pad, policy.device())?;
        let p = pair_logps(policy, &ps, pad, false)?;
        let out = dpo_loss(&cfg.loss, &p.logps, &rc, &rr, &scale)?;
        st.add(&out, &p)?;
    }
    Ok(st)
}

fn to_map(fields: Vec<(String, f64)>) -> BTreeMap<String, f64> {
    fields.into_iter().collect()
}

/// Trains a policy with DPO on `cfg.prefs` from `cfg.model`; writes
/// checkpoints, `metrics.jsonl`, `loss.png`, the reference log-probs (when
/// precomputed) and the trained policy as a Hugging Face folder (`model/`).
pub fn train_dpo(cfg: &DpoConfig, device: &Device, opts: &RunOptions) -> Result<DpoReport> {
    train_dpo_with(cfg, device, opts, &Control::default())
}

/// [`train_dpo`] with [`Control`]s.
pub fn train_dpo_with(
    cfg: &DpoConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<DpoReport> {
    cfg.validate()?;
    let mdir = policy_dir(&cfg.model)?;
    let split = read_split(
        &cfg.prefs,
        &mdir,
        cfg.chat_template.as_deref(),
        cfg.max_length,
        cfg.train.eval_fraction,
        cfg.train.seed,
    )?;
    let files = ModelFiles::from_dir(&mdir)?;
    let (mcfg, tensors) = load_weights(&files, device)?;
    opts.check_kind(RUN_KIND)?;
    if device.is_cpu() {
        // The policy's training state, and a reference model's weights
        // unless its log-probabilities are computed once up front.
        let params = mcfg.num_params() as u64;
        let reference = if cfg.precompute_ref_log_probs { 0 } else { 4 };
        crate::train::check_pairs_fit(
            "DPO",
            &mcfg,
            &split.train,
            cfg.train.batch_size,
            true,
            params.saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM + reference),
            kiln_core::memory::available(),
        )?;
    }
    let run = opts.open("dpo", RUN_KIND, cfg, MAY_CHANGE_ON_RESUME)?;
    run.check_inputs(&[&cfg.prefs])?;
    let dir = run.dir().clone();
    let pad = split.pad;
    let (policy, policy_vs) =
        trainable_from(&mcfg, &tensors, device, cfg.train.seed, &files.config)?;
    let steps_per_epoch = cfg.train.steps_per_epoch(split.train.len());
    let sched = cfg.train.schedule(cfg.train.epochs * steps_per_epoch);
    let opt = cfg.train.optimizer(&policy_vs)?;
    let mut builder = Session::builder(run, cfg.train.seed).part("policy", &policy_vs, opt);
    if cfg.train.max_grad_norm > 0.0 {
        builder = builder.clip_grad_norm(cfg.train.max_grad_norm);
    }
    let (reference, ref_vs) = if cfg.precompute_ref_log_probs {
        let path = dir.join(REF_LOGPS_FILE);
        let pre = if path.is_file() {
            read_ref_logps(&path, split.train.len(), split.eval.len(), device)?
        } else {
            let m = frozen_from(&mcfg, tensors, device)?;
            let b = cfg.train.batch_size;
            let train = all_pair_logps(&m, &split.train, b, pad)?;
            let eval = all_pair_logps(&m, &split.eval, b, pad)?;
            write_ref_logps(&path, &train, &eval, device)?;
            (train, eval)
        };
        (
            Reference::Precomputed {
                train: pre.0,
                eval: pre.1,
            },
            None,
        )
    } else {
        // The reference keeps the starting weights (read from the model
        // folder, so a resumed run gets the same reference).
        let vs = store_of(&tensors, cfg.train.seed)?;
        drop(tensors);
        let m = frozen_view(&mcfg, &vs, device)?;
        (Reference::Model(Box::new(m)), Some(vs))
    };
    if let Some(vs) = &ref_vs {
        builder = builder.frozen("ref", vs);
    }
    let mut builder = builder
        .epochs(cfg.train.epochs, steps_per_epoch)
        .observer(opts.observer());
    if let Some(n) = control.stop_at {
        builder = builder.stop_at(n);
    }
    let mut s = builder.start()?;
    let mut last_eval = None;
    let n_train = split.train.len();
    let end = s.run_epochs(
        |epoch, start| {
            cfg.train
                .epoch_steps(n_train, epoch, start)
                .into_iter()
                .map(Ok::<_, RlhfError>)
        },
        |s, idx| {
            sched.apply(s.opt_mut("policy")?);
            let pairs: Vec<&EncodedPair> = idx.iter().map(|&i| &split.train[i]).collect();
            let scale = scale_of(&pairs);
            let mut st = DpoStats::default();
            for (mi, mp) in idx
                .chunks(cfg.train.batch_size)
                .zip(pairs.chunks(cfg.train.batch_size))
            {
                let (rc, rr) = reference.logps(Set::Train, mi, mp, pad, device)?;
                let p = pair_logps(&policy, mp, pad, cfg.dropout)?;
                let out = dpo_loss(&cfg.loss, &p.logps, &rc, &rr, &scale)?;
                s.backward("policy", &out.loss)?;
                st.add(&out, &p)?;
            }
            let norm = s.step("policy")?;
            let mut rec = Record::new(idx.len());
            for (k, v) in st.fields() {
                rec.push(k, v);
            }
            if let Some(n) = norm {
                rec.push("grad_norm", n);
            }
            rec.push("learning_rate", s.opt("policy")?.lr(0));
            Ok(rec)
        },
        |s| {
            if !split.eval.is_empty() {
                let st = evaluate(cfg, &policy, &reference, &split.eval, pad)?;
                let fields = st.fields();
                let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                s.record("eval", &refs)?;
                last_eval = Some(to_map(fields));
            }
            Ok(())
        },
    )?;
    let interrupted = !end.completed();
    if last_eval.is_none() && !interrupted && !split.eval.is_empty() {
        // Resumed after the last epoch's evaluation: eval mode is
        // deterministic, so this is what that run logged.
        last_eval = Some(to_map(
            evaluate(cfg, &policy, &reference, &split.eval, pad)?.fields(),
        ));
    }
    let train_means: BTreeMap<String, f64> = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ]
    .iter()
    .filter_map(|k| s.last_epoch(k).map(|v| (k.to_string(), v)))
    .collect();
    let mut report = DpoReport {
        train: train_means,
        eval: last_eval,
        data: split.stats.clone(),
        train_pairs: split.train.len(),
        eval_pairs: split.eval.len(),
        epochs: s.epoch(),
        steps: s.global_step(),
        pairs_per_s: s.observer.throughput(),
        interrupted,
        model_dir: None,
    };
    if !interrupted {
        let out = dir.join(MODEL_DIR);
        policy.save_pretrained(&out, Some(&split.tokenizer))?;
        save_chat_template(&out, split.chat.as_ref())?;
        report.model_dir = Some(out);
        let metrics = dir.join("metrics.jsonl");
        if metrics.exists() {
            plot_metrics(
                &metrics,
                &dir.join("loss.png"),
                "DPO: loss and reward margin",
                &["loss", "rewards/margins"],
            )?;
        }
        let v = serde_json::to_value(&report)
            .map_err(|e| RlhfError::file(dir.path(), e.to_string()))?;
        s.finish(v)?;
    }
    Ok(report)
}

fn write_ref_logps(
    path: &Path,
    train: &(Vec<f32>, Vec<f32>),
    eval: &(Vec<f32>, Vec<f32>),
    dev: &Device,
) -> Result<()> {
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), dev);
    let tensors = vec![
        ("train.chosen".to_string(), t(&train.0)?),
        ("train.rejected".to_string(), t(&train.1)?),
        ("eval.chosen".to_string(), t(&eval.0)?),
        ("eval.rejected".to_string(), t(&eval.1)?),
    ];
    kiln_core::checkpoint::save_safetensors(&tensors, None, path)
        .map_err(|e| RlhfError::file(path, e.to_string()))
}

type RefLogps = ((Vec<f32>, Vec<f32>), (Vec<f32>, Vec<f32>));

fn read_ref_logps(path: &Path, n_train: usize, n_eval: usize, dev: &Device) -> Result<RefLogps> {
    let m = candle_core::safetensors::load(path, dev)
        .map_err(|e| RlhfError::file(path, format!("not a readable safetensors file: {e}")))?;
    let get = |k: &str, n: usize| -> Result<Vec<f32>> {
        let v = m
            .get(k)
            .ok_or_else(|| RlhfError::file(path, format!("no tensor `{k}`")))?
            .to_vec1::<f32>()?;
        if v.len() != n {
            return Err(RlhfError::file(
                path,
                format!("`{k}` has {} values for {n} pairs; the preference file changed since the run started", v.len()),
            ));
        }
        Ok(v)
    };
    Ok((
        (
            get("train.chosen", n_train)?,
            get("train.rejected", n_train)?,
        ),
        (get("eval.chosen", n_eval)?, get("eval.rejected", n_eval)?),
    ))
}
