//! GAN configuration: architecture presets, losses, stabilisers and
//! optimisation, with validation that names the bad field. A run's
//! `config.toml` holds a [`RunConfig`].

use serde::{Deserialize, Serialize};

use crate::error::{config_err, Result};

/// How weights are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Radford et al. (as pytorch/examples' `weights_init`): conv weights
    /// N(0, 0.02), batch-norm weights N(1, 0.02) and biases 0, projection
    /// embeddings N(0, 0.02).
    #[default]
    Radford,
    /// PyTorch's default init of each layer (kaiming-uniform convs, batch norm
    /// 1/0, embeddings N(0, 1)).
    Pytorch,
}

/// The normalisation after each hidden convolution (the first discriminator
/// layer and the output layers never have one, as in DCGAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Batch norm (DCGAN's).
    Batch,
    /// Layer norm over each sample's `[C, H, W]` (WGAN-GP's critic).
    Layer,
    /// None.
    None,
}

/// Generator and discriminator architecture (DCGAN family).
///
/// The generator maps `z [B, nz]` (plus a one-hot label in conditional mode)
/// through a 4x4 transposed convolution to `[B, ngf * 2^(n-1), 4, 4]`, then
/// `n - 1` stride-2 transposed convolutions halving the channels, each with
/// batch norm and ReLU, then a stride-2 transposed convolution to `channels`
/// and tanh, where `n = log2(image_size / 4)`. The discriminator mirrors it:
/// `n` stride-2 4x4 convolutions doubling the channels from `ndf` (norm after
/// all but the first, leaky ReLU 0.2), then a 4x4 convolution to one logit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Image side (a power of two from 8 to 256; 32 for dcgan32, 64 for dcgan64).
    pub image_size: usize,
    /// Image channels (1 or 3).
    pub channels: usize,
    /// Latent dimension (100).
    pub nz: usize,
    /// Generator width: channels of its last hidden layer (64).
    pub ngf: usize,
    /// Discriminator width: channels of its first layer (64).
    pub ndf: usize,
    /// Normalisation in the generator (`batch` or `none`).
    pub g_norm: Norm,
    /// Normalisation in the discriminator; `batch` is not allowed with a
    /// gradient penalty (the penalty is per sample).
    pub d_norm: Norm,
    /// Spectral normalisation of every discriminator convolution (Miyato et al. 2018).
    pub spectral_norm: bool,
    /// Weight initialisation.
    pub init: Init,
    /// Class-conditional mode: labels go to the generator (one-hot,
    /// concatenated to z) and to a projection discriminator (Miyato &
    /// Koyama 2018).
    pub num_classes: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::dcgan32()
    }
}

impl ModelConfig {
    /// The DCGAN of `shared/bench/torch_reference.py` at 32x32: nz 100,
    /// ngf = ndf = 64, batch norm in both networks.
    pub fn dcgan32() -> Self {
        Self {
            image_size: 32,
            channels: 3,
            nz: 100,
            ngf: 64,
            ndf: 64,
            g_norm: Norm::Batch,
            d_norm: Norm::Batch,
            spectral_norm: false,
            init: Init::Radford,
            num_classes: None,
        }
    }

    /// The DCGAN of pytorch/examples at 64x64 (one more layer each side,
    /// widths up to `8 * ngf`).
    pub fn dcgan64() -> Self {
        Self {
            image_size: 64,
            ..Self::dcgan32()
        }
    }

    /// A preset by name: `dcgan32` or `dcgan64`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "dcgan32" => Ok(Self::dcgan32()),
            "dcgan64" => Ok(Self::dcgan64()),
            other => Err(config_err(
                "preset",
                format!("unknown preset {other:?}; expected dcgan32 or dcgan64"),
            )),
        }
    }

    /// Scalars the generator of this config holds (weights, and batch
    /// norm's running statistics), computed without building it: to size a
    /// model before it is made. Saturating, as widths come from files.
    pub fn generator_params(&self) -> u64 {
        let n = self.depth();
        let conv = |i: usize, o: usize| (i as u64).saturating_mul(o as u64).saturating_mul(16);
        let mut prev = self.nz.saturating_add(self.num_classes.unwrap_or(0));
        let mut total = 0u64;
        for i in 0..n {
            let width = self
                .ngf
                .checked_shl((n - 1 - i) as u32)
                .unwrap_or(usize::MAX);
            total = total.saturating_add(conv(prev, width));
            if self.g_norm == Norm::Batch {
                // weight, bias, running mean and variance.
                total = total.saturating_add((width as u64).saturating_mul(4));
            }
            prev = width;
        }
        total.saturating_add(conv(prev, self.channels))
    }

    /// Scalars the discriminator of this config holds (weights, norms'
    /// statistics, spectral norm's `u` and `v`, the class embedding),
    /// computed without building it. Saturating.
    pub fn discriminator_params(&self) -> u64 {
        let n = self.depth();
        let conv = |i: usize, o: usize| {
            let w = (i as u64).saturating_mul(o as u64).saturating_mul(16);
            // Spectral norm keeps u [out] and v [in * 16].
            let sn = match self.spectral_norm {
                true => (o as u64).saturating_add((i as u64).saturating_mul(16)),
                false => 0,
            };
            w.saturating_add(sn)
        };
        let (mut prev, mut side, mut total) = (self.channels, self.image_size, 0u64);
        for i in 0..n {
            let width = self.ndf.checked_shl(i as u32).unwrap_or(usize::MAX);
            total = total.saturating_add(conv(prev, width));
            side /= 2;
            if i > 0 {
                let norm = match self.d_norm {
                    Norm::Batch => (width as u64).saturating_mul(4),
                    Norm::Layer => (width as u64).saturating_mul((2 * side * side) as u64),
                    Norm::None => 0,
                };
                total = total.saturating_add(norm);
            }
            prev = width;
        }
        let embed = (self.num_classes.unwrap_or(0) as u64).saturating_mul(prev as u64);
        total.saturating_add(conv(prev, 1)).saturating_add(embed)
    }

    /// Output elements of the generator's layers for one image (its
    /// `ngf * 2^k` maps from 4x4 up, and the image). Saturating.
    fn generator_outputs(&self) -> u64 {
        let n = self.depth();
        let image = (self.channels as u64).saturating_mul((self.image_size as u64).pow(2));
        (0..n).fold(image, |acc, i| {
            let width = self
                .ngf
                .checked_shl((n - 1 - i) as u32)
                .unwrap_or(usize::MAX);
            let side = 4u64 << i;
            acc.saturating_add((width as u64).saturating_mul(side * side))
        })
    }

    /// Elements of the discriminator's input and layer outputs for one
    /// image. Saturating.
    fn discriminator_outputs(&self) -> u64 {
        let image = (self.channels as u64).saturating_mul((self.image_size as u64).pow(2));
        (0..self.depth()).fold(image, |acc, i| {
            let width = self.ndf.checked_shl(i as u32).unwrap_or(usize::MAX);
            let side = (self.image_size >> (i + 1)) as u64;
            acc.saturating_add((width as u64).saturating_mul(side * side))
        })
    }

    /// About how many bytes one training iteration holds at its peak per
    /// image of a batch, on top of the weights and optimizer state: the
    /// generator's graph (kept from the discriminator's step to its own),
    /// the discriminator's graphs on real and generated images with their
    /// convolutions' unfolded inputs, and the gradients in flight.
    /// `penalty`: R1 or WGAN-GP, whose central difference runs the
    /// discriminator on two more copies of the batch.
    ///
    /// Floats per output element (3 for the generator's; 8.5 for the
    /// discriminator's, 9.5 with layer norm, 6.5 more with a penalty) were
    /// measured with a counting allocator on 16x16 to 64x64 models of
    /// widths 16 to 128; the estimate lies within 1.0 to 1.25 times the
    /// measured peak (`tests/activation_memory.rs` checks three).
    pub fn training_bytes_per_image(&self, penalty: bool) -> u64 {
        let d_halves = match (self.d_norm, penalty) {
            (Norm::Layer, false) => 19,
            (_, false) => 17,
            (Norm::Layer, true) => 32,
            (_, true) => 30,
        };
        let halves = self
            .generator_outputs()
            .saturating_mul(6)
            .saturating_add(self.discriminator_outputs().saturating_mul(d_halves));
        // Half-floats to bytes.
        halves.saturating_mul(2)
    }

    /// Stride-2 layers on each side: `log2(image_size / 4)`.
    pub fn depth(&self) -> usize {
        (self.image_size / 4).max(1).trailing_zeros() as usize
    }

    /// Checks every field, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(8..=256).contains(&self.image_size) || !self.image_size.is_power_of_two() {
            return Err(config_err(
                "model.image_size",
                format!(
                    "expected a power of two from 8 to 256, found {}",
                    self.image_size
                ),
            ));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(config_err(
                "model.channels",
                format!("expected 1 or 3, found {}", self.channels),
            ));
        }
        for (f, v) in [
            ("model.nz", self.nz),
            ("model.ngf", self.ngf),
            ("model.ndf", self.ndf),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(config_err(f, format!("expected 1..=65536, found {v}")));
            }
        }
        if self.g_norm == Norm::Layer {
            return Err(config_err(
                "model.g_norm",
                "expected batch or none (layer norm is for the discriminator)",
            ));
        }
        if let Some(k) = self.num_classes {
            if k < 2 {
                return Err(config_err(
                    "model.num_classes",
                    format!("a conditional GAN needs at least 2 classes, found {k}"),
                ));
            }
        }
        Ok(())
    }
}

/// The adversarial objective. Every loss that takes a logarithm is written
/// with softplus, so saturated logits give finite losses and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Goodfellow et al.'s minimax game with the saturating generator loss
    /// `E[log(1 - D(G(z)))]` (= `-softplus(logit)`).
    Minimax,
    /// The minimax discriminator loss with the non-saturating generator loss
    /// `-E[log D(G(z))]` (= `softplus(-logit)`): DCGAN's.
    NonSaturating,
    /// Least squares (Mao et al. 2017): D regresses real to 1 and fake to 0,
    /// G pushes fake to 1, each term halved.
    LeastSquares,
    /// Hinge (Lim & Ye 2017; SNGAN, BigGAN): `relu(1 - D(x)) + relu(1 + D(G(z)))`
    /// for D, `-D(G(z))` for G.
    Hinge,
    /// Wasserstein (Arjovsky et al. 2017): the critic maximises
    /// `D(x) - D(G(z))`; its weights are clipped to `[-clip, clip]` after each
    /// step unless a gradient penalty or spectral norm keeps it Lipschitz.
    Wasserstein,
}

impl LossKind {
    /// Parses `minimax`, `non-saturating` (`ns`), `least-squares` (`ls`),
    /// `hinge` or `wasserstein` (`wgan`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "minimax" | "saturating" => Self::Minimax,
            "non-saturating" | "ns" => Self::NonSaturating,
            "least-squares" | "ls" | "lsgan" => Self::LeastSquares,
            "hinge" => Self::Hinge,
            "wasserstein" | "wgan" => Self::Wasserstein,
            other => {
                return Err(config_err(
                    "train.loss",
                    format!(
                        "unknown loss {other:?}; expected minimax, non-saturating, \
                         least-squares, hinge or wasserstein"
                    ),
                ))
            }
        })
    }

    /// Whether D's output is a classifier logit whose sigmoid is a
    /// probability, so "D(x) > 0.99" means something (minimax,
    /// non-saturating, hinge).
    pub fn is_classifier(self) -> bool {
        matches!(self, Self::Minimax | Self::NonSaturating | Self::Hinge)
    }
}

/// A gradient penalty on the discriminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PenaltyKind {
    /// No penalty.
    None,
    /// R1 (Mescheder et al. 2018): `weight / 2 * E ||grad_x D(x)||^2` on real images.
    R1,
    /// WGAN-GP (Gulrajani et al. 2017): `weight * E (||grad_x D(x^)|| - 1)^2`
    /// on random interpolates of real and generated images.
    WganGp,
}

impl PenaltyKind {
    /// Parses `none`, `r1` or `wgan-gp` (`gp`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Self::None,
            "r1" => Self::R1,
            "wgan-gp" | "gp" => Self::WganGp,
            other => {
                return Err(config_err(
                    "train.penalty",
                    format!("unknown penalty {other:?}; expected none, r1 or wgan-gp"),
                ))
            }
        })
    }
}

/// One DiffAugment transform (Zhao et al. 2020), applied with the same
/// random draws' distribution to real and generated images, differentiably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// Random brightness, saturation and contrast per image.
    Color,
    /// A random shift of up to 1/8 of the side, zero-filled.
    Translation,
    /// A zeroed square of half the side at a random position.
    Cutout,
}

impl Augment {
    /// Parses a comma-separated policy such as `color,translation,cutout`
    /// (empty or `none`: no augmentation).
    pub fn parse_policy(s: &str) -> Result<Vec<Self>> {
        if s.is_empty() || s == "none" {
            return Ok(Vec::new());
        }
        s.split(',')
            .map(|p| match p.trim() {
                "color" | "colour" => Ok(Self::Color),
                "translation" => Ok(Self::Translation),
                "cutout" => Ok(Self::Cutout),
                other => Err(config_err(
                    "train.augment",
                    format!(
                        "unknown augmentation {other:?}; expected color, translation or cutout"
                    ),
                )),
            })
            .collect()
    }
}

/// An exponential moving average of the generator's weights and batch-norm
/// running statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// `ema = decay * ema + (1 - decay) * g` after each generator step (0.999).
    pub decay: f64,
    /// Generator steps before averaging starts; until then the copy follows G
    /// exactly.
    pub start: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.999,
            start: 1000,
        }
    }
}

/// Optimisation and training settings (DCGAN's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Images per discriminator step (64). One loader batch holds
    /// `batch_size * n_critic` real images.
    pub batch_size: usize,
    /// Generator Adam learning rate (2e-4).
    pub lr_g: f64,
    /// Discriminator Adam learning rate (2e-4).
    pub lr_d: f64,
    /// Adam beta1 (0.5).
    pub beta1: f64,
    /// Adam beta2 (0.999).
    pub beta2: f64,
    /// The adversarial loss.
    pub loss: LossKind,
    /// Weight clipping bound for the Wasserstein loss (0.01); 0 turns
    /// clipping off (when a penalty or spectral norm is used instead).
    pub clip: f64,
    /// Discriminator steps per generator step (1; WGAN uses 5).
    pub n_critic: usize,
    /// Gradient penalty.
    pub penalty: PenaltyKind,
    /// Weight of the penalty (R1's gamma, WGAN-GP's lambda; 10).
    pub penalty_weight: f64,
    /// Step of the finite-difference Hessian-vector product behind the
    /// penalty, as a length in input space (each sample moves by this along
    /// its unit input gradient; 1e-2).
    pub fd_step: f64,
    /// EMA copy of the generator, if any.
    pub ema: Option<EmaConfig>,
    /// DiffAugment policy (empty: none).
    pub augment: Vec<Augment>,
    /// Seed of weights, data order, noise and augmentation.
    pub seed: u64,
    /// The dataset, as given on the command line (recorded for `sample`).
    pub dataset: String,
    /// Stop when D(x) > `collapse_real` and D(G(z)) < `collapse_fake` for this
    /// many steps in a row (200; 0 turns the check off). Applies to the
    /// classifier losses (minimax, non-saturating, hinge); NaN always stops.
    pub collapse_window: u64,
    /// The D(x) threshold of the collapse check (0.99).
    pub collapse_real: f64,
    /// Evaluate FID every this many epochs with the extractor given to
    /// [`train_with_eval`](crate::train::train_with_eval) (0: never), keeping
    /// the best generator in `checkpoints/best-fid.safetensors`.
    #[serde(default)]
    pub eval_every: u64,
    /// The D(G(z)) threshold of the collapse check (0.01).
    pub collapse_fake: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 25,
            batch_size: 64,
            lr_g: 2e-4,
            lr_d: 2e-4,
            beta1: 0.5,
            beta2: 0.999,
            loss: LossKind::NonSaturating,
            clip: 0.01,
            n_critic: 1,
            penalty: PenaltyKind::None,
            penalty_weight: 10.0,
            fd_step: 1e-2,
            ema: None,
            augment: Vec::new(),
            seed: 0,
            dataset: "synthetic-flowers".into(),
            collapse_window: 200,
            collapse_real: 0.99,
            collapse_fake: 0.01,
            eval_every: 0,
        }
    }
}

impl TrainConfig {
    /// Rejects settings that cannot train, naming the field and its range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(config_err("train.epochs", "expected at least 1, found 0"));
        }
        if self.batch_size < 2 {
            return Err(config_err(
                "train.batch_size",
                format!(
                    "expected at least 2 (batch statistics), found {}",
                    self.batch_size
                ),
            ));
        }
        if self.n_critic == 0 || self.n_critic > 100 {
            return Err(config_err(
                "train.n_critic",
                format!("expected 1..=100, found {}", self.n_critic),
            ));
        }
        for (f, v) in [("train.lr_g", self.lr_g), ("train.lr_d", self.lr_d)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(config_err(
                    f,
                    format!("expected a positive number, found {v}"),
                ));
            }
        }
        for (f, v) in [("train.beta1", self.beta1), ("train.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(config_err(
                    f,
                    format!("expected a value in [0, 1), found {v}"),
                ));
            }
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return Err(config_err(
                "train.clip",
                format!("expected a number >= 0, found {}", self.clip),
            ));
        }
        if !(self.penalty_weight.is_finite() && self.penalty_weight > 0.0) {
            return Err(config_err(
                "train.penalty_weight",
                format!("expected a positive number, found {}", self.penalty_weight),
            ));
        }
        if !(self.fd_step.is_finite() && self.fd_step > 0.0 && self.fd_step <= 1.0) {
            return Err(config_err(
                "train.fd_step",
                format!("expected a number in (0, 1], found {}", self.fd_step),
            ));
        }
        if let Some(e) = &self.ema {
            if !(e.decay > 0.0 && e.decay < 1.0) {
                return Err(config_err(
                    "train.ema.decay",
                    format!("expected a value in (0, 1), found {}", e.decay),
                ));
            }
        }
        for (i, a) in self.augment.iter().enumerate() {
            if self.augment[..i].contains(a) {
                return Err(config_err(
                    "train.augment",
                    format!("{a:?} is listed twice"),
                ));
            }
        }
        for (f, v) in [
            ("train.collapse_real", self.collapse_real),
            ("train.collapse_fake", self.collapse_fake),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(config_err(
                    f,
                    format!("expected a value in (0, 1), found {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// What a run's `config.toml` holds besides its `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The architecture.
    pub model: ModelConfig,
    /// The optimisation.
    pub train: TrainConfig,
}

impl RunConfig {
    /// Validates both parts and their combination.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        if self.train.penalty != PenaltyKind::None && self.model.d_norm == Norm::Batch {
            return Err(config_err(
                "model.d_norm",
                "a gradient penalty is per sample, so the discriminator cannot use batch \
                 norm; use layer or none (as the WGAN-GP paper does)",
            ));
        }
        Ok(())
    }
}

/// The config fields a resumed run may change (`--epochs` extends a run).
pub const MAY_CHANGE_ON_RESUME: &[&str] = &["train.epochs", "train.eval_every"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_serde() {
        for m in [ModelConfig::dcgan32(), ModelConfig::dcgan64()] {
            let rc = RunConfig {
                model: m,
                train: TrainConfig {
                    ema: Some(EmaConfig::default()),
                    augment: vec![Augment::Color, Augment::Cutout],
                    ..TrainConfig::default()
                },
            };
            rc.validate().unwrap();
            assert_eq!(round_trip(&rc), rc);
        }
        assert_eq!(ModelConfig::dcgan32().depth(), 3);
        assert_eq!(ModelConfig::dcgan64().depth(), 4);
    }

    fn round_trip(rc: &RunConfig) -> RunConfig {
        let v = serde_json::to_value(rc).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn bad_values_name_their_field() {
        let field = |rc: RunConfig| match rc.validate().unwrap_err() {
            crate::GanError::Config { field, .. } => field,
            e => panic!("{e}"),
        };
        let base = RunConfig {
            model: ModelConfig::dcgan32(),
            train: TrainConfig::default(),
        };
        let mut rc = base.clone();
        rc.model.image_size = 48;
        assert_eq!(field(rc), "model.image_size");
        let mut rc = base.clone();
        rc.train.lr_d = f64::NAN;
        assert_eq!(field(rc), "train.lr_d");
        let mut rc = base.clone();
        rc.train.penalty = PenaltyKind::R1;
        assert_eq!(field(rc), "model.d_norm");
        let mut rc = base.clone();
        rc.train.ema = Some(EmaConfig {
            decay: 1.0,
            start: 0,
        });
        assert_eq!(field(rc), "train.ema.decay");
        let mut rc = base.clone();
        rc.train.n_critic = 0;
        assert_eq!(field(rc), "train.n_critic");
        let mut rc = base;
        rc.model.num_classes = Some(1);
        assert_eq!(field(rc), "model.num_classes");
        assert!(LossKind::parse("wgan").is_ok());
        assert!(LossKind::parse("bce").is_err());
        assert_eq!(
            Augment::parse_policy("color,translation,cutout")
                .unwrap()
                .len(),
            3
        );
        assert!(Augment::parse_policy("flip").is_err());
    }
}
