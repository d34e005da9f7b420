//! The preference losses as pure functions of per-sequence log-probabilities
//! and rewards: DPO and its family (TRL's `loss_type` list with weights) and
//! the reward model's Bradley–Terry loss.
//!
//! Every loss is written as a *sum* over the pairs of a micro-batch divided
//! by a [`LossScale`], the pair and token counts of the whole optimizer step:
//! with `k` micro-batches each scaled by the step's counts, the accumulated
//! gradient equals the one of a single batch `k` times the size, per-token
//! terms (`sft`) included. For one batch, [`LossScale::of_batch`] gives TRL's
//! means.
//!
//! `softplus` here is `log(exp(x - m) + exp(-m)) + m` with `m = max(x, 0)`
//! held constant: stable, and its derivative is `sigmoid(x)` everywhere. The
//! `relu(x) + log1p(exp(-|x|))` form gives a zero gradient at `x = 0` in candle
//! (`relu'(0) = sign(0) = 0`), which is exactly where DPO starts (policy ==
//! reference): the first step would not move the model.

use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::RlhfError;

/// `log(1 + exp(x))` with the exact derivative `sigmoid(x)` at every `x`
/// (see the module notes).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let m = x.relu()?.detach();
    let inner = ((x - &m)?.exp()? + m.neg()?.exp()?)?;
    inner.log()? + m
}

/// `log(sigmoid(x))`, stable: `-softplus(-x)`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)?.neg()
}

/// `sigmoid(x)`, stable and differentiable: `exp(log_sigmoid(x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// One of TRL's DPO loss types (`DPOConfig.loss_type`), under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// DPO (Rafailov et al.): `-log sigmoid(β Δ)`, Δ the chosen minus the
    /// rejected log-ratio to the reference.
    Sigmoid,
    /// SLiC: `relu(1 - β Δ)`.
    Hinge,
    /// IPO (Azar et al.), per-token normalised as TRL: each log-ratio is
    /// divided by its completion's token count, then `(Δ' - 1/(2β))²`.
    Ipo,
    /// Robust DPO (Chowdhury et al.) with flip probability ε
    /// (`label_smoothing` in [0, 0.5)).
    Robust,
    /// Negative log-likelihood of the chosen completions, averaged over their
    /// tokens (RPO / MPO's SFT term).
    Sft,
    /// APO-zero (D'Oosterlinck et al.): `1 - sigmoid(β r_c) + sigmoid(β r_r)`
    /// on the two log-ratios.
    ApoZero,
}

impl DpoLossType {
    /// Every supported type.
    pub const ALL: [DpoLossType; 6] = [
        Self::Sigmoid,
        Self::Hinge,
        Self::Ipo,
        Self::Robust,
        Self::Sft,
        Self::ApoZero,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Hinge => "hinge",
            Self::Ipo => "ipo",
            Self::Robust => "robust",
            Self::Sft => "sft",
            Self::ApoZero => "apo_zero",
        }
    }

    /// The loss of a policy equal to its reference (all log-ratios 0), with
    /// `beta` and chosen completions of mean token log-likelihood `nll`
    /// (only `sft` depends on it): ln 2 for sigmoid and robust, 1 for hinge
    /// and apo_zero, 1/(4β²) for IPO.
    pub fn value_at_reference(self, beta: f64, nll: f64) -> f64 {
        match self {
            Self::Sigmoid | Self::Robust => std::f64::consts::LN_2,
            Self::Hinge | Self::ApoZero => 1.0,
            Self::Ipo => 1.0 / (4.0 * beta * beta),
            Self::Sft => nll,
        }
    }
}

impl fmt::Display for DpoLossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DpoLossType {
    type Err = RlhfError;

    fn from_str(s: &str) -> std::result::Result<Self, RlhfError> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                RlhfError::config(
                    "DPO",
                    "loss_type",
                    format!(
                        "unknown loss type {s:?}; expected one of {}",
                        Self::ALL.map(Self::name).join(", ")
                    ),
                )
            })
    }
}

/// DPO's loss settings (TRL's `DPOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoLossConfig {
    /// The loss types, summed with `loss_weights` (default `["sigmoid"]`).
    pub loss_type: Vec<DpoLossType>,
    /// One weight per loss type (`None`: all 1, as TRL).
    pub loss_weights: Option<Vec<f64>>,
    /// β: the strength of the pull towards the reference (TRL's default 0.1).
    /// For IPO it is the regulariser τ.
    pub beta: f64,
    /// Robust DPO's label-flip probability ε, in [0, 0.5).
    pub label_smoothing: f64,
}

impl Default for DpoLossConfig {
    fn default() -> Self {
        Self {
            loss_type: vec![DpoLossType::Sigmoid],
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

impl DpoLossConfig {
    /// Checks the values, naming the field at fault.
    pub fn validate(&self) -> std::result::Result<(), RlhfError> {
        let bad = |f: &str, m: String| Err(RlhfError::config("DPO", f, m));
        if self.loss_type.is_empty() {
            return bad("loss_type", "give at least one loss type".into());
        }
        for (i, t) in self.loss_type.iter().enumerate() {
            if self.loss_type[..i].contains(t) {
                return bad("loss_type", format!("{t} is listed twice"));
            }
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != self.loss_type.len() {
                return bad(
                    "loss_weights",
                    format!(
                        "{} weights for {} loss types; give one weight per loss type",
                        w.len(),
                        self.loss_type.len()
                    ),
                );
            }
            if let Some(x) = w.iter().find(|x| !x.is_finite()) {
                return bad("loss_weights", format!("weights must be finite, got {x}"));
            }
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", format!("must be positive, got {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!(
                    "robust DPO's flip probability must be in [0, 0.5), got {}",
                    self.label_smoothing
                ),
            );
        }
        Ok(())
    }

    /// `(type, weight)` pairs.
    pub fn weighted(&self) -> Vec<(DpoLossType, f64)> {
        self.loss_type
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let w = self
                    .loss_weights
                    .as_ref()
                    .and_then(|w| w.get(i).copied())
                    .unwrap_or(1.0);
                (t, w)
            })
            .collect()
    }

    /// The total loss of a policy equal to its reference (see
    /// [`DpoLossType::value_at_reference`]).
    pub fn value_at_reference(&self, nll: f64) -> f64 {
        self.weighted()
            .iter()
            .map(|(t, w)| w * t.value_at_reference(self.beta, nll))
            .sum()
    }
}

/// What a loss over a micro-batch is divided by: the counts of the whole
/// optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// Pairs in the optimizer step (per-sequence losses are averaged over them).
    pub pairs: f64,
    /// Chosen completion tokens in the step (the `sft` term is averaged over them).
    pub chosen_tokens: f64,
}

impl LossScale {
    /// The counts of one batch on its own (TRL's means).
    pub fn of_batch(logps: &SequenceLogps) -> Result<Self> {
        Ok(Self {
            pairs: logps.chosen.dim(0)? as f64,
            chosen_tokens: logps
                .chosen_tokens
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?,
        })
    }
}

/// Per-pair summed log-probabilities of the completions (prompt tokens
/// excluded), and their token counts. All `[B]`.
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// `Σ log p(chosen token)` per pair.
    pub chosen: Tensor,
    /// `Σ log p(rejected token)` per pair.
    pub rejected: Tensor,
    /// Tokens in each chosen completion (the dtype of `chosen`).
    pub chosen_tokens: Tensor,
    /// Tokens in each rejected completion.
    pub rejected_tokens: Tensor,
}

/// The result of [`dpo_loss`].
#[derive(Debug, Clone)]
pub struct DpoLossOutput {
    /// The weighted sum of the loss types (a scalar, differentiable).
    pub loss: Tensor,
    /// Each type's (unweighted) value, detached.
    pub terms: Vec<(DpoLossType, f64)>,
    /// `β (log π(chosen) - log π_ref(chosen))` per pair, detached: TRL's
    /// `rewards/chosen`.
    pub chosen_rewards: Tensor,
    /// The same for the rejected completions (`rewards/rejected`).
    pub rejected_rewards: Tensor,
}

/// The per-pair loss of one type (`None` for `sft`, which is a token mean).
fn per_pair(
    t: DpoLossType,
    cfg: &DpoLossConfig,
    policy: &SequenceLogps,
    chosen_lr: &Tensor,
    rejected_lr: &Tensor,
) -> Result<Option<Tensor>> {
    let beta = cfg.beta;
    let bd = ((chosen_lr - rejected_lr)? * beta)?;
    Ok(Some(match t {
        DpoLossType::Sigmoid => softplus(&bd.neg()?)?,
        DpoLossType::Hinge => (bd.neg()? + 1.0)?.relu()?,
        DpoLossType::Ipo => {
            let c = chosen_lr.div(&policy.chosen_tokens.maximum(1.0)?)?;
            let r = rejected_lr.div(&policy.rejected_tokens.maximum(1.0)?)?;
            ((c - r)? - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLossType::Robust => {
            let e = cfg.label_smoothing;
            let clean = (softplus(&bd.neg()?)? * (1.0 - e))?;
            let flipped = (softplus(&bd)? * e)?;
            ((clean - flipped)? / (1.0 - 2.0 * e))?
        }
        DpoLossType::ApoZero => {
            let chosen = (sigmoid(&(chosen_lr * beta)?)?.neg()? + 1.0)?;
            let rejected = sigmoid(&(rejected_lr * beta)?)?;
            (chosen + rejected)?
        }
        DpoLossType::Sft => return Ok(None),
    }))
}

/// DPO's loss over a micro-batch: `Σ_types weight · term`, each per-pair term
/// summed over the pairs and divided by `scale.pairs`, the `sft` term the
/// chosen completions' negative log-likelihood divided by
/// `scale.chosen_tokens`. `ref_chosen`/`ref_rejected` are the reference
/// model's log-probabilities (no gradient flows into them).
pub fn dpo_loss(
    cfg: &DpoLossConfig,
    policy: &SequenceLogps,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    scale: &LossScale,
) -> Result<DpoLossOutput> {
    let chosen_lr = (&policy.chosen - ref_chosen.detach())?;
    let rejected_lr = (&policy.rejected - ref_rejected.detach())?;
    let mut total: Option<Tensor> = None;
    let mut terms = Vec::new();
    for (t, w) in cfg.weighted() {
        let term = match per_pair(t, cfg, policy, &chosen_lr, &rejected_lr)? {
            Some(l) => (l.sum_all()? / scale.pairs)?,
            None => (policy.chosen.sum_all()?.neg()? / scale.chosen_tokens.max(1.0))?,
        };
        terms.push((t, scalar(&term)?));
        let weighted = (term * w)?;
        total = Some(match total {
            None => weighted,
            Some(acc) => (acc + weighted)?,
        });
    }
    let loss = total.ok_or_else(|| candle_core::Error::Msg("DPO: no loss type".into()))?;
    Ok(DpoLossOutput {
        loss,
        terms,
        chosen_rewards: (chosen_lr * cfg.beta)?.detach(),
        rejected_rewards: (rejected_lr * cfg.beta)?.detach(),
    })
}

/// The reward model's Bradley–Terry loss (TRL's `RewardTrainer`) over a
/// micro-batch: `Σ -log sigmoid(r_c - r_r - margin) / pairs`, plus
/// `center · Σ (r_c + r_r)² / pairs` when reward centring is on
/// (`center_rewards_coefficient`). Rewards `[B]`; `margin [B]` optional.
pub fn reward_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
    pairs: f64,
) -> Result<Tensor> {
    let mut d = (chosen - rejected)?;
    if let Some(m) = margin {
        d = (d - m)?;
    }
    let mut loss = (softplus(&d.neg()?)?.sum_all()? / pairs)?;
    if let Some(c) = center_rewards_coefficient {
        let centre = ((chosen + rejected)?.sqr()?.sum_all()? / pairs)?;
        loss = (loss + (centre * c)?)?;
    }
    Ok(loss)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn t(xs: &[f64]) -> Tensor {
        Tensor::new(xs, &Device::Cpu).unwrap()
    }

    fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: got {g}, want {w}"
            );
        }
    }

    const C: [f64; 4] = [-12.5, -20.25, -8.0, -30.0];
    const R: [f64; 4] = [-14.0, -19.0, -9.5, -28.0];
    const RC: [f64; 4] = [-13.0, -20.0, -8.5, -29.0];
    const RR: [f64; 4] = [-13.5, -19.5, -9.0, -29.5];
    const CT: [f64; 4] = [5.0, 8.0, 3.0, 12.0];
    const RT: [f64; 4] = [6.0, 7.0, 4.0, 10.0];

    /// Loss and gradients w.r.t. the policy's chosen and rejected log-probs.
    fn run(cfg: &DpoLossConfig) -> (f64, Vec<f64>, Vec<f64>) {
        let c = Var::new(&C, &Device::Cpu).unwrap();
        let r = Var::new(&R, &Device::Cpu).unwrap();
        let lp = SequenceLogps {
            chosen: c.as_tensor().clone(),
            rejected: r.as_tensor().clone(),
            chosen_tokens: t(&CT),
            rejected_tokens: t(&RT),
        };
        let scale = LossScale::of_batch(&lp).unwrap();
        let out = dpo_loss(cfg, &lp, &t(&RC), &t(&RR), &scale).unwrap();
        let g = out.loss.backward().unwrap();
        let grad = |v: &Var| -> Vec<f64> {
            g.get(v.as_tensor())
                .map(|x| x.to_vec1::<f64>().unwrap())
                .unwrap_or_else(|| vec![0.0; 4])
        };
        (out.loss.to_scalar::<f64>().unwrap(), grad(&c), grad(&r))
    }

    /// TRL 1.16's formulas (`tests/fixtures/trl_loss_refs.py`, the
    /// per-sequence losses copied from `DPOTrainer._compute_loss`), in f64 on
    /// `c = [-12.5, -20.25, -8.0, -30.0]`, `r = [-14.0, -19.0, -9.5, -28.0]`,
    /// `ref_c = [-13.0, -20.0, -8.5, -29.0]`, `ref_r = [-13.5, -19.5, -9.0, -29.5]`,
    /// chosen tokens `[5, 8, 3, 12]`, rejected tokens `[6, 7, 4, 10]`:
    ///
    /// ```text
    /// $ python3 trl_loss_refs.py   # (loss_type, beta, label_smoothing, loss, d/dc, d/dr)
    /// ("sigmoid", 0.1, 0.0, 7.115207202131951e-01, [-0.011875520313027, -0.012968530396963, -0.011875520313027, -0.014054412522145], [0.011875520313027, 0.012968530396963, 0.011875520313027, 0.014054412522145]),
    /// ("sigmoid", 0.5, 0.0, 8.370515784613566e-01, [-0.047192583599768, -0.074083324994259, -0.047192583599768, -0.097162482646836], [0.047192583599768, 0.074083324994259, 0.047192583599768, 0.097162482646836]),
    /// ("hinge", 0.1, 0.0, 1.031250000000000e+00, [-0.025, -0.025, -0.025, -0.025], [0.025, 0.025, 0.025, 0.025]),
    /// ("hinge", 0.5, 0.0, 1.156250000000000e+00, [-0.125, -0.125, -0.125, -0.125], [0.125, 0.125, 0.125, 0.125]),
    /// ("ipo", 0.1, 0.0, 2.469844673416241e+01, [-0.481666666666667, -0.318917410714286, -0.784722222222222, -0.218055555555556], [0.401388888888889, 0.364477040816327, 0.588541666666667, 0.261666666666667]),
    /// ("ipo", 0.5, 0.0, 9.764229246386055e-01, [-0.081666666666667, -0.068917410714286, -0.118055555555556, -0.051388888888889], [0.068055555555556, 0.078762755102041, 0.088541666666667, 0.061666666666667]),
    /// ("robust", 0.1, 0.2, 7.219373868798619e-01, [-0.02020885364636, -0.021301863730297, -0.02020885364636, -0.022387745855478], [0.02020885364636, 0.021301863730297, 0.02020885364636, 0.022387745855478]),
    /// ("robust", 0.5, 0.1, 8.565828284613566e-01, [-0.062817583599768, -0.089708324994259, -0.062817583599768, -0.112787482646836], [0.062817583599768, 0.089708324994259, 0.062817583599768, 0.112787482646836]),
    /// ("apo_zero", 0.1, 0.0, 1.007791629467392e+00, [-0.006246095377028, -0.006249023539216, -0.006246095377028, -0.006234401004822], [0.006246095377028, 0.006246095377028, 0.006246095377028, 0.006214975166939]),
    /// ("apo_zero", 0.5, 0.0, 1.036579475273402e+00, [-0.0307667603422, -0.031128246876702, -0.0307667603422, -0.029375464025199], [0.0307667603422, 0.0307667603422, 0.0307667603422, 0.027236874220227]),
    /// ("sft", 0.1, 0.0, 2.526785714285714e+00, [-0.035714285714286, -0.035714285714286, -0.035714285714286, -0.035714285714286], [0.0, 0.0, 0.0, 0.0]),
    /// weighted sigmoid+0.5*sft: 1.974913577356052e+00 [-0.029732663170169357, -0.03082567325410624, -0.029732663170169357, -0.03191155537928781] [0.011875520313026501, 0.012968530396963383, 0.011875520313026501, 0.014054412522144955]
    /// ```
    #[test]
    #[rustfmt::skip]
    fn dpo_losses_and_gradients_match_trl() {
        type Case = (&'static str, f64, f64, f64, [f64; 4], [f64; 4]);
        let cases: [Case; 11] = [
            ("sigmoid", 0.1, 0.0, 7.115207202131951e-01, [-0.011875520313027, -0.012968530396963, -0.011875520313027, -0.014054412522145], [0.011875520313027, 0.012968530396963, 0.011875520313027, 0.014054412522145]),
            ("sigmoid", 0.5, 0.0, 8.370515784613566e-01, [-0.047192583599768, -0.074083324994259, -0.047192583599768, -0.097162482646836], [0.047192583599768, 0.074083324994259, 0.047192583599768, 0.097162482646836]),
            ("hinge", 0.1, 0.0, 1.031250000000000e+00, [-0.025, -0.025, -0.025, -0.025], [0.025, 0.025, 0.025, 0.025]),
            ("hinge", 0.5, 0.0, 1.156250000000000e+00, [-0.125, -0.125, -0.125, -0.125], [0.125, 0.125, 0.125, 0.125]),
            ("ipo", 0.1, 0.0, 2.469844673416241e+01, [-0.481666666666667, -0.318917410714286, -0.784722222222222, -0.218055555555556], [0.401388888888889, 0.364477040816327, 0.588541666666667, 0.261666666666667]),
            ("ipo", 0.5, 0.0, 9.764229246386055e-01, [-0.081666666666667, -0.068917410714286, -0.118055555555556, -0.051388888888889], [0.068055555555556, 0.078762755102041, 0.088541666666667, 0.061666666666667]),
            ("robust", 0.1, 0.2, 7.219373868798619e-01, [-0.02020885364636, -0.021301863730297, -0.02020885364636, -0.022387745855478], [0.02020885364636, 0.021301863730297, 0.02020885364636, 0.022387745855478]),
            ("robust", 0.5, 0.1, 8.565828284613566e-01, [-0.062817583599768, -0.089708324994259, -0.062817583599768, -0.112787482646836], [0.062817583599768, 0.089708324994259, 0.062817583599768, 0.112787482646836]),
            ("apo_zero", 0.1, 0.0, 1.007791629467392e+00, [-0.006246095377028, -0.006249023539216, -0.006246095377028, -0.006234401004822], [0.006246095377028, 0.006246095377028, 0.006246095377028, 0.006214975166939]),
            ("apo_zero", 0.5, 0.0, 1.036579475273402e+00, [-0.0307667603422, -0.031128246876702, -0.0307667603422, -0.029375464025199], [0.0307667603422, 0.0307667603422, 0.0307667603422, 0.027236874220227]),
            ("sft", 0.1, 0.0, 2.526785714285714e+00, [-0.035714285714286, -0.035714285714286, -0.035714285714286, -0.035714285714286], [0.0, 0.0, 0.0, 0.0]),
        ];
        for (name, beta, eps, loss, dc, dr) in cases {
            let cfg = DpoLossConfig {
                loss_type: vec![name.parse().unwrap()],
                beta,
                label_smoothing: eps,
                ..Default::default()
            };
            cfg.validate().unwrap();
            let (l, gc, gr) = run(&cfg);
            let what = format!("{name} beta={beta}");
            close(&[l], &[loss], 1e-13, &what);
            // The gradients were printed rounded to 15 decimals.
            close(&gc, &dc, 2e-15, &format!("{what} d/dchosen"));
            close(&gr, &dr, 2e-15, &format!("{what} d/drejected"));
        }
        let cfg = DpoLossConfig {
            loss_type: vec![DpoLossType::Sigmoid, DpoLossType::Sft],
            loss_weights: Some(vec![1.0, 0.5]),
            ..Default::default()
        };
        let (l, gc, gr) = run(&cfg);
        close(&[l], &[1.974913577356052e+00], 1e-13, "sigmoid+0.5 sft");
        close(&gc, &[-0.029732663170169357, -0.03082567325410624, -0.029732663170169357, -0.03191155537928781], 1e-13, "weighted d/dc");
        close(&gr, &[0.011875520313026501, 0.012968530396963383, 0.011875520313026501, 0.014054412522144955], 1e-13, "weighted d/dr");
    }

    /// At the reference (all log-ratios 0) each loss takes its closed-form
    /// value and its gradient is not zero (the first step moves the policy;
    /// candle's relu-based softplus gives 0 there).
    #[test]
    fn losses_at_the_reference_take_their_closed_forms() {
        let beta = 0.25;
        for ty in DpoLossType::ALL {
            let cfg = DpoLossConfig {
                loss_type: vec![ty],
                beta,
                label_smoothing: 0.2,
                ..Default::default()
            };
            let c = Var::new(&C, &Device::Cpu).unwrap();
            let r = Var::new(&R, &Device::Cpu).unwrap();
            let lp = SequenceLogps {
                chosen: c.as_tensor().clone(),
                rejected: r.as_tensor().clone(),
                chosen_tokens: t(&CT),
                rejected_tokens: t(&RT),
            };
            let scale = LossScale::of_batch(&lp).unwrap();
            let out = dpo_loss(&cfg, &lp, &t(&C), &t(&R), &scale).unwrap();
            let nll = -C.iter().sum::<f64>() / CT.iter().sum::<f64>();
            let want = ty.value_at_reference(beta, nll);
            let got = out.loss.to_scalar::<f64>().unwrap();
            assert!((got - want).abs() < 1e-14, "{ty}: {got} vs {want}");
            assert_eq!(out.chosen_rewards.to_vec1::<f64>().unwrap(), vec![0.0; 4]);
            let g = out.loss.backward().unwrap();
            let gc = g.get(c.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            assert!(gc.iter().all(|&x| x < 0.0), "{ty}: d/dchosen {gc:?}");
        }
        assert!((DpoLossType::Ipo.value_at_reference(0.1, 0.0) - 25.0).abs() < 1e-12);
    }

    #[test]
    fn softplus_is_stable_with_sigmoid_gradient() {
        let x = Var::new(&[-800.0f32, -3.0, 0.0, 2.0, 800.0], &Device::Cpu).unwrap();
        let y = softplus(x.as_tensor()).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        let want = [0.0f32, 0.048587352, std::f32::consts::LN_2, 2.126928, 800.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let want = [0.0f32, 0.047425874, 0.5, 0.880797, 1.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
        let s = sigmoid(&Tensor::new(&[0.0f64, 30.0], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(s.to_vec1::<f64>().unwrap()[0], 0.5);
    }

    /// TRL's `RewardTrainer.compute_loss` (`tests/fixtures/trl_loss_refs.py`)
    /// on `r_c = [0.8, -0.3, 1.5, 0.1]`, `r_r = [0.2, 0.4, -1.0, 0.1]`,
    /// `margin = [0.5, 0.0, 1.0, -0.25]`, centring coefficient 0.01:
    ///
    /// ```text
    /// reward margin=False center=None: 5.781777285559596e-01 [-0.08858592344355112, -0.1670469430420415, -0.01896454500531089, -0.125] [0.08858592344355112, 0.1670469430420415, 0.01896454500531089, 0.125]
    /// reward margin=True center=None: 6.312338517051562e-01 [-0.118755203130265, -0.1670469430420415, -0.04560638095158908, -0.10945587477855047] [0.118755203130265, 0.1670469430420415, 0.04560638095158908, 0.10945587477855047]
    /// reward margin=False center=0.01: 5.814277285559596e-01 [-0.08358592344355112, -0.1665469430420415, -0.01646454500531089, -0.124] [0.09358592344355113, 0.1675469430420415, 0.02146454500531089, 0.126]
    /// reward margin=True center=0.01: 6.344838517051562e-01 [-0.11375520313026499, -0.1665469430420415, -0.04310638095158908, -0.10845587477855047] [0.123755203130265, 0.1675469430420415, 0.04810638095158908, 0.11045587477855047]
    /// ```
    #[test]
    #[rustfmt::skip]
    fn reward_loss_matches_trl() {
        type Case = (bool, Option<f64>, f64, [f64; 4], [f64; 4]);
        let cases: [Case; 4] = [
            (false, None, 5.781777285559596e-01, [-0.08858592344355112, -0.1670469430420415, -0.01896454500531089, -0.125], [0.08858592344355112, 0.1670469430420415, 0.01896454500531089, 0.125]),
            (true, None, 6.312338517051562e-01, [-0.118755203130265, -0.1670469430420415, -0.04560638095158908, -0.10945587477855047], [0.118755203130265, 0.1670469430420415, 0.04560638095158908, 0.10945587477855047]),
            (false, Some(0.01), 5.814277285559596e-01, [-0.08358592344355112, -0.1665469430420415, -0.01646454500531089, -0.124], [0.09358592344355113, 0.1675469430420415, 0.02146454500531089, 0.126]),
            (true, Some(0.01), 6.344838517051562e-01, [-0.11375520313026499, -0.1665469430420415, -0.04310638095158908, -0.10845587477855047], [0.123755203130265, 0.1675469430420415, 0.04810638095158908, 0.11045587477855047]),
        ];
        for (use_margin, centre, want, dc, dr) in cases {
            let c = Var::new(&[0.8f64, -0.3, 1.5, 0.1], &Device::Cpu).unwrap();
            let r = Var::new(&[0.2f64, 0.4, -1.0, 0.1], &Device::Cpu).unwrap();
            let m = t(&[0.5, 0.0, 1.0, -0.25]);
            let l = reward_loss(c.as_tensor(), r.as_tensor(), use_margin.then_some(&m), centre, 4.0).unwrap();
            let what = format!("margin={use_margin} centre={centre:?}");
            close(&[l.to_scalar::<f64>().unwrap()], &[want], 1e-14, &what);
            let g = l.backward().unwrap();
            close(&g.get(c.as_tensor()).unwrap().to_vec1::<f64>().unwrap(), &dc, 1e-14, &what);
            close(&g.get(r.as_tensor()).unwrap().to_vec1::<f64>().unwrap(), &dr, 1e-14, &what);
        }
    }

    #[test]
    fn settings_are_checked_and_named() {
        let ok = DpoLossConfig::default();
        ok.validate().unwrap();
        let cases = [
            (
                DpoLossConfig {
                    loss_type: vec![],
                    ..ok.clone()
                },
                "loss_type",
            ),
            (
                DpoLossConfig {
                    loss_weights: Some(vec![1.0, 2.0]),
                    ..ok.clone()
                },
                "loss_weights",
            ),
            (
                DpoLossConfig {
                    beta: 0.0,
                    ..ok.clone()
                },
                "beta",
            ),
            (
                DpoLossConfig {
                    label_smoothing: 0.5,
                    ..ok.clone()
                },
                "label_smoothing",
            ),
            (
                DpoLossConfig {
                    loss_type: vec![DpoLossType::Sft, DpoLossType::Sft],
                    ..ok.clone()
                },
                "twice",
            ),
        ];
        for (cfg, want) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = "dpo".parse::<DpoLossType>().unwrap_err().to_string();
        assert!(e.contains("apo_zero"), "{e}");
        for ty in DpoLossType::ALL {
            assert_eq!(ty.name().parse::<DpoLossType>().unwrap(), ty);
            let json = serde_json::to_string(&ty).unwrap();
            assert_eq!(json, format!("\"{}\"", ty.name()));
        }
        // f32 inputs work too.
        let x = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        assert_eq!(log_sigmoid(&x).unwrap().dtype(), DType::F32);
    }
}
