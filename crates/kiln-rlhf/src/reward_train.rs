//! The reward model's trainer (TRL's `RewardTrainer`) on kiln-core's
//! [`Session`]: Bradley–Terry on `prompt + chosen` against
//! `prompt + rejected` (EOS appended to text, as TRL), the pair's `margin`
//! subtracted when the file gives one, optional reward centring
//! (`center_rewards_coefficient`). Logged under TRL's names: `loss`,
//! `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`,
//! `num_tokens` (training tokens so far), `grad_norm`, `learning_rate`; the
//! held-out pairs after each epoch under split `eval`. The model is written
//! in transformers' `GPT2ForSequenceClassification` layout (`model/`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use kiln_core::image::plot_metrics;
use kiln_core::run::RunOptions;
use kiln_core::session::{Record, Session};
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::loss::reward_loss;
use crate::models::model_dir;
use crate::prefs::{EncodedPair, PreferenceData};
use crate::reward::RewardModel;
use crate::train::{read_split, save_chat_template, TrainingArgs};

/// The run kind in `config.toml`.
pub const RUN_KIND: &str = "reward";

/// Settings a resumed run may change.
pub const MAY_CHANGE_ON_RESUME: &[&str] = &["train.epochs"];

/// Where the trained reward model is written.
pub const MODEL_DIR: &str = "model";

/// The reward trainer's settings (TRL's `RewardConfig` names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// The preference pairs (JSONL in TRL's forms, optional `margin`).
    pub prefs: PathBuf,
    /// The starting model: a GPT-2 language model (the head starts fresh) or
    /// a reward model folder (training continues), or a kiln run folder.
    pub model: PathBuf,
    /// A chat template for conversational pairs; default: the model's own.
    pub chat_template: Option<String>,
    /// Longest sequence in tokens (longer pairs are dropped and counted).
    pub max_length: usize,
    /// Keep dropout on during training.
    pub dropout: bool,
    /// Weight of the `mean((r_c + r_r)²)` term that centres rewards on 0.
    pub center_rewards_coefficient: Option<f64>,
    /// Optimisation (TRL's reward learning rate default: 1e-4).
    pub train: TrainingArgs,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            prefs: PathBuf::new(),
            model: PathBuf::new(),
            chat_template: None,
            max_length: 1024,
            dropout: false,
            center_rewards_coefficient: None,
            train: TrainingArgs::with_lr(1e-4),
        }
    }
}

impl RewardConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let what = "reward model";
        if self.prefs.as_os_str().is_empty() {
            return Err(RlhfError::config(what, "prefs", "give a preference file"));
        }
        if self.model.as_os_str().is_empty() {
            return Err(RlhfError::config(what, "model", "give a model folder"));
        }
        if self.max_length < 1 {
            return Err(RlhfError::config(what, "max_length", "must be at least 1"));
        }
        if let Some(c) = self.center_rewards_coefficient {
            if !(c.is_finite() && c >= 0.0) {
                return Err(RlhfError::config(
                    what,
                    "center_rewards_coefficient",
                    format!("must be >= 0, got {c}"),
                ));
            }
        }
        self.train.validate(what)
    }
}

/// The outcome of [`train_reward`].
#[derive(Debug, Clone, Serialize)]
pub struct RewardReport {
    /// Means over the last epoch's steps.
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
    /// Throughput (pairs per second).
    pub pairs_per_s: f64,
    /// Whether the run stopped early.
    pub interrupted: bool,
    /// The trained reward model (a Hugging Face folder), when the run finished.
    pub model_dir: Option<PathBuf>,
}

/// Rewards of a micro-batch: `(chosen [B], rejected [B])`.
pub fn pair_rewards(
    rm: &RewardModel,
    pairs: &[&EncodedPair],
    train: bool,
) -> Result<(Tensor, Tensor)> {
    let b = pairs.len();
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.chosen_sequence())
        .chain(pairs.iter().map(|p| p.rejected_sequence()))
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let s = rm.scores_of(&refs, train)?;
    Ok((s.narrow(0, 0, b)?, s.narrow(0, b, b)?))
}

/// The margins of `pairs` (0 where a pair has none), or `None` when no pair has one.
pub fn margins(pairs: &[&EncodedPair], dev: &Device) -> Result<Option<Tensor>> {
    if pairs.iter().all(|p| p.margin.is_none()) {
        return Ok(None);
    }
    let m: Vec<f32> = pairs
        .iter()
        .map(|p| p.margin.unwrap_or(0.0) as f32)
        .collect();
    Ok(Some(Tensor::from_vec(m, pairs.len(), dev)?))
}

/// Sums of a set of pairs' reward metrics.
#[derive(Debug, Clone)]
pub struct RewardStats {
    pairs: f64,
    loss: f64,
    correct: f64,
    margin: f64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for RewardStats {
    fn default() -> Self {
        Self {
            pairs: 0.0,
            loss: 0.0,
            correct: 0.0,
            margin: 0.0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl RewardStats {
    /// Adds a micro-batch's (scaled) loss and rewards.
    pub fn add(&mut self, loss: f64, chosen: &Tensor, rejected: &Tensor) -> Result<()> {
        let c = chosen.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let r = rejected.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        self.pairs += c.len() as f64;
        self.loss += loss;
        for (a, b) in c.iter().zip(&r) {
            self.correct += f64::from(u8::from(a > b));
            self.margin += a - b;
            self.sum += a + b;
            self.min = self.min.min(a.min(*b));
            self.max = self.max.max(a.max(*b));
        }
        Ok(())
    }

    /// Held-out accuracy (chosen scored above rejected).
    pub fn accuracy(&self) -> f64 {
        self.correct / self.pairs.max(1.0)
    }

    /// TRL's metrics (without `num_tokens`).
    pub fn fields(&self) -> Vec<(String, f64)> {
        let n = self.pairs.max(1.0);
        vec![
            ("loss".into(), self.loss),
            ("accuracy".into(), self.accuracy()),
            ("margin".into(), self.margin / n),
            ("min_reward".into(), self.min),
            ("mean_reward".into(), self.sum / (2.0 * n)),
            ("max_reward".into(), self.max),
        ]
    }
}

/// Reward metrics of `pairs` (eval mode), the loss over all of them.
pub fn evaluate_reward(
    rm: &RewardModel,
    pairs: &[EncodedPair],
    batch: usize,
    center: Option<f64>,
) -> Result<RewardStats> {
    let mut st = RewardStats::default();
    let n = pairs.len() as f64;
    for chunk in pairs.chunks(batch.max(1)) {
        let ps: Vec<&EncodedPair> = chunk.iter().collect();
        let (c, r) = pair_rewards(rm, &ps, false)?;
        let m = margins(&ps, rm.backbone().device())?;
        let l = reward_loss(&c, &r, m.as_ref(), center, n)?;
        st.add(l.to_dtype(DType::F64)?.to_scalar::<f64>()?, &c, &r)?;
    }
    Ok(st)
}

/// Trains a reward model on `cfg.prefs`; writes checkpoints, `metrics.jsonl`,
/// `loss.png` and the model (`model/`, transformers'
/// `GPT2ForSequenceClassification` layout, with the tokenizer).
pub fn train_reward(
    cfg: &RewardConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<RewardReport> {
    train_reward_with(cfg, device, opts, &Control::default())
}

/// [`train_reward`] with [`Control`]s.
pub fn train_reward_with(
    cfg: &RewardConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<RewardReport> {
    cfg.validate()?;
    let mdir = model_dir(&cfg.model);
    let split = read_split(
        &cfg.prefs,
        &mdir,
        cfg.chat_template.as_deref(),
        cfg.max_length,
        cfg.train.eval_fraction,
        cfg.train.seed,
    )?;
    let is_reward = std::fs::read_to_string(mdir.join("config.json"))
        .map(|t| t.contains("ForSequenceClassification"))
        .unwrap_or(false);
    let (rm, vs) = if is_reward {
        RewardModel::load(&mdir, device, cfg.train.seed)?
    } else {
        RewardModel::from_lm(&mdir, device, cfg.train.seed)?
    };
    opts.check_kind(RUN_KIND)?;
    if device.is_cpu() {
        let params = rm.config().num_params() as u64;
        crate::train::check_pairs_fit(
            "reward model",
            rm.config(),
            &split.train,
            cfg.train.batch_size,
            false,
            params.saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM),
            kiln_core::memory::available(),
        )?;
    }
    let run = opts.open("reward", RUN_KIND, cfg, MAY_CHANGE_ON_RESUME)?;
    run.check_inputs(&[&cfg.prefs])?;
    let dir = run.dir().clone();
    let steps_per_epoch = cfg.train.steps_per_epoch(split.train.len());
    let sched = cfg.train.schedule(cfg.train.epochs * steps_per_epoch);
    let opt = cfg.train.optimizer(&vs)?;
    let mut builder = Session::builder(run, cfg.train.seed).part("reward", &vs, opt);
    if cfg.train.max_grad_norm > 0.0 {
        builder = builder.clip_grad_norm(cfg.train.max_grad_norm);
    }
    let mut builder = builder
        .epochs(cfg.train.epochs, steps_per_epoch)
        .observer(opts.observer());
    if let Some(n) = control.stop_at {
        builder = builder.stop_at(n);
    }
    let mut s = builder.start()?;
    let n_train = split.train.len();
    let mut last_eval = None;
    let end = s.run_epochs(
        |epoch, start| {
            cfg.train
                .epoch_steps(n_train, epoch, start)
                .into_iter()
                .map(Ok::<_, RlhfError>)
        },
        |s, idx| {
            sched.apply(s.opt_mut("reward")?);
            let pairs: Vec<&EncodedPair> = idx.iter().map(|&i| &split.train[i]).collect();
            let n = pairs.len() as f64;
            let mut st = RewardStats::default();
            let mut tokens = 0u64;
            for mp in pairs.chunks(cfg.train.batch_size) {
                let (c, r) = pair_rewards(&rm, mp, cfg.dropout)?;
                let m = margins(mp, device)?;
                let l = reward_loss(&c, &r, m.as_ref(), cfg.center_rewards_coefficient, n)?;
                let v = s.backward("reward", &l)?;
                st.add(v, &c.detach(), &r.detach())?;
                tokens += mp
                    .iter()
                    .map(|p| (p.chosen_sequence().len() + p.rejected_sequence().len()) as u64)
                    .sum::<u64>();
            }
            let norm = s.step("reward")?;
            // The cursor counts the training tokens seen (TRL's num_tokens),
            // kept in checkpoints.
            s.cursor += tokens;
            let mut rec = Record::new(idx.len());
            for (k, v) in st.fields() {
                rec.push(k, v);
            }
            rec.push("num_tokens", s.cursor as f64);
            if let Some(g) = norm {
                rec.push("grad_norm", g);
            }
            rec.push("learning_rate", s.opt("reward")?.lr(0));
            Ok(rec)
        },
        |s| {
            if !split.eval.is_empty() {
                let st = evaluate_reward(
                    &rm,
                    &split.eval,
                    cfg.train.batch_size,
                    cfg.center_rewards_coefficient,
                )?;
                let mut fields = st.fields();
                fields.push(("num_tokens".into(), s.cursor as f64));
                let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                s.record("eval", &refs)?;
                last_eval = Some(fields.into_iter().collect::<BTreeMap<_, _>>());
            }
            Ok(())
        },
    )?;
    let interrupted = !end.completed();
    if last_eval.is_none() && !interrupted && !split.eval.is_empty() {
        let st = evaluate_reward(
            &rm,
            &split.eval,
            cfg.train.batch_size,
            cfg.center_rewards_coefficient,
        )?;
        let mut m: BTreeMap<String, f64> = st.fields().into_iter().collect();
        m.insert("num_tokens".into(), s.cursor as f64);
        last_eval = Some(m);
    }
    let train_means = [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
    ]
    .iter()
    .filter_map(|k| s.last_epoch(k).map(|v| (k.to_string(), v)))
    .collect();
    let mut report = RewardReport {
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
        rm.save_pretrained(&out, Some(&split.tokenizer))?;
        save_chat_template(&out, split.chat.as_ref())?;
        report.model_dir = Some(out);
        let metrics = dir.join("metrics.jsonl");
        if metrics.exists() {
            plot_metrics(
                &metrics,
                &dir.join("loss.png"),
                "Reward model: loss and accuracy",
                &["loss", "accuracy"],
            )?;
        }
        let v = serde_json::to_value(&report)
            .map_err(|e| RlhfError::file(dir.path(), e.to_string()))?;
        s.finish(v)?;
    }
    Ok(report)
}
