//! GRPO (Shao et al. 2024) as TRL 1.x runs it: `num_generations`
//! completions per prompt, advantages relative to each group
//! ([`group_advantages`]), the clipped surrogate with `loss_type` grpo /
//! dapo (default) / dr_grpo, β = 0 by default (no reference model is
//! loaded; with β > 0 the k3 KL to a frozen copy of the starting policy is
//! added per token) and `num_iterations` updates per rollout.
//!
//! Each iteration: roll out (policy in eval mode, dropout off), score,
//! compute advantages, then `num_iterations` optimizer steps on the whole
//! batch. The old log-probs are the first update's own (detached) when
//! `num_iterations` is 1, as in TRL, else a teacher-forced pass over the
//! same batch: either way the first update's ratio is exactly 1.

use std::time::Instant;

use candle_core::Device;
use kiln_core::run::RunOptions;
use kiln_core::session::Session;
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::online::{
    finish, reward_set, rollout_step, setup, start_session, OnlineArgs, OnlineReport,
};
use crate::pg::{group_advantages, grpo_loss, mean_of, GrpoLossConfig, GrpoLossType, ScaleRewards};
use crate::rewards::RewardSet;
use crate::rollout::{token_logps, TokenBatch};

/// GRPO's settings (TRL's `GRPOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// What every online trainer has.
    pub common: OnlineArgs,
    /// Completions per prompt.
    pub num_generations: usize,
    /// The aggregation.
    pub loss_type: GrpoLossType,
    /// Clipping ε (lower bound `1 - ε`).
    pub epsilon: f64,
    /// Upper bound `1 + epsilon_high` (`None`: `epsilon`).
    pub epsilon_high: Option<f64>,
    /// KL coefficient (0: no reference model).
    pub beta: f64,
    /// How the centred rewards are scaled.
    pub scale_rewards: ScaleRewards,
    /// Updates per rollout (TRL's μ).
    pub num_iterations: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            common: OnlineArgs::default(),
            num_generations: 8,
            loss_type: GrpoLossType::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
        }
    }
}

impl GrpoConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("GRPO")?;
        let bad = |f: &str, m: String| Err(RlhfError::config("GRPO", f, m));
        if self.num_generations < 2 {
            return bad(
                "num_generations",
                format!(
                    "group advantages need at least 2 completions per prompt, got {}",
                    self.num_generations
                ),
            );
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return bad(
                "epsilon",
                format!("must be in (0, 1), got {}", self.epsilon),
            );
        }
        if self
            .epsilon_high
            .is_some_and(|e| !(e > 0.0 && e.is_finite()))
        {
            return bad("epsilon_high", "must be positive".into());
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be >= 0, got {}", self.beta));
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be at least 1".into());
        }
        Ok(())
    }

    fn loss(&self) -> GrpoLossConfig {
        GrpoLossConfig {
            loss_type: self.loss_type,
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high,
            beta: self.beta,
            max_completion_length: self.common.generation.max_new_tokens,
        }
    }
}

/// The run kind of [`train_grpo`].
pub const GRPO_KIND: &str = "grpo";

/// Settings a resumed run may change.
pub const MAY_CHANGE: &[&str] = crate::online::MAY_CHANGE;

/// GRPO on kiln-core's session with the reward functions the config names
/// (see [`train_grpo_with`] for Rust closures).
pub fn train_grpo(
    cfg: &GrpoConfig,
    device: &Device,
    opts: &RunOptions,
    control: &Control,
) -> Result<OnlineReport> {
    train_grpo_with(cfg, None, device, opts, control)
}

/// GRPO with `rewards` (or, when `None`, the functions the config names).
/// Writes `metrics.jsonl` with TRL's names, checkpoints and `model/`.
pub fn train_grpo_with(
    cfg: &GrpoConfig,
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
    crate::online::check_update_memory("GRPO", &st, rows, None)?;
    let mut s = start_session(&st, c, ("grpo", GRPO_KIND, cfg), None, opts, control)?;
    let end = s.run_iterations(|s| {
        let (g, mut rec) = rollout_step(s, &st, cfg.num_generations, rewards)?;
        let t0 = Instant::now();
        let step = grpo_update(s, cfg, &st, &g.rollout, &g.rewards)?;
        for (k, v) in step {
            rec.push(k, v);
        }
        rec.push("time/update", crate::online::seconds_since(t0));
        Ok::<_, RlhfError>(rec)
    })?;
    finish(&s, end, &st)
}

/// One GRPO update on a scored rollout: advantages, then `num_iterations`
/// steps. Returns TRL's loss-side metrics (`loss`, `entropy`, `kl`,
/// `frac_reward_zero_std`, `clip_ratio/*`, and `ratio/first_mean` and
/// `ratio/first_max_dev`: the first step's ratio, exactly 1).
pub(crate) fn grpo_update(
    s: &mut Session,
    cfg: &GrpoConfig,
    st: &crate::online::Setup,
    ro: &crate::rollout::Rollout,
    rewards: &[f64],
) -> Result<Vec<(String, f64)>> {
    let dev = st.policy.device();
    let adv = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)?;
    let batch = TokenBatch::new(&ro.rows(), st.pad, dev)?;
    let temp = cfg.common.generation.temperature;
    let old = if cfg.num_iterations > 1 {
        Some(
            token_logps(&st.policy, &batch, temp, false, false)?
                .logps
                .detach(),
        )
    } else {
        None
    };
    let reference = match &st.reference {
        Some((m, _)) if cfg.beta > 0.0 => {
            Some(token_logps(m, &batch, temp, false, false)?.logps.detach())
        }
        _ => None,
    };
    let lc = cfg.loss();
    let mut out: Vec<(String, f64)> = Vec::new();
    let (mut lo, mut hi, mut region, mut loss_sum, mut kl_sum) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for it in 0..cfg.num_iterations {
        let tl = token_logps(&st.policy, &batch, temp, false, it == 0)?;
        let old_lp = match &old {
            Some(o) => o.clone(),
            None => tl.logps.detach(),
        };
        let l = grpo_loss(
            &lc,
            &batch,
            &tl.logps,
            &old_lp,
            reference.as_ref(),
            &adv.advantages,
            batch.len(),
        )?;
        if it == 0 {
            let r = l
                .ratio
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?;
            out.push((
                "ratio/first_mean".into(),
                r.iter().sum::<f64>() / r.len() as f64,
            ));
            out.push((
                "ratio/first_max_dev".into(),
                r.iter().fold(0.0f64, |m, x| m.max((x - 1.0).abs())),
            ));
            if let Some(e) = &tl.entropy {
                out.push(("entropy".into(), mean_of(e)?));
            }
        }
        lo += l.clip_low;
        hi += l.clip_high;
        region += l.clip_region;
        kl_sum += l.kl.unwrap_or(0.0);
        loss_sum += s.train_step("policy", &l.loss)?;
    }
    let k = cfg.num_iterations as f64;
    out.push(("loss".into(), loss_sum / k));
    if cfg.beta > 0.0 {
        out.push(("kl".into(), kl_sum / k));
    }
    out.push(("clip_ratio/low_mean".into(), lo / k));
    out.push(("clip_ratio/high_mean".into(), hi / k));
    out.push(("clip_ratio/region_mean".into(), region / k));
    out.push((
        "frac_reward_zero_std".into(),
        adv.zero_std.iter().filter(|&&z| z).count() as f64 / adv.zero_std.len().max(1) as f64,
    ));
    Ok(out)
}
