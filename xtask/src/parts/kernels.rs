//! kiln-core's kernels in xtask: the `inpaint_convae_train_step` benchmark, the
//! chapter's masked conv autoencoder built from kiln-core layers (which run on
//! `kiln_core::ops`).

use anyhow::Result;
use kiln_core::loss::bce_with_logits;
use kiln_core::loss::{mse, Reduction};
use kiln_core::nn::{BatchNorm, Conv2d, ConvConfig, ConvTranspose2d, MaxPool2d};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::ModuleT;
use kiln_core::{DType, Device, Module, Tensor};

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

fn bench_convae(ctx: &crate::bench::BenchCtx) -> Result<serde_json::Value> {
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

/// Stride and padding of a 4x4 DCGAN layer, without bias (a batch norm follows).
fn dcgan_cfg(stride: usize, padding: usize) -> ConvConfig {
    ConvConfig {
        stride,
        padding,
        ..ConvConfig::default()
    }
    .no_bias()
}

/// torch_reference.py's DCGAN generator at 32x32 (nz 100, ngf 64): transposed
/// convs without bias, batch norm and ReLU, then tanh.
struct DcganG {
    t: Vec<ConvTranspose2d>,
    bn: Vec<BatchNorm>,
}

impl DcganG {
    fn new(vs: &VarStore, dev: &Device) -> Result<Self> {
        let vb = vs.builder(DType::F32, dev);
        let ch = [100, 256, 128, 64, 3];
        let mut t = Vec::new();
        for i in 0..4 {
            let cfg = if i == 0 {
                dcgan_cfg(1, 0)
            } else {
                dcgan_cfg(2, 1)
            };
            t.push(ConvTranspose2d::new(
                ch[i],
                ch[i + 1],
                4,
                cfg,
                vb.pp(format!("t{i}")),
            )?);
        }
        let bn = (1..4)
            .map(|i| BatchNorm::new(ch[i], vb.pp(format!("bn{i}"))))
            .collect::<kiln_core::Result<_>>()?;
        Ok(Self { t, bn })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = z.clone();
        for (t, bn) in self.t.iter().zip(&self.bn) {
            h = kiln_core::ops::relu(&bn.forward_t(&t.forward(&h)?, true)?)?;
        }
        Ok(self.t[3].forward(&h)?.tanh()?)
    }
}

/// torch_reference.py's DCGAN discriminator (ndf 64): strided convs without
/// bias, batch norm and leaky ReLU (0.2), one logit per image.
struct DcganD {
    c: Vec<Conv2d>,
    bn: Vec<BatchNorm>,
}

impl DcganD {
    fn new(vs: &VarStore, dev: &Device) -> Result<Self> {
        let vb = vs.builder(DType::F32, dev);
        let ch = [3, 64, 128, 256, 1];
        let mut c = Vec::new();
        for i in 0..4 {
            let cfg = if i == 3 {
                dcgan_cfg(1, 0)
            } else {
                dcgan_cfg(2, 1)
            };
            c.push(Conv2d::new(
                ch[i],
                ch[i + 1],
                4,
                cfg,
                vb.pp(format!("c{i}")),
            )?);
        }
        let bn = (1..3)
            .map(|i| BatchNorm::new(ch[i + 1], vb.pp(format!("bn{i}"))))
            .collect::<kiln_core::Result<_>>()?;
        Ok(Self { c, bn })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = kiln_core::ops::leaky_relu(&self.c[0].forward(x)?, 0.2)?;
        for (c, bn) in self.c[1..3].iter().zip(&self.bn) {
            h = kiln_core::ops::leaky_relu(&bn.forward_t(&c.forward(&h)?, true)?, 0.2)?;
        }
        Ok(self.c[3].forward(&h)?.flatten_all()?)
    }
}

/// One DCGAN iteration as torch_reference.py's `dcgan`: a discriminator step on
/// real and (detached) fake images, then a non-saturating generator step; Adam
/// (2e-4, betas 0.5/0.999), batch 64, 30 timed steps after 3 warm-up steps.
fn bench_dcgan(ctx: &crate::bench::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let (vg, vd) = (VarStore::new(0), VarStore::new(1));
    let (g, d) = (DcganG::new(&vg, &dev)?, DcganD::new(&vd, &dev)?);
    let adam = OptimKind::Adam {
        betas: (0.5, 0.999),
        eps: 1e-8,
    };
    let mut og = Optimizer::single(adam, vg.vars(), 2e-4, 0.0)?;
    let mut od = Optimizer::single(adam, vd.vars(), 2e-4, 0.0)?;
    let mut rng = SeededRng::new(0);
    let b = 64;
    let real = rng.uniform(&[b, 3, 32, 32], -1.0, 1.0, &dev)?;
    let ones = Tensor::ones(b, DType::F32, &dev)?;
    let zeros = Tensor::zeros(b, DType::F32, &dev)?;
    let ctx = crate::bench::BenchCtx {
        threads: ctx.threads,
        steps: 30,
        warm: 3,
    };
    ctx.train_line("dcgan32_train_iter", b, || {
        let z = rng.normal(&[b, 100, 1, 1], 0.0, 1.0, &dev)?;
        let fake = g.forward(&z)?;
        let ld = (bce_with_logits(&d.forward(&real)?, &ones, Reduction::Mean)?
            + bce_with_logits(&d.forward(&fake.detach())?, &zeros, Reduction::Mean)?)?;
        od.backward_step(&ld)?;
        let lg = bce_with_logits(&d.forward(&fake)?, &ones, Reduction::Mean)?;
        og.backward_step(&lg)?;
        Ok(())
    })
}
