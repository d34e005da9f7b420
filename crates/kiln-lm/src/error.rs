//! Errors of kiln-lm: configs, model folders, tokenizers, generation, runs.

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LmError {
    /// A config field has a bad value.
    #[error("{what} field `{field}`: {msg}")]
    Config {
        /// Which config (`config.json`, generation settings, training settings).
        what: String,
        /// The field.
        field: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A model file is missing, unreadable or malformed.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A model could not be found locally or fetched.
    #[error("{0}")]
    NotFound(String),
    /// A tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A run folder is not an LM run or is damaged.
    #[error("run {path}: {msg}")]
    Run {
        /// The run folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Bad input to a model or generation call.
    #[error("{0}")]
    Input(String),
    /// Loading data failed.
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    /// Tensor or model error.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
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

impl LmError {
    pub(crate) fn config(what: &str, field: &str, msg: impl Into<String>) -> Self {
        Self::Config {
            what: what.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// kiln-lm's result type.
pub type Result<T, E = LmError> = std::result::Result<T, E>;
