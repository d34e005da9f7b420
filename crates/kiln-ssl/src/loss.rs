//! Contrastive losses as pure functions.

use kiln_core::{Result, Tensor, D};

/// Smallest NT-Xent temperature accepted ([`nt_xent`], [`info_nce`], `SimclrConfig::temperature`).
///
/// The logits are cosine similarities in `[-1, 1]` divided by the temperature,
/// computed in f32. Far below this they grow so large that the self-similarity
/// mask (a `1e9` offset) and the positives vanish in rounding (at `1e-30` the
/// loss is about `1e28` and nothing is learnt), and at about `1e-39` they overflow.
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// Largest NT-Xent temperature accepted: above it every logit is within 0.01
/// of 0, the softmax is uniform and the gradients vanish.
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Why `temperature` cannot be an NT-Xent or InfoNCE temperature, or `None` when it can
/// (finite and within [`MIN_TEMPERATURE`]`..=`[`MAX_TEMPERATURE`]).
pub fn temperature_problem(temperature: f64) -> Option<String> {
    if (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&temperature) {
        return None;
    }
    Some(format!(
        "expected a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], found {temperature:?}: \
         the logits are cosine similarities in [-1, 1] divided by the temperature, in f32; \
         below {MIN_TEMPERATURE} they swamp the self-similarity mask or overflow, above \
         {MAX_TEMPERATURE} they are all about 0 and nothing is learnt"
    ))
}

/// Rows scaled to unit L2 norm (`F.normalize(x, dim=1)`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&n)
}

/// NT-Xent (SimCLR's normalised temperature-scaled cross-entropy; InfoNCE with
/// the other 2N-2 views as negatives): `z1`, `z2` are `[N, d]` projections of
/// two views of the same N images. Mean over the 2N anchors. `temperature`
/// must be in [`MIN_TEMPERATURE`]`..=`[`MAX_TEMPERATURE`].
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
    if let Some(msg) = temperature_problem(temperature) {
        kiln_core::candle::bail!("nt_xent: temperature: {msg}");
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
/// row i of `a` should match row i of `b` among all rows of `b`. `temperature`
/// must be in [`MIN_TEMPERATURE`]`..=`[`MAX_TEMPERATURE`].
pub fn info_nce(a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, d) = a.dims2()?;
    let (m, e) = b.dims2()?;
    // Row i of `b` is row i's positive, so `b` needs a row for each of `a`'s
    // (more rows are extra negatives), of the same width.
    if m < n || e != d {
        kiln_core::candle::bail!(
            "info_nce: b is [{m}, {e}]; expected at least {n} rows (one positive per row of \
             a, [{n}, {d}]) of width {d}"
        );
    }
    if let Some(msg) = temperature_problem(temperature) {
        kiln_core::candle::bail!("info_nce: temperature: {msg}");
    }
    let logits = (l2_normalize(a)?.matmul(&l2_normalize(b)?.t()?)? / temperature)?;
    let targets = Tensor::arange(0u32, n as u32, a.device())?;
    kiln_core::loss::cross_entropy(&logits, &targets, None, kiln_core::loss::Reduction::Mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Device;

    /// At 1e-30 the loss was a finite ~1e28 that taught nothing; it is refused.
    #[test]
    fn nt_xent_refuses_a_temperature_it_cannot_use() {
        let z1 = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let z2 = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9]], &Device::Cpu).unwrap();
        for t in [1e-30, 5e-4, 1e3] {
            let e = nt_xent(&z1, &z2, t).unwrap_err().to_string();
            assert!(
                e.contains("temperature") && e.contains(&format!("{t:?}")),
                "{e}"
            );
        }
        for t in [MIN_TEMPERATURE, 0.5, MAX_TEMPERATURE] {
            let l = nt_xent(&z1, &z2, t).unwrap().to_scalar::<f32>().unwrap();
            assert!(l.is_finite(), "{t}: {l}");
        }
    }

    /// info_nce divides by the temperature as nt_xent does: at 1e-30 it
    /// returned a loss that taught nothing, at 0 or NaN a NaN; it is refused.
    #[test]
    fn info_nce_refuses_a_temperature_it_cannot_use() {
        let a = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9]], &Device::Cpu).unwrap();
        for t in [1e-30, 5e-4, 1e3, 0.0, -0.5, f64::NAN, f64::INFINITY] {
            let e = info_nce(&a, &b, t).unwrap_err().to_string();
            assert!(
                e.contains("info_nce: temperature") && e.contains(&format!("{t:?}")),
                "{e}"
            );
        }
        for t in [MIN_TEMPERATURE, 0.5, MAX_TEMPERATURE] {
            let l = info_nce(&a, &b, t).unwrap().to_scalar::<f32>().unwrap();
            assert!(l.is_finite(), "{t}: {l}");
        }
    }

    /// `b` holds each row of `a`'s positive: fewer rows or another width is
    /// refused by name; extra rows are extra negatives.
    #[test]
    fn info_nce_checks_b_against_a() {
        let a = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let one = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
        let wide = Tensor::new(&[[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        for (b, shape) in [(&one, "[1, 2]"), (&wide, "[2, 3]")] {
            let e = info_nce(&a, b, 0.5).unwrap_err().to_string();
            assert!(
                e.contains(&format!("info_nce: b is {shape}; expected at least 2 rows")),
                "{e}"
            );
        }
        let more = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let l = info_nce(&a, &more, 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(l.is_finite(), "{l}");
    }
}
