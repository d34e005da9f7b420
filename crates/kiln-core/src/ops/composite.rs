//! Softmax, log-softmax and layer norm from candle's differentiable tensor ops:
//! the fallback of the fused kernels on other devices and dtypes, and the
//! reference those kernels are tested against. (candle's own fused softmax
//! and layer norm drop gradients.)

use candle_core::{DType, Result, Tensor, D};

/// Softmax along `dim`, with gradients (max-subtracted for stability; a fused
/// kernel for the last dimension of f32 CPU tensors).
pub fn softmax<Dim: candle_core::shape::Dim>(x: &Tensor, dim: Dim) -> Result<Tensor> {
    let d = dim.to_index(x.shape(), "softmax")?;
    if d + 1 == x.rank() {
        return super::softmax_last_dim(x);
    }
    softmax_composite(x, d)
}

/// Softmax from candle tensor ops (the reference the fused kernel is tested against).
pub(crate) fn softmax_composite<Dim: candle_core::shape::Dim>(
    x: &Tensor,
    dim: Dim,
) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "softmax")?;
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

/// Log-softmax along `dim`, with gradients (log-sum-exp form, stable on large logits).
pub fn log_softmax<Dim: candle_core::shape::Dim>(x: &Tensor, dim: Dim) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "log_softmax")?;
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Layer norm from candle tensor ops (other devices and dtypes, and the
/// reference the fused kernel is tested against).
pub(crate) fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}
