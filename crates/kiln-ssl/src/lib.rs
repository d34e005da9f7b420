//! # kiln-ssl
//!
//! Self-supervised learning on kiln: the reference chapter's masked-inpainting
//! conv autoencoder ([`inpaint`]), SimCLR with the NT-Xent loss ([`simclr`],
//! [`loss`]), and representation probes — a linear probe and a kNN classifier —
//! as plain functions of feature matrices ([`probe`]).
//!
//! ```
//! use kiln_core::{Device, Tensor};
//! use kiln_ssl::{loss::nt_xent, probe::knn_accuracy};
//!
//! let z1 = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
//! let z2 = Tensor::new(&[[0.9f32, 0.1], [0.1, 0.9]], &Device::Cpu)?;
//! let l = nt_xent(&z1, &z2, 0.5)?.to_scalar::<f32>()?;
//! assert!(l > 0.0);
//! // Two well-separated clusters: kNN gets them all right.
//! let train = Tensor::new(&[[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &Device::Cpu)?;
//! let acc = knn_accuracy(&train, &[0, 0, 1, 1], &z2, &[0, 1], 2, 0.07)?;
//! assert_eq!(acc, 1.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;

/// Where and how a training run is written (kiln-core's, shared by every trainer).
pub use kiln_core::run::RunOptions;

pub mod inpaint;
pub mod loss;
pub mod probe;
pub mod simclr;

pub use inpaint::{evaluate_inpaint, train_inpaint, InpaintAe, InpaintConfig, InpaintReport};
pub use probe::{knn_accuracy, linear_probe, probe_all, LinearProbeConfig, ProbeReport};
pub use simclr::{train_simclr, Simclr, SimclrConfig, SimclrReport};

/// A refused batch as a `batch_size` config error, with the batch size
/// that fits or, when none does, `none_fits` (what else to change).
pub(crate) fn batch_error(e: kiln_core::memory::BatchTooLarge, none_fits: &str) -> SslError {
    let advice = match e.largest_batch() {
        0 => format!("not even one image fits: {none_fits}"),
        n => format!("--batch-size {n} or less fits"),
    };
    SslError::Config {
        field: "batch_size".into(),
        msg: format!("{e}; {advice}; {}", kiln_core::memory::SKIP_HINT),
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SslError {
    /// A config field has a bad value.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// The field.
        field: String,
        /// What was wrong.
        msg: String,
    },
    /// A run folder is not the expected kind.
    #[error("run {path}: {msg}")]
    Run {
        /// The folder.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// Data loading.
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    /// Tensor or model error.
    #[error(transparent)]
    Tensor(#[from] kiln_core::candle::Error),
    /// Run folder I/O.
    #[error(transparent)]
    RunDir(#[from] kiln_core::run::RunError),
    /// Checkpoint I/O.
    #[error(transparent)]
    Checkpoint(#[from] kiln_core::checkpoint::CheckpointError),
    /// The training session (run folder, checkpoint, NaN guard, finished run).
    // Not transparent: the session error stays in the source chain, so a
    // caller can find `SessionError::Finished` through any crate's error.
    #[error("{0}")]
    Session(#[from] kiln_core::session::SessionError),
    /// Figure output.
    #[error(transparent)]
    Figure(#[from] kiln_core::image::FigureError),
}

/// The README's examples, compiled (and run unless marked `no_run`) as doctests, so
/// they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
