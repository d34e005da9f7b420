//! Whole train steps of the chapter's two models at batch 32 (forward,
//! backward, fused Adam): the VAE and the masked-inpainting autoencoder.
//! `cargo xtask bench` reports the same steps as images/s beside
//! torch_reference.py; these are for fine-grained work on one change.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_core::loss::{mse, Reduction};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module};
use kiln_ssl::InpaintAe;
use kiln_vae::{elbo_loss, Vae, VaeConfig};

fn vae_step(c: &mut Criterion) {
    let cfg = VaeConfig::mlp_chapter();
    let vs = VarStore::new(0);
    let model = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 2e-3, 0.0).unwrap();
    let mut rng = SeededRng::new(0);
    let x = rng
        .uniform(&[32, 3, 32, 32], 0.0, 1.0, &Device::Cpu)
        .unwrap();
    c.bench_function("vae_mlp_train_step/batch32", |b| {
        b.iter(|| {
            let out = model.forward(&x, None, &mut rng).unwrap();
            let t = elbo_loss(&out, &x, cfg.likelihood, None, 1.0).unwrap();
            opt.backward_step(&t.loss).unwrap();
        })
    });
}

fn inpaint_step(c: &mut Criterion) {
    let vs = VarStore::new(0);
    let model = InpaintAe::new(3, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let mut rng = SeededRng::new(0);
    let x = rng
        .uniform(&[32, 3, 32, 32], 0.0, 1.0, &Device::Cpu)
        .unwrap();
    c.bench_function("inpaint_convae_train_step/batch32", |b| {
        b.iter(|| {
            let loss = mse(&model.forward(&x).unwrap(), &x, Reduction::Mean).unwrap();
            opt.backward_step(&loss).unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = vae_step, inpaint_step
}
criterion_main!(benches);
