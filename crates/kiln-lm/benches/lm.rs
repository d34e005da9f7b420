//! Criterion benches of kiln-lm at the `train lm` demo's size (4 layers x 128,
//! vocabulary 512, batch 16 x 64): a training step, a prefill and a cached decode
//! step. GPT-2 small is benchmarked against PyTorch by `cargo xtask bench`.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_lm::train::causal_lm_loss;
use kiln_lm::{Gpt2, Gpt2Config, KvCache};

fn setup() -> (Gpt2, VarStore, Tensor) {
    let cfg = Gpt2Config::tiny(512, 64);
    let vs = VarStore::new(0);
    let m = Gpt2::new(&cfg, vs.builder(DType::F32, &Device::Cpu), vs.rng().clone()).unwrap();
    let mut r = SeededRng::new(1);
    let ids: Vec<u32> = (0..16 * 65).map(|_| r.below(512) as u32).collect();
    (
        m,
        vs,
        Tensor::from_vec(ids, (16, 65), &Device::Cpu).unwrap(),
    )
}

fn benches(c: &mut Criterion) {
    kiln_core::device::tune_allocator();
    kiln_core::device::set_threads(2).ok();
    let (m, vs, ids) = setup();
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-4, 0.01).unwrap();
    c.bench_function("lm_tiny_train_step_b16x64", |b| {
        b.iter(|| {
            let loss = causal_lm_loss(&m, &ids, None, true).unwrap();
            opt.backward_step(&loss).unwrap();
        })
    });
    let prompt = ids.narrow(0, 0, 1).unwrap().narrow(1, 0, 32).unwrap();
    c.bench_function("lm_tiny_prefill_32", |b| {
        b.iter(|| {
            let mut cache = KvCache::new(4);
            m.forward_cached(&prompt, &mut cache, false).unwrap()
        })
    });
    let mut cache = KvCache::new(4);
    m.forward_cached(&prompt, &mut cache, false).unwrap();
    let one = prompt.narrow(1, 0, 1).unwrap();
    c.bench_function("lm_tiny_decode_step_at_32", |b| {
        b.iter(|| {
            let mut c2 = cache.clone();
            m.forward_cached(&one, &mut c2, false).unwrap()
        })
    });
}

/// GPT-2 small's LM head for one token (50257 x 768, 154 MB of f32): a pure
/// memory-bandwidth test of the decode gemv.
fn lm_head(c: &mut Criterion) {
    kiln_core::device::set_threads(2).ok();
    let cfg = Gpt2Config {
        n_layer: 1,
        ..Gpt2Config::gpt2_small()
    };
    let vs = VarStore::new(0);
    let m = Gpt2::new(&cfg, vs.builder(DType::F32, &Device::Cpu), vs.rng().clone()).unwrap();
    let h = SeededRng::new(2)
        .normal((1, 768), 0.0, 1.0, &Device::Cpu)
        .unwrap();
    c.bench_function("gpt2_lm_head_gemv_1x768x50257", |b| {
        b.iter(|| m.logits(&h).unwrap())
    });
}

criterion_group! {
    name = lm;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(5));
    targets = benches, lm_head
}
criterion_main!(lm);
