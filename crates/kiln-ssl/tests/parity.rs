//! NT-Xent and the chapter's conv autoencoder against PyTorch. Reference
//! values: `fixtures/ssl_parity.json`, written by `fixtures/make_ssl_fixture.py`
//! (PyTorch 2.15, CPU): nt_xent(tau=0.5) 2.8616387844085693,
//! nt_xent(tau=0.1) 8.111992835998535, conv AE MSE 0.09723073244094849.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use kiln_core::tolerance::{chain_length, f32_abs_tol, f32_abs_tol_tight, layers_abs_tol};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, Tensor, Var};
use kiln_ssl::loss::nt_xent;
use kiln_ssl::InpaintAe;
use serde_json::Value;

fn formula(shape: &[usize], a: f64, b: f64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * (a * i as f64 + b).sin()) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/ssl_parity.json")).unwrap()
}

/// Every element of `got` within `tol` (absolute) of `want`.
fn close_all(got: &[f32], want: &Value, tol: f64, what: &str) {
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= tol,
            "{what}[{i}]: kiln {g} vs torch {w} ({err:e} > {tol:e})"
        );
    }
}

#[test]
fn nt_xent_loss_and_gradients_match_pytorch() {
    let f = fixture();
    for tau in [0.5, 0.1] {
        let case = &f[format!("nt_xent_{tau}")];
        let z1 = Var::from_tensor(&formula(&[6, 5], 0.31, 0.2, 1.0)).unwrap();
        let z2 = Var::from_tensor(&formula(&[6, 5], 0.17, 1.1, 1.0)).unwrap();
        let l = nt_xent(z1.as_tensor(), z2.as_tensor(), tau).unwrap();
        let got = l.to_scalar::<f32>().unwrap() as f64;
        let want = case["loss"].as_f64().unwrap();
        // 12 rows of 5: a norm and a dot product over 5, a logsumexp over
        // the 11 others, a mean over 12; each row's terms, logsumexp - s/τ,
        // are at most |loss| + 2/τ in magnitude (cosines are in [-1, 1]).
        // The gradients run the chain back (twice as long), their terms
        // softmax weights times z / τ over 2N rows: at most 2 / (12 τ).
        let chain = chain_length(&[5, 5, 11, 12]);
        let tol = f32_abs_tol_tight(chain, want + 2.0 / tau);
        let gtol = f32_abs_tol_tight(2 * chain, 2.0 / (12.0 * tau));
        assert!(
            (got - want).abs() <= tol,
            "tau {tau}: {got} vs {want} (tolerance {tol:e})"
        );
        let g = l.backward().unwrap();
        close_all(
            &g.get(z1.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            &case["g1"],
            gtol,
            "dz1",
        );
        close_all(
            &g.get(z2.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            &case["g2"],
            gtol,
            "dz2",
        );
    }
    assert!(nt_xent(
        &formula(&[1, 5], 0.1, 0.0, 1.0),
        &formula(&[1, 5], 0.2, 0.0, 1.0),
        0.5
    )
    .is_err());
}

#[test]
fn chapter_autoencoder_forward_and_backward_match_pytorch() {
    let f = fixture();
    let case = &f["convae"];
    let vs = VarStore::new(0);
    let model = InpaintAe::new(3, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    let mut vals = HashMap::new();
    for (k, (name, v)) in vs.vars().into_iter().enumerate() {
        vals.insert(name, formula(v.as_tensor().dims(), 0.37, k as f64, 0.3));
    }
    vs.assign(&vals).unwrap();
    let x = (formula(&[2, 3, 8, 8], 0.13, 0.0, 1.0) * 0.45)
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    let mut m = vec![1f32; 2 * 64];
    for b in 0..2 {
        for y in 2..5 {
            for xx in 3..6 {
                m[b * 64 + y * 8 + xx] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(m, (2, 1, 8, 8), &Device::Cpu).unwrap();
    let y = model.forward(&x.broadcast_mul(&mask).unwrap()).unwrap();
    // The forward chain: conv 3·9, conv 8·9, transposed convs over 32 and 8
    // channels (one tap each), values of order 1 (a sigmoid's output, whose
    // slope is at most 1/4, so the logit's error bounds the output's).
    let forward = [27, 72, 32, 8];
    let ytol = layers_abs_tol(&forward, 1.0);
    close_all(
        &y.flatten_all()
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap()
            .to_vec1()
            .unwrap(),
        &case["y_first"],
        ytol,
        "output",
    );
    let loss = kiln_core::loss::mse(&y, &x, kiln_core::loss::Reduction::Mean).unwrap();
    let want = case["loss"].as_f64().unwrap();
    // The mean of 384 squares (y - x)², |y - x| < 1: each errs by at most
    // 2 ytol, then the mean's own rounding.
    let ltol = 2.0 * ytol + f32_abs_tol(384, want);
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want).abs() <= ltol,
        "loss {got} vs {want} (tolerance {ltol:e})"
    );
    // The gradients: the forward chain, the mean over 384, the chain back,
    // and a weight's sum over the batch's 2·8·8 positions.
    let back = chain_length(&[27, 72, 32, 8, 384, 8, 32, 72, 27, 128]);
    let g = loss.backward().unwrap();
    for (name, v) in vs.vars() {
        let got: Vec<f32> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Gradients are ~1e-3..1e-2: compare on the scale of each tensor's norm.
        let norm = case["grads"][&name]["norm"].as_f64().unwrap();
        let want: Vec<f64> = case["grads"][&name]["all"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // On the scale of the tensor's norm, with the widest reduction's
        // √72 for the terms' magnitude (random signs).
        let tol = f32_abs_tol(back, 72f64.sqrt() * norm);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= tol,
                "{name}[{i}]: kiln {a} vs torch {b} (norm {norm}, tolerance {tol:e})"
            );
        }
    }
}
