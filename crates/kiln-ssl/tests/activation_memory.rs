//! The kiln-ssl trainers' activation estimates against what their training
//! steps allocate, counted by a global allocator: inpainting (masking, the
//! autoencoder, the weighted loss, Adam) and SimCLR (two views through the
//! encoder and head, NT-Xent, AdamW). The test binary holds this one test,
//! so no other test's allocations are counted.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::memory::{compare_estimate, CountingAllocator};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, Tensor};
use kiln_data::masks::SquareMask;
use kiln_ssl::inpaint::inpaint_loss;
use kiln_ssl::loss::nt_xent;
use kiln_ssl::{InpaintAe, InpaintConfig, Simclr, SimclrConfig};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Peak bytes of `step`'s second run above what was live before it (the
/// first makes the optimizer's moments).
fn measure(mut step: impl FnMut()) -> u64 {
    step();
    ALLOC.reset_peak();
    let before = ALLOC.current();
    step();
    ALLOC.peak() - before
}

/// Peak bytes of an inpainting step on `b` images.
fn inpaint(cfg: &InpaintConfig, b: usize) -> u64 {
    let (side, c) = (cfg.image_size, cfg.channels);
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let m = InpaintAe::new(c, vs.builder(DType::F32, &dev)).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let mut rng = SeededRng::new(0);
    let x = rng.uniform(&[b, c, side, side], 0.0, 1.0, &dev).unwrap();
    let mask = SquareMask::new(8, false);
    measure(|| {
        let (masked, keep) = mask.apply(&x, &mut rng).unwrap();
        let loss = inpaint_loss(&m.forward(&masked).unwrap(), &x, &keep, cfg.hole_weight).unwrap();
        opt.backward_step(&loss).unwrap();
    })
}

/// Peak bytes of a SimCLR step on `b` images (`2 b` views).
fn simclr(cfg: &SimclrConfig, b: usize) -> u64 {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let m = Simclr::new(cfg, vs.builder(DType::F32, &dev)).unwrap();
    let mut opt = Optimizer::single(
        OptimKind::adamw(),
        vs.vars_where(|n| !n.contains("running_")),
        1e-3,
        1e-4,
    )
    .unwrap();
    let mut rng = SeededRng::new(0);
    let s = cfg.image_size;
    let v1 = rng
        .uniform(&[b, cfg.channels, s, s], 0.0, 1.0, &dev)
        .unwrap();
    let v2 = rng
        .uniform(&[b, cfg.channels, s, s], 0.0, 1.0, &dev)
        .unwrap();
    measure(|| {
        let both = Tensor::cat(&[&v1, &v2], 0).unwrap();
        let z = m.project(&both, true).unwrap();
        let loss = nt_xent(
            &z.narrow(0, 0, b).unwrap(),
            &z.narrow(0, b, b).unwrap(),
            cfg.temperature,
        )
        .unwrap();
        opt.backward_step(&loss).unwrap();
    })
}

#[test]
fn the_activation_estimates_follow_what_a_training_step_allocates() {
    // Differences of two batch sizes, so that what does not grow with the
    // batch cancels; the estimate's difference against the measured one.
    let check = |what: &str, measured: f64, estimate: f64| {
        println!("{}", compare_estimate(what, estimate, measured).unwrap());
    };
    for (side, hole, channels) in [(64, 1.0, 3), (32, 4.0, 1)] {
        let cfg = InpaintConfig {
            image_size: side,
            channels,
            hole_weight: hole,
            ..InpaintConfig::default()
        };
        let measured = (inpaint(&cfg, 96) - inpaint(&cfg, 32)) as f64;
        let estimate = 64.0 * cfg.training_bytes_per_image() as f64;
        check(
            &format!("inpainting {side}x{side}x{channels}, hole weight {hole}, 64 images"),
            measured,
            estimate,
        );
    }
    // The encoder's share (default widths), then NT-Xent's quadratic share
    // (a tiny encoder on large batches).
    let base = SimclrConfig::default();
    let tiny = SimclrConfig {
        widths: vec![2],
        image_size: 4,
        channels: 1,
        ..base.clone()
    };
    for (cfg, small, large) in [(base, 32, 96), (tiny, 512, 1024)] {
        let measured = (simclr(&cfg, large) - simclr(&cfg, small)) as f64;
        let estimate = (cfg.training_activation_bytes(large as u64)
            - cfg.training_activation_bytes(small as u64)) as f64;
        check(
            &format!("SimCLR widths {:?}, {small} to {large} images", cfg.widths),
            measured,
            estimate,
        );
    }
}
