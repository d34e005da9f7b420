//! kiln-core's kernels in xtask: the `inpaint_convae_train_step` benchmark, the
//! chapter's masked conv autoencoder built from kiln-core layers (which run on
//! `kiln_core::ops`), and `dcgan32_train_iter`, torch_reference.py's DCGAN
//! iteration built from kiln-gan's `dcgan32` models.

use anyhow::Result;
use kiln_core::loss::{mse, Reduction};
use kiln_core::nn::{Conv2d, ConvConfig, ConvTranspose2d, MaxPool2d};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, Tensor};
use kiln_gan::loss::{minimax_d, non_saturating_g};
use kiln_gan::{is_trainable, Discriminator, Generator, ModelConfig};

use super::{Bench, Component};

/// Registers the kernels' benchmark.
pub fn component() -> Component {
    Component {
        benches: vec![
            Bench {
                name: "inpaint_convae_train_step",
                run: bench_convae,
            },
            Bench {
                name: "dcgan32_train_iter",
                run: bench_dcgan,
            },
        ],
        ..Default::default()
    }
}

/// The chapter's inpainting autoencoder, as `torch_reference.py`'s `ConvAE`.
struct ConvAe {
    c1: Conv2d,
    c2: Conv2d,
    t1: ConvTranspose2d,
    t2: ConvTranspose2d,
    pool: MaxPool2d,
}

impl ConvAe {
    fn new(vs: &VarStore, dev: &Device) -> Result<Self> {
        let vb = vs.builder(DType::F32, dev);
        Ok(Self {
            c1: Conv2d::new(3, 8, 3, ConvConfig::padding(1), vb.pp("c1"))?,
            c2: Conv2d::new(8, 32, 3, ConvConfig::padding(1), vb.pp("c2"))?,
            t1: ConvTranspose2d::new(32, 8, 2, ConvConfig::stride(2), vb.pp("t1"))?,
            t2: ConvTranspose2d::new(8, 3, 2, ConvConfig::stride(2), vb.pp("t2"))?,
            pool: MaxPool2d::new(2),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.pool.forward(&self.c1.forward_relu(x)?)?;
        let h = self.pool.forward(&self.c2.forward_relu(&h)?)?;
        let h = self.t1.forward_relu(&h)?;
        Ok(kiln_core::candle_nn::ops::sigmoid(&self.t2.forward(&h)?)?)
    }
}

fn bench_convae(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let model = ConvAe::new(&vs, &dev)?;
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0)?;
    let mut rng = SeededRng::new(0);
    let x = rng.uniform(&[32, 3, 32, 32], 0.0, 1.0, &dev)?;
    // The chapter's mask: an 8x8 hole at rows 5..13, columns 9..17.
    let mut m = vec![1f32; 32 * 32];
    for r in 5..13 {
        m[r * 32 + 9..r * 32 + 17].fill(0.0);
    }
    let mask = Tensor::from_vec(m, (1, 1, 32, 32), &dev)?;
    ctx.train_line("inpaint_convae_train_step", 32, || {
        let pred = model.forward(&x.broadcast_mul(&mask)?)?;
        let loss = mse(&pred, &x, Reduction::Mean)?;
        opt.backward_step(&loss)?;
        Ok(())
    })
}

/// One DCGAN iteration as torch_reference.py's `dcgan`: a discriminator step on
/// real and (detached) fake images, then a non-saturating generator step; Adam
/// (2e-4, betas 0.5/0.999), batch 64, 30 timed steps after 3 warm-up steps.
fn bench_dcgan(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
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
    let b = 64;
    let real = rng.uniform(&[b, 3, 32, 32], -1.0, 1.0, &dev)?;
    let ctx = super::BenchCtx {
        threads: ctx.threads,
        steps: 30,
        warm: 3,
    };
    ctx.train_line("dcgan32_train_iter", b, || {
        let fake = g.forward_t(&g.noise(b, &mut rng)?, None, true)?;
        // BCE-with-logits against ones / zeros, as the reference.
        let ld = minimax_d(
            &d.forward_t(&real, None, true)?,
            &d.forward_t(&fake.detach(), None, true)?,
        )?;
        od.backward_step(&ld)?;
        let lg = non_saturating_g(&d.forward_t(&fake, None, true)?)?;
        og.backward_step(&lg)?;
        Ok(())
    })
}
