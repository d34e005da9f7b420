//! One optimizer step over the chapter VAE's parameters (3.4M), kiln's fused
//! Adam against candle-nn's AdamW; and one small train step.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_core::candle_nn::{self, Optimizer as _};
use kiln_core::nn::Linear;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module};

/// The chapter VAE's layer shapes (3,293,504 parameters with biases).
const SHAPES: [(usize, usize); 7] = [
    (3072, 512),
    (512, 128),
    (128, 32),
    (128, 32),
    (32, 128),
    (128, 512),
    (512, 3072),
];

fn build() -> (VarStore, Vec<Linear>) {
    let vs = VarStore::new(0);
    let vb = vs.builder(DType::F32, &Device::Cpu);
    let layers = SHAPES
        .iter()
        .enumerate()
        .map(|(i, (a, b))| Linear::new(*a, *b, vb.pp(format!("l{i}"))).unwrap())
        .collect();
    (vs, layers)
}

fn grads(vs: &VarStore) -> kiln_core::candle::backprop::GradStore {
    // A loss touching every parameter: sum of squares.
    let mut loss: Option<kiln_core::Tensor> = None;
    for (_, v) in vs.vars() {
        let s = v.as_tensor().sqr().unwrap().sum_all().unwrap();
        loss = Some(match loss {
            None => s,
            Some(l) => l.add(&s).unwrap(),
        });
    }
    loss.unwrap().backward().unwrap()
}

fn optimizer_step(c: &mut Criterion) {
    let (vs, _) = build();
    assert_eq!(vs.num_params(), 3_293_504);
    let g = grads(&vs);
    let mut kiln = Optimizer::single(OptimKind::adam(), vs.vars(), 2e-3, 0.0).unwrap();
    c.bench_function("optim_step_3.4M/kiln_fused_adam", |b| {
        b.iter(|| kiln.step(&g).unwrap())
    });
    let vars: Vec<_> = vs.vars().into_iter().map(|(_, v)| v).collect();
    let params = candle_nn::ParamsAdamW {
        lr: 2e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut cnd = candle_nn::AdamW::new(vars, params).unwrap();
    c.bench_function("optim_step_3.4M/candle_nn_adamw", |b| {
        b.iter(|| cnd.step(&g).unwrap())
    });
}

fn small_train_step(c: &mut Criterion) {
    let vs = VarStore::new(0);
    let vb = vs.builder(DType::F32, &Device::Cpu);
    let l1 = Linear::new(256, 128, vb.pp("l1")).unwrap();
    let l2 = Linear::new(128, 10, vb.pp("l2")).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let mut rng = kiln_core::rng::SeededRng::new(0);
    let x = rng.normal(&[64, 256], 0.0, 1.0, &Device::Cpu).unwrap();
    let y = kiln_core::Tensor::new((0..64u32).map(|i| i % 10).collect::<Vec<_>>(), &Device::Cpu)
        .unwrap();
    c.bench_function("train_step/mlp_256_128_10_batch64", |b| {
        b.iter(|| {
            let logits = l2
                .forward(&l1.forward(&x).unwrap().relu().unwrap())
                .unwrap();
            let loss =
                kiln_core::loss::cross_entropy(&logits, &y, None, kiln_core::loss::Reduction::Mean)
                    .unwrap();
            opt.backward_step(&loss).unwrap();
        })
    });
}

criterion_group!(benches, optimizer_step, small_train_step);
criterion_main!(benches);
