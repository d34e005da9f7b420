//! Small file helpers.

use std::path::Path;
#[cfg(feature = "download")]
use std::path::PathBuf;

use crate::error::{DataError, Result};

/// A sibling path with `suffix` appended to the file name (`a.tgz` -> `a.tgz.part`).
#[cfg(feature = "download")]
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `bytes` atomically with kiln-core's one atomic write (temporary
/// sibling, fsync, rename, fsync of the folder).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    kiln_core::files::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}
