//! Gradient penalties (R1 and WGAN-GP) without double backward.
//!
//! A penalty on the input gradient `g_i = grad_x D(x_i)` of each sample,
//! `P = mean_i f(||g_i||)`, needs the parameter gradient of a gradient:
//! `grad_theta P = mean_i f'(||g_i||) (d g_i / d theta)^T u_i` with
//! `u_i = g_i / ||g_i||`. candle detaches gradients (no double backward),
//! but the product on the right is a Hessian-vector product, and
//! `(d g / d theta)^T u = grad_theta (u . grad_x D(x))` is the parameter
//! gradient of a directional derivative, which a central difference gives
//! from first-order gradients alone:
//!
//! ```text
//! u . grad_x D(x)  ~  [D(x + h u) - D(x - h u)] / (2 h)      (u held constant)
//! ```
//!
//! So one backward pass for `g` (with respect to the input), then one
//! forward of `D` on the `2B` shifted inputs, give a scalar surrogate
//! `S = mean_i f'(||g_i||) [D(x_i + h u_i) - D(x_i - h u_i)] / (2 h)` whose
//! parameter gradient is `grad_theta P` up to `O(h^2)`. Adding `S` to the
//! discriminator's loss before its backward applies the penalty. The error
//! is checked against central differences of `P` in f64 in the tests.
//!
//! `D` must treat samples independently (no batch norm), as the penalty is
//! per sample: the config refuses batch norm in D with a penalty.
//!
//! - R1 (Mescheder et al. 2018): `f(n) = gamma / 2 * n^2` on real images.
//! - WGAN-GP (Gulrajani et al. 2017): `f(n) = lambda * (n - 1)^2` on
//!   `x^ = a x + (1 - a) G(z)`, `a ~ U(0, 1)` per sample.

use kiln_core::{DType, Result, Tensor, Var};

use crate::config::PenaltyKind;

/// A penalty's value and the surrogate that carries its gradient.
#[derive(Debug, Clone)]
pub struct PenaltyTerms {
    /// `P = mean_i f(||g_i||)`, for logging.
    pub value: f64,
    /// A scalar whose parameter gradient is `grad_theta P` (its value is not
    /// `P`): add it to the discriminator's loss, or backpropagate it into the
    /// same gradient accumulator.
    pub surrogate: Tensor,
    /// `mean_i ||g_i||`, for logging.
    pub grad_norm: f64,
}

/// The input gradient `grad_x sum_i D(x_i)`, `[B, ...]` like `x` (each
/// sample's own `grad_x D(x_i)` when D treats samples independently),
/// detached from the parameters.
pub fn input_gradient(d: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let out = d(xv.as_tensor())?;
    let grads = out.sum_all()?.backward()?;
    // candle detaches the gradients it propagates, but a leaf's gradient is
    // the last product (output gradient times the weights) and still refers
    // to the parameters: held constant here, as the method requires.
    match grads.get(xv.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => xv.as_tensor().zeros_like(),
    }
}

/// Per-sample Euclidean norms of `g [B, ...]`, in f64.
pub fn per_sample_norms(g: &Tensor) -> Result<Vec<f64>> {
    let b = g.dim(0)?;
    let sq = g
        .to_dtype(DType::F64)?
        .reshape((b, ()))?
        .sqr()?
        .sum(1)?
        .to_vec1::<f64>()?;
    Ok(sq.into_iter().map(f64::sqrt).collect())
}

/// `f(n)` and `f'(n)` of the penalty of `kind` with `weight`.
pub fn penalty_fn(kind: PenaltyKind, weight: f64, n: f64) -> (f64, f64) {
    match kind {
        PenaltyKind::None => (0.0, 0.0),
        PenaltyKind::R1 => (0.5 * weight * n * n, weight * n),
        PenaltyKind::WganGp => (weight * (n - 1.0).powi(2), 2.0 * weight * (n - 1.0)),
    }
}

/// The penalty of `kind` at the inputs `x [B, ...]` (real images for R1,
/// interpolates for WGAN-GP), with the finite-difference step `h` (a length
/// in input space). `d` maps `[N, ...]` to `[N]` logits for `N = B` and
/// `N = 2B` (the shifted inputs `x + h u` then `x - h u`; repeat any labels
/// accordingly).
pub fn gradient_penalty(
    d: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    kind: PenaltyKind,
    weight: f64,
    h: f64,
) -> Result<PenaltyTerms> {
    let b = x.dim(0)?;
    let x = x.detach();
    let g = input_gradient(&d, &x)?;
    let norms = per_sample_norms(&g)?;
    let mut value = 0.0;
    // Per-sample scale of the direction (1 / ||g_i||, 0 for a zero
    // gradient) and coefficient f'(||g_i||) / (B * 2h).
    let mut inv = Vec::with_capacity(b);
    let mut coef = Vec::with_capacity(b);
    for &n in &norms {
        let (f, fp) = penalty_fn(kind, weight, n);
        value += f / b as f64;
        let ok = n > 0.0 && n.is_finite();
        inv.push(if ok { 1.0 / n } else { 0.0 });
        coef.push(if ok { fp / (b as f64 * 2.0 * h) } else { 0.0 });
    }
    let dt = x.dtype();
    let dev = x.device();
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    let inv = Tensor::from_vec(inv, shape.as_slice(), dev)?.to_dtype(dt)?;
    let step = (g.broadcast_mul(&inv)? * h)?;
    let shifted = Tensor::cat(&[(&x + &step)?, (&x - &step)?], 0)?;
    let out = d(&shifted)?;
    let diff = (out.narrow(0, 0, b)? - out.narrow(0, b, b)?)?;
    let coef = Tensor::from_vec(coef, b, dev)?.to_dtype(diff.dtype())?;
    let surrogate = (diff * coef)?.sum_all()?;
    let grad_norm = norms.iter().sum::<f64>() / b.max(1) as f64;
    Ok(PenaltyTerms {
        value,
        surrogate,
        grad_norm,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_core::rng::SeededRng;
    use kiln_core::Device;

    /// A linear critic `D(x) = w . x` has `grad_x D = w` for every sample, so
    /// R1 is `gamma / 2 ||w||^2` with gradient `gamma w`, and WGAN-GP is
    /// `lambda (||w|| - 1)^2` with gradient `2 lambda (||w|| - 1) w / ||w||`:
    /// closed forms, which the central difference reproduces (it is exact
    /// for a linear D up to rounding).
    #[test]
    fn linear_critic_penalties_match_their_closed_forms() {
        let dev = Device::Cpu;
        let wv: Vec<f64> = vec![0.3, -1.2, 0.5, 2.0, 0.1, -0.4];
        let w = Var::new(wv.as_slice(), &dev).unwrap();
        let x = SeededRng::new(1)
            .normal(&[5, 6], 0.0, 1.0, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let d = |x: &Tensor| x.broadcast_mul(w.as_tensor())?.sum(1);
        let n: f64 = wv.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (kind, weight, value, scale) in [
            (PenaltyKind::R1, 10.0, 5.0 * n * n, 10.0),
            (
                PenaltyKind::WganGp,
                3.0,
                3.0 * (n - 1.0).powi(2),
                6.0 * (n - 1.0) / n,
            ),
        ] {
            let p = gradient_penalty(d, &x, kind, weight, 1e-3).unwrap();
            assert!(
                (p.value - value).abs() < 1e-12 * value,
                "{kind:?} {}",
                p.value
            );
            assert!((p.grad_norm - n).abs() < 1e-14);
            let g = p.surrogate.backward().unwrap();
            let gw = g.get(w.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            for (got, wi) in gw.iter().zip(&wv) {
                let want = scale * wi;
                assert!(
                    (got - want).abs() < 1e-9 * want.abs().max(1.0),
                    "{kind:?}: {got} vs {want}"
                );
            }
        }
    }
}
