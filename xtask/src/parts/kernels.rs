//! kiln-core's kernels in xtask: the `inpaint_convae_train_step` benchmark, a
//! train step of the chapter's masked conv autoencoder (kiln-ssl's `InpaintAe`,
//! whose layers run on `kiln_core::ops`), and `dcgan32_train_iter`, torch_reference.py's DCGAN
//! iteration built from kiln-gan's `dcgan32` models.

use anyhow::Result;
use kiln_core::loss::{mse, Reduction};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Module};
use kiln_data::masks::SquareMask;
use kiln_gan::loss::{minimax_d, non_saturating_g};
use kiln_gan::{is_trainable, Discriminator, Generator, ModelConfig};
use kiln_ssl::InpaintAe;

use super::{Bench, Component};

/// Registers the kernels' benchmark.
pub fn component() -> Component {
    Component {
        benches: vec![
            Bench {
                name: "inpaint_convae_train_step",
                run: bench_convae,
                gpu_batches: &[32, 512],
                cpu_batch: false,
            },
            Bench {
                name: "dcgan32_train_iter",
                run: bench_dcgan,
                gpu_batches: &[64, 512],
                cpu_batch: false,
            },
        ],
        ..Default::default()
    }
}

fn bench_convae(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = ctx.device.clone();
    let vs = VarStore::new(0);
    // kiln-ssl's model is torch_reference.py's `ConvAE` (same layers and shapes).
    let model = InpaintAe::new(3, vs.builder(DType::F32, &dev))?;
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0)?;
    let mut rng = SeededRng::new(0);
    let b = ctx.batch_or(32);
    let x = rng.uniform(&[b, 3, 32, 32], 0.0, 1.0, &dev)?;
    // The chapter's 8x8 hole, drawn once: torch_reference.py fixes one too.
    let mask = SquareMask::chapter().sample(1, 32, 32, &mut rng, &dev)?;
    ctx.train_line("inpaint_convae_train_step", b, || {
        let pred = model.forward(&x.broadcast_mul(&mask)?)?;
        let loss = mse(&pred, &x, Reduction::Mean)?;
        opt.backward_step(&loss)?;
        Ok(())
    })
}

/// One DCGAN iteration as torch_reference.py's `dcgan`: a discriminator step on
/// real and (detached) fake images, then a non-saturating generator step; Adam
/// (2e-4, betas 0.5/0.999), batch 64, 30 timed steps after 3 warm-up steps
/// (on a GPU 100 after 10, as torch_gpu.py).
fn bench_dcgan(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = ctx.device.clone();
    let cfg = ModelConfig::dcgan32();
    let (vg, vd) = (VarStore::new(0), VarStore::new(1));
    let g = Generator::new(&cfg, vg.builder(DType::F32, &dev))?;
    let d = Discriminator::new(&cfg, vd.builder(DType::F32, &dev))?;
    let adam = OptimKind::Adam {
        betas: (0.5, 0.999),
        eps: 1e-8,
    };
    let mut og = Optimizer::single(adam, vg.vars_where(is_trainable), 2e-4, 0.0)?;
    let mut od = Optimizer::single(adam, vd.vars_where(is_trainable), 2e-4, 0.0)?;
    let mut rng = SeededRng::new(0);
    let b = ctx.batch_or(64);
    let real = rng.uniform(&[b, 3, 32, 32], -1.0, 1.0, &dev)?;
    let ctx = if dev.is_cpu() {
        ctx.with_steps(30, 3)
    } else {
        ctx.with_steps(100, 10)
    };
    ctx.train_line("dcgan32_train_iter", b, || {
        let fake = g.forward_t(&g.noise(b, &mut rng)?, None, true)?;
        // BCE-with-logits against ones / zeros, as the reference.
        let ld = minimax_d(
            &d.forward_t(&real, None, true)?,
            &d.forward_t(&fake.detach(), None, true)?,
        )?;
        od.backward_step(&ld)?;
        // As kiln-gan's trainer: D's weights frozen for the generator step
        // (same G gradients; D's weight gradients, which the reference forms
        // and throws away, are skipped).
        let lg = non_saturating_g(&kiln_core::nn::frozen(|| d.forward_t(&fake, None, true))?)?;
        og.backward_step(&lg)?;
        Ok(())
    })
}
