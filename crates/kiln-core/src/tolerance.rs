//! Comparison tolerances derived from the arithmetic, not from one machine's
//! result.
//!
//! A value computed by f32 reductions (sums, dot products, matmuls) is exact
//! only up to rounding whose size depends on the order of the additions, and
//! that order changes with the CPU: candle's gemm picks its blocking from the
//! cache sizes and its kernels from the instruction set, rayon splits by the
//! thread count. So a test that compares kiln with PyTorch (or with itself
//! under another thread count) must allow the rounding of *any* order.
//!
//! The bound used here is Higham and Mary's probabilistic one ("A new
//! approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
//! 41(5), 2019, theorem 3.1): a sum of `n` terms in a precision with unit
//! roundoff `u` has, with probability at least `1 - 2 exp(-λ² / 2)`, a
//! relative error (with respect to the sum of the terms' magnitudes) of at
//! most `λ √n u + O(u²)`. With `λ = 10` that fails once in 10²¹ comparisons,
//! yet is `√n / 10` times tighter than the worst-case `n u`, so the tests keep
//! their power to catch real bugs (a wrong sign, a missing term, a
//! transposed weight move values by far more).
//!
//! ```
//! use kiln_core::tolerance::{f32_abs_tol, within};
//! // A sum of 3072 terms whose magnitudes add up to 40 000:
//! let tol = f32_abs_tol(3072, 40_000.0);
//! assert!(tol > 2.6 && tol < 2.7); // 2 · 10 · √3072 · 2⁻²⁴ · 40 000
//! assert!(within(17486.97, 17486.98, tol));
//! ```

/// f32's unit roundoff `u = 2^-24` (half of `f32::EPSILON`).
pub const F32_UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// The confidence factor `λ` of the probabilistic bound (failure probability
/// `2 exp(-λ²/2)`, about 4e-22 for λ = 10).
pub const LAMBDA: f64 = 10.0;

/// Relative error bound of one f32 reduction of `n` terms, relative to the
/// sum of the terms' magnitudes: `λ √n u` (at least one rounding, `u`).
pub fn f32_reduction_rel(n: usize) -> f64 {
    (LAMBDA * (n.max(1) as f64).sqrt() * F32_UNIT_ROUNDOFF).max(F32_UNIT_ROUNDOFF)
}

/// The absolute tolerance for comparing two independent f32 computations of
/// a value built from reductions of `n` terms whose magnitudes sum to
/// `magnitude` (for a sum of positive terms, the value itself; for a vector
/// norm, the norm; for a sum of values that cancel, the sum of their
/// absolute values). Each side may err by the bound, hence the factor 2.
pub fn f32_abs_tol(n: usize, magnitude: f64) -> f64 {
    2.0 * f32_reduction_rel(n) * magnitude.abs()
}

/// The largest absolute difference between two tensors of the same shape,
/// in f64 (any float dtype): what a test compares with a tolerance.
///
/// ```
/// use kiln_core::{tolerance::max_abs_diff, Device, Tensor};
/// let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// let b = Tensor::new(&[1f32, 2.5, 2.0], &Device::Cpu)?;
/// assert_eq!(max_abs_diff(&a, &b)?, 1.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<f64> {
    let d = (a.to_dtype(candle_core::DType::F64)? - b.to_dtype(candle_core::DType::F64)?)?;
    d.abs()?.max_all()?.to_scalar::<f64>()
}

/// The worst-case relative error of an f32 reduction of `n` terms in any
/// order, relative to the sum of the terms' magnitudes:
/// `γ_{n-1} = (n-1) u / (1 - (n-1) u)` (Higham, "Accuracy and Stability of
/// Numerical Algorithms", 2nd ed., §4.2), at least one rounding, `u`. It holds
/// with certainty, and below `n = λ²` (100 terms) it is tighter than the
/// probabilistic [`f32_reduction_rel`].
pub fn f32_worst_case_rel(n: usize) -> f64 {
    let k = n.saturating_sub(1) as f64 * F32_UNIT_ROUNDOFF;
    (k / (1.0 - k)).max(F32_UNIT_ROUNDOFF)
}

/// [`f32_abs_tol`] with the tighter of the probabilistic and the worst-case
/// bound: for short chains (a norm over 4 features, a softmax over 3 logits),
/// where `λ √n` exceeds `n`.
pub fn f32_abs_tol_tight(n: usize, magnitude: f64) -> f64 {
    2.0 * f32_reduction_rel(n).min(f32_worst_case_rel(n)) * magnitude.abs()
}

/// The tolerance to use when a specification also states one: the derived
/// tolerance, but never looser than the stated one (the stated tolerance is
/// the loosest allowed).
pub fn capped(derived: f64, stated: f64) -> f64 {
    derived.min(stated)
}

/// `|got - want| <= tol` (false for NaN).
pub fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

/// The length of the longest chain of reductions behind a gradient of a
/// stack of dense layers: the sum of the widths its backward pass reduces
/// over (each layer's fan-out on the way back, and the batch for the weight
/// gradient). Errors of successive reductions add, so their lengths add.
pub fn chain_length(widths: &[usize]) -> usize {
    widths.iter().sum::<usize>().max(1)
}

/// The absolute tolerance for an output of a stack of layers (dense or
/// convolutional) whose longest path reduces over `chain` terms, layer by
/// layer (a convolution's `c_in k_h k_w`), with outputs up to `max_abs` in
/// magnitude: [`f32_abs_tol`] over [`chain_length`], with the magnitude of
/// the widest reduction, whose terms of random signs add up in absolute value
/// to about the square root of their number times the output.
///
/// ```
/// use kiln_core::tolerance::layers_abs_tol;
/// // 2 · 10 · √(27 + 288) · 2⁻²⁴ · √288 · 1
/// let tol = layers_abs_tol(&[27, 288], 1.0);
/// assert!(tol > 3.5e-4 && tol < 3.6e-4);
/// ```
pub fn layers_abs_tol(chain: &[usize], max_abs: f64) -> f64 {
    let widest = chain.iter().copied().max().unwrap_or(1).max(1);
    f32_abs_tol(chain_length(chain), (widest as f64).sqrt() * max_abs)
}

/// The length of the longest chain of reductions behind an output of a
/// GPT-2-style (pre-norm) transformer with `n_layer` blocks of width `d` and
/// `n_head` heads over `t` positions: per block, two layer norms (a mean and
/// a variance over `d` each), the q/k/v projection (`d`), the attention
/// scores (`d / n_head`), the softmax and the weighted sum of the values
/// (`t` each), the output projection (`d`) and the MLP (`d`, then `4 d`);
/// then the final layer norm (`2 d`) and the head (`d`). Errors of
/// successive reductions add (the residual stream carries them forward).
///
/// ```
/// use kiln_core::tolerance::transformer_chain;
/// // 2 blocks of width 32 with 4 heads over 6 tokens: 2 * 372 + 64 + 32
/// assert_eq!(transformer_chain(2, 32, 4, 6), 840);
/// ```
pub fn transformer_chain(n_layer: usize, d: usize, n_head: usize, t: usize) -> usize {
    let block = 2 * (2 * d) + d + d / n_head.max(1) + 2 * t + d + d + 4 * d;
    chain_length(&[n_layer * block, 2 * d, d])
}

/// The absolute tolerance for an output of such a transformer (a logit, a
/// score) whose values reach `max_abs` in magnitude: [`f32_abs_tol`] over
/// [`transformer_chain`], with the magnitude of the head's sum of `d` terms,
/// which with random signs add up in absolute value to about `√d` times the
/// output (layer norms keep the activations of order 1 on the way). A wrong
/// sign, a transposed weight or a missing bias moves outputs by far more.
///
/// ```
/// use kiln_core::tolerance::transformer_abs_tol;
/// // 2 · 10 · √840 · 2⁻²⁴ · √32 · 4
/// let tol = transformer_abs_tol(2, 32, 4, 6, 4.0);
/// assert!(tol > 7.8e-4 && tol < 7.9e-4);
/// ```
pub fn transformer_abs_tol(n_layer: usize, d: usize, n_head: usize, t: usize, max_abs: f64) -> f64 {
    f32_abs_tol(
        transformer_chain(n_layer, d, n_head, t),
        (d as f64).sqrt() * max_abs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_grow_as_root_n_and_scale_linearly() {
        // Closed form: 2 * 10 * sqrt(10000) * 2^-24 * 1
        let t = f32_abs_tol(10_000, 1.0);
        assert!((t - 2000.0 / 16_777_216.0).abs() < 1e-15, "{t}");
        assert_eq!(f32_abs_tol(400, 3.0), 4.0 * f32_abs_tol(100, 1.5));
        assert_eq!(f32_reduction_rel(0), f32_reduction_rel(1));
        assert!(f32_reduction_rel(1) >= F32_UNIT_ROUNDOFF);
        assert_eq!(capped(1.0, 0.5), 0.5);
        assert!(!within(f64::NAN, 1.0, 1.0));
        assert_eq!(chain_length(&[3072, 512, 8]), 3592);
        assert_eq!(layers_abs_tol(&[9, 16], 2.0), f32_abs_tol(25, 8.0));
        // 2 norms of 2 · 8, q/k/v 8, scores 4, softmax and values 2 · 3,
        // projection 8, MLP 8 and 32; the final norm 16 and the head 8.
        assert_eq!(
            transformer_chain(1, 8, 2, 3),
            32 + 8 + 4 + 6 + 8 + 8 + 32 + 16 + 8
        );
    }

    #[test]
    fn the_tight_bound_is_the_worst_case_below_lambda_squared() {
        let u = F32_UNIT_ROUNDOFF;
        // 4 terms: 3 roundings at worst, 3u / (1 - 3u), each side.
        let t = f32_abs_tol_tight(4, 2.0);
        assert!(
            (t - 2.0 * 2.0 * 3.0 * u / (1.0 - 3.0 * u)).abs() < 1e-20,
            "{t}"
        );
        assert!(t < f32_abs_tol(4, 2.0));
        assert_eq!(f32_worst_case_rel(1), u);
        assert_eq!(f32_worst_case_rel(0), u);
        // From about λ² terms on, the probabilistic bound is the tighter.
        assert_eq!(f32_abs_tol_tight(4096, 1.0), f32_abs_tol(4096, 1.0));
        assert!(f32_worst_case_rel(4096) > f32_reduction_rel(4096));
    }

    /// The bound holds for real f32 sums in shuffled orders: the largest
    /// error seen over many orders stays below it (and far below the
    /// worst-case `n u`).
    #[test]
    fn f32_sums_in_any_order_stay_within_the_bound() {
        use crate::rng::SeededRng;
        let n = 4096;
        let mut rng = SeededRng::new(7);
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0) + 0.1)
            .collect();
        let exact: f64 = xs.iter().map(|&x| x as f64).sum();
        let mag: f64 = xs.iter().map(|&x| (x as f64).abs()).sum();
        let bound = f32_reduction_rel(n) * mag;
        for _ in 0..50 {
            let order = rng.permutation(n);
            let s: f32 = order.iter().map(|&i| xs[i]).sum();
            assert!(((s as f64) - exact).abs() <= bound);
        }
    }
}
