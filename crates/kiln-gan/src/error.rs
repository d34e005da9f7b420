//! Errors of kiln-gan's outward-facing parts (configs, runs, data, training
//! that collapses or diverges).

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GanError {
    /// A config field has a bad value.
    #[error("GAN config field `{field}`: {msg}")]
    Config {
        /// The field (dotted for nested settings, e.g. `train.ema.decay`).
        field: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A run folder is not a GAN run or is damaged.
    #[error("run {path}: {msg}")]
    Run {
        /// The run folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Training collapsed: the discriminator separated real from generated
    /// images with near certainty for a whole window of steps. Nothing was
    /// checkpointed after the collapse began.
    #[error("{0}")]
    Collapsed(Box<Failure>),
    /// Training diverged: a loss or a discriminator output became NaN or
    /// infinite. The parameters were not updated with it.
    #[error("{0}")]
    Diverged(Box<Failure>),
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
    /// The training session (run folder, checkpoint, finished run).
    // Not transparent: the session error stays in the source chain, so a
    // caller can find `SessionError::Finished` through any crate's error.
    #[error("{0}")]
    Session(#[from] kiln_core::session::SessionError),
    /// A metric's inputs do not fit (too few images, mismatched dimensions,
    /// non-finite features) or its linear algebra failed.
    #[error("{0}")]
    Metric(String),
    /// Figure output.
    #[error(transparent)]
    Figure(#[from] kiln_core::image::FigureError),
}

/// How and where a training run failed, and which checkpoint to use instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The run folder.
    pub run: PathBuf,
    /// The batch (step of `metrics.jsonl`) at which training stopped.
    pub step: u64,
    /// What was seen (e.g. "D(x) > 0.99 and D(G(z)) < 0.01 for 200 steps in
    /// a row, since step 812").
    pub reason: String,
    /// The checkpoint whose generator predates the failure, if any.
    pub checkpoint: Option<PathBuf>,
    /// The step that checkpoint was written at.
    pub checkpoint_step: Option<u64>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training in {} stopped at step {}: {}. ",
            self.run.display(),
            self.step,
            self.reason
        )?;
        match (&self.checkpoint, self.checkpoint_step) {
            (Some(c), Some(s)) => write!(
                f,
                "Use {} (written at step {s}, before the failure began) for sampling: \
                 cargo xtask sample gan --run {} --checkpoint {}",
                c.display(),
                self.run.display(),
                c.file_stem()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default()
            ),
            _ => write!(
                f,
                "No checkpoint predates the failure; start a new run with other settings \
                 (a lower learning rate, another loss, spectral norm or a gradient penalty)"
            ),
        }
    }
}

/// kiln-gan's result type.
pub type Result<T, E = GanError> = std::result::Result<T, E>;

/// A [`GanError::Config`] naming `field`.
pub(crate) fn config_err(field: &str, msg: impl Into<String>) -> GanError {
    GanError::Config {
        field: field.into(),
        msg: msg.into(),
    }
}
