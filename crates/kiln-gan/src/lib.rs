//! # kiln-gan
//!
//! Generative adversarial networks (Goodfellow et al. 2014) on kiln: the
//! DCGAN of Radford et al. ([`ModelConfig::dcgan32`], exactly the DCGAN of
//! kiln's PyTorch benchmark reference, and [`ModelConfig::dcgan64`]) with
//! Radford's or PyTorch's initialisation; minimax (saturating and
//! non-saturating), least-squares, hinge and Wasserstein losses, all in
//! softplus form where they take logarithms; `n_critic` discriminator steps
//! per generator step; spectral normalisation; an EMA copy of the generator
//! (batch-norm statistics included); DiffAugment; R1 and WGAN-GP gradient
//! penalties through a finite-difference Hessian-vector product (candle has
//! no double backward); a class-conditional mode with a projection
//! discriminator; a trainer on kiln-core's session with exact resume,
//! sample grids each epoch, collapse detection and a best-FID checkpoint;
//! and sample-quality metrics in f64 ([`metrics`]: FID, KID, PRDC, Inception
//! Score, memorisation) on pytorch-fid's InceptionV3 ([`inception`]) or any
//! other [`metrics::FeatureExtractor`].
//!
//! ```
//! use kiln_core::{rng::SeededRng, vars::VarStore, DType, Device};
//! use kiln_gan::{d_loss, g_loss, Discriminator, Generator, LossKind, ModelConfig};
//!
//! // A small DCGAN at 16x16.
//! let cfg = ModelConfig { image_size: 16, nz: 16, ngf: 8, ndf: 8, ..ModelConfig::dcgan32() };
//! let (gv, dv) = (VarStore::new(0), VarStore::new(1));
//! let g = Generator::new(&cfg, gv.builder(DType::F32, &Device::Cpu))?;
//! let d = Discriminator::new(&cfg, dv.builder(DType::F32, &Device::Cpu))?;
//! let mut rng = SeededRng::new(2);
//! let fake = g.forward_t(&g.noise(4, &mut rng)?, None, true)?; // [4, 3, 16, 16] in [-1, 1]
//! let real = rng.uniform(&[4, 3, 16, 16], -1.0, 1.0, &Device::Cpu)?;
//! let ld = d_loss(
//!     LossKind::NonSaturating,
//!     &d.forward_t(&real, None, true)?,
//!     &d.forward_t(&fake.detach(), None, true)?,
//! )?;
//! let lg = g_loss(LossKind::NonSaturating, &d.forward_t(&fake, None, true)?)?;
//! assert!(ld.to_scalar::<f32>()? > 0.0 && lg.to_scalar::<f32>()? > 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod augment;
pub mod config;
pub mod ema;
pub mod error;
pub mod eval;
pub mod fid_record;
pub mod inception;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod penalty;
pub mod train;

pub use augment::diff_augment;
pub use config::{
    Augment, EmaConfig, Init, LossKind, ModelConfig, Norm, PenaltyKind, RunConfig, TrainConfig,
    MAY_CHANGE_ON_RESUME,
};
pub use ema::Ema;
pub use error::{Failure, GanError, Result};
pub use fid_record::{ExtractorSource, FidRecord, FID_RECORD_FILE};
pub use loss::{d_loss, g_loss};
pub use model::{is_trainable, Discriminator, Generator, SpectralNorm};
pub use monitor::{CollapseMonitor, Verdict};
pub use penalty::{gradient_penalty, PenaltyTerms};
pub use train::{
    load_generator, train, train_until, train_with_eval, FidEval, Gan, TrainReport, Which,
    BEST_FID_CHECKPOINT, HEALTHY_CHECKPOINT, RUN_KIND,
};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
