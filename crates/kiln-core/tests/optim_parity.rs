//! Optimizers against torch.optim, step for step.
//!
//! Reference (PyTorch 2.15, CPU, float32):
//! ```python
//! import torch
//! a = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]])
//! b = torch.tensor([[0.3, 0.1, -0.2], [1.0, -0.5, 0.7]])
//! def run(name, make, steps=5, clip=None):
//!     p = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]], requires_grad=True)
//!     opt = make([p]); out = []
//!     for _ in range(steps):
//!         opt.zero_grad()
//!         loss = ((p * a - b) ** 2).sum(); loss.backward()
//!         if clip is not None: torch.nn.utils.clip_grad_norm_([p], clip)
//!         opt.step(); out.append(p.detach().flatten().tolist())
//!     print(name, [f"{x:.8e}" for x in out[-1]]); print(name, "step1", [f"{x:.8e}" for x in out[0]])
//! run("adam", lambda ps: torch.optim.Adam(ps, lr=0.1))
//! run("adam_wd", lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1))
//! run("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05))
//! run("sgd", lambda ps: torch.optim.SGD(ps, lr=0.02))
//! run("sgd_mom_wd", lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=0.01))
//! run("sgd_nesterov", lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, nesterov=True))
//! run("adam_clip", lambda ps: torch.optim.Adam(ps, lr=0.1), clip=0.5)
//! run("sgd_clip", lambda ps: torch.optim.SGD(ps, lr=0.02), clip=0.5)
//! ```
//! Output pasted into each test below.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;

use kiln_core::optim::{clip_grad_norm, LrSchedule, OptimKind, Optimizer, ParamGroup};
use kiln_core::tolerance::{chain_length, f32_abs_tol, within, F32_UNIT_ROUNDOFF};
use kiln_core::{Device, Tensor, Var};

fn run(
    kind: OptimKind,
    lr: f64,
    wd: f64,
    clip: Option<f64>,
    steps: usize,
    dev: &Device,
) -> (Vec<Vec<f32>>, Optimizer, Var) {
    let p = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.0, -0.3]], dev).unwrap())
        .unwrap();
    let a = Tensor::new(&[[1.0f32, -2.0, 0.5], [3.0, 0.25, -1.5]], dev).unwrap();
    let b = Tensor::new(&[[0.3f32, 0.1, -0.2], [1.0, -0.5, 0.7]], dev).unwrap();
    let vars = vec![("p".to_string(), p.clone())];
    let mut opt = Optimizer::new(
        kind,
        vec![ParamGroup::new(vars.clone(), lr).weight_decay(wd)],
    )
    .unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let loss = p
            .as_tensor()
            .mul(&a)
            .unwrap()
            .sub(&b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let mut g = loss.backward().unwrap();
        if let Some(c) = clip {
            clip_grad_norm(&mut g, &vars, c).unwrap();
        }
        opt.step(&g).unwrap();
        out.push(
            p.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    (out, opt, p)
}

fn parse(v: &[&str]) -> Vec<f32> {
    v.iter().map(|s| s.parse::<f32>().unwrap()).collect()
}

/// Per step, each parameter's update is a fixed elementwise chain of a
/// handful of f32 roundings (gradient, moments, sqrt, division, the move; the
/// clip's norm sums only 6 squares), each at most `u` relative to
/// `1 + |p|`: 5 steps of about 6 roundings, 32 u with margin. No reduction
/// of machine-dependent order is involved, so this holds on any CPU.
const STEP_TOL: f64 = 32.0 * F32_UNIT_ROUNDOFF;

fn check(kind: OptimKind, lr: f64, wd: f64, clip: Option<f64>, step1: &[&str], step5: &[&str]) {
    let (out, _, _) = run(kind, lr, wd, clip, 5, &Device::Cpu);
    for (got, want) in [(&out[0], parse(step1)), (&out[4], parse(step5))] {
        for (g, w) in got.iter().zip(&want) {
            assert!(
                ((g - w).abs() as f64) <= STEP_TOL * (1.0 + w.abs() as f64),
                "{kind:?}: got {got:?}, torch {want:?}"
            );
        }
    }
}

#[test]
fn adam_matches_torch() {
    check(
        OptimKind::adam(),
        0.1,
        0.0,
        None,
        &[
            "4.00000006e-01",
            "-8.99999976e-01",
            "1.89999998e+00",
            "1.99999988e-01",
            "-9.99999866e-02",
            "-4.00000006e-01",
        ],
        &[
            "1.82904989e-01",
            "-5.08644104e-01",
            "1.50234115e+00",
            "4.60242063e-01",
            "-4.97044206e-01",
            "-5.61276734e-01",
        ],
    );
}

#[test]
fn adam_with_l2_weight_decay_matches_torch() {
    check(
        OptimKind::adam(),
        0.05,
        0.1,
        None,
        &[
            "4.49999988e-01",
            "-9.49999988e-01",
            "1.95000005e+00",
            "1.50000006e-01",
            "-4.99999933e-02",
            "-3.50000024e-01",
        ],
        &[
            "2.69215912e-01",
            "-7.51579344e-01",
            "1.75053132e+00",
            "3.33688676e-01",
            "-2.48709768e-01",
            "-5.11786878e-01",
        ],
    );
}

#[test]
fn adamw_matches_torch() {
    check(
        OptimKind::adamw(),
        0.1,
        0.05,
        None,
        &[
            "3.97500008e-01",
            "-8.94999981e-01",
            "1.88999999e+00",
            "1.99499995e-01",
            "-9.99999866e-02",
            "-3.98499995e-01",
        ],
        &[
            "1.81642503e-01",
            "-4.89469051e-01",
            "1.45808601e+00",
            "4.56019819e-01",
            "-4.92101818e-01",
            "-5.56887984e-01",
        ],
    );
}

#[test]
fn sgd_variants_match_torch() {
    check(
        OptimKind::sgd(0.0, false),
        0.02,
        0.0,
        None,
        &[
            "4.92000014e-01",
            "-8.47999990e-01",
            "1.97599995e+00",
            "1.84000000e-01",
            "-4.99999989e-03",
            "-3.14999998e-01",
        ],
        &[
            "4.63074535e-01",
            "-4.47301388e-01",
            "1.88237607e+00",
            "3.08279365e-01",
            "-2.48753112e-02",
            "-3.62661302e-01",
        ],
    );
    check(
        OptimKind::sgd(0.9, false),
        0.02,
        0.01,
        None,
        &[
            "4.91899997e-01",
            "-8.47800016e-01",
            "1.97560000e+00",
            "1.83980003e-01",
            "-4.99999989e-03",
            "-3.14940006e-01",
        ],
        &[
            "4.03297573e-01",
            "3.39478523e-01",
            "1.68693590e+00",
            "5.13172686e-01",
            "-6.53028488e-02",
            "-4.57615227e-01",
        ],
    );
    check(
        OptimKind::sgd(0.9, true),
        0.02,
        0.0,
        None,
        &[
            "4.84800011e-01",
            "-7.11199999e-01",
            "1.95439994e+00",
            "2.59599984e-01",
            "-9.49999969e-03",
            "-3.28500003e-01",
        ],
        &[
            "3.85857463e-01",
            "2.88452834e-01",
            "1.61225784e+00",
            "3.89440924e-01",
            "-8.32955316e-02",
            "-4.73021388e-01",
        ],
    );
}

#[test]
fn gradient_norm_clipping_matches_torch() {
    check(
        OptimKind::adam(),
        0.1,
        0.0,
        Some(0.5),
        &[
            "4.00000036e-01",
            "-9.00000036e-01",
            "1.89999998e+00",
            "1.99999988e-01",
            "-9.99999195e-02",
            "-3.99999976e-01",
        ],
        &[
            "2.09927723e-01",
            "-4.99113262e-01",
            "1.49787033e+00",
            "4.43389088e-01",
            "-5.02136886e-01",
            "-5.26557326e-01",
        ],
    );
    check(
        OptimKind::sgd(0.0, false),
        0.02,
        0.0,
        Some(0.5),
        &[
            "4.99545991e-01",
            "-9.91373956e-01",
            "1.99863803e+00",
            "1.04767039e-01",
            "-2.83752161e-04",
            "-3.00851256e-01",
        ],
        &[
            "4.97687221e-01",
            "-9.56665516e-01",
            "1.99303746e+00",
            "1.23398066e-01",
            "-1.45179708e-03",
            "-3.04311335e-01",
        ],
    );
}

/// The tensor-op path (used on devices without the fused kernel) gives the
/// same numbers as the fused CPU kernel. Forced here by using f64 parameters.
#[test]
fn composite_path_agrees_with_fused() {
    for kind in [
        OptimKind::adam(),
        OptimKind::adamw(),
        OptimKind::sgd(0.9, true),
    ] {
        let (fused, _, _) = run(kind, 0.05, 0.01, None, 5, &Device::Cpu);
        let p = Var::from_tensor(
            &Tensor::new(&[[0.5f64, -1.0, 2.0], [0.1, 0.0, -0.3]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let a = Tensor::new(&[[1.0f64, -2.0, 0.5], [3.0, 0.25, -1.5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0.3f64, 0.1, -0.2], [1.0, -0.5, 0.7]], &Device::Cpu).unwrap();
        let mut opt = Optimizer::single(kind, vec![("p".into(), p.clone())], 0.05, 0.01).unwrap();
        for _ in 0..5 {
            let loss = p
                .as_tensor()
                .mul(&a)
                .unwrap()
                .sub(&b)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let got = p
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // The f64 path is exact to f32's eyes: the difference is the fused
        // f32 kernel's elementwise rounding over 5 steps (see `STEP_TOL`).
        for (g, f) in got.iter().zip(&fused[4]) {
            assert!(
                (g - *f as f64).abs() <= STEP_TOL * (1.0 + g.abs()),
                "{kind:?}: composite {got:?} vs fused {:?}",
                fused[4]
            );
        }
    }
}

#[test]
fn state_round_trips_and_continues_identically() {
    // 3 steps, save state, restore into a fresh optimizer over a copy of the
    // parameters, 2 more steps: same as 5 straight steps.
    let (straight, _, _) = run(OptimKind::adam(), 0.1, 0.0, None, 5, &Device::Cpu);
    let (_, opt, p) = run(OptimKind::adam(), 0.1, 0.0, None, 3, &Device::Cpu);
    let (ts, meta) = opt.state().unwrap();
    let ts: HashMap<String, Tensor> = ts.into_iter().collect();
    assert!(ts.contains_key("p.exp_avg") && ts.contains_key("p.exp_avg_sq"));
    let q = Var::from_tensor(&p.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 =
        Optimizer::single(OptimKind::adam(), vec![("p".into(), q.clone())], 0.1, 0.0).unwrap();
    opt2.load_state(&ts, &meta).unwrap();
    assert_eq!(opt2.step_count(), 3);
    let a = Tensor::new(&[[1.0f32, -2.0, 0.5], [3.0, 0.25, -1.5]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[0.3f32, 0.1, -0.2], [1.0, -0.5, 0.7]], &Device::Cpu).unwrap();
    for _ in 0..2 {
        let loss = q
            .as_tensor()
            .mul(&a)
            .unwrap()
            .sub(&b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt2.backward_step(&loss).unwrap();
    }
    assert_eq!(
        q.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        straight[4]
    );
    // A state from another optimizer kind is refused.
    let mut sgd =
        Optimizer::single(OptimKind::sgd(0.9, false), vec![("p".into(), q)], 0.1, 0.0).unwrap();
    let e = sgd.load_state(&ts, &meta).unwrap_err().to_string();
    assert!(e.contains("Adam"), "{e}");
}

#[test]
fn frozen_groups_and_unused_params_are_left_alone() {
    let dev = Device::Cpu;
    let w = Var::new(&[1.0f32, 2.0], &dev).unwrap();
    let enc = Var::new(&[3.0f32], &dev).unwrap();
    let unused = Var::new(&[5.0f32], &dev).unwrap();
    let mut opt = Optimizer::new(
        OptimKind::sgd(0.0, false),
        vec![
            ParamGroup::new(vec![("head.w".into(), w.clone())], 0.1),
            ParamGroup::new(
                vec![
                    ("encoder.x".into(), enc.clone()),
                    ("encoder.unused".into(), unused.clone()),
                ],
                1.0,
            ),
        ],
    )
    .unwrap();
    assert_eq!(opt.set_frozen("encoder.x", true), 1);
    let loss = (w.as_tensor().sum_all().unwrap() * enc.as_tensor().sum_all().unwrap()).unwrap();
    opt.backward_step(&loss).unwrap();
    // d/dw = enc = 3 -> w - 0.1*3
    assert_eq!(
        w.as_tensor().to_vec1::<f32>().unwrap(),
        vec![1.0 - 0.3, 2.0 - 0.3]
    );
    assert_eq!(enc.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
    assert_eq!(unused.as_tensor().to_vec1::<f32>().unwrap(), vec![5.0]);
    opt.set_frozen("encoder", false);
    let loss = (w.as_tensor().sum_all().unwrap() * enc.as_tensor().sum_all().unwrap()).unwrap();
    opt.backward_step(&loss).unwrap();
    // second group lr 1.0: d/denc = sum(w) = 2.4
    let e = enc.as_tensor().to_vec1::<f32>().unwrap()[0];
    // 3 - (0.7 + 1.7): three f32 roundings of values at most 3 (sum of
    // two terms, fixed order), 4 u * 3 with margin.
    assert!(
        ((e as f64) - (3.0 - 2.4)).abs() <= 4.0 * F32_UNIT_ROUNDOFF * 3.0,
        "{e}"
    );
    let bad = Optimizer::new(
        OptimKind::adam(),
        vec![ParamGroup::new(
            vec![("a".into(), w.clone()), ("a".into(), w)],
            0.1,
        )],
    );
    assert!(bad.unwrap_err().to_string().contains("twice"));
}

#[test]
fn gradient_accumulation_equals_the_full_batch() {
    use kiln_core::optim::GradAccumulator;
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1.0f32, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]], &dev).unwrap();
    let mk = || Var::new(&[0.3f32, -0.2], &dev).unwrap();
    let loss_of = |w: &Var, x: &Tensor| {
        x.matmul(&w.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let full = mk();
    let g_full = loss_of(&full, &x).backward().unwrap();
    let acc_w = mk();
    let mut acc = GradAccumulator::new();
    for i in 0..2 {
        let part = x.narrow(0, 2 * i, 2).unwrap();
        acc.accumulate(&(loss_of(&acc_w, &part) * 0.5).unwrap())
            .unwrap();
    }
    assert_eq!(acc.count(), 2);
    let g_acc = acc.take().unwrap();
    let a = g_full
        .get(full.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = g_acc
        .get(acc_w.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // d/dw_j of mean_i (x_i . w)^2 = sum_i 2 (x_i . w) x_ij / 4: a dot of
    // length 2 then a sum over the 4 rows (split in two halves on one side):
    // chain 2 + 4, magnitude sum_i 2 (|x_i0 w_0| + |x_i1 w_1|) |x_ij| / 4.
    let xs = x.to_vec2::<f32>().unwrap();
    let w0 = [0.3f64, -0.2];
    for (j, (p, q)) in a.iter().zip(&b).enumerate() {
        let mag: f64 = xs
            .iter()
            .map(|r| {
                let dot = (r[0] as f64 * w0[0]).abs() + (r[1] as f64 * w0[1]).abs();
                2.0 * dot * (r[j] as f64).abs() / 4.0
            })
            .sum();
        let tol = f32_abs_tol(chain_length(&[2, 4]), mag);
        assert!(
            within(*p as f64, *q as f64, tol),
            "{a:?} vs {b:?} (tolerance {tol:.3e})"
        );
    }
}

/// PyTorch:
/// ```python
/// o = torch.optim.SGD([p], lr=1.0)
/// s = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.1)  # lr per step:
/// # ['1.00000000', '0.97797543', '0.91405765', '0.81450336', '0.68905765', '0.55000000',
/// #  '0.41094235', '0.28549664', '0.18594235', '0.12202457', '0.10000000']
/// s = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
/// # [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
/// ```
#[test]
fn schedules_match_torch() {
    let cos = LrSchedule::Cosine {
        warmup: 0,
        total: 10,
        min_factor: 0.1,
    };
    let want = [
        1.0, 0.97797543, 0.91405765, 0.81450336, 0.68905765, 0.55, 0.41094235, 0.28549664,
        0.18594235, 0.12202457, 0.1,
    ];
    for (s, w) in want.iter().enumerate() {
        assert!((cos.factor(s as u64) - w).abs() < 1e-7, "cosine step {s}");
    }
    let st = LrSchedule::Step {
        step_size: 3,
        gamma: 0.5,
    };
    let f: Vec<f64> = (0..8).map(|s| st.factor(s)).collect();
    assert_eq!(f, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]);
    let wu = LrSchedule::LinearWarmup {
        warmup: 4,
        total: 8,
    };
    let f: Vec<f64> = (0..9).map(|s| wu.factor(s)).collect();
    assert_eq!(f, vec![0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]);
    assert_eq!(LrSchedule::Constant.factor(1000), 1.0);
    let mut opt = Optimizer::single(OptimKind::adam(), vec![], 0.2, 0.0).unwrap();
    st.apply(&mut opt);
    assert_eq!(opt.lr(0), 0.2);
}
