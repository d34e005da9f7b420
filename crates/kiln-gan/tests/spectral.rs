//! Spectral normalisation: the power iteration's sigma against a closed-form
//! singular value and against an SVD (one-sided Jacobi, f64) of the weight.
#![allow(clippy::unwrap_used, clippy::needless_range_loop, missing_docs)]

use kiln_core::rng::SeededRng;
use kiln_core::tolerance::f32_abs_tol;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_gan::{Discriminator, ModelConfig, Norm, SpectralNorm};

const DEV: Device = Device::Cpu;

/// Singular values of the `m x n` row-major matrix `a` by one-sided Jacobi
/// (Hestenes): rotate column pairs until they are orthogonal; the column
/// norms are then the singular values. Sorted, largest first.
fn svd_values(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a[i * n + j]).collect())
        .collect();
    for _sweep in 0..60 {
        let mut off = 0f64;
        for i in 0..n {
            for j in i + 1..n {
                let alpha: f64 = cols[i].iter().map(|x| x * x).sum();
                let beta: f64 = cols[j].iter().map(|x| x * x).sum();
                let gamma: f64 = cols[i].iter().zip(&cols[j]).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for k in 0..m {
                    let (x, y) = (cols[i][k], cols[j][k]);
                    cols[i][k] = c * x - s * y;
                    cols[j][k] = s * x + c * y;
                }
            }
        }
        if off < 1e-14 {
            break;
        }
    }
    let mut sv: Vec<f64> = cols
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    sv.sort_by(|a, b| b.total_cmp(a));
    sv
}

/// A Householder reflection `I - 2 v v^T / |v|^2`, `k x k`, row-major.
fn householder(v: &[f64]) -> Vec<f64> {
    let k = v.len();
    let vv: f64 = v.iter().map(|x| x * x).sum();
    let mut h = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            h[i * k + j] = f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv;
        }
    }
    h
}

/// The SVD checker itself, on a diagonal matrix with known values.
#[test]
fn jacobi_svd_finds_known_singular_values() {
    let a = [0.0, 2.0, 0.0, 0.0, 0.0, -5.0];
    let sv = svd_values(&a, 2, 3);
    assert!(
        (sv[0] - 5.0).abs() < 1e-12 && (sv[1] - 2.0).abs() < 1e-12,
        "{sv:?}"
    );
}

/// `W = U diag(s) V^T` with Householder `U`, `V` has largest singular value
/// `max(s)` exactly: the power iteration's sigma converges to it.
#[test]
fn sigma_converges_to_a_closed_form_singular_value() {
    let (m, n) = (6, 12); // W as a conv weight [6, 3, 2, 2]
    let s = [3.0, 1.5, 1.2, 0.7, 0.4, 0.1];
    let u = householder(&[1.0, -2.0, 0.5, 0.3, 1.1, -0.7]);
    let v = householder(
        &(0..n)
            .map(|i| (i as f64 * 0.7).sin() + 0.2)
            .collect::<Vec<_>>(),
    );
    let mut w = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            w[i * n + j] = (0..m).map(|k| u[i * m + k] * s[k] * v[j * n + k]).sum();
        }
    }
    let sv = svd_values(&w, m, n);
    assert!((sv[0] - 3.0).abs() < 1e-12, "construction: {sv:?}");
    let wt = Tensor::from_vec(
        w.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        (m, 3, 2, 2),
        &DEV,
    )
    .unwrap();
    let vs = VarStore::new(1);
    let sn = SpectralNorm::new(&wt, vs.builder(DType::F32, &DEV)).unwrap();
    // Convergence ratio (1.5 / 3)^2 per iteration: 15 at creation + 15 more
    // leave (1/4)^30 ~ 1e-18 of the error.
    for _ in 0..15 {
        sn.power_iteration(&wt).unwrap();
    }
    let sigma = sn.sigma(&wt).unwrap().to_scalar::<f32>().unwrap() as f64;
    // u^T W v: two chained reductions of n and m terms of magnitude sigma.
    let tol = f32_abs_tol(m + n, 3.0) + f32_abs_tol(m * n, 3.0);
    assert!(
        (sigma - 3.0).abs() <= tol,
        "sigma {sigma} vs 3 (tol {tol:e})"
    );
    // The normalised weight has spectral norm 1.
    let wn: Vec<f64> = sn
        .normalized(&wt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let top = svd_values(&wn, m, n)[0];
    assert!((top - 1.0).abs() <= 2.0 * tol / 3.0, "{top}");
    // u and v are stored as the store's weight_u / weight_v.
    assert_eq!(
        vs.names(),
        vec!["weight_u".to_string(), "weight_v".to_string()]
    );
}

/// Every layer of a spectrally normalised discriminator: sigma after enough
/// power iterations equals the largest singular value from an SVD of the
/// layer's weight as a matrix `[out, in * 4 * 4]`.
#[test]
fn discriminator_sigmas_match_an_svd_of_each_weight() {
    let cfg = ModelConfig {
        image_size: 16,
        ndf: 8,
        d_norm: Norm::None,
        spectral_norm: true,
        ..ModelConfig::dcgan32()
    };
    let vs = VarStore::new(4);
    let d = Discriminator::new(&cfg, vs.builder(DType::F32, &DEV)).unwrap();
    for _ in 0..300 {
        d.power_iteration().unwrap();
    }
    let sigmas = d.sigmas().unwrap();
    let names = ["net.0.weight", "net.2.weight", "net.5.weight"];
    assert_eq!(sigmas.len(), names.len());
    for (name, sigma) in names.iter().zip(&sigmas) {
        let w = vs.get(name).unwrap();
        let dims = w.dims().to_vec();
        let (m, n) = (dims[0], dims[1..].iter().product::<usize>());
        let a: Vec<f64> = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let sv = svd_values(&a, m, n);
        let tol = f32_abs_tol(m + n, sv[0]) + f32_abs_tol(m * n, sv[0]);
        // A single output row (the last layer) has one singular value: its norm.
        assert!(
            (sigma - sv[0]).abs() <= tol.max(1e-6 * sv[0]),
            "{name}: sigma {sigma} vs SVD {} (gap to the next: {:?})",
            sv[0],
            sv.get(1)
        );
    }
    // The normalised network's forward still runs and sigma's gradient
    // reaches the raw weight.
    let x = SeededRng::new(2)
        .uniform(&[2, 3, 16, 16], -1.0, 1.0, &DEV)
        .unwrap();
    let out = d.forward_t(&x, None, true).unwrap().sum_all().unwrap();
    let g = out.backward().unwrap();
    for name in names {
        assert!(g.get(vs.get(name).unwrap().as_tensor()).is_some(), "{name}");
    }
    assert!(g
        .get(vs.get("net.0.weight_u").unwrap().as_tensor())
        .is_none());
}
