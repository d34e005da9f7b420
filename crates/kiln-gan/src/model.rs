//! The DCGAN generator and discriminator (Radford et al. 2015), with spectral
//! normalisation, layer norm or no norm in the discriminator, and the
//! class-conditional variants (one-hot labels to G, a projection D).
//!
//! Variable names follow the PyTorch reference's `nn.Sequential` indices
//! (`net.0.weight`, `net.1.running_mean`, ... as in
//! `shared/bench/torch_reference.py`'s `DcganG`/`DcganD`), so a state dict
//! of those modules maps one to one. Spectral norm adds `weight_u` and
//! `weight_v` beside each discriminator weight (PyTorch's names); the
//! projection embedding is `embed.weight`.

use kiln_core::candle_nn::Init as CInit;
use kiln_core::nn::{BatchNorm, Conv2d, ConvConfig, ConvTranspose2d, Embedding};
use kiln_core::rng::SeededRng;
use kiln_core::{DType, Device, Module, ModuleT, Result, Tensor, Var, VarBuilder};

use crate::config::{Init, ModelConfig, Norm};

/// Slope of the discriminator's leaky ReLUs.
pub const LEAKY_SLOPE: f64 = 0.2;

/// A 4x4 DCGAN convolution's settings: no bias (a norm follows, or none is
/// needed at the output).
fn conv_cfg(stride: usize, padding: usize) -> ConvConfig {
    ConvConfig {
        stride,
        padding,
        ..ConvConfig::default()
    }
    .no_bias()
}

/// Creates the weight of a conv layer with Radford's N(0, 0.02) before the
/// layer asks for it (the layer then finds it in the store).
fn pre_init_conv(
    vb: &VarBuilder<'_>,
    shape: (usize, usize, usize, usize),
    init: Init,
) -> Result<()> {
    if init == Init::Radford {
        vb.get_with_hints(
            shape,
            "weight",
            CInit::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
    }
    Ok(())
}

/// Batch norm with Radford's N(1, 0.02) weights and zero biases, or PyTorch's 1/0.
fn batch_norm(c: usize, vb: VarBuilder<'_>, init: Init) -> Result<BatchNorm> {
    if init == Init::Radford {
        vb.get_with_hints(
            c,
            "weight",
            CInit::Randn {
                mean: 1.0,
                stdev: 0.02,
            },
        )?;
        vb.get_with_hints(c, "bias", CInit::Const(0.0))?;
    }
    BatchNorm::new(c, vb)
}

/// Whether an optimizer should train the variable `name`: everything but
/// batch-norm running statistics and spectral norm's power-iteration vectors
/// (which are updated in place and saved in checkpoints).
pub fn is_trainable(name: &str) -> bool {
    !(name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("weight_u")
        || name.ends_with("weight_v"))
}

/// `[B]` class labels as a one-hot `[B, k]` tensor of `dtype`; a label
/// outside `0..k` is an error.
pub fn one_hot(labels: &Tensor, k: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let ids = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut v = vec![0f32; ids.len() * k];
    for (i, &c) in ids.iter().enumerate() {
        if c as usize >= k {
            kiln_core::candle::bail!("label {c} is outside the model's classes 0..{k}");
        }
        v[i * k + c as usize] = 1.0;
    }
    Tensor::from_vec(v, (ids.len(), k), device)?.to_dtype(dtype)
}

/// The DCGAN generator: `z [B, nz]` (and labels in conditional mode) to
/// images `[B, channels, image_size, image_size]` in `[-1, 1]`.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: ModelConfig,
    blocks: Vec<(ConvTranspose2d, Option<BatchNorm>)>,
    out: ConvTranspose2d,
    dtype: DType,
    device: Device,
}

impl Generator {
    /// Builds the generator of `cfg` in `vb` (fresh weights drawn with
    /// `cfg.init`, or existing ones when the store has them).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let n = cfg.depth();
        let net = vb.pp("net");
        let mut prev = cfg.nz + cfg.num_classes.unwrap_or(0);
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let width = cfg.ngf << (n - 1 - i);
            // 1x1 -> 4x4 first, then doubling the side.
            let c = if i == 0 {
                conv_cfg(1, 0)
            } else {
                conv_cfg(2, 1)
            };
            let vbi = net.pp(3 * i);
            pre_init_conv(&vbi, (prev, width, 4, 4), cfg.init)?;
            let conv = ConvTranspose2d::new(prev, width, 4, c, vbi)?;
            let bn = match cfg.g_norm {
                Norm::Batch => Some(batch_norm(width, net.pp(3 * i + 1), cfg.init)?),
                _ => None,
            };
            blocks.push((conv, bn));
            prev = width;
        }
        let vbo = net.pp(3 * n);
        pre_init_conv(&vbo, (prev, cfg.channels, 4, 4), cfg.init)?;
        let out = ConvTranspose2d::new(prev, cfg.channels, 4, conv_cfg(2, 1), vbo)?;
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            out,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Images from latents `z [B, nz]` (or `[B, nz, 1, 1]`); `labels [B]`
    /// are required in conditional mode and ignored otherwise. With `train`,
    /// batch norm uses the batch's statistics and updates its running ones.
    pub fn forward_t(&self, z: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut h = z.reshape((b, self.cfg.nz))?;
        if let Some(k) = self.cfg.num_classes {
            let Some(y) = labels else {
                kiln_core::candle::bail!("a conditional generator needs labels");
            };
            h = Tensor::cat(&[&h, &one_hot(y, k, h.dtype(), h.device())?], 1)?;
        }
        let mut h = h.reshape((b, (), 1, 1))?;
        for (conv, bn) in &self.blocks {
            h = match bn {
                Some(bn) => bn.forward_act_t(&conv.forward(&h)?, train, 0.0)?,
                None => conv.forward_relu(&h)?,
            };
        }
        kiln_core::ops::tanh(&self.out.forward(&h)?)
    }

    /// `n` latents `[n, nz]` from N(0, 1), drawn from `rng`.
    pub fn noise(&self, n: usize, rng: &mut SeededRng) -> Result<Tensor> {
        rng.normal(&[n, self.cfg.nz], 0.0, 1.0, &self.device)?
            .to_dtype(self.dtype)
    }

    /// `n` new images in evaluation mode (batch norm with running statistics).
    pub fn sample(&self, n: usize, labels: Option<&Tensor>, rng: &mut SeededRng) -> Result<Tensor> {
        let z = self.noise(n, rng)?;
        self.forward_t(&z, labels, false)
    }
}

/// Spectral normalisation of one weight (Miyato et al. 2018): the weight is
/// divided by an estimate `sigma = u^T W v` of its largest singular value,
/// where `W` is the weight as a matrix `[out, in * kh * kw]` and `u`, `v` are
/// kept from one power iteration to the next. `u` and `v` are variables of
/// the store (`weight_u`, `weight_v`), so checkpoints carry them; they get
/// no gradient (`sigma`'s gradient reaches `W` only, as in PyTorch).
#[derive(Debug, Clone)]
pub struct SpectralNorm {
    u: Var,
    v: Var,
}

/// `x / max(||x||, 1e-12)` (PyTorch's `normalize`).
fn normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_all()?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&n)
}

impl SpectralNorm {
    /// Power-iteration vectors for a weight `w [out, ...]`, drawn N(0, 1),
    /// normalised, then refined by 15 power iterations (as PyTorch does when
    /// the norm is registered).
    pub fn new(w: &Tensor, vb: VarBuilder<'_>) -> Result<Self> {
        let out = w.dim(0)?;
        let n = w.elem_count() / out.max(1);
        let std = CInit::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let u = Var::from_tensor(&vb.get_with_hints(out, "weight_u", std)?)?;
        let v = Var::from_tensor(&vb.get_with_hints(n, "weight_v", std)?)?;
        u.set(&normalize(u.as_tensor())?)?;
        v.set(&normalize(v.as_tensor())?)?;
        let sn = Self { u, v };
        for _ in 0..15 {
            sn.power_iteration(w)?;
        }
        Ok(sn)
    }

    fn matrix(w: &Tensor) -> Result<Tensor> {
        let out = w.dim(0)?;
        w.reshape((out, ()))
    }

    /// One power iteration on the current weight: `v = normalize(W^T u)`,
    /// `u = normalize(W v)`.
    pub fn power_iteration(&self, w: &Tensor) -> Result<()> {
        let wm = Self::matrix(&w.detach())?;
        let u = self.u.as_tensor().detach().unsqueeze(1)?;
        let v = normalize(&wm.t()?.matmul(&u)?)?;
        let u = normalize(&wm.matmul(&v)?)?;
        self.v.set(&v.squeeze(1)?)?;
        self.u.set(&u.squeeze(1)?)?;
        Ok(())
    }

    /// `sigma = u^T W v`, a scalar tensor whose gradient reaches `w`.
    pub fn sigma(&self, w: &Tensor) -> Result<Tensor> {
        let wm = Self::matrix(w)?;
        let u = self.u.as_tensor().detach().unsqueeze(0)?;
        let v = self.v.as_tensor().detach().unsqueeze(1)?;
        u.matmul(&wm)?.matmul(&v)?.reshape(())
    }

    /// `w / sigma`.
    pub fn normalized(&self, w: &Tensor) -> Result<Tensor> {
        w.broadcast_div(&self.sigma(w)?)
    }
}

/// The normalisation after a hidden discriminator convolution.
#[derive(Debug, Clone)]
enum DNorm {
    None,
    Batch(BatchNorm),
    /// Layer norm over `[C, H, W]`, element-wise affine `[C * H * W]`.
    Layer {
        weight: Tensor,
        bias: Tensor,
    },
}

impl DNorm {
    /// The normalisation, then the leaky ReLU (fused with a batch norm).
    fn forward_leaky(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            DNorm::Batch(bn) => bn.forward_act_t(h, train, LEAKY_SLOPE),
            _ => kiln_core::ops::leaky_relu(&self.forward(h, train)?, LEAKY_SLOPE),
        }
    }

    fn forward(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            DNorm::None => Ok(h.clone()),
            DNorm::Batch(bn) => bn.forward_t(h, train),
            DNorm::Layer { weight, bias } => {
                let dims = h.dims().to_vec();
                let flat = h.reshape((dims[0], ()))?;
                let (w, b) = (kiln_core::nn::param(weight), kiln_core::nn::param(bias));
                kiln_core::nn::layer_norm(&flat, &w, &b, 1e-5)?.reshape(dims)
            }
        }
    }
}

/// A discriminator convolution, spectrally normalised or not.
#[derive(Debug, Clone)]
struct DConv {
    conv: Conv2d,
    stride: usize,
    padding: usize,
    sn: Option<SpectralNorm>,
}

impl DConv {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        padding: usize,
        cfg: &ModelConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        pre_init_conv(&vb, (cout, cin, 4, 4), cfg.init)?;
        let conv = Conv2d::new(cin, cout, 4, conv_cfg(stride, padding), vb.clone())?;
        let sn = cfg
            .spectral_norm
            .then(|| SpectralNorm::new(conv.weight(), vb))
            .transpose()?;
        Ok(Self {
            conv,
            stride,
            padding,
            sn,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.sn {
            None => self.conv.forward(x),
            Some(sn) => {
                let w = sn.normalized(&kiln_core::nn::param(self.conv.weight()))?;
                kiln_core::ops::conv2d(x, &w, self.stride, self.padding, 1, 1)
            }
        }
    }

    fn power_iteration(&self) -> Result<()> {
        match &self.sn {
            Some(sn) => sn.power_iteration(self.conv.weight()),
            None => Ok(()),
        }
    }
}

/// The DCGAN discriminator: images `[B, C, H, W]` in `[-1, 1]` (and labels
/// in conditional mode) to one logit per image, `[B]`.
#[derive(Debug, Clone)]
pub struct Discriminator {
    cfg: ModelConfig,
    layers: Vec<(DConv, DNorm)>,
    out: DConv,
    embed: Option<Embedding>,
}

impl Discriminator {
    /// Builds the discriminator of `cfg` in `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let n = cfg.depth();
        let net = vb.pp("net");
        let mut layers = Vec::with_capacity(n);
        let mut prev = cfg.channels;
        let mut side = cfg.image_size;
        // Sequential indices: conv 0, act 1, then (conv, norm, act) triples.
        let mut idx = 0;
        for i in 0..n {
            let width = cfg.ndf << i;
            let conv = DConv::new(prev, width, 2, 1, cfg, net.pp(idx))?;
            side /= 2;
            let norm = if i == 0 {
                DNorm::None
            } else {
                match cfg.d_norm {
                    Norm::None => DNorm::None,
                    Norm::Batch => DNorm::Batch(batch_norm(width, net.pp(idx + 1), cfg.init)?),
                    Norm::Layer => {
                        let vbn = net.pp(idx + 1);
                        let len = width * side * side;
                        DNorm::Layer {
                            weight: vbn.get_with_hints(len, "weight", CInit::Const(1.0))?,
                            bias: vbn.get_with_hints(len, "bias", CInit::Const(0.0))?,
                        }
                    }
                }
            };
            layers.push((conv, norm));
            idx += if i == 0 { 2 } else { 3 };
            prev = width;
        }
        let out = DConv::new(prev, 1, 1, 0, cfg, net.pp(idx))?;
        let embed = match cfg.num_classes {
            Some(k) => {
                let vbe = vb.pp("embed");
                if cfg.init == Init::Radford {
                    vbe.get_with_hints(
                        (k, prev),
                        "weight",
                        CInit::Randn {
                            mean: 0.0,
                            stdev: 0.02,
                        },
                    )?;
                }
                Some(Embedding::new(k, prev, vbe)?)
            }
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            layers,
            out,
            embed,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// One logit per image, `[B]`. In conditional mode `labels [B]` are
    /// required: the logit is `psi(phi(x)) + <embed(y), sum_hw phi(x)>`
    /// (the projection discriminator). With `train`, batch norm uses the
    /// batch's statistics. Spectral norm uses its current `u`, `v` (see
    /// [`Discriminator::power_iteration`]).
    pub fn forward_t(&self, x: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, norm) in &self.layers {
            h = norm.forward_leaky(&conv.forward(&h)?, train)?;
        }
        let logit = self.out.forward(&h)?.flatten_all()?;
        match &self.embed {
            None => Ok(logit),
            Some(e) => {
                let Some(y) = labels else {
                    kiln_core::candle::bail!("a conditional discriminator needs labels");
                };
                let phi = h.sum((2, 3))?;
                let ey = e.forward(&y.to_dtype(DType::U32)?)?;
                logit + (phi * ey)?.sum(1)?
            }
        }
    }

    /// One power iteration of every spectrally normalised layer (nothing
    /// without spectral norm). The trainer calls it once per discriminator
    /// step, so every forward within a step (real, fake, penalty) uses the
    /// same normalisation.
    pub fn power_iteration(&self) -> Result<()> {
        for (conv, _) in &self.layers {
            conv.power_iteration()?;
        }
        self.out.power_iteration()
    }

    /// The spectral-norm estimates `sigma` of every layer, in order (empty
    /// without spectral norm).
    pub fn sigmas(&self) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for c in self.layers.iter().map(|(c, _)| c).chain([&self.out]) {
            if let Some(sn) = &c.sn {
                out.push(
                    sn.sigma(c.conv.weight())?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_core::vars::VarStore;

    fn small(size: usize) -> ModelConfig {
        ModelConfig {
            image_size: size,
            nz: 8,
            ngf: 4,
            ndf: 4,
            ..ModelConfig::dcgan32()
        }
    }

    /// The counts made without building match the built networks', for
    /// each option that adds or changes variables.
    #[test]
    fn parameter_counts_match_the_built_networks() {
        let mut configs = vec![ModelConfig::dcgan32(), small(8), small(64)];
        let mut c = small(16);
        c.num_classes = Some(5);
        c.spectral_norm = true;
        c.d_norm = Norm::None;
        c.channels = 1;
        configs.push(c);
        let mut c = small(32);
        c.d_norm = Norm::Layer;
        c.g_norm = Norm::None;
        c.init = Init::Pytorch;
        configs.push(c);
        for cfg in configs {
            let (gv, dv) = (VarStore::new(0), VarStore::new(1));
            Generator::new(&cfg, gv.builder(DType::F32, &Device::Cpu)).unwrap();
            Discriminator::new(&cfg, dv.builder(DType::F32, &Device::Cpu)).unwrap();
            assert_eq!(cfg.generator_params(), gv.num_params() as u64, "{cfg:?}");
            assert_eq!(
                cfg.discriminator_params(),
                dv.num_params() as u64,
                "{cfg:?}"
            );
        }
    }

    #[test]
    fn shapes_and_names_follow_the_reference() {
        let dev = Device::Cpu;
        for (cfg, side) in [(ModelConfig::dcgan32(), 32), (small(64), 64), (small(8), 8)] {
            let (gv, dv) = (VarStore::new(0), VarStore::new(1));
            let g = Generator::new(&cfg, gv.builder(DType::F32, &dev)).unwrap();
            let d = Discriminator::new(&cfg, dv.builder(DType::F32, &dev)).unwrap();
            let mut rng = SeededRng::new(2);
            let z = g.noise(3, &mut rng).unwrap();
            let x = g.forward_t(&z, None, true).unwrap();
            assert_eq!(x.dims(), &[3, 3, side, side]);
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
            assert_eq!(d.forward_t(&x, None, true).unwrap().dims(), &[3]);
        }
        // torch_reference.py's DcganG / DcganD state-dict names and shapes.
        let cfg = ModelConfig::dcgan32();
        let (gv, dv) = (VarStore::new(0), VarStore::new(1));
        Generator::new(&cfg, gv.builder(DType::F32, &Device::Cpu)).unwrap();
        Discriminator::new(&cfg, dv.builder(DType::F32, &Device::Cpu)).unwrap();
        let shape = |vs: &VarStore, n: &str| vs.get(n).unwrap().dims().to_vec();
        assert_eq!(shape(&gv, "net.0.weight"), [100, 256, 4, 4]);
        assert_eq!(shape(&gv, "net.1.running_var"), [256]);
        assert_eq!(shape(&gv, "net.3.weight"), [256, 128, 4, 4]);
        assert_eq!(shape(&gv, "net.6.weight"), [128, 64, 4, 4]);
        assert_eq!(shape(&gv, "net.9.weight"), [64, 3, 4, 4]);
        assert_eq!(shape(&dv, "net.0.weight"), [64, 3, 4, 4]);
        assert_eq!(shape(&dv, "net.2.weight"), [128, 64, 4, 4]);
        assert_eq!(shape(&dv, "net.3.weight"), [128]);
        assert_eq!(shape(&dv, "net.5.weight"), [256, 128, 4, 4]);
        assert_eq!(shape(&dv, "net.6.bias"), [256]);
        assert_eq!(shape(&dv, "net.8.weight"), [1, 256, 4, 4]);
        // Parameter counts of the PyTorch modules (sum of p.numel() over
        // parameters(), running statistics excluded).
        let trainable = |vs: &VarStore| -> usize {
            vs.vars_where(is_trainable)
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        assert_eq!(trainable(&gv), 1_068_928);
        assert_eq!(trainable(&dv), 663_296);
    }

    /// The generator step through a frozen discriminator (`nn::frozen`): the
    /// generator's gradients are bit for bit those of the unfrozen pass, and
    /// the discriminator's weights get none, for every discriminator kind
    /// (batch norm, layer norm + spectral norm, conditional projection).
    #[test]
    fn frozen_discriminator_gives_the_same_generator_gradients_and_none_of_its_own() {
        let dev = Device::Cpu;
        let kinds = [
            small(8),
            ModelConfig {
                d_norm: Norm::Layer,
                spectral_norm: true,
                ..small(8)
            },
            ModelConfig {
                num_classes: Some(3),
                ..small(8)
            },
        ];
        for cfg in kinds {
            let (gv, dv) = (VarStore::new(0), VarStore::new(1));
            let g = Generator::new(&cfg, gv.builder(DType::F32, &dev)).unwrap();
            let d = Discriminator::new(&cfg, dv.builder(DType::F32, &dev)).unwrap();
            let mut rng = SeededRng::new(2);
            let z = g.noise(4, &mut rng).unwrap();
            let y = cfg
                .num_classes
                .map(|_| Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap());
            let grads = |frozen: bool| {
                let x = g.forward_t(&z, y.as_ref(), true).unwrap();
                let run = || d.forward_t(&x, y.as_ref(), true).unwrap();
                let logit = if frozen {
                    kiln_core::nn::frozen(run)
                } else {
                    run()
                };
                assert!(!kiln_core::nn::is_frozen());
                logit.sum_all().unwrap().backward().unwrap()
            };
            let (plain, frozen) = (grads(false), grads(true));
            for (name, v) in gv.vars_where(is_trainable) {
                let a = plain.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                let b = frozen.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                assert_eq!(
                    a.to_vec1::<f32>().unwrap(),
                    b.to_vec1::<f32>().unwrap(),
                    "{name}"
                );
            }
            for (name, v) in dv.vars_where(is_trainable) {
                assert!(plain.get(v.as_tensor()).is_some(), "{name} unfrozen");
                assert!(frozen.get(v.as_tensor()).is_none(), "{name} frozen");
            }
        }
    }

    /// Radford's init: conv weights N(0, 0.02), batch-norm weights N(1, 0.02),
    /// biases 0; the PyTorch init: kaiming-uniform bounds, batch norm 1/0.
    #[test]
    fn inits_have_the_stated_moments() {
        let stats = |t: &Tensor| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let n = v.len() as f64;
            let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let s = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
            let max = v.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
            (m, s, max)
        };
        let vs = VarStore::new(3);
        Generator::new(
            &ModelConfig::dcgan32(),
            vs.builder(DType::F32, &Device::Cpu),
        )
        .unwrap();
        // 409 600 draws: the mean's standard error is 0.02 / 640.
        let (m, s, _) = stats(vs.get("net.0.weight").unwrap().as_tensor());
        assert!(m.abs() < 2e-4 && (s - 0.02).abs() < 2e-4, "{m} {s}");
        let (m, s, _) = stats(vs.get("net.1.weight").unwrap().as_tensor());
        assert!(
            (m - 1.0).abs() < 0.01 && (s - 0.02).abs() < 0.005,
            "{m} {s}"
        );
        assert_eq!(stats(vs.get("net.1.bias").unwrap().as_tensor()).2, 0.0);
        let cfg = ModelConfig {
            init: Init::Pytorch,
            ..ModelConfig::dcgan32()
        };
        let vs = VarStore::new(3);
        Discriminator::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
        // kaiming_uniform(a = sqrt(5)): bound 1 / sqrt(fan_in), fan_in = 64 * 16.
        let (_, s, max) = stats(vs.get("net.2.weight").unwrap().as_tensor());
        let bound = 1.0 / (64.0f64 * 16.0).sqrt();
        assert!(max <= bound && max > 0.99 * bound, "{max} {bound}");
        assert!((s - bound / 3f64.sqrt()).abs() < 0.01 * bound, "{s}");
        let (m, s, _) = stats(vs.get("net.3.weight").unwrap().as_tensor());
        assert_eq!((m, s), (1.0, 0.0));
    }

    #[test]
    fn conditional_models_use_their_labels() {
        let cfg = ModelConfig {
            num_classes: Some(3),
            ..small(16)
        };
        let (gv, dv) = (VarStore::new(0), VarStore::new(1));
        let g = Generator::new(&cfg, gv.builder(DType::F32, &Device::Cpu)).unwrap();
        let d = Discriminator::new(&cfg, dv.builder(DType::F32, &Device::Cpu)).unwrap();
        let z = g.noise(2, &mut SeededRng::new(1)).unwrap();
        let z = Tensor::cat(&[&z.narrow(0, 0, 1).unwrap(); 2], 0).unwrap();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let x = g.forward_t(&z, Some(&y), false).unwrap();
        let diff = (x.get(0).unwrap() - x.get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff > 0.0,
            "the same z with other labels gave the same image"
        );
        let same = Tensor::cat(&[&x.narrow(0, 0, 1).unwrap(); 2], 0).unwrap();
        let l = d
            .forward_t(&same, Some(&y), false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(l[0], l[1]);
        assert!(g.forward_t(&z, None, false).is_err());
        let bad = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        assert!(g.forward_t(&z, Some(&bad), false).is_err());
    }
}
