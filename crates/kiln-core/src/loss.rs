//! Numerically stable losses, with PyTorch's reductions.

use candle_core::{DType, Result, Tensor, D};

/// How a loss reduces its per-element values (PyTorch's `reduction=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// The mean over all elements (PyTorch's default).
    #[default]
    Mean,
    /// The sum over all elements.
    Sum,
    /// No reduction: the per-element tensor.
    None,
}

fn reduce(x: Tensor, r: Reduction) -> Result<Tensor> {
    match r {
        Reduction::Mean => x.mean_all(),
        Reduction::Sum => x.sum_all(),
        Reduction::None => Ok(x),
    }
}

/// `softplus(x) = log(1 + exp(x))`, computed as `relu(x) + log(1 + exp(-|x|))` so
/// it never overflows; its gradient is `sigmoid(x)` everywhere, 1/2 at exactly 0.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let tail = (abs.neg()?.exp()? + 1.0)?.log()?;
    // `x/2 + |x|/2` is `relu(x)` bit for bit (halving is exact; halving
    // first keeps it finite up to f32::MAX), but its gradient at exactly 0 is
    // 1/2 whatever sign the backward of `|x|` takes there, so the total is
    // sigmoid(0) = 1/2. With `relu` (gradient 0 at 0) it was 0 or -1/2: a DPO
    // step from a policy equal to its reference did not move.
    ((x * 0.5)? + (&abs * 0.5)?)? + tail
}

/// Binary cross-entropy on logits: `relu(x) - x*t + log(1 + exp(-|x|))`.
/// Finite for any logit (candle's version goes through sigmoid then log).
pub fn bce_with_logits(logits: &Tensor, target: &Tensor, r: Reduction) -> Result<Tensor> {
    let per = (softplus(logits)? - (logits * target)?)?;
    reduce(per, r)
}

/// Binary cross-entropy on probabilities, as PyTorch's `binary_cross_entropy`:
/// each log is clamped at -100 so saturated outputs give a large finite loss.
pub fn bce(probs: &Tensor, target: &Tensor, r: Reduction) -> Result<Tensor> {
    let log_p = probs.log()?.maximum(-100.0)?;
    let log_1mp = probs.affine(-1.0, 1.0)?.log()?.maximum(-100.0)?;
    let per = ((target * log_p)? + (target.affine(-1.0, 1.0)? * log_1mp)?)?.neg()?;
    reduce(per, r)
}

/// Mean squared error.
pub fn mse(pred: &Tensor, target: &Tensor, r: Reduction) -> Result<Tensor> {
    reduce((pred - target)?.sqr()?, r)
}

/// KL divergence of N(mean, exp(logvar)) from N(0, 1), summed over the last
/// dimension: `-0.5 * sum(1 + logvar - mean^2 - exp(logvar))`. `Sum` adds over
/// the batch too (the chapter's VAE); `Mean` averages over the batch.
pub fn gaussian_kl(mean: &Tensor, logvar: &Tensor, r: Reduction) -> Result<Tensor> {
    let per = ((logvar + 1.0)? - mean.sqr()? - logvar.exp()?)?;
    let per_row = (per.sum(D::Minus1)? * -0.5)?;
    reduce(per_row, r)
}

/// Cross-entropy of `logits [N, C]` against class indices `targets [N]`
/// (u32 or i64). Rows whose target equals `ignore_index` contribute nothing;
/// `Mean` divides by the number of rows kept (PyTorch's behaviour; 0/0 = NaN
/// when every row is ignored, as in PyTorch).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    r: Reduction,
) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!(
            "cross_entropy: targets must be [{n}] to match logits [{n}, {c}], got {:?}",
            targets.dims()
        );
    }
    let t = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let mut keep = Vec::with_capacity(n);
    let mut safe = Vec::with_capacity(n);
    for (i, &v) in t.iter().enumerate() {
        if Some(v) == ignore_index {
            keep.push(0f32);
            safe.push(0u32);
        } else if v < 0 || v as usize >= c {
            candle_core::bail!("cross_entropy: target {v} at row {i} is outside 0..{c}");
        } else {
            keep.push(1.0);
            safe.push(v as u32);
        }
    }
    let dev = logits.device();
    let keep_t = Tensor::from_vec(keep, n, dev)?.to_dtype(logits.dtype())?;
    let safe_t = Tensor::from_vec(safe, n, dev)?;
    // Log-softmax gathered at the targets without an [N, C] log-prob tensor.
    let nll = (crate::ops::token_logprobs(logits, &safe_t)?.neg()? * &keep_t)?;
    match r {
        Reduction::Mean => {
            nll.sum_all()? / keep_t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?
        }
        Reduction::Sum => nll.sum_all(),
        Reduction::None => Ok(nll),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::approx_constant,
        clippy::excessive_precision
    )]
    use super::*;
    use candle_core::{Device, Var};

    /// The gradient at a logit of exactly 0 is sigmoid(0) = 1/2 (closed
    /// form), where DPO and a GAN's first steps start; elsewhere sigmoid(x).
    #[test]
    fn softplus_and_bce_gradients_are_sigmoid_at_zero_too() {
        let x = Var::new(&[-1f32, 0.0, 0.0, 2.0], &Device::Cpu).unwrap();
        let g = softplus(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        close(&g, &[sig(-1.0), 0.5, 0.5, sig(2.0)], 1e-6);
        let y = t(&[0.0, 0.0, 1.0, 1.0]);
        let l = bce_with_logits(x.as_tensor(), &y, Reduction::Sum).unwrap();
        let g: Vec<f32> = l
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        close(&g, &[sig(-1.0), 0.5, -0.5, sig(2.0) - 1.0], 1e-6);
        // Finite and exact at the ends of f32's range.
        let big = t(&[-f32::MAX, f32::MAX, 3e38]);
        let v: Vec<f32> = softplus(&big).unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.0, f32::MAX, 3e38]);
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    // PyTorch 2.15:
    // x = torch.tensor([-1000., -20., -1., 0., 2.5, 30., 1000.], requires_grad=True)
    // y = torch.tensor([1., 0., 1., .5, 0., 1., 0.])
    // l = F.binary_cross_entropy_with_logits(x, y, reduction='none'); l.sum().backward()
    // l  -> [1000.0, 0.0, 1.3132617473602295, 0.6931471824645996, 2.578889846801758, 9.357622912219837e-14, 1000.0]
    // x.grad -> [-1.0, 2.06115369216775e-09, -0.7310585975646973, 0.0, 0.9241418242454529, 0.0, 1.0]
    // F.binary_cross_entropy_with_logits(x, y) -> 286.36932373046875
    #[test]
    fn bce_with_logits_is_stable_and_matches_torch() {
        let x = Var::new(&[-1000f32, -20., -1., 0., 2.5, 30., 1000.], &Device::Cpu).unwrap();
        let y = t(&[1., 0., 1., 0.5, 0., 1., 0.]);
        let l = bce_with_logits(x.as_tensor(), &y, Reduction::None).unwrap();
        close(
            &l.to_vec1::<f32>().unwrap(),
            &[
                1000.0,
                0.0,
                1.3132617,
                0.6931472,
                2.5788898,
                9.357623e-14,
                1000.0,
            ],
            1e-6,
        );
        let g = l.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(gx.iter().all(|v| v.is_finite()));
        close(
            &gx,
            &[-1.0, 2.0611537e-09, -0.7310586, 0.0, 0.9241418, 0.0, 1.0],
            1e-6,
        );
        let m = bce_with_logits(x.as_tensor(), &y, Reduction::Mean).unwrap();
        close(&[m.to_scalar::<f32>().unwrap()], &[286.36932], 1e-6);
    }

    // PyTorch: F.softplus(torch.tensor([-100., -1., 0., 1., 100.]))
    // -> [3.783505853677006e-44, 0.3132616877555847, 0.6931471824645996, 1.31326162815094, 100.0]
    #[test]
    fn softplus_matches_torch_without_overflow() {
        let s = softplus(&t(&[-100., -1., 0., 1., 100.])).unwrap();
        close(
            &s.to_vec1::<f32>().unwrap(),
            &[0.0, 0.3132617, 0.6931472, 1.3132616, 100.],
            1e-6,
        );
    }

    // PyTorch: F.binary_cross_entropy(torch.tensor([0., .2, .9, 1.]), torch.tensor([1., 0., 1., 1.]), reduction='sum')
    // -> 100.32850646972656 (the 0-vs-1 term is clamped to 100)
    #[test]
    fn bce_clamps_like_torch() {
        let l = bce(
            &t(&[0., 0.2, 0.9, 1.]),
            &t(&[1., 0., 1., 1.]),
            Reduction::Sum,
        )
        .unwrap();
        close(&[l.to_scalar::<f32>().unwrap()], &[100.328_51], 1e-6);
    }

    // Closed form: mse([1,2,3],[1,0,0]) = (0+4+9)/3.
    #[test]
    fn mse_reductions() {
        let (a, b) = (t(&[1., 2., 3.]), t(&[1., 0., 0.]));
        close(
            &[mse(&a, &b, Reduction::Mean)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()],
            &[13.0 / 3.0],
            1e-7,
        );
        close(
            &[mse(&a, &b, Reduction::Sum)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()],
            &[13.0],
            1e-7,
        );
        close(
            &mse(&a, &b, Reduction::None)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &[0., 4., 9.],
            1e-7,
        );
    }

    // Closed form: KL(N(mu, s^2) || N(0,1)) = 0.5 * (s^2 + mu^2 - 1 - ln s^2).
    #[test]
    fn gaussian_kl_closed_form() {
        let mu = Tensor::new(&[[0.5f32, -1.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let lv = Tensor::new(&[[0.2f32, -0.3], [0.0, 0.0]], &Device::Cpu).unwrap();
        let per = gaussian_kl(&mu, &lv, Reduction::None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let kl = |m: f32, l: f32| 0.5 * (l.exp() + m * m - 1.0 - l);
        close(&per, &[kl(0.5, 0.2) + kl(-1.0, -0.3), 0.0], 1e-6);
        let s = gaussian_kl(&mu, &lv, Reduction::Sum)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        close(&[s], &[per[0]], 1e-6);
    }

    // PyTorch:
    // x = torch.tensor([[2., 1., .1], [0., 0., 0.], [1000., -1000., 0.], [.5, .3, 3.]])
    // F.cross_entropy(x, torch.tensor([0, 2, 1, -100]))            -> 667.171875
    // F.cross_entropy(x, torch.tensor([0, 2, 1, -100]), reduction='none')
    //   -> [0.4170299470424652, 1.0986123085021973, 2000.0, 0.0]
    #[test]
    fn cross_entropy_with_ignore_index_matches_torch() {
        let x = Tensor::new(
            &[
                [2f32, 1., 0.1],
                [0., 0., 0.],
                [1000., -1000., 0.],
                [0.5, 0.3, 3.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::new(&[0i64, 2, 1, -100], &Device::Cpu).unwrap();
        let m = cross_entropy(&x, &y, Some(-100), Reduction::Mean).unwrap();
        close(&[m.to_scalar::<f32>().unwrap()], &[667.171875], 1e-6);
        let n = cross_entropy(&x, &y, Some(-100), Reduction::None).unwrap();
        close(
            &n.to_vec1::<f32>().unwrap(),
            &[0.41702995, 1.0986123, 2000.0, 0.0],
            1e-6,
        );
        let bad = Tensor::new(&[0i64, 3, 1, 0], &Device::Cpu).unwrap();
        let e = cross_entropy(&x, &bad, None, Reduction::Mean)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1"), "{e}");
    }
}
