//! Contrastive losses as pure functions.

use kiln_core::{Result, Tensor, D};

/// Rows scaled to unit L2 norm (`F.normalize(x, dim=1)`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&n)
}

/// NT-Xent (SimCLR's normalised temperature-scaled cross-entropy; InfoNCE with
/// the other 2N-2 views as negatives): `z1`, `z2` are `[N, d]` projections of
/// two views of the same N images. Mean over the 2N anchors.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, _) = z1.dims2()?;
    if z2.dims() != z1.dims() {
        kiln_core::candle::bail!(
            "nt_xent: views must have the same shape, got {:?} and {:?}",
            z1.dims(),
            z2.dims()
        );
    }
    if n < 2 {
        kiln_core::candle::bail!("nt_xent: needs at least 2 images per batch (negatives), got {n}");
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        kiln_core::candle::bail!("nt_xent: temperature must be positive, got {temperature}");
    }
    let z = l2_normalize(&Tensor::cat(&[z1, z2], 0)?)?;
    let sim = (z.matmul(&z.t()?)? / temperature)?;
    // Exclude self-similarity with a large negative constant (exp underflows to 0;
    // -inf would poison the gradient with NaN through 0 * inf).
    let eye = Tensor::eye(2 * n, z.dtype(), z.device())?;
    let sim = (sim - (eye * 1e9)?)?;
    let targets: Vec<u32> = (n as u32..2 * n as u32).chain(0..n as u32).collect();
    let targets = Tensor::new(targets, z.device())?;
    kiln_core::loss::cross_entropy(&sim, &targets, None, kiln_core::loss::Reduction::Mean)
}

/// InfoNCE between paired rows of `a` and `b` (CLIP-style, one direction):
/// row i of `a` should match row i of `b` among all rows of `b`.
pub fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, _) = a.dims2()?;
    let logits = (l2_normalize(a)?.matmul(&l2_normalize(b)?.t()?)? / temperature)?;
    let targets = Tensor::arange(0u32, n as u32, a.device())?;
    kiln_core::loss::cross_entropy(&logits, &targets, None, kiln_core::loss::Reduction::Mean)
}
