//! The finite-difference Hessian-vector product behind R1 and WGAN-GP,
//! checked on the real discriminator (layer norm, no norm, conditional,
//! spectral norm) against central differences of the penalty itself in f64:
//! `dP/dtheta_j ~ [P(theta + h e_j) - P(theta - h e_j)] / 2h`, where
//! `P(theta) = mean_i f(||grad_x D(x_i; theta)||)` needs only first-order
//! gradients.
#![allow(clippy::unwrap_used, clippy::needless_range_loop, missing_docs)]

use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_gan::penalty::{input_gradient, penalty_fn, per_sample_norms};
use kiln_gan::{gradient_penalty, is_trainable, Discriminator, ModelConfig, Norm, PenaltyKind};

const DEV: Device = Device::Cpu;

fn model(norm: Norm, sn: bool, classes: Option<usize>) -> ModelConfig {
    ModelConfig {
        image_size: 8,
        ndf: 4,
        nz: 4,
        ngf: 4,
        d_norm: norm,
        spectral_norm: sn,
        num_classes: classes,
        // PyTorch's init gives larger weights than Radford's N(0, 0.02):
        // input gradients of order 1, so both penalties are far from flat.
        init: kiln_gan::Init::Pytorch,
        ..ModelConfig::dcgan32()
    }
}

/// The penalty value `P` by first-order autograd (no surrogate).
fn penalty_value(
    d: &Discriminator,
    x: &Tensor,
    y: Option<&Tensor>,
    kind: PenaltyKind,
    w: f64,
) -> f64 {
    let g = input_gradient(|x| d.forward_t(x, y, true), x).unwrap();
    let n = per_sample_norms(&g).unwrap();
    n.iter().map(|&n| penalty_fn(kind, w, n).0).sum::<f64>() / n.len() as f64
}

struct Case {
    name: &'static str,
    cfg: ModelConfig,
    kind: PenaltyKind,
    weight: f64,
}

/// Compares the surrogate's gradient (FD-HVP with step `hvp`, in `dtype`)
/// with central differences of `P` over 24 parameter entries in f64.
/// Returns the largest error relative to the largest reference component.
fn compare(c: &Case, dtype: DType, hvp: f64) -> f64 {
    let b = 3;
    let vs = VarStore::new(11);
    let d = Discriminator::new(&c.cfg, vs.builder(DType::F64, &DEV)).unwrap();
    let mut rng = SeededRng::new(5);
    let x = rng
        .uniform(&[b, 3, 8, 8], -1.0, 1.0, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let y = c
        .cfg
        .num_classes
        .map(|_| Tensor::new(&[0u32, 2, 1], &DEV).unwrap());
    // The surrogate, computed in `dtype` with a copy of the weights.
    let vs_t = VarStore::new(0);
    let d_t = Discriminator::new(&c.cfg, vs_t.builder(dtype, &DEV)).unwrap();
    vs_t.assign(&vs.tensors().into_iter().collect()).unwrap();
    let xt = x.to_dtype(dtype).unwrap();
    let yr = y.clone();
    let critic = |xx: &Tensor| {
        let reps = xx.dim(0)? / b;
        let yy = yr
            .as_ref()
            .map(|y| Tensor::cat(&vec![y; reps], 0))
            .transpose()?;
        d_t.forward_t(xx, yy.as_ref(), true)
    };
    let p = gradient_penalty(critic, &xt, c.kind, c.weight, hvp).unwrap();
    let want_value = penalty_value(&d, &x, y.as_ref(), c.kind, c.weight);
    assert!(
        (p.value - want_value).abs() <= 1e-4 * want_value.abs().max(1e-3),
        "{}: value {} vs {want_value}",
        c.name,
        p.value
    );
    let grads = p.surrogate.backward().unwrap();
    // 24 parameter entries spread over every trainable tensor.
    let params = vs.vars_where(is_trainable);
    let params_t = vs_t.vars_where(is_trainable);
    let mut pick = SeededRng::new(7);
    let (mut worst, mut scale) = (0f64, 0f64);
    for k in 0..24 {
        let i = k % params.len();
        let (name, var) = &params[i];
        let n = var.elem_count();
        let j = pick.below(n);
        let flat = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6 * flat[j].abs().max(1e-2);
        let at = |delta: f64| {
            let mut v = flat.clone();
            v[j] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &DEV).unwrap())
                .unwrap();
            let pv = penalty_value(&d, &x, y.as_ref(), c.kind, c.weight);
            var.set(&Tensor::from_vec(flat.clone(), var.shape(), &DEV).unwrap())
                .unwrap();
            pv
        };
        let want = (at(h) - at(-h)) / (2.0 * h);
        let got = grads
            .get(params_t[i].1.as_tensor())
            .map(|g| {
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[j]
            })
            .unwrap_or(0.0);
        assert_eq!(&params_t[i].0, name);
        worst = worst.max((got - want).abs());
        scale = scale.max(want.abs());
    }
    assert!(scale > 0.0, "{}: a zero reference gradient", c.name);
    worst / scale
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "R1, layer norm",
            cfg: model(Norm::Layer, false, None),
            kind: PenaltyKind::R1,
            weight: 10.0,
        },
        Case {
            name: "WGAN-GP, no norm",
            cfg: model(Norm::None, false, None),
            kind: PenaltyKind::WganGp,
            weight: 10.0,
        },
        Case {
            name: "R1, spectral norm, projection D",
            cfg: model(Norm::None, true, Some(3)),
            kind: PenaltyKind::R1,
            weight: 1.0,
        },
        Case {
            name: "WGAN-GP, layer norm, projection D",
            cfg: model(Norm::Layer, false, Some(3)),
            kind: PenaltyKind::WganGp,
            weight: 5.0,
        },
    ]
}

/// In f64 with a small step the FD-HVP agrees with the reference to the
/// reference's own error: both central differences (over theta with
/// h = 1e-6 |theta_j|, over x with h = 1e-5) have truncation O(h^2) and
/// rounding ~ u / h ~ 1e-10 relative to the terms, amplified by the
/// network's reductions; measured ~5e-8, bound 1e-6.
#[test]
fn penalties_match_f64_finite_differences() {
    for c in cases() {
        let rel = compare(&c, DType::F64, 1e-5);
        assert!(rel < 1e-6, "{}: relative error {rel:e}", c.name);
    }
}

/// In f32 with the training default (step 1e-2) the error is the f32
/// rounding of the difference quotient (u / h ~ 6e-6 relative to the
/// terms, amplified by the reductions) plus the truncation O(h^2) and any
/// leaky ReLU kink crossed within +-h; measured ~5e-5, bound 1e-3 (a wrong
/// factor or a missing detach is off by 100%).
#[test]
fn f32_penalties_with_the_default_step_stay_close() {
    for c in cases() {
        let rel = compare(&c, DType::F32, 1e-2);
        assert!(rel < 1e-3, "{}: relative error {rel:e}", c.name);
    }
}
