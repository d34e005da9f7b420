//! The VAE objective: reconstruction negative log-likelihood plus β·KL, and
//! the importance-weighted bound.

use kiln_core::loss::{bce_with_logits, gaussian_kl, Reduction};
use kiln_core::{Result, Tensor, D};

use crate::config::Likelihood;
use crate::model::VaeOutput;

const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// The parts of the loss, each summed over the batch.
#[derive(Debug, Clone)]
pub struct ElboTerms {
    /// `rec + beta * kl` (what is minimised), summed over the batch.
    pub loss: Tensor,
    /// Reconstruction negative log-likelihood, summed over pixels and batch.
    pub rec: Tensor,
    /// KL(q(z|x) || N(0, I)), summed over the batch.
    pub kl: Tensor,
}

/// Per-image reconstruction NLL `[B]`: `-log p(x|z)`.
///
/// Bernoulli: BCE on logits (the chapter's `binary_cross_entropy(sigmoid(l), x)`
/// computed stably). Gaussian: `0.5 * ((x - mu)^2 / s2 + log s2 + log 2π)` with
/// `mu = sigmoid(logits)`.
pub fn reconstruction_nll(
    logits: &Tensor,
    x: &Tensor,
    likelihood: Likelihood,
    logvar_x: Option<&Tensor>,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let per = match likelihood {
        Likelihood::Bernoulli => bce_with_logits(logits, x, Reduction::None)?,
        Likelihood::Gaussian { .. } => {
            let Some(lv) = logvar_x else {
                kiln_core::candle::bail!("a Gaussian likelihood needs the decoder log-variance");
            };
            let mu = kiln_core::candle_nn::ops::sigmoid(logits)?;
            let sq = (mu - x)?.sqr()?;
            let inv = lv.neg()?.exp()?;
            ((sq.broadcast_mul(&inv)?.broadcast_add(lv)? + LN_2PI)? * 0.5)?
        }
    };
    per.reshape((b, ()))?.sum(1)
}

/// The β-ELBO loss of a forward pass on `x`: `rec + beta * kl`, summed over the
/// batch (divide by the batch size for the per-image figure the chapter prints).
pub fn elbo_loss(
    out: &VaeOutput,
    x: &Tensor,
    likelihood: Likelihood,
    logvar_x: Option<&Tensor>,
    beta: f64,
) -> Result<ElboTerms> {
    let rec = reconstruction_nll(&out.logits, x, likelihood, logvar_x)?.sum_all()?;
    let kl = gaussian_kl(&out.posterior.mean, &out.posterior.logvar, Reduction::Sum)?;
    let loss = (&rec + (&kl * beta)?)?;
    Ok(ElboTerms { loss, rec, kl })
}

/// `log N(z; mean, exp(logvar))` summed over the last dimension, `[B]`.
pub fn log_normal(z: &Tensor, mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let sq = (z - mean)?.sqr()?;
    let t = ((sq / logvar.exp()?)? + logvar)? + LN_2PI;
    (t? * -0.5)?.sum(D::Minus1)
}

/// Log-sum-exp over dimension 0 of `[K, B]`, stable.
pub fn logsumexp0(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(0)?;
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(0)?.log()?;
    (s + m)?.squeeze(0)
}
