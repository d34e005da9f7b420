//! Checked sizes for numbers read from files.
//!
//! Every reader in this crate turns a size, count or offset taken from a file
//! into an index only through these helpers: a header whose dimensions
//! overflow, or that announces more bytes than the file holds, becomes a
//! [`DataError`] naming the file and the field, never a wrapped product, an
//! out-of-bounds slice or a panic.

use std::path::Path;

use crate::error::{DataError, Result};

/// The product of `dims` (sizes read from `path`'s field `what`); an
/// overflow is a [`DataError::Format`] naming the field and the sizes.
pub(crate) fn product(path: &Path, what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            let shown: Vec<String> = dims.iter().map(usize::to_string).collect();
            DataError::format(
                path,
                what,
                "sizes whose product fits in 64 bits",
                format!(
                    "{}, whose product overflows; the header is corrupt: download or copy the file again",
                    shown.join(" x ")
                ),
            )
        })
}

/// `a + b` for an offset or size read from `path` (field `what`).
pub(crate) fn sum(path: &Path, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_add(b).ok_or_else(|| {
        DataError::format(
            path,
            what,
            "an offset that fits in 64 bits",
            format!("{a} + {b}, which overflows; the file is corrupt"),
        )
    })
}

/// A size read from a file as a `usize` (only fails on 32-bit targets).
pub(crate) fn to_usize(path: &Path, what: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        DataError::format(
            path,
            what,
            "a size this machine can address",
            format!("{v}; the file is corrupt or too large for this machine"),
        )
    })
}

/// `bytes[start..start + len]` of the file `path`, or
/// [`DataError::Truncated`] when the file ends first.
pub(crate) fn slice<'a>(
    path: &Path,
    bytes: &'a [u8],
    start: usize,
    len: usize,
) -> Result<&'a [u8]> {
    let end = sum(path, "offset", start, len)?;
    bytes.get(start..end).ok_or_else(|| DataError::Truncated {
        path: path.to_path_buf(),
        expected: end as u64,
        found: bytes.len() as u64,
    })
}

/// The `u32` at byte `at` of the file `path`, big- or little-endian.
pub(crate) fn u32_at(path: &Path, bytes: &[u8], at: usize, big_endian: bool) -> Result<u32> {
    let b = slice(path, bytes, at, 4)?;
    let a = [b[0], b[1], b[2], b[3]];
    Ok(if big_endian {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn overflowing_products_and_short_files_are_errors_naming_the_file() {
        let p = Path::new("x.idx");
        assert_eq!(product(p, "dims", &[4, 28, 28]).unwrap(), 3136);
        assert_eq!(product(p, "dims", &[]).unwrap(), 1);
        let e = product(p, "dims", &[4, 1 << 31, 1 << 31])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.idx") && e.contains("4 x 2147483648 x 2147483648"),
            "{e}"
        );
        assert!(sum(p, "offset", usize::MAX, 1).is_err());
        let e = slice(p, &[1, 2, 3], 2, 4).unwrap_err().to_string();
        assert!(
            e.contains("x.idx") && e.contains("expected 6 bytes, found 3"),
            "{e}"
        );
        assert!(slice(p, &[1, 2, 3], usize::MAX, 2).is_err());
        assert_eq!(u32_at(p, &[0, 0, 1, 2], 0, true).unwrap(), 258);
        assert_eq!(u32_at(p, &[2, 1, 0, 0], 0, false).unwrap(), 258);
    }
}
