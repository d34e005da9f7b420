//! The policy-gradient pieces of the online trainers, as pure functions on
//! fixed numbers, each checked against TRL's code (the snippet
//! `tests/fixtures/trl_online_refs.py` and its output are pasted beside the
//! tests below):
//!
//! - advantages: GRPO's group-relative ones with `scale_rewards` group /
//!   batch / none ([`group_advantages`]), RLOO's leave-one-out baseline
//!   ([`rloo_advantages`]), PPO's GAE ([`gae`]) and whitening ([`whiten`]);
//! - the KL estimators k1, k2, k3 ([`kl_estimate`]);
//! - GRPO's clipped surrogate with its `loss_type` aggregations
//!   ([`grpo_loss`]), RLOO's sequence-level one ([`rloo_loss`]), PPO's
//!   clipped policy and value losses ([`ppo_policy_loss`],
//!   [`ppo_value_loss`]).
//!
//! Per-token tensors are flat `[N]` over the completion tokens of a batch
//! (row 0's, then row 1's, ...: [`TokenBatch`]'s layout), so there is no
//! padding to mask: a masked mean over TRL's `[R, T]` tensors is a plain
//! mean here.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};
use crate::rollout::{row_sums, TokenBatch};

/// TRL's `scale_rewards`: what GRPO divides the centred rewards by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Each group's standard deviation (the original GRPO).
    #[default]
    Group,
    /// The whole batch's standard deviation.
    Batch,
    /// No scaling (Dr. GRPO: the std division biases towards easy prompts).
    None,
}

/// GRPO advantages of one batch.
#[derive(Debug, Clone)]
pub struct GroupAdvantages {
    /// Per completion (0 for unscorable ones).
    pub advantages: Vec<f64>,
    /// Per completion, whether the std it was scaled by (the group's, or
    /// the batch's with `batch`) is zero: TRL's `frac_reward_zero_std`.
    pub zero_std: Vec<bool>,
}

/// NaN-aware mean and unbiased std (TRL's `nanmean`, `nanstd`).
fn nan_stats(v: &[f64]) -> (f64, f64) {
    crate::rewards::nan_mean_std(v)
}

/// GRPO's advantages: `rewards` hold `num_generations` consecutive
/// completions per prompt; each is centred on its group's mean and, unless
/// `scale` is `None`, divided by `std + 1e-4` (group or batch std). NaN
/// rewards (unscorable) are left out of the statistics and get advantage 0.
pub fn group_advantages(
    rewards: &[f64],
    num_generations: usize,
    scale: ScaleRewards,
) -> Result<GroupAdvantages> {
    let g = num_generations;
    if g == 0 || !rewards.len().is_multiple_of(g) {
        return Err(RlhfError::Input(format!(
            "{} rewards do not split into groups of {g}",
            rewards.len()
        )));
    }
    let (_, batch_std) = nan_stats(rewards);
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut zero_std = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(g) {
        let (mean, gstd) = nan_stats(group);
        let gstd = if g > 1 { gstd } else { 0.0 };
        let std = match scale {
            ScaleRewards::Group | ScaleRewards::None => gstd,
            ScaleRewards::Batch => batch_std,
        };
        for &r in group {
            let mut a = r - mean;
            if scale != ScaleRewards::None {
                a /= std + 1e-4;
            }
            advantages.push(if a.is_nan() { 0.0 } else { a });
            zero_std.push(std.abs() <= 1e-8 || std.is_nan());
        }
    }
    Ok(GroupAdvantages {
        advantages,
        zero_std,
    })
}

/// RLOO's advantages: each reward minus the mean of the *other* completions
/// of its prompt (`(Σ_group - r) / (k - 1)`): the sample's own reward never
/// enters its baseline. NaN rewards are left out of the baselines (and get
/// advantage 0), as in TRL.
pub fn rloo_advantages(rewards: &[f64], num_generations: usize) -> Result<Vec<f64>> {
    let g = num_generations;
    if g < 2 || !rewards.len().is_multiple_of(g) {
        return Err(RlhfError::Input(format!(
            "RLOO needs groups of at least 2 completions; {} rewards in groups of {g}",
            rewards.len()
        )));
    }
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(g) {
        let scorable = group.iter().filter(|r| !r.is_nan()).count() as f64;
        let sum: f64 = group.iter().filter(|r| !r.is_nan()).sum();
        for &r in group {
            let a = r - (sum - r) / (scorable - 1.0);
            out.push(if a.is_finite() { a } else { 0.0 });
        }
    }
    Ok(out)
}

/// TRL's `masked_whiten` over all of `values`: `(v - mean) / sqrt(var + 1e-8)`
/// with the unbiased variance; `shift_mean = false` adds the mean back.
pub fn whiten(values: &[f64], shift_mean: bool) -> Vec<f64> {
    let n = values.len() as f64;
    if values.len() < 2 {
        return values.to_vec();
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n * (n / (n - 1.0));
    let inv = 1.0 / (var + 1e-8).sqrt();
    values
        .iter()
        .map(|v| {
            let w = (v - mean) * inv;
            if shift_mean {
                w
            } else {
                w + mean
            }
        })
        .collect()
}

/// Per-row, per-token numbers.
pub type PerRow = Vec<Vec<f64>>;

/// Generalised advantage estimation per row (each row's tokens, the value
/// after a row's last token taken as 0: the episode ends there):
/// `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = δ_t + γλ A_{t+1}`, returns
/// `A + V`. Returns `(advantages, returns)` in the same per-row shape.
pub fn gae(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    gamma: f64,
    lam: f64,
) -> Result<(PerRow, PerRow)> {
    if rewards.len() != values.len() {
        return Err(RlhfError::Input(format!(
            "GAE: {} reward rows, {} value rows",
            rewards.len(),
            values.len()
        )));
    }
    let mut adv = Vec::with_capacity(rewards.len());
    let mut ret = Vec::with_capacity(rewards.len());
    for (i, (r, v)) in rewards.iter().zip(values).enumerate() {
        if r.len() != v.len() {
            return Err(RlhfError::Input(format!(
                "GAE row {i}: {} rewards, {} values",
                r.len(),
                v.len()
            )));
        }
        let mut a = vec![0.0; r.len()];
        let mut last = 0.0;
        for t in (0..r.len()).rev() {
            let next = if t + 1 < v.len() { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lam * last;
            a[t] = last;
        }
        ret.push(a.iter().zip(v).map(|(a, v)| a + v).collect());
        adv.push(a);
    }
    Ok((adv, ret))
}

/// A per-token KL estimator of `KL(π || π_ref)` from samples of π
/// (Schulman's k1, k2, k3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log π - log π_ref`: unbiased, can be negative per token.
    #[default]
    K1,
    /// `(log π - log π_ref)² / 2`.
    K2,
    /// `exp(log π_ref - log π) - (log π_ref - log π) - 1`: unbiased and
    /// never negative (GRPO's).
    K3,
}

/// The per-token KL estimate from policy and reference log-probs (same
/// shapes).
pub fn kl_estimate(logps: &Tensor, ref_logps: &Tensor, est: KlEstimator) -> Result<Tensor> {
    let logr = (ref_logps - logps)?;
    Ok(match est {
        KlEstimator::K1 => logr.neg()?,
        KlEstimator::K2 => (logr.sqr()? * 0.5)?,
        KlEstimator::K3 => ((logr.exp()? - &logr)? - 1.0)?,
    })
}

/// GRPO's `loss_type`: how the per-token losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Mean over each sequence's tokens, then over sequences (the original
    /// GRPO: long sequences' tokens weigh less).
    Grpo,
    /// Sum over all tokens divided by the tokens in the generation batch
    /// (DAPO's token-level average; TRL's default).
    #[default]
    Dapo,
    /// Sum over all tokens divided by `rows × max_completion_length` (Dr.
    /// GRPO: no length bias).
    DrGrpo,
}

/// GRPO's loss on one batch and its clipping statistics.
#[derive(Debug, Clone)]
pub struct GrpoLoss {
    /// The scalar loss.
    pub loss: Tensor,
    /// Share of tokens with ratio < 1 - ε_low and a negative advantage.
    pub clip_low: f64,
    /// Share of tokens with ratio > 1 + ε_high and a positive advantage.
    pub clip_high: f64,
    /// Share of either.
    pub clip_region: f64,
    /// The per-token KL (k3) mean, when β > 0.
    pub kl: Option<f64>,
    /// The ratios (detached), for invariants.
    pub ratio: Tensor,
}

/// GRPO's settings for [`grpo_loss`].
#[derive(Debug, Clone, Copy)]
pub struct GrpoLossConfig {
    /// The aggregation.
    pub loss_type: GrpoLossType,
    /// Lower clipping bound: ratios below `1 - epsilon` are clipped.
    pub epsilon: f64,
    /// Upper bound (`None`: `epsilon`; DAPO suggests 0.28).
    pub epsilon_high: Option<f64>,
    /// KL coefficient β (0: no KL term, no reference needed).
    pub beta: f64,
    /// `max_completion_length` (dr_grpo's denominator).
    pub max_completion_length: usize,
}

/// GRPO's clipped surrogate: per token
/// `-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) + β k3`, with `ρ = exp(logp - old)` and each token taking its sequence's
/// advantage, aggregated by `loss_type`. `num_items` is the completion
/// tokens of the whole generation batch (dapo's denominator).
pub fn grpo_loss(
    cfg: &GrpoLossConfig,
    batch: &TokenBatch,
    logps: &Tensor,
    old_logps: &Tensor,
    ref_logps: Option<&Tensor>,
    advantages: &[f64],
    num_items: usize,
) -> Result<GrpoLoss> {
    let dev = logps.device();
    let adv = batch.per_token(advantages, dev)?;
    let el = cfg.epsilon;
    let eh = cfg.epsilon_high.unwrap_or(cfg.epsilon);
    let ratio = (logps - old_logps)?.exp()?;
    let clipped = ratio.clamp(1.0 - el, 1.0 + eh)?;
    let mut per_token = (ratio.mul(&adv)?.minimum(&clipped.mul(&adv)?)?).neg()?;
    let mut kl = None;
    if cfg.beta != 0.0 {
        let r = ref_logps.ok_or_else(|| {
            RlhfError::Input("GRPO with beta > 0 needs reference log-probs".into())
        })?;
        let k = kl_estimate(logps, r, KlEstimator::K3)?;
        kl = Some(mean_of(&k)?);
        per_token = (per_token + (k * cfg.beta)?)?;
    }
    let n = batch.len() as f64;
    let loss = match cfg.loss_type {
        GrpoLossType::Grpo => {
            let counts: Vec<f32> = batch.batch.tokens.iter().map(|&t| t as f32).collect();
            let counts = Tensor::from_vec(counts, batch.rows(), dev)?;
            (row_sums(batch, &per_token)? / counts)?.mean_all()?
        }
        GrpoLossType::Dapo => (per_token.sum_all()? / num_items.max(1) as f64)?,
        GrpoLossType::DrGrpo => {
            (per_token.sum_all()? / (batch.rows() * cfg.max_completion_length).max(1) as f64)?
        }
    };
    let r: Vec<f32> = ratio.to_dtype(DType::F32)?.to_vec1()?;
    let (mut lo, mut hi) = (0usize, 0usize);
    for (k, &x) in r.iter().enumerate() {
        let a = advantages[batch.owner[k]];
        if (x as f64) < 1.0 - el && a < 0.0 {
            lo += 1;
        }
        if (x as f64) > 1.0 + eh && a > 0.0 {
            hi += 1;
        }
    }
    Ok(GrpoLoss {
        loss,
        clip_low: lo as f64 / n,
        clip_high: hi as f64 / n,
        clip_region: (lo + hi) as f64 / n,
        kl,
        ratio: ratio.detach(),
    })
}

/// The mean of a tensor as f64.
pub fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// RLOO's loss: sequence-level ratios `ρ = exp(Σ logp - Σ old)` per
/// completion, `-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)` averaged over
/// completions. Returns the loss and the detached ratios `[R]`.
pub fn rloo_loss(
    batch: &TokenBatch,
    logps: &Tensor,
    old_logps: &Tensor,
    advantages: &[f64],
    epsilon: f64,
    epsilon_high: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let dev = logps.device();
    let seq = row_sums(batch, logps)?;
    let old = row_sums(batch, old_logps)?;
    let a: Vec<f32> = advantages.iter().map(|&x| x as f32).collect();
    let a = Tensor::from_vec(a, advantages.len(), dev)?;
    let ratio = (seq - old)?.exp()?;
    let clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high.unwrap_or(epsilon))?;
    let loss = ratio
        .mul(&a)?
        .minimum(&clipped.mul(&a)?)?
        .neg()?
        .mean_all()?;
    Ok((loss, ratio.detach()))
}

/// PPO's clipped policy loss and its statistics.
#[derive(Debug, Clone)]
pub struct PpoPolicyLoss {
    /// `mean(max(-Aρ, -A clip(ρ, 1-ε, 1+ε)))` over the tokens.
    pub loss: Tensor,
    /// Share of tokens where the clipped term is the larger.
    pub clipfrac: f64,
    /// `0.5 mean((logp - old)²)`.
    pub approxkl: f64,
    /// The ratios (detached).
    pub ratio: Tensor,
}

/// PPO's clipped policy loss (TRL's `pg_loss`, `pg_clipfrac`, `approxkl`).
pub fn ppo_policy_loss(
    logps: &Tensor,
    old_logps: &Tensor,
    advantages: &Tensor,
    cliprange: f64,
) -> Result<PpoPolicyLoss> {
    let diff = (logps - old_logps)?;
    let ratio = diff.exp()?;
    let l1 = advantages.neg()?.mul(&ratio)?;
    let l2 = advantages
        .neg()?
        .mul(&ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let loss = l1.maximum(&l2)?.mean_all()?;
    let clipfrac = mean_of(&l2.gt(&l1)?.to_dtype(DType::F32)?)?;
    let approxkl = 0.5 * mean_of(&diff.sqr()?)?;
    Ok(PpoPolicyLoss {
        loss,
        clipfrac,
        approxkl,
        ratio: ratio.detach(),
    })
}

/// PPO's clipped value loss `0.5 mean(max((V - R)², (clip(V, V_old ± ε) - R)²))`
/// and the share of tokens where the clipped term is the larger.
pub fn ppo_value_loss(
    vpred: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    cliprange_value: f64,
) -> Result<(Tensor, f64)> {
    let lo = (old_values - cliprange_value)?;
    let hi = (old_values + cliprange_value)?;
    let clipped = vpred.maximum(&lo)?.minimum(&hi)?;
    let l1 = (vpred - returns)?.sqr()?;
    let l2 = (clipped - returns)?.sqr()?;
    let loss = (l1.maximum(&l2)?.mean_all()? * 0.5)?;
    let clipfrac = mean_of(&l2.gt(&l1)?.to_dtype(DType::F32)?)?;
    Ok((loss, clipfrac))
}

/// Values from `tests/fixtures/trl_online_refs.py` (TRL 1.16's formulas),
/// its output pasted line by line beside each check.
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    fn vec_of(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    }

    const R: [f64; 8] = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 1.0, -1.0];

    #[test]
    fn group_advantages_match_trl_and_sum_to_zero() -> Result<()> {
        // grpo_adv group [0.1463678679116721, -1.024575075381705, -0.43910360373501633, 1.3173108112050491, 0.7833085331744302, 0.7833085331744302, -0.2611028443914767, -1.3055142219573836]
        // grpo_adv batch [0.0884808952961055, -0.6193662670727386, -0.26544268588831654, 0.7963280576649495, 1.0617707435532662, 1.0617707435532662, -0.353923581184422, -1.7696179059221102]
        // grpo_adv none [0.125, -0.875, -0.375, 1.125, 1.5, 1.5, -0.5, -2.5]
        let want = [
            (
                ScaleRewards::Group,
                [
                    0.1463678679116721,
                    -1.024575075381705,
                    -0.43910360373501633,
                    1.3173108112050491,
                    0.7833085331744302,
                    0.7833085331744302,
                    -0.2611028443914767,
                    -1.3055142219573836,
                ],
            ),
            (
                ScaleRewards::Batch,
                [
                    0.0884808952961055,
                    -0.6193662670727386,
                    -0.26544268588831654,
                    0.7963280576649495,
                    1.0617707435532662,
                    1.0617707435532662,
                    -0.353923581184422,
                    -1.7696179059221102,
                ],
            ),
            (
                ScaleRewards::None,
                [0.125, -0.875, -0.375, 1.125, 1.5, 1.5, -0.5, -2.5],
            ),
        ];
        for (scale, w) in want {
            let a = group_advantages(&R, 4, scale)?;
            // TRL's nanstd divides integer counts (count / (count - 1)),
            // which torch does in float32: its Bessel factor is off by ~1e-8.
            close(&a.advantages, &w, 1e-7);
            for g in a.advantages.chunks(4) {
                assert!(g.iter().sum::<f64>().abs() < 1e-12, "{scale:?}: {g:?}");
            }
        }
        // A group of equal rewards has zero std (and zero advantages).
        let a = group_advantages(&[1.0, 1.0, 0.0, 2.0], 2, ScaleRewards::Group)?;
        assert_eq!(a.zero_std, vec![true, true, false, false]);
        assert_eq!(&a.advantages[..2], &[0.0, 0.0]);
        assert!(group_advantages(&R, 3, ScaleRewards::Group).is_err());
        Ok(())
    }

    #[test]
    fn rloo_baseline_leaves_the_sample_out() -> Result<()> {
        // rloo_adv [0.16666666666666663, -1.1666666666666667, -0.5, 1.5, 2.0, 2.0, -0.6666666666666667, -3.3333333333333335]
        let a = rloo_advantages(&R, 4)?;
        close(
            &a,
            &[
                0.16666666666666663,
                -1.1666666666666667,
                -0.5,
                1.5,
                2.0,
                2.0,
                -0.6666666666666667,
                -3.3333333333333335,
            ],
            1e-12,
        );
        // Changing a sample's own reward moves its baseline not at all: its
        // advantage moves by exactly the change.
        let mut r2 = R;
        r2[1] += 5.0;
        let b = rloo_advantages(&r2, 4)?;
        assert!((b[1] - a[1] - 5.0).abs() < 1e-12);
        assert!(rloo_advantages(&R, 1).is_err());
        Ok(())
    }

    fn two_rows() -> Result<TokenBatch> {
        let rows: Vec<(&[u32], &[u32])> = vec![(&[1], &[2, 3, 4]), (&[1], &[5, 6])];
        TokenBatch::new(&rows, 0, &Device::Cpu)
    }

    const LOGP: [f32; 5] = [-1.0, -2.0, -0.5, -0.3, -1.2];
    const OLD: [f32; 5] = [-1.3, -1.9, -0.2, -0.1, -1.5];
    const REF: [f32; 5] = [-1.1, -2.5, -0.4, -0.2, -1.0];
    const ADV: [f64; 2] = [0.7, -1.1];

    #[test]
    fn grpo_loss_variants_match_trl() -> Result<()> {
        // grpo_loss grpo 0.0 0.255035637996117 [0.0, -0.1055643654375286, -0.08642879241286708, 0.22515095709644503, 0.37121117208340093, 0.0]
        // grpo_loss grpo 0.04 0.25607830139730353 [0.0006344172130936035, -0.10294123650227949, -0.08712993186670473, 0.22409924791568855, 0.3689971445017992, 0.0]
        // grpo_loss dapo 0.0 0.06749791392340196 [0.0, -0.12667723852503432, -0.10371455089544049, 0.18012076567715601, 0.2969689376667207, 0.0]
        // grpo_loss dapo 0.04 0.06864281529988245 [0.0007613006557123242, -0.12352948380273539, -0.10455591824004568, 0.17927939833255083, 0.29519771560143937, 0.0]
        // grpo_loss dr_grpo 0.0 0.03374895696170098 [0.0, -0.06333861926251716, -0.051857275447720244, 0.09006038283857801, 0.14848446883336036, 0.0]
        // grpo_loss dr_grpo 0.04 0.034321407649941224 [0.0003806503278561621, -0.061764741901367694, -0.05227795912002284, 0.08963969916627541, 0.14759885780071968, 0.0]
        let cases: [(GrpoLossType, f64, f64, [f64; 5]); 6] = [
            (
                GrpoLossType::Grpo,
                0.0,
                0.255035637996117,
                [
                    0.0,
                    -0.1055643654375286,
                    -0.08642879241286708,
                    0.22515095709644503,
                    0.37121117208340093,
                ],
            ),
            (
                GrpoLossType::Grpo,
                0.04,
                0.25607830139730353,
                [
                    0.0006344172130936035,
                    -0.10294123650227949,
                    -0.08712993186670473,
                    0.22409924791568855,
                    0.3689971445017992,
                ],
            ),
            (
                GrpoLossType::Dapo,
                0.0,
                0.06749791392340196,
                [
                    0.0,
                    -0.12667723852503432,
                    -0.10371455089544049,
                    0.18012076567715601,
                    0.2969689376667207,
                ],
            ),
            (
                GrpoLossType::Dapo,
                0.04,
                0.06864281529988245,
                [
                    0.0007613006557123242,
                    -0.12352948380273539,
                    -0.10455591824004568,
                    0.17927939833255083,
                    0.29519771560143937,
                ],
            ),
            (
                GrpoLossType::DrGrpo,
                0.0,
                0.03374895696170098,
                [
                    0.0,
                    -0.06333861926251716,
                    -0.051857275447720244,
                    0.09006038283857801,
                    0.14848446883336036,
                ],
            ),
            (
                GrpoLossType::DrGrpo,
                0.04,
                0.034321407649941224,
                [
                    0.0003806503278561621,
                    -0.061764741901367694,
                    -0.05227795912002284,
                    0.08963969916627541,
                    0.14759885780071968,
                ],
            ),
        ];
        let b = two_rows()?;
        let dev = Device::Cpu;
        let old = Tensor::new(&OLD, &dev)?;
        let rf = Tensor::new(&REF, &dev)?;
        for (lt, beta, want, grad) in cases {
            let lp = Var::new(&LOGP, &dev)?;
            let cfg = GrpoLossConfig {
                loss_type: lt,
                epsilon: 0.2,
                epsilon_high: Some(0.28),
                beta,
                max_completion_length: 5,
            };
            let out = grpo_loss(&cfg, &b, lp.as_tensor(), &old, Some(&rf), &ADV, 5)?;
            let l = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            assert!((l - want).abs() < 1e-6, "{lt:?} {beta}: {l} vs {want}");
            let g = out.loss.backward()?;
            let g = vec_of(g.get(lp.as_tensor()).expect("a gradient"));
            close(&g, &grad, 1e-6);
        }
        Ok(())
    }

    #[test]
    fn kl_estimators_match_trl() -> Result<()> {
        // k1 [0.10000000000000009, 0.5, -0.09999999999999998, -0.09999999999999998, -0.19999999999999996, -0.0]
        // k2 [0.005000000000000009, 0.125, 0.0049999999999999975, 0.0049999999999999975, 0.01999999999999999, 0.0]
        // k3 [0.004837418035959606, 0.10653065971263342, 0.005170918075647513, 0.005170918075647513, 0.0214027581601699, 0.0]
        let dev = Device::Cpu;
        let lp = Tensor::new(&LOGP, &dev)?;
        let rf = Tensor::new(&REF, &dev)?;
        for (est, want) in [
            (KlEstimator::K1, [0.1, 0.5, -0.1, -0.1, -0.2]),
            (KlEstimator::K2, [0.005, 0.125, 0.005, 0.005, 0.02]),
            (
                KlEstimator::K3,
                [
                    0.004837418035959606,
                    0.10653065971263342,
                    0.005170918075647513,
                    0.005170918075647513,
                    0.0214027581601699,
                ],
            ),
        ] {
            close(&vec_of(&kl_estimate(&lp, &rf, est)?), &want, 1e-6);
            // Zero against an equal reference.
            assert!(vec_of(&kl_estimate(&lp, &lp, est)?)
                .iter()
                .all(|&x| x == 0.0));
        }
        Ok(())
    }

    #[test]
    fn rloo_loss_matches_trl() -> Result<()> {
        // rloo_loss 0.2911509086290204 [-0.3166930963125859, -0.3166930963125859, -0.3166930963125859, 0.6078440049416063, 0.6078440049416063, 0.0]
        let dev = Device::Cpu;
        let b = two_rows()?;
        let lp = Var::new(&LOGP, &dev)?;
        let old = Tensor::new(&OLD, &dev)?;
        let (loss, _) = rloo_loss(&b, lp.as_tensor(), &old, &ADV, 0.2, None)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!((l - 0.2911509086290204).abs() < 1e-6, "{l}");
        let g = loss.backward()?;
        close(
            &vec_of(g.get(lp.as_tensor()).expect("a gradient")),
            &[
                -0.3166930963125859,
                -0.3166930963125859,
                -0.3166930963125859,
                0.6078440049416063,
                0.6078440049416063,
            ],
            1e-6,
        );
        Ok(())
    }

    #[test]
    fn gae_and_whitening_match_trl() -> Result<()> {
        // gae_adv [[0.94475, 1.205, 1.9, 0.0], [-0.3, 0.0, 0.0, 0.0]]
        // gae_ret [[1.24475, 1.3050000000000002, 1.5, 0.0], [0.2, 0.0, 0.0, 0.0]]
        // whiten [0.00796371883338506, 0.29139043013436927, 1.0482840491706187, -1.347638198138373]
        let (a, r) = gae(
            &[vec![0.0, -0.1, 1.5], vec![0.2]],
            &[vec![0.3, 0.1, -0.4], vec![0.5]],
            1.0,
            0.95,
        )?;
        close(&a[0], &[0.94475, 1.205, 1.9], 1e-12);
        close(&a[1], &[-0.3], 1e-12);
        close(&r[0], &[1.24475, 1.305, 1.5], 1e-12);
        close(&r[1], &[0.2], 1e-12);
        let flat: Vec<f64> = a.concat();
        let w = whiten(&flat, true);
        close(
            &w,
            &[
                0.00796371883338506,
                0.29139043013436927,
                1.0482840491706187,
                -1.347638198138373,
            ],
            1e-9,
        );
        // Whitened: mean 0, (unbiased) std 1.
        let (m, s) = crate::rewards::nan_mean_std(&w);
        assert!(m.abs() < 1e-12 && (s - 1.0).abs() < 1e-6, "{m} {s}");
        assert!(gae(&[vec![0.0]], &[vec![]], 1.0, 0.95).is_err());
        Ok(())
    }

    #[test]
    fn ppo_losses_match_trl() -> Result<()> {
        // ppo_pg -0.08463130521467684 [0.0, 0.22620935450898988, -0.22224546620451535, 0.06140480648084863] 0.25 0.028750000000000005
        // ppo_vf 0.041562499999999995 [0.0, 0.056249999999999994, 0.07500000000000001, -0.0625] 0.25
        let dev = Device::Cpu;
        let lp = Var::new(&[-1.0f32, -2.0, -0.5, -0.3], &dev)?;
        let old = Tensor::new(&[-1.3f32, -1.9, -0.2, -0.1], &dev)?;
        let adv = Tensor::new(&[0.5f32, -1.0, 1.2, -0.3], &dev)?;
        let out = ppo_policy_loss(lp.as_tensor(), &old, &adv, 0.2)?;
        let l = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!((l + 0.08463130521467684).abs() < 1e-6, "{l}");
        assert!((out.clipfrac - 0.25).abs() < 1e-12);
        assert!((out.approxkl - 0.02875).abs() < 1e-6);
        let g = out.loss.backward()?;
        close(
            &vec_of(g.get(lp.as_tensor()).expect("a gradient")),
            &[
                0.0,
                0.22620935450898988,
                -0.22224546620451535,
                0.06140480648084863,
            ],
            1e-6,
        );
        let vp = Var::new(&[0.4f32, -0.2, 1.0, 0.05], &dev)?;
        let vo = Tensor::new(&[0.1f32, 0.0, 0.5, 0.0], &dev)?;
        let ret = Tensor::new(&[0.6f32, -0.5, 0.7, 0.3], &dev)?;
        let (vf, frac) = ppo_value_loss(vp.as_tensor(), &vo, &ret, 0.2)?;
        let l = vf.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!((l - 0.0415625).abs() < 1e-6, "{l}");
        assert!((frac - 0.25).abs() < 1e-12);
        let g = vf.backward()?;
        close(
            &vec_of(g.get(vp.as_tensor()).expect("a gradient")),
            &[0.0, 0.05625, 0.075, -0.0625],
            1e-6,
        );
        Ok(())
    }
}
