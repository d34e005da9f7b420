//! `VaeConfig::training_bytes_per_image` against what a training step
//! (the trainer's: forward with a sampled latent, the ELBO, Adam) allocates,
//! counted by a global allocator. The test binary holds this one test, so
//! no other test's allocations are counted.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::memory::{compare_estimate, CountingAllocator};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use kiln_vae::{elbo_loss, Likelihood, Vae, VaeConfig};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Peak bytes of one step on a batch of `b`, above what was live before it
/// (the model and Adam's moments, made by a first step).
fn peak(cfg: &VaeConfig, b: usize) -> u64 {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let m = Vae::new(cfg, vs.builder(DType::F32, &dev)).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let mut rng = SeededRng::new(0);
    let s = cfg.image_size;
    let x = rng
        .uniform(&[b, cfg.channels, s, s], 0.0, 1.0, &dev)
        .unwrap();
    let mut step = |rng: &mut SeededRng| {
        let out = m.forward(&x, None, rng).unwrap();
        let t = elbo_loss(&out, &x, cfg.likelihood, m.logvar_x(), cfg.beta).unwrap();
        opt.backward_step(&t.loss).unwrap();
    };
    step(&mut rng);
    ALLOC.reset_peak();
    let before = ALLOC.current();
    step(&mut rng);
    ALLOC.peak() - before
}

#[test]
fn the_activation_estimate_follows_what_a_training_step_allocates() {
    let mlp = VaeConfig::mlp_chapter();
    let conv = VaeConfig::conv();
    // The chapter's MLP; a wider MLP with the Gaussian likelihood; a
    // three-layer conv VAE at 64x64 that the weights were not fitted on.
    let cases = [
        mlp.clone(),
        VaeConfig {
            hidden: vec![1024, 256],
            likelihood: Likelihood::Gaussian {
                learned: true,
                logvar: 0.0,
            },
            ..mlp
        },
        VaeConfig {
            image_size: 64,
            hidden: vec![16, 48, 96],
            ..conv
        },
    ];
    for c in cases {
        // Per image: the difference of two batch sizes, so that what does
        // not grow with the batch cancels.
        let per_image = (peak(&c, 96) - peak(&c, 32)) as f64 / 64.0;
        let estimate = c.training_bytes_per_image() as f64;
        let what = format!(
            "{:?} {}x{} {:?}",
            c.arch, c.image_size, c.image_size, c.hidden
        );
        println!("{}", compare_estimate(&what, estimate, per_image).unwrap());
    }
}
