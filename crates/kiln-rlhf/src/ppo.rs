//! PPO for language models as TRL's `PPOTrainer` runs it (now in
//! `trl.experimental`): one completion per prompt, a per-token KL penalty
//! to a frozen copy of the starting policy (k1 or k3, `kl_coef` 0.05) with
//! the score added on each completion's last token (its EOS, never a pad),
//! GAE (γ = 1, λ = 0.95) on a value model's estimates, whitened
//! advantages, and `num_ppo_epochs` passes over `num_mini_batches`
//! minibatches per rollout with the clipped policy and value losses
//! (`cliprange`, `cliprange_value` 0.2; `loss = pg + vf_coef · vf`,
//! `vf_coef` 0.1).
//!
//! **The value model** is a separate GPT-2 initialised from the reward
//! model (TRL's way: its own backbone and scalar head, trained with its
//! own optimizer) or a scalar head on the policy's final hidden states
//! (one backbone; the value loss shapes it too).
//!
//! **Old log-probs and values** are computed per minibatch of the first
//! epoch, with the same rows as its update: the first minibatch's ratio is
//! exactly 1 and its KL to the (still equal) reference exactly 0.
//! TRL's value mask runs one position past the last token; kiln's covers
//! the completion's tokens, the same as the policy's.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::online::{
    finish, load_reward_model, reward_set, rollout_step, setup, start_session, OnlineArgs,
    OnlineReport,
};
use crate::pg::{gae, kl_estimate, mean_of, ppo_policy_loss, ppo_value_loss, whiten, KlEstimator};
use crate::reward::RewardModel;
use crate::rewards::RewardSet;
use crate::rollout::{token_logps, TokenBatch};

/// Where PPO's value estimates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueModelKind {
    /// A separate model initialised from the reward model.
    #[default]
    Separate,
    /// A scalar head on the policy (`v_head.weight`, zero-initialised).
    Head,
}

/// PPO's settings (TRL's `PPOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// What every online trainer has (`reward_model` is required: it
    /// scores and, with `separate`, initialises the value model).
    pub common: OnlineArgs,
    /// The value model.
    pub value_model: ValueModelKind,
    /// Discount γ.
    pub gamma: f64,
    /// GAE's λ.
    pub lam: f64,
    /// Policy ratio clipping.
    pub cliprange: f64,
    /// Value clipping around the old values.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// KL penalty coefficient.
    pub kl_coef: f64,
    /// The per-token KL estimator (k1 or k3).
    pub kl_estimator: KlEstimator,
    /// Passes over each rollout.
    pub num_ppo_epochs: usize,
    /// Minibatches per pass.
    pub num_mini_batches: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            common: OnlineArgs::default(),
            value_model: ValueModelKind::Separate,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
        }
    }
}

impl PpoConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("PPO")?;
        let bad = |f: &str, m: String| Err(RlhfError::config("PPO", f, m));
        if self.common.reward_model.is_none() {
            return bad(
                "common.reward_model",
                "PPO needs a reward model (the value model starts from it)".into(),
            );
        }
        for (f, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(f, format!("must be in [0, 1], got {v}"));
            }
        }
        for (f, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("vf_coef", self.vf_coef),
            ("kl_coef", self.kl_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(f, format!("must be >= 0, got {v}"));
            }
        }
        if self.kl_estimator == KlEstimator::K2 {
            return bad("kl_estimator", "PPO uses k1 or k3".into());
        }
        if self.num_ppo_epochs == 0 || self.num_mini_batches == 0 {
            return bad(
                "num_ppo_epochs/num_mini_batches",
                "both must be at least 1".into(),
            );
        }
        if self.num_mini_batches > self.common.prompts_per_iteration {
            return bad(
                "num_mini_batches",
                format!(
                    "{} minibatches of {} rollouts leave some empty",
                    self.num_mini_batches, self.common.prompts_per_iteration
                ),
            );
        }
        Ok(())
    }
}

/// The run kind of [`train_ppo`].
pub const PPO_KIND: &str = "ppo";

/// The value model in use.
enum Value {
    Separate(Box<RewardModel>),
    Head(Tensor),
}

impl Value {
    /// `[N]` values at the batch's completion positions; `policy_hidden`
    /// is the policy's `[N, C]` hidden states there (the head reads them).
    fn values(&self, batch: &TokenBatch, policy_hidden: &Tensor) -> Result<Tensor> {
        let (h, w) = match self {
            Value::Separate(m) => {
                let h = m.backbone().hidden_states(&batch.batch.inputs, false)?;
                let (r, l, c) = h.dims3()?;
                let h = h
                    .reshape((r * l, c))?
                    .index_select(&batch.batch.positions, 0)?;
                (h, m.score_weight().clone())
            }
            Value::Head(w) => (policy_hidden.clone(), w.clone()),
        };
        Ok(h.matmul(&w.t()?)?.squeeze(1)?)
    }
}

/// The per-token numbers of one rollout row.
#[derive(Debug, Clone, Default)]
struct RowData {
    old: Vec<f32>,
    values: Vec<f32>,
    adv: Vec<f64>,
    returns: Vec<f64>,
}

fn flat_of(
    rows: &[usize],
    data: &[RowData],
    f: impl Fn(&RowData) -> Vec<f32>,
    dev: &Device,
) -> Result<Tensor> {
    let v: Vec<f32> = rows.iter().flat_map(|&r| f(&data[r])).collect();
    let n = v.len();
    Ok(Tensor::from_vec(v, n, dev)?)
}

/// PPO with the reward functions the config names.
pub fn train_ppo(
    cfg: &PpoConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<OnlineReport> {
    train_ppo_with(cfg, None, device, opts, control)
}

/// PPO with `rewards` (or the config's functions when `None`). Writes
/// TRL's metrics (`objective/*`, `policy/*`, `loss/*`, `val/*`, `lr`,
/// `episode`), checkpoints (policy and value model) and `model/`.
pub fn train_ppo_with(
    cfg: &PpoConfig,
    rewards: Option<&RewardSet<'_>>,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<OnlineReport> {
    cfg.validate()?;
    let c = &cfg.common;
    let st = setup(c, device, true)?;
    let own = match rewards {
        Some(_) => None,
        None => Some(reward_set(&c.reward_specs(), st.rm.as_ref())?),
    };
    let rewards = rewards
        .or(own.as_ref())
        .ok_or_else(|| RlhfError::Input("no rewards".into()))?;
    let (value, value_vs) = match cfg.value_model {
        ValueModelKind::Separate => {
            let path = c.reward_model.as_ref().ok_or_else(|| {
                RlhfError::config("PPO", "common.reward_model", "needed for the value model")
            })?;
            let v = load_reward_model(path, &st.tok, device, c.seed)?;
            (Value::Separate(Box::new(v.model)), Some(v.vars))
        }
        ValueModelKind::Head => {
            let w = Var::from_tensor(&Tensor::zeros((1, st.mcfg.n_embd), DType::F32, device)?)?;
            st.vs
                .varmap()
                .data()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert("v_head.weight".into(), w.clone());
            (Value::Head(w.as_tensor().clone()), None)
        }
    };
    // Each optimizer step trains one mini-batch of the rollouts.
    let rows = c
        .prompts_per_iteration
        .div_ceil(cfg.num_mini_batches.max(1));
    let value_cfg = match &value {
        Value::Separate(v) => Some(v.config().clone()),
        Value::Head(_) => None,
    };
    crate::online::check_update_memory("PPO", &st, rows, value_cfg.as_ref())?;
    let mut s = start_session(
        &st,
        c,
        ("ppo", PPO_KIND, cfg),
        value_vs.as_ref(),
        opts,
        control,
    )?;
    let (reference, _) = st
        .reference
        .as_ref()
        .ok_or_else(|| RlhfError::Input("PPO needs a reference model".into()))?;
    let dev = st.policy.device().clone();
    let temp = c.generation.temperature;
    let eos = st.tok.eos_id().or(st.mcfg.eos_token_id);
    let end = s.run_iterations(|s| {
        let (g, mut rec) = rollout_step(s, &st, 1, rewards)?;
        let t0 = Instant::now();
        let n_rows = g.rollout.len();
        let rows = g.rollout.rows();
        let mb_size = n_rows.div_ceil(cfg.num_mini_batches);
        let it = s.iteration();
        let order_of = |epoch: usize| -> Vec<usize> {
            SeededRng::derive(c.seed, &[0x990, it, epoch as u64]).permutation(n_rows)
        };
        // Old log-probs, reference log-probs and values, per minibatch of
        // the first epoch (the same rows as its updates).
        let first = order_of(0);
        let mut data = vec![RowData::default(); n_rows];
        let mut kl_rows = vec![Vec::new(); n_rows];
        for mb in first.chunks(mb_size) {
            let sub: Vec<(&[u32], &[u32])> = mb.iter().map(|&r| rows[r]).collect();
            let tb = TokenBatch::new(&sub, st.pad, &dev)?;
            let tl = token_logps(&st.policy, &tb, temp, false, false)?;
            let rl = token_logps(reference, &tb, temp, false, false)?.logps;
            let kl = kl_estimate(&tl.logps, &rl, cfg.kl_estimator)?;
            let v = value.values(&tb, &tl.hidden)?;
            let (old, kl, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                tl.logps.to_vec1()?,
                kl.to_vec1()?,
                v.to_dtype(DType::F32)?.to_vec1()?,
            );
            let mut off = 0;
            for (&r, &n) in mb.iter().zip(&tb.batch.tokens) {
                data[r].old = old[off..off + n].to_vec();
                data[r].values = v[off..off + n].to_vec();
                kl_rows[r] = kl[off..off + n].to_vec();
                off += n;
            }
        }
        // Per-token rewards: -kl_coef · kl, plus the score on the last token.
        let mut tok_rewards = Vec::with_capacity(n_rows);
        let (mut kl_sum, mut nsr_sum, mut ent_sum) = (0.0, 0.0, 0.0);
        for r in 0..n_rows {
            let mut rw: Vec<f64> = kl_rows[r]
                .iter()
                .map(|&k| -cfg.kl_coef * k as f64)
                .collect();
            kl_sum += kl_rows[r].iter().map(|&k| k as f64).sum::<f64>();
            nsr_sum += rw.iter().sum::<f64>();
            ent_sum -= data[r].old.iter().map(|&x| x as f64).sum::<f64>();
            if let Some(last) = rw.last_mut() {
                *last += g.rewards[r];
            }
            tok_rewards.push(rw);
        }
        let values: Vec<Vec<f64>> = data
            .iter()
            .map(|d| d.values.iter().map(|&v| v as f64).collect())
            .collect();
        let (adv, ret) = gae(&tok_rewards, &values, cfg.gamma, cfg.lam)?;
        let flat: Vec<f64> = adv.concat();
        let w = whiten(&flat, true);
        let mut off = 0;
        for (r, d) in data.iter_mut().enumerate() {
            let n = adv[r].len();
            d.adv = w[off..off + n].to_vec();
            d.returns = ret[r].clone();
            off += n;
        }
        let nr = n_rows as f64;
        let score_mean = g.rewards.iter().sum::<f64>() / nr;
        rec.push("objective/kl", kl_sum / nr);
        rec.push("objective/entropy", ent_sum / nr);
        rec.push("objective/non_score_reward", nsr_sum / nr);
        rec.push("objective/rlhf_reward", nsr_sum / nr + score_mean);
        rec.push("objective/scores", score_mean);
        // The updates.
        let mut st_acc = [0.0f64; 6]; // approxkl, clipfrac, pg, vf, vclip, entropy
        let mut ratios: Vec<f64> = Vec::new();
        let mut updates = 0.0;
        for epoch in 0..cfg.num_ppo_epochs {
            let order = if epoch == 0 {
                first.clone()
            } else {
                order_of(epoch)
            };
            for (k, mb) in order.chunks(mb_size).enumerate() {
                let sub: Vec<(&[u32], &[u32])> = mb.iter().map(|&r| rows[r]).collect();
                let tb = TokenBatch::new(&sub, st.pad, &dev)?;
                let tl = token_logps(&st.policy, &tb, temp, false, true)?;
                let old = flat_of(mb, &data, |d| d.old.clone(), &dev)?;
                let advs = flat_of(
                    mb,
                    &data,
                    |d| d.adv.iter().map(|&x| x as f32).collect(),
                    &dev,
                )?;
                let rets = flat_of(
                    mb,
                    &data,
                    |d| d.returns.iter().map(|&x| x as f32).collect(),
                    &dev,
                )?;
                let vold = flat_of(mb, &data, |d| d.values.clone(), &dev)?;
                let pg = ppo_policy_loss(&tl.logps, &old, &advs, cfg.cliprange)?;
                let vpred = value.values(&tb, &tl.hidden)?;
                let (vf, vclip) = ppo_value_loss(&vpred, &vold, &rets, cfg.cliprange_value)?;
                let r = pg.ratio.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                if epoch == 0 && k == 0 {
                    rec.push(
                        "ratio/first_max_dev",
                        r.iter().fold(0.0f64, |m, x| m.max((x - 1.0).abs())),
                    );
                    rec.push("policy/first_clipfrac", pg.clipfrac);
                }
                ratios.extend(r);
                let pg_v;
                let vf_v;
                if value_vs.is_some() {
                    pg_v = s.backward("policy", &pg.loss)?;
                    vf_v = s.backward("value", &(&vf * cfg.vf_coef)?)? / cfg.vf_coef.max(1e-12);
                    s.step("policy")?;
                    s.step("value")?;
                } else {
                    pg_v = mean_of(&pg.loss)?;
                    vf_v = mean_of(&vf)?;
                    let loss = (&pg.loss + (&vf * cfg.vf_coef)?)?;
                    s.backward("policy", &loss)?;
                    s.step("policy")?;
                }
                let ent = match &tl.entropy {
                    Some(e) => mean_of(e)?,
                    None => f64::NAN,
                };
                for (a, v) in
                    st_acc
                        .iter_mut()
                        .zip([pg.approxkl, pg.clipfrac, pg_v, vf_v, vclip, ent])
                {
                    *a += v;
                }
                updates += 1.0;
            }
        }
        for (name, v) in [
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "val/clipfrac_avg",
            "policy/entropy_avg",
        ]
        .into_iter()
        .zip(st_acc)
        {
            rec.push(name, v / updates);
        }
        let (m, sd) = crate::rewards::nan_mean_std(&ratios);
        rec.push("val/ratio", m);
        rec.push("val/ratio_var", sd * sd);
        rec.push(
            "val/num_eos_tokens",
            g.rollout
                .completions
                .iter()
                .flatten()
                .filter(|&&t| Some(t) == eos)
                .count() as f64,
        );
        rec.push("lr", s.opt("policy")?.lr(0));
        rec.push("episode", ((it + 1) as usize * n_rows) as f64);
        rec.push("time/update", crate::online::seconds_since(t0));
        Ok::<_, RlhfError>(rec)
    })?;
    finish(&s, end, &st)
}
