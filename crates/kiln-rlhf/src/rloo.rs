//! RLOO (Ahmadian et al. 2024) as TRL 1.x runs it: `num_generations` (2)
//! completions per prompt, the KL to a frozen copy of the starting policy
//! folded into the reward (`r - β Σ_t (log π_old - log π_ref)`, k1 per
//! token, β 0.05, no gradient through it), each completion's baseline the
//! mean reward of the *other* completions of its prompt
//! ([`rloo_advantages`]), and a sequence-level clipped surrogate
//! ([`rloo_loss`]).

use std::time::Instant;

use candle_core::{DType, Device};
use kiln_core::run::RunOptions;
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::online::{
    finish, reward_set, rollout_step, setup, start_session, OnlineArgs, OnlineReport,
};
use crate::pg::{kl_estimate, mean_of, rloo_advantages, rloo_loss, KlEstimator};
use crate::rewards::RewardSet;
use crate::rollout::{row_sums, token_logps, TokenBatch};

/// RLOO's settings (TRL's `RLOOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// What every online trainer has.
    pub common: OnlineArgs,
    /// Completions per prompt.
    pub num_generations: usize,
    /// KL coefficient of the reward penalty.
    pub beta: f64,
    /// Clipping ε.
    pub epsilon: f64,
    /// Upper bound `1 + epsilon_high` (`None`: `epsilon`).
    pub epsilon_high: Option<f64>,
    /// Updates per rollout.
    pub num_iterations: usize,
    /// Whiten the advantages over the batch (TRL's `normalize_advantages`).
    pub normalize_advantages: bool,
}

impl Default for RlooConfig {
    fn default() -> Self {
        Self {
            common: OnlineArgs::default(),
            num_generations: 2,
            beta: 0.05,
            epsilon: 0.2,
            epsilon_high: None,
            num_iterations: 1,
            normalize_advantages: false,
        }
    }
}

impl RlooConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("RLOO")?;
        let bad = |f: &str, m: String| Err(RlhfError::config("RLOO", f, m));
        if self.num_generations < 2 {
            return bad(
                "num_generations",
                format!(
                    "a leave-one-out baseline needs at least 2 completions per prompt, got {}",
                    self.num_generations
                ),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be >= 0, got {}", self.beta));
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return bad(
                "epsilon",
                format!("must be in (0, 1), got {}", self.epsilon),
            );
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be at least 1".into());
        }
        Ok(())
    }
}

/// The run kind of [`train_rloo`].
pub const RLOO_KIND: &str = "rloo";

/// RLOO with the reward functions the config names.
pub fn train_rloo(
    cfg: &RlooConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<OnlineReport> {
    train_rloo_with(cfg, None, device, opts, control)
}

/// RLOO with `rewards` (or the config's functions when `None`).
pub fn train_rloo_with(
    cfg: &RlooConfig,
    rewards: Option<&RewardSet<'_>>,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<OnlineReport> {
    cfg.validate()?;
    let c = &cfg.common;
    let st = setup(c, device, cfg.beta > 0.0)?;
    let own = match rewards {
        Some(_) => None,
        None => Some(reward_set(&c.reward_specs(), st.rm.as_ref())?),
    };
    let rewards = rewards
        .or(own.as_ref())
        .ok_or_else(|| RlhfError::Input("no rewards".into()))?;
    let rows = c.prompts_per_iteration.saturating_mul(cfg.num_generations);
    crate::online::check_update_memory("RLOO", &st, rows, None)?;
    let mut s = start_session(&st, c, ("rloo", RLOO_KIND, cfg), None, opts, control)?;
    let dev = st.policy.device().clone();
    let temp = c.generation.temperature;
    let end = s.run_iterations(|s| {
        let (g, mut rec) = rollout_step(s, &st, cfg.num_generations, rewards)?;
        let t0 = Instant::now();
        let batch = TokenBatch::new(&g.rollout.rows(), st.pad, &dev)?;
        let old = token_logps(&st.policy, &batch, temp, false, false)?
            .logps
            .detach();
        let mut rewards = g.rewards.clone();
        if let Some((m, _)) = &st.reference {
            let r = token_logps(m, &batch, temp, false, false)?.logps;
            let kl = row_sums(&batch, &kl_estimate(&old, &r, KlEstimator::K1)?)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            rec.push("kl", kl.iter().sum::<f64>() / kl.len() as f64);
            for (x, k) in rewards.iter_mut().zip(&kl) {
                *x -= cfg.beta * k;
            }
        }
        let mut adv = rloo_advantages(&rewards, cfg.num_generations)?;
        if cfg.normalize_advantages {
            adv = crate::pg::whiten(&adv, true);
        }
        let (mut loss_sum, mut clipped) = (0.0, 0.0);
        for it in 0..cfg.num_iterations {
            let tl = token_logps(&st.policy, &batch, temp, false, it == 0)?;
            let (loss, ratio) =
                rloo_loss(&batch, &tl.logps, &old, &adv, cfg.epsilon, cfg.epsilon_high)?;
            let r = ratio.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if it == 0 {
                rec.push(
                    "ratio/first_max_dev",
                    r.iter().fold(0.0f64, |m, x| m.max((x - 1.0).abs())),
                );
                if let Some(e) = &tl.entropy {
                    rec.push("entropy", mean_of(e)?);
                }
            }
            let eh = cfg.epsilon_high.unwrap_or(cfg.epsilon);
            clipped += r
                .iter()
                .zip(&adv)
                .filter(|(x, a)| {
                    (**x < 1.0 - cfg.epsilon && **a < 0.0) || (**x > 1.0 + eh && **a > 0.0)
                })
                .count() as f64
                / r.len() as f64;
            loss_sum += s.train_step("policy", &loss)?;
        }
        let k = cfg.num_iterations as f64;
        rec.push("loss", loss_sum / k);
        rec.push("clip_ratio/region_mean", clipped / k);
        rec.push("time/update", crate::online::seconds_since(t0));
        Ok::<_, RlhfError>(rec)
    })?;
    finish(&s, end, &st)
}
