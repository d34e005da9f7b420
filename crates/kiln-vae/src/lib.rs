//! # kiln-vae
//!
//! Variational autoencoders (Kingma & Welling 2013) on kiln: the reference
//! chapter's MLP VAE exactly ([`VaeConfig::mlp_chapter`]: 3072-512-128-32,
//! Bernoulli likelihood, BCE-sum + KL, Adam 2e-3), a convolutional VAE
//! ([`VaeConfig::conv`]), β-VAE, Gaussian likelihood with learned or fixed
//! variance, and a class-conditional VAE; training with checkpoints and exact
//! resume, sampling, reconstruction, interpolation, and test-set evaluation in
//! nats, bits/dim and the IWAE bound.
//!
//! ```
//! use kiln_core::{vars::VarStore, rng::SeededRng, DType, Device};
//! use kiln_vae::{Vae, VaeConfig, elbo_loss};
//!
//! let cfg = VaeConfig { image_size: 8, hidden: vec![32], latent: 4, ..VaeConfig::mlp_chapter() };
//! let vs = VarStore::new(0);
//! let vae = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu))?;
//! let mut rng = SeededRng::new(1);
//! let x = rng.uniform(&[2, 3, 8, 8], 0.0, 1.0, &Device::Cpu)?;
//! let out = vae.forward(&x, None, &mut rng)?;
//! let terms = elbo_loss(&out, &x, cfg.likelihood, vae.logvar_x(), cfg.beta)?;
//! assert!(terms.loss.to_scalar::<f32>()? > 0.0);
//! let samples = vae.sample(4, None, &mut rng, &Device::Cpu)?;
//! assert_eq!(samples.dims(), &[4, 3, 8, 8]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod error;
pub mod eval;
pub mod loss;
pub mod model;
pub mod train;

pub use config::{Arch, Likelihood, VaeConfig};
pub use error::{Result, VaeError};
pub use eval::{evaluate, EvalReport};
pub use loss::{elbo_loss, ElboTerms};
pub use model::{Posterior, Vae, VaeOutput};
pub use train::{
    from_run, train, RunConfig, TrainConfig, TrainReport, MAY_CHANGE_ON_RESUME, RUN_KIND,
};

/// The README's examples, compiled (and run unless marked `no_run`) as doctests, so
/// they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
