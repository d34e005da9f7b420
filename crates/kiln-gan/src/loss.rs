//! Adversarial losses as pure functions of the discriminator's outputs
//! (`[B]` logits or critic scores), each the mean over the batch.
//!
//! Every loss with a logarithm is written with softplus
//! (`log(1 + e^x) = relu(x) + log(1 + e^-|x|)`), so saturated logits give
//! finite values and gradients where `log(sigmoid(x))` would give
//! `log(0) = -inf` and NaN gradients:
//!
//! | loss | discriminator | generator |
//! |---|---|---|
//! | minimax (saturating) | `softplus(-D(x)) + softplus(D(G(z)))` | `-softplus(D(G(z)))` = `log(1 - sigmoid(D(G(z))))` |
//! | non-saturating | as minimax | `softplus(-D(G(z)))` = `-log sigmoid(D(G(z)))` |
//! | least squares | `((D(x) - 1)^2 + D(G(z))^2) / 2` | `(D(G(z)) - 1)^2 / 2` |
//! | hinge | `relu(1 - D(x)) + relu(1 + D(G(z)))` | `-D(G(z))` |
//! | Wasserstein | `D(G(z)) - D(x)` | `-D(G(z))` |
//!
//! The PyTorch equivalents: minimax D is
//! `F.binary_cross_entropy_with_logits(real, ones) + F.binary_cross_entropy_with_logits(fake, zeros)`,
//! non-saturating G is `F.binary_cross_entropy_with_logits(fake, ones)`.

use kiln_core::loss::softplus;
use kiln_core::{DType, Result, Tensor};

use crate::config::LossKind;

/// Minimax discriminator loss: `mean softplus(-real) + mean softplus(fake)`
/// (binary cross-entropy with targets 1 for real and 0 for fake).
pub fn minimax_d(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    softplus(&real.neg()?)?.mean_all()? + softplus(fake)?.mean_all()?
}

/// Saturating (minimax) generator loss: `mean log(1 - sigmoid(fake))` =
/// `-mean softplus(fake)`.
pub fn saturating_g(fake: &Tensor) -> Result<Tensor> {
    softplus(fake)?.mean_all()?.neg()
}

/// Non-saturating generator loss: `-mean log sigmoid(fake)` =
/// `mean softplus(-fake)`.
pub fn non_saturating_g(fake: &Tensor) -> Result<Tensor> {
    softplus(&fake.neg()?)?.mean_all()
}

/// Least-squares discriminator loss: `mean (real - 1)^2 / 2 + mean fake^2 / 2`.
pub fn least_squares_d(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    ((real - 1.0)?.sqr()?.mean_all()? + fake.sqr()?.mean_all()?)? * 0.5
}

/// Least-squares generator loss: `mean (fake - 1)^2 / 2`.
pub fn least_squares_g(fake: &Tensor) -> Result<Tensor> {
    (fake - 1.0)?.sqr()?.mean_all()? * 0.5
}

/// Hinge discriminator loss: `mean relu(1 - real) + mean relu(1 + fake)`.
pub fn hinge_d(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    real.affine(-1.0, 1.0)?.relu()?.mean_all()? + (fake + 1.0)?.relu()?.mean_all()?
}

/// Generator loss of the hinge and Wasserstein objectives: `-mean fake`.
pub fn critic_g(fake: &Tensor) -> Result<Tensor> {
    fake.mean_all()?.neg()
}

/// Wasserstein critic loss: `mean fake - mean real` (the negated estimate of
/// the Wasserstein-1 distance).
pub fn wasserstein_d(real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    fake.mean_all()? - real.mean_all()?
}

/// The discriminator loss of `kind` on real and fake outputs `[B]`.
pub fn d_loss(kind: LossKind, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    match kind {
        LossKind::Minimax | LossKind::NonSaturating => minimax_d(real, fake),
        LossKind::LeastSquares => least_squares_d(real, fake),
        LossKind::Hinge => hinge_d(real, fake),
        LossKind::Wasserstein => wasserstein_d(real, fake),
    }
}

/// The generator loss of `kind` on the discriminator's outputs for
/// generated images `[B]`.
pub fn g_loss(kind: LossKind, fake: &Tensor) -> Result<Tensor> {
    match kind {
        LossKind::Minimax => saturating_g(fake),
        LossKind::NonSaturating => non_saturating_g(fake),
        LossKind::LeastSquares => least_squares_g(fake),
        LossKind::Hinge | LossKind::Wasserstein => critic_g(fake),
    }
}

/// `mean sigmoid(logits)`: "D(x)" or "D(G(z))" as a probability, computed
/// in f64 (finite for any logit).
pub fn mean_prob(logits: &Tensor) -> Result<f64> {
    let v = logits
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let s: f64 = v.iter().map(|&x| sigmoid(x)).sum();
    Ok(s / v.len().max(1) as f64)
}

/// The logistic function, stable for any input.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_core::tolerance::{f32_abs_tol, F32_UNIT_ROUNDOFF};
    use kiln_core::{Device, Var};

    /// Fixed logits, saturated ones included (f32's largest finite values too).
    const REAL: [f32; 8] = [0.0, 1.5, -2.0, 30.0, -30.0, 120.0, -1.0e4, 3.0e38];
    const FAKE: [f32; 8] = [0.0, -0.7, 2.5, 45.0, -45.0, -150.0, 1.0e4, -3.0e38];

    /// log(1 + e^x) in f64 from its definition, with its asymptotes where
    /// f64 overflows or `1 + e^x` rounds to 1.
    fn softplus_ref(x: f64) -> f64 {
        if x > 700.0 {
            x
        } else if x < -700.0 {
            0.0
        } else if x < -30.0 {
            x.exp()
        } else {
            (1.0 + x.exp()).ln()
        }
    }

    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        v.iter().sum::<f64>() / v.len() as f64
    }

    /// Each loss's value and its gradients with respect to both inputs.
    type Grads = (f64, Vec<f64>, Vec<f64>);

    fn run(f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>) -> Grads {
        let r = Var::new(&REAL[..], &Device::Cpu).unwrap();
        let fk = Var::new(&FAKE[..], &Device::Cpu).unwrap();
        let l = f(r.as_tensor(), fk.as_tensor()).unwrap();
        let g = l.backward().unwrap();
        let get = |v: &Var| match g.get(v.as_tensor()) {
            Some(t) => t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; 8],
        };
        let val = l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        (val, get(&r), get(&fk))
    }

    /// Compares a loss with its closed form: value within the rounding of
    /// an f32 mean of 8 terms of the given magnitude, gradients within a few
    /// ulps of 1/8.
    fn check(name: &str, got: Grads, want: Grads) {
        let mag = want.0.abs().max(1.0);
        let tol = f32_abs_tol(16, mag) + 4.0 * F32_UNIT_ROUNDOFF * mag;
        assert!(got.0.is_finite(), "{name}: value {}", got.0);
        assert!(
            (got.0 - want.0).abs() <= tol,
            "{name}: {} vs closed form {} (tol {tol})",
            got.0,
            want.0
        );
        for (side, g, w) in [("real", &got.1, &want.1), ("fake", &got.2, &want.2)] {
            for i in 0..8 {
                assert!(g[i].is_finite(), "{name}: d/d{side}[{i}] = {}", g[i]);
                assert!(
                    (g[i] - w[i]).abs() <= 4.0 * F32_UNIT_ROUNDOFF,
                    "{name}: d/d{side}[{i}] = {} vs {}",
                    g[i],
                    w[i]
                );
            }
        }
    }

    fn r64() -> impl Iterator<Item = f64> {
        REAL.iter().map(|&x| x as f64)
    }
    fn f64s() -> impl Iterator<Item = f64> {
        FAKE.iter().map(|&x| x as f64)
    }
    const N: f64 = 8.0;

    #[test]
    fn minimax_and_non_saturating_match_their_closed_forms_even_saturated() {
        // D: -log sigmoid(r) - log(1 - sigmoid(f)); d/dr = -(1 - sigmoid(r)), d/df = sigmoid(f).
        let want = (
            mean(r64().map(|r| softplus_ref(-r))) + mean(f64s().map(softplus_ref)),
            r64().map(|r| -(1.0 - sigmoid(r)) / N).collect(),
            f64s().map(|f| sigmoid(f) / N).collect(),
        );
        check("minimax D", run(minimax_d), want.clone());
        check(
            "minimax D via d_loss",
            run(|r, f| d_loss(LossKind::NonSaturating, r, f)),
            want,
        );
        // Saturating G: log(1 - sigmoid(f)) = -softplus(f); d/df = -sigmoid(f).
        let want = (
            -mean(f64s().map(softplus_ref)),
            vec![0.0; 8],
            f64s().map(|f| -sigmoid(f) / N).collect(),
        );
        check(
            "saturating G",
            run(|_, f| g_loss(LossKind::Minimax, f)),
            want,
        );
        // Non-saturating G: -log sigmoid(f) = softplus(-f); d/df = -(1 - sigmoid(f)).
        let want = (
            mean(f64s().map(|f| softplus_ref(-f))),
            vec![0.0; 8],
            f64s().map(|f| -(1.0 - sigmoid(f)) / N).collect(),
        );
        check(
            "non-saturating G",
            run(|_, f| g_loss(LossKind::NonSaturating, f)),
            want,
        );
    }

    #[test]
    fn least_squares_hinge_and_wasserstein_match_their_closed_forms() {
        // Moderate logits: the squares of 3e38 overflow f32, as in PyTorch.
        let r: Vec<f64> = r64().take(5).collect();
        let f: Vec<f64> = f64s().take(5).collect();
        let rt = Var::new(&REAL[..5], &Device::Cpu).unwrap();
        let ft = Var::new(&FAKE[..5], &Device::Cpu).unwrap();
        let n = 5.0;
        let ls = least_squares_d(rt.as_tensor(), ft.as_tensor()).unwrap();
        let want: f64 = r.iter().map(|r| (r - 1.0).powi(2)).sum::<f64>() / n / 2.0
            + f.iter().map(|f| f * f).sum::<f64>() / n / 2.0;
        let got = ls.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() <= f32_abs_tol(10, want), "{got} {want}");
        let g = ls.backward().unwrap();
        let gr = g.get(rt.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (i, (&a, r)) in gr.iter().zip(&r).enumerate() {
            let w = (r - 1.0) / n;
            assert!(
                (a as f64 - w).abs() <= 4.0 * F32_UNIT_ROUNDOFF * w.abs().max(1.0),
                "{i}"
            );
        }
        let lsg = least_squares_g(ft.as_tensor()).unwrap();
        let want: f64 = f.iter().map(|f| (f - 1.0).powi(2)).sum::<f64>() / n / 2.0;
        let got = lsg
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - want).abs() <= f32_abs_tol(5, want), "{got} {want}");

        // Hinge and Wasserstein are piecewise linear: exact on every logit.
        let hinge = (
            mean(r64().map(|r| (1.0 - r).max(0.0))) + mean(f64s().map(|f| (1.0 + f).max(0.0))),
            r64()
                .map(|r| if r < 1.0 { -1.0 / N } else { 0.0 })
                .collect(),
            f64s()
                .map(|f| if f > -1.0 { 1.0 / N } else { 0.0 })
                .collect(),
        );
        check("hinge D", run(hinge_d), hinge);
        let wd = (
            mean(f64s()) - mean(r64()),
            vec![-1.0 / N; 8],
            vec![1.0 / N; 8],
        );
        // The means of +-3e38 terms cancel exactly in f64 but not in f32
        // (where the sum overflows to inf); compare the finite part.
        let (r6, f6): (Vec<f32>, Vec<f32>) = (REAL[..7].to_vec(), FAKE[..7].to_vec());
        let got = wasserstein_d(
            &Tensor::new(r6.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(f6.as_slice(), &Device::Cpu).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        let want = mean(f6.iter().map(|&x| x as f64)) - mean(r6.iter().map(|&x| x as f64));
        assert!((got - want).abs() <= f32_abs_tol(7, 2e4), "{got} {want}");
        let (_, gr, gf) = run(wasserstein_d);
        assert_eq!((gr, gf), (wd.1, wd.2));
        let (v, _, gf) = run(|_, f| g_loss(LossKind::Hinge, &f.narrow(0, 0, 7)?));
        assert!((v - -mean(f64s().take(7))).abs() <= f32_abs_tol(7, 2e4));
        assert!(gf[..7].iter().all(|&g| g == (-1.0f32 / 7.0) as f64) && gf[7] == 0.0);
    }

    #[test]
    fn sigmoid_means_are_finite_probabilities() {
        let t = Tensor::new(&REAL[..], &Device::Cpu).unwrap();
        let p = mean_prob(&t).unwrap();
        let want = mean(r64().map(sigmoid));
        assert!((p - want).abs() < 1e-15 && (0.0..=1.0).contains(&p));
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(-1e6), 0.0);
        assert!((sigmoid(-30.0) - (-30f64).exp() / (1.0 + (-30f64).exp())).abs() < 1e-25);
    }
}
