//! Errors of kiln-rlhf: settings, preference files, model folders, runs.

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RlhfError {
    /// A setting has a bad value.
    #[error("{what} field `{field}`: {msg}")]
    Config {
        /// Which settings (`DPO`, `reward model`, `generation`, ...).
        what: String,
        /// The field.
        field: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A line of a JSONL file is malformed or cannot be used.
    #[error("{path}:{line}: {msg}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A file or folder is missing, unreadable or malformed.
    #[error("{path}: {msg}")]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// Bad input to a model, loss or batch builder.
    #[error("{0}")]
    Input(String),
    /// A chat template failed to render.
    #[error(transparent)]
    Prompt(#[from] kiln_prompt::Error),
    /// Reading preference pairs failed.
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    /// The language model (loading, tokenizing, generating).
    #[error(transparent)]
    Lm(#[from] kiln_lm::LmError),
    /// Tensor error.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Run-folder I/O.
    #[error(transparent)]
    RunDir(#[from] kiln_core::run::RunError),
    /// The training session (run folder, checkpoint, NaN guard, finished run).
    // Not transparent: the session error stays in the source chain, so a
    // caller can find `SessionError::Finished` through any crate's error.
    #[error("{0}")]
    Session(#[from] kiln_core::session::SessionError),
    /// Figure output.
    #[error(transparent)]
    Figure(#[from] kiln_core::image::FigureError),
}

impl RlhfError {
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

/// kiln-rlhf's result type.
pub type Result<T> = std::result::Result<T, RlhfError>;
