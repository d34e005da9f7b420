//! Errors of kiln-vae's outward-facing parts (configs, runs, data).

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaeError {
    /// A config field has a bad value.
    #[error("VAE config field `{field}`: {msg}")]
    Config {
        /// The field.
        field: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A run folder is not a VAE run or is damaged.
    #[error("run {path}: {msg}")]
    Run {
        /// The run folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Loading data failed.
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    /// Tensor or model error.
    #[error(transparent)]
    Tensor(#[from] kiln_core::candle::Error),
    /// Run-folder I/O.
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

/// kiln-vae's result type.
pub type Result<T, E = VaeError> = std::result::Result<T, E>;
