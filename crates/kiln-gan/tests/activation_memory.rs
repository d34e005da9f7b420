//! `ModelConfig::training_bytes_per_image` against what a training
//! iteration allocates, counted by a global allocator: the trainer's
//! iteration (a discriminator step on real and detached generated images,
//! with the penalty's extra passes, then a generator step through the
//! frozen discriminator) on kiln-gan's models. The test binary holds this
//! one test, so no other test's allocations are counted.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::memory::{compare_estimate, CountingAllocator};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use kiln_gan::loss::{d_loss, g_loss};
use kiln_gan::penalty::gradient_penalty;
use kiln_gan::{is_trainable, Discriminator, Generator, LossKind, ModelConfig, Norm, PenaltyKind};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Peak bytes of one iteration on batches of `b`, above what was live
/// before it (models and optimizer state, made by a first iteration).
fn peak(m: &ModelConfig, penalty: PenaltyKind, b: usize) -> u64 {
    let dev = Device::Cpu;
    let (vg, vd) = (VarStore::new(0), VarStore::new(1));
    let g = Generator::new(m, vg.builder(DType::F32, &dev)).unwrap();
    let d = Discriminator::new(m, vd.builder(DType::F32, &dev)).unwrap();
    let adam = OptimKind::Adam {
        betas: (0.5, 0.999),
        eps: 1e-8,
    };
    let mut og = Optimizer::single(adam, vg.vars_where(is_trainable), 2e-4, 0.0).unwrap();
    let mut od = Optimizer::single(adam, vd.vars_where(is_trainable), 2e-4, 0.0).unwrap();
    let mut rng = SeededRng::new(0);
    let s = m.image_size;
    let real = rng
        .uniform(&[b, m.channels, s, s], -1.0, 1.0, &dev)
        .unwrap();
    let mut iter = |rng: &mut SeededRng| {
        let fake = g.forward_t(&g.noise(b, rng).unwrap(), None, true).unwrap();
        let lr = d.forward_t(&real, None, true).unwrap();
        let lf = d.forward_t(&fake.detach(), None, true).unwrap();
        let loss = d_loss(LossKind::Minimax, &lr, &lf).unwrap();
        let mut grads = loss.backward().unwrap();
        if penalty != PenaltyKind::None {
            let p = gradient_penalty(|x| d.forward_t(x, None, true), &real, penalty, 1.0, 1e-3)
                .unwrap();
            // The trainer adds these into the same gradients.
            drop(p.surrogate.backward().unwrap());
        }
        od.step(&grads).unwrap();
        grads = kiln_core::nn::frozen(|| {
            let lf = d.forward_t(&fake, None, true).unwrap();
            g_loss(LossKind::Minimax, &lf).unwrap().backward().unwrap()
        });
        og.step(&grads).unwrap();
    };
    iter(&mut rng);
    ALLOC.reset_peak();
    let before = ALLOC.current();
    iter(&mut rng);
    ALLOC.peak() - before
}

#[test]
fn the_activation_estimate_follows_what_a_training_iteration_allocates() {
    let base = ModelConfig::dcgan32();
    // Batch norm everywhere; wide discriminator without norm; a 16x16
    // model with layer norm and R1 (the penalty's extra forward passes).
    let cases = [
        (base.clone(), PenaltyKind::None),
        (
            ModelConfig {
                ngf: 32,
                ndf: 96,
                d_norm: Norm::None,
                ..base.clone()
            },
            PenaltyKind::None,
        ),
        (
            ModelConfig {
                image_size: 16,
                ngf: 16,
                ndf: 24,
                d_norm: Norm::Layer,
                ..base
            },
            PenaltyKind::R1,
        ),
    ];
    for (m, penalty) in cases {
        // Per image: the difference of two batch sizes, so that what does
        // not grow with the batch cancels.
        let per_image = (peak(&m, penalty, 96) - peak(&m, penalty, 32)) as f64 / 64.0;
        let estimate = m.training_bytes_per_image(penalty != PenaltyKind::None) as f64;
        let what = format!(
            "{0}x{0}, ngf {1}, ndf {2}, {3:?}, {penalty:?}",
            m.image_size, m.ngf, m.ndf, m.d_norm
        );
        println!("{}", compare_estimate(&what, estimate, per_image).unwrap());
    }
}
