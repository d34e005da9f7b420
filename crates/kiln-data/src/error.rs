//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, transforming or downloading data.
///
/// Messages name the file (and line, for JSONL), what was expected and what
/// was found, and where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// An I/O operation on a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file or folder the dataset needs is not there.
    #[error("{path}: not found; {hint}")]
    Missing {
        /// The missing path.
        path: PathBuf,
        /// What to do (e.g. which download command to run).
        hint: String,
    },
    /// A file is not in the expected format (wrong magic number, bad header, ...).
    #[error("{path}: {what}: expected {expected}, found {found}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The field or part of the file.
        what: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A file ends before the data its header announces.
    #[error(
        "{path}: truncated: expected {expected} bytes, found {found}; the file is incomplete: \
         download or copy it again"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Expected size in bytes.
        expected: u64,
        /// Actual size in bytes.
        found: u64,
    },
    /// An image could not be decoded (damaged, truncated or not an image).
    #[error(
        "{path}: cannot decode image: {msg}; the file is damaged or not a JPEG/PNG: replace \
         it with a good copy or remove it"
    )]
    Decode {
        /// The image file (or `archive:entry`).
        path: PathBuf,
        /// The decoder's message.
        msg: String,
    },
    /// A label is outside `0..classes`.
    #[error("{path}: label {label} of item {index} is out of range: expected 0..{classes}")]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// The item (0-based).
        index: usize,
        /// The label found.
        label: i64,
        /// The number of classes.
        classes: usize,
    },
    /// A downloaded or provided file does not have the published checksum.
    #[error("{path}: md5 mismatch: expected {expected}, found {found}; {hint}")]
    Checksum {
        /// The file checked: the download's destination, or the user's
        /// `--from` file (which is never modified or removed).
        path: PathBuf,
        /// The published md5.
        expected: String,
        /// The md5 of the data received.
        found: String,
        /// What happened to the data and what to do.
        hint: String,
    },
    /// An HTTP transfer failed.
    #[error("{url}: {msg}")]
    Http {
        /// The URL.
        url: String,
        /// What happened.
        msg: String,
    },
    /// An archive entry would be written outside the target folder.
    #[error("{archive}: unsafe entry {entry:?}: {reason}; refusing to extract")]
    UnsafeArchive {
        /// The archive.
        archive: PathBuf,
        /// The entry's path in the archive.
        entry: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A JSONL line could not be parsed or lacks a field.
    #[error("{path}:{line}: {msg}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// An option or argument has a bad value.
    #[error("invalid {field}: {msg}")]
    Config {
        /// The option, field or argument.
        field: String,
        /// What was wrong and what is accepted.
        msg: String,
    },
    /// Images in one batch have different shapes.
    #[error("item {index} has shape {found:?}, expected {expected:?} like the rest of the batch; add a Resize transform or an image size")]
    Shape {
        /// The dataset index.
        index: usize,
        /// The shape of the batch's first image `[C, H, W]`.
        expected: Vec<usize>,
        /// This item's shape.
        found: Vec<usize>,
    },
    /// The dataset has no such split (e.g. a validation split of MNIST, or a
    /// test split of an image folder without a `test/` sub-folder). Callers
    /// that can do without the split may go on without it, saying so; a
    /// split that exists but cannot be read is another error.
    #[error("{dataset} has no {split} split; {hint}")]
    NoSplit {
        /// The dataset (`mnist`, `folder:PATH`, ...).
        dataset: String,
        /// The split asked for (`train`, `val`, `test`).
        split: &'static str,
        /// Which splits there are, and how to add the missing one.
        hint: String,
    },
    /// A tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] kiln_core::candle::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`DataError::Config`] for `field`.
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        DataError::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// A [`DataError::Format`].
    pub fn format(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        expected: impl ToString,
        found: impl ToString,
    ) -> Self {
        DataError::Format {
            path: path.into(),
            what: what.into(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }

    /// Whether this is an undecodable-image error (what `skip_corrupt` skips).
    pub fn is_corrupt_image(&self) -> bool {
        matches!(self, DataError::Decode { .. })
    }

    /// Whether the dataset simply has no such split ([`DataError::NoSplit`]),
    /// as opposed to a split that is there but broken.
    pub fn is_missing_split(&self) -> bool {
        matches!(self, DataError::NoSplit { .. })
    }
}

/// Reads a whole file, mapping errors to [`DataError`] with the path
/// ([`DataError::Missing`] with `hint` when it does not exist).
pub(crate) fn read_file(path: &std::path::Path, hint: &str) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::Missing {
            path: path.to_path_buf(),
            hint: hint.to_string(),
        }),
        Err(e) => Err(DataError::io(path, e)),
    }
}

/// Lets model code that returns `kiln_core::Result` (candle's) use `?` on data
/// errors; the message is kept.
impl From<DataError> for kiln_core::candle::Error {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Tensor(t) => t,
            other => kiln_core::candle::Error::wrap(other),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_candle_errors_keeping_the_message() {
        fn model_step() -> kiln_core::Result<()> {
            Err(DataError::Truncated {
                path: "x.bin".into(),
                expected: 10,
                found: 3,
            })?;
            Ok(())
        }
        let e = model_step().unwrap_err().to_string();
        assert!(
            e.contains("x.bin") && e.contains("expected 10 bytes, found 3"),
            "{e}"
        );
    }
}
