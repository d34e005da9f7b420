//! The chapter's VAE against PyTorch: for fixed weights, batch and noise, the
//! loss and every gradient equal PyTorch's to 1e-4 (relative, or absolute for
//! values below 1), or tighter where f32's rounding bound for the reduction
//! behind the value is tighter ([`kiln_core::tolerance`]: the summation order,
//! hence the rounding, differs between CPUs, so no tolerance is fitted to one
//! machine's result). Reference values: `fixtures/vae_parity.json`, written by
//! `fixtures/make_vae_fixture.py` (PyTorch 2.15, CPU):
//! small (48-16-8-4, batch 5): loss 172.66830444335938, bce 171.65505981445312, kld 1.0132513046264648
//! chapter (3072-512-128-32, batch 8): loss 17486.970703125, bce 17484.6328125, kld 2.337172746658325
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use kiln_core::tolerance::{capped, chain_length, f32_abs_tol, within};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_vae::{elbo_loss, Likelihood, Vae, VaeConfig};
use serde_json::Value;

/// The stated tolerance: 1e-4 relative, absolute below 1.
fn stated(want: f64) -> f64 {
    1e-4 * want.abs().max(1.0)
}

/// `got` equals `want` within `tol`.
fn close_tol(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        within(got, want, tol),
        "{what}: kiln {got} vs torch {want} (difference {:.3e}, tolerance {tol:.3e})",
        (got - want).abs()
    );
}

/// Within the stated tolerance (elements: each is one short reduction, whose
/// rounding bound is far below it).
fn close(got: f64, want: f64, what: &str) {
    close_tol(got, want, stated(want), what);
}

/// Deterministic weights: `scale * sin(0.37 i + k)` for the k-th parameter in
/// sorted-name order, scale `1/sqrt(fan_in)` (as the Python fixture does).
fn fill(vs: &VarStore) {
    let vars = vs.vars();
    let mut values = HashMap::new();
    for (k, (name, v)) in vars.iter().enumerate() {
        let dims = v.as_tensor().dims().to_vec();
        let fan_in = if dims.len() == 2 {
            dims[1]
        } else {
            vars[k + 1].1.as_tensor().dims()[1]
        };
        let scale = 1.0 / (fan_in as f64).sqrt();
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| (scale * (0.37 * i as f64 + k as f64).sin()) as f32)
            .collect();
        values.insert(
            name.clone(),
            Tensor::from_vec(data, dims, &Device::Cpu).unwrap(),
        );
    }
    vs.assign(&values).unwrap();
}

fn check_case(case: &Value, full: bool) {
    let dims: Vec<usize> = case["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (d, h0, h1, latent, batch) = (dims[0], dims[1], dims[2], dims[3], dims[4]);
    let side = ((d / 3) as f64).sqrt() as usize;
    let cfg = VaeConfig {
        image_size: side,
        hidden: vec![h0, h1],
        latent,
        ..VaeConfig::mlp_chapter()
    };
    let vs = VarStore::new(0);
    let vae = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    fill(&vs);
    let x: Vec<f32> = (0..batch * d)
        .map(|i| (0.5 + 0.45 * (0.13 * i as f64).sin()) as f32)
        .collect();
    let x = Tensor::from_vec(x, (batch, 3, side, side), &Device::Cpu).unwrap();
    let eps: Vec<f32> = (0..batch * latent)
        .map(|j| (0.71 * j as f64 + 0.3).sin() as f32)
        .collect();
    let eps = Tensor::from_vec(eps, (batch, latent), &Device::Cpu).unwrap();
    let out = vae.forward_with_eps(&x, None, &eps).unwrap();
    let t = elbo_loss(&out, &x, Likelihood::Bernoulli, None, 1.0).unwrap();
    // The loss sums batch * d positive terms: its magnitude is itself.
    let want_loss = case["loss"].as_f64().unwrap();
    close_tol(
        t.loss.to_scalar::<f32>().unwrap() as f64,
        want_loss,
        capped(f32_abs_tol(batch * d, want_loss), stated(want_loss)),
        "loss",
    );
    close(
        t.rec.to_scalar::<f32>().unwrap() as f64,
        case["bce"].as_f64().unwrap(),
        "bce",
    );
    close(
        t.kl.to_scalar::<f32>().unwrap() as f64,
        case["kld"].as_f64().unwrap(),
        "kld",
    );
    let grads = t.loss.backward().unwrap();
    // Every gradient comes back through the decoder and encoder widths and,
    // for a weight, a reduction over the batch: their errors add.
    let chain = chain_length(&[d, h0, h1, latent, h1, h0, batch]);
    let want = case["grads"].as_object().unwrap();
    assert_eq!(want.len(), vs.vars().len());
    for (name, v) in vs.vars() {
        let w = &want[&name];
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let sum: f64 = g.iter().map(|&x| x as f64).sum();
        let abs_sum: f64 = g.iter().map(|&x| (x as f64).abs()).sum();
        let norm: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let want_norm = w["norm"].as_f64().unwrap();
        close_tol(
            norm,
            want_norm,
            capped(f32_abs_tol(chain, want_norm), stated(want_norm)),
            &format!("{name} gradient norm"),
        );
        // The elements' errors add in their sum: its magnitude is their
        // absolute sum (the sum itself cancels).
        let s = w["sum"].as_f64().unwrap();
        close_tol(
            sum,
            s,
            capped(f32_abs_tol(chain, abs_sum), stated(s)),
            &format!("{name} gradient sum"),
        );
        let elems: Vec<f64> = if full {
            w["all"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        } else {
            w["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        for (i, e) in elems.iter().enumerate() {
            close(g[i] as f64, *e, &format!("{name} gradient [{i}]"));
        }
    }
}

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/vae_parity.json")).unwrap()
}

#[test]
fn small_vae_loss_and_every_gradient_element_match_pytorch() {
    check_case(&fixture()["small"], true);
}

#[test]
fn chapter_vae_loss_and_gradients_match_pytorch() {
    check_case(&fixture()["chapter"], false);
}
