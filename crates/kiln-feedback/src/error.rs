//! kiln-feedback's error type: every message names the file (and line) or
//! the flag it is about.

use std::path::{Path, PathBuf};

/// What can go wrong while labelling, measuring agreement or exporting.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a JSONL file is malformed.
    #[error("{}:{line}: {msg}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        msg: String,
    },
    /// Another process holds the labelling folder's lock (a second `serve`
    /// or `label` would write conflicting answers to the same log).
    #[error(
        "{} is in use: another process is {holder}; one process at a time serves or labels a \
         folder: stop that one first, or use another --out folder",
        path.display()
    )]
    Busy {
        /// The folder.
        path: PathBuf,
        /// Who holds it, as far as its lock file says ("serving it (pid 12)").
        holder: String,
    },
    /// Anything else (bad flags, an empty folder, a terminal that is not one).
    #[error("{0}")]
    Invalid(String),
}

impl FeedbackError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// An error on line `line` of `path`.
    pub fn line(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        Self::Line {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
}

/// kiln-feedback's result type.
pub type Result<T> = std::result::Result<T, FeedbackError>;
