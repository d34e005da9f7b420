//! The VAE: encoder q(z|x) = N(mean, exp(logvar)), decoder p(x|z).
//!
//! Variable names follow the PyTorch reference (`encoder.0.weight`,
//! `fc_mean.weight`, `fc_var.weight`, `decoder.4.weight`, ...), so a state
//! dict maps one to one. The decoder returns logits; the chapter's final
//! Sigmoid is applied by [`Vae::decode`] and folded into a stable
//! BCE-with-logits by the loss.

use kiln_core::nn::{Conv2d, ConvConfig, ConvTranspose2d, Linear};
use kiln_core::rng::SeededRng;
use kiln_core::{candle_nn, DType, Module, Result, Tensor, VarBuilder};

use crate::config::{Arch, Likelihood, VaeConfig};

#[derive(Debug, Clone)]
enum Encoder {
    Mlp(Vec<Linear>),
    Conv(Vec<Conv2d>),
}

#[derive(Debug, Clone)]
enum Decoder {
    Mlp(Vec<Linear>),
    Conv {
        input: Linear,
        layers: Vec<ConvTranspose2d>,
    },
}

/// Encoder outputs.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `[B, latent]`.
    pub mean: Tensor,
    /// `[B, latent]`.
    pub logvar: Tensor,
}

/// A forward pass: posterior, the latent drawn, and decoder logits.
#[derive(Debug, Clone)]
pub struct VaeOutput {
    /// q(z|x).
    pub posterior: Posterior,
    /// `z = mean + exp(logvar/2) * eps`, `[B, latent]`.
    pub z: Tensor,
    /// Decoder output before the sigmoid, `[B, C, H, W]`.
    pub logits: Tensor,
}

/// A variational autoencoder.
#[derive(Debug, Clone)]
pub struct Vae {
    cfg: VaeConfig,
    encoder: Encoder,
    fc_mean: Linear,
    fc_var: Linear,
    decoder: Decoder,
    /// Learned or fixed decoder log-variance (Gaussian likelihood).
    logvar_x: Option<Tensor>,
}

impl Vae {
    /// Builds the model; variables come from `vb` (fresh, or a checkpoint's).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder<'_>) -> Result<Self> {
        cfg.validate()
            .map_err(|e| kiln_core::candle::Error::Msg(e.to_string()))?;
        let cond = cfg.num_classes.unwrap_or(0);
        let d = cfg.input_dim();
        let (encoder, enc_out) = match cfg.arch {
            Arch::Mlp => {
                let mut layers = Vec::new();
                let mut prev = d + cond;
                for (i, &h) in cfg.hidden.iter().enumerate() {
                    layers.push(Linear::new(prev, h, vb.pp(format!("encoder.{}", 2 * i)))?);
                    prev = h;
                }
                (Encoder::Mlp(layers), prev)
            }
            Arch::Conv => {
                let mut layers = Vec::new();
                let mut prev = cfg.channels + cond;
                let conv = ConvConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                for (i, &h) in cfg.hidden.iter().enumerate() {
                    layers.push(Conv2d::new(
                        prev,
                        h,
                        4,
                        conv,
                        vb.pp(format!("encoder.{}", 2 * i)),
                    )?);
                    prev = h;
                }
                let side = cfg.image_size >> cfg.hidden.len();
                (Encoder::Conv(layers), prev * side * side)
            }
        };
        let fc_mean = Linear::new(enc_out, cfg.latent, vb.pp("fc_mean"))?;
        let fc_var = Linear::new(enc_out, cfg.latent, vb.pp("fc_var"))?;
        let decoder = match cfg.arch {
            Arch::Mlp => {
                let mut layers = Vec::new();
                let mut prev = cfg.latent + cond;
                let widths: Vec<usize> = cfg
                    .hidden
                    .iter()
                    .rev()
                    .copied()
                    .chain(std::iter::once(d))
                    .collect();
                for (i, &h) in widths.iter().enumerate() {
                    layers.push(Linear::new(prev, h, vb.pp(format!("decoder.{}", 2 * i)))?);
                    prev = h;
                }
                Decoder::Mlp(layers)
            }
            Arch::Conv => {
                let side = cfg.image_size >> cfg.hidden.len();
                let top = *cfg.hidden.last().unwrap_or(&1);
                let input =
                    Linear::new(cfg.latent + cond, top * side * side, vb.pp("decoder_input"))?;
                let conv = ConvConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                let chans: Vec<usize> = cfg
                    .hidden
                    .iter()
                    .rev()
                    .copied()
                    .chain(std::iter::once(cfg.channels))
                    .collect();
                let mut layers = Vec::new();
                for (i, w) in chans.windows(2).enumerate() {
                    layers.push(ConvTranspose2d::new(
                        w[0],
                        w[1],
                        4,
                        conv,
                        vb.pp(format!("decoder.{}", 2 * i)),
                    )?);
                }
                Decoder::Conv { input, layers }
            }
        };
        let logvar_x = match cfg.likelihood {
            Likelihood::Bernoulli => None,
            Likelihood::Gaussian {
                learned: true,
                logvar,
            } => Some(vb.get_with_hints(1, "logvar_x", candle_nn::Init::Const(logvar))?),
            Likelihood::Gaussian {
                learned: false,
                logvar,
            } => Some(Tensor::full(logvar as f32, 1, vb.device())?),
        };
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            fc_mean,
            fc_var,
            decoder,
            logvar_x,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The decoder log-variance for a Gaussian likelihood.
    pub fn logvar_x(&self) -> Option<&Tensor> {
        self.logvar_x.as_ref()
    }

    fn one_hot(
        &self,
        labels: Option<&Tensor>,
        n: usize,
        dev: &kiln_core::Device,
    ) -> Result<Option<Tensor>> {
        let Some(k) = self.cfg.num_classes else {
            return Ok(None);
        };
        let Some(l) = labels else {
            kiln_core::candle::bail!("this VAE is class-conditional ({k} classes): pass labels");
        };
        let ids = l.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if ids.len() != n {
            kiln_core::candle::bail!("expected {n} labels, got {}", ids.len());
        }
        let mut v = vec![0f32; n * k];
        for (i, &c) in ids.iter().enumerate() {
            if c as usize >= k {
                kiln_core::candle::bail!("label {c} at row {i} is outside 0..{k}");
            }
            v[i * k + c as usize] = 1.0;
        }
        Ok(Some(Tensor::from_vec(v, (n, k), dev)?))
    }

    /// q(z|x) for images `[B, C, H, W]` (labels `[B]` for a conditional VAE).
    pub fn encode(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Posterior> {
        let b = x.dim(0)?;
        let oh = self.one_hot(labels, b, x.device())?;
        let h = match &self.encoder {
            Encoder::Mlp(layers) => {
                let mut h = x.flatten_from(1)?;
                if let Some(o) = &oh {
                    h = Tensor::cat(&[&h, o], 1)?;
                }
                for l in layers {
                    h = l.forward(&h)?.relu()?;
                }
                h
            }
            Encoder::Conv(layers) => {
                let mut h = x.clone();
                if let Some(o) = &oh {
                    let (_, _, hh, ww) = x.dims4()?;
                    let planes =
                        o.unsqueeze(2)?
                            .unsqueeze(3)?
                            .broadcast_as((b, o.dim(1)?, hh, ww))?;
                    h = Tensor::cat(&[&h, &planes.contiguous()?], 1)?;
                }
                for l in layers {
                    h = l.forward(&h)?.relu()?;
                }
                h.flatten_from(1)?
            }
        };
        Ok(Posterior {
            mean: self.fc_mean.forward(&h)?,
            logvar: self.fc_var.forward(&h)?,
        })
    }

    /// Decoder logits `[B, C, H, W]` for latents `[B, latent]`.
    pub fn decode_logits(&self, z: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut h = z.clone();
        if let Some(o) = self.one_hot(labels, b, z.device())? {
            h = Tensor::cat(&[&h, &o], 1)?;
        }
        let c = &self.cfg;
        match &self.decoder {
            Decoder::Mlp(layers) => {
                let n = layers.len();
                for (i, l) in layers.iter().enumerate() {
                    h = l.forward(&h)?;
                    if i + 1 < n {
                        h = h.relu()?;
                    }
                }
                h.reshape((b, c.channels, c.image_size, c.image_size))
            }
            Decoder::Conv { input, layers } => {
                let side = c.image_size >> c.hidden.len();
                let top = *c.hidden.last().unwrap_or(&1);
                h = input.forward(&h)?.relu()?.reshape((b, top, side, side))?;
                let n = layers.len();
                for (i, l) in layers.iter().enumerate() {
                    h = l.forward(&h)?;
                    if i + 1 < n {
                        h = h.relu()?;
                    }
                }
                Ok(h)
            }
        }
    }

    /// Decoded images (the likelihood's mean, in [0, 1]).
    pub fn decode(&self, z: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.decode_logits(z, labels)?)
    }

    /// A full pass with given noise `eps` `[B, latent]` (for exact comparisons).
    pub fn forward_with_eps(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        eps: &Tensor,
    ) -> Result<VaeOutput> {
        let posterior = self.encode(x, labels)?;
        let std = (&posterior.logvar * 0.5)?.exp()?;
        let z = (&posterior.mean + (std * eps)?)?;
        let logits = self.decode_logits(&z, labels)?;
        Ok(VaeOutput {
            posterior,
            z,
            logits,
        })
    }

    /// A full pass drawing eps from `rng`.
    pub fn forward(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        rng: &mut SeededRng,
    ) -> Result<VaeOutput> {
        let eps = rng.normal(&[x.dim(0)?, self.cfg.latent], 0.0, 1.0, x.device())?;
        self.forward_with_eps(x, labels, &eps)
    }

    /// Reconstructions of `x` through the posterior mean (no sampling noise).
    pub fn reconstruct(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let p = self.encode(x, labels)?;
        self.decode(&p.mean, labels)
    }

    /// `n` new images from z ~ N(0, I) (class `labels` for a conditional VAE).
    pub fn sample(
        &self,
        n: usize,
        labels: Option<&Tensor>,
        rng: &mut SeededRng,
        dev: &kiln_core::Device,
    ) -> Result<Tensor> {
        let z = rng.normal(&[n, self.cfg.latent], 0.0, 1.0, dev)?;
        self.decode(&z, labels)
    }

    /// Decodes `steps` points on the line between the posterior means of `a`
    /// and `b` (each `[1, C, H, W]` or `[C, H, W]`), ends included.
    pub fn interpolate(
        &self,
        a: &Tensor,
        b: &Tensor,
        steps: usize,
        labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        if steps < 2 {
            kiln_core::candle::bail!("interpolate: steps must be at least 2, got {steps}");
        }
        let as4 = |t: &Tensor| {
            if t.rank() == 3 {
                t.unsqueeze(0)
            } else {
                Ok(t.clone())
            }
        };
        let za = self.encode(&as4(a)?, labels)?.mean;
        let zb = self.encode(&as4(b)?, labels)?.mean;
        let mut zs = Vec::with_capacity(steps);
        for i in 0..steps {
            let t = i as f64 / (steps - 1) as f64;
            zs.push(((&za * (1.0 - t))? + (&zb * t)?)?);
        }
        let z = Tensor::cat(&zs, 0)?;
        let lab = match labels {
            Some(l) => Some(l.repeat(steps)?),
            None => None,
        };
        self.decode(&z, lab.as_ref())
    }
}
