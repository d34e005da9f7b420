//! A strict reader for the numeric arrays of MATLAB level-5 `.mat` files
//! (Flowers102's `imagelabels.mat` and `setid.mat`).
//!
//! Written here instead of using the `matfile` crate, which reads the
//! variables before a damaged element and silently drops the rest (so a
//! truncated file reported "variable `labels` absent"), prints to stdout on
//! unsupported elements, can panic on overflowing dimensions, and inflates a
//! compressed element without bound. Only what kiln needs is read: real
//! numeric arrays, compressed (`miCOMPRESSED`) or not, in either byte order;
//! other classes (cells, structs, chars, sparse) are listed by name only.
//! Every size comes from the file through [`crate::sizes`].

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::sizes::{product, slice, sum, to_usize, u32_at};

/// Bytes of the level-5 header (text, subsystem offset, version, endianness).
const HEADER: usize = 128;
/// Data type of an array element.
const MI_MATRIX: u32 = 14;
/// Data type of a zlib-compressed element.
const MI_COMPRESSED: u32 = 15;

/// One variable of a `.mat` file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MatVar {
    /// The variable's name.
    pub name: String,
    /// The MATLAB class number (6 = double, 9 = uint8, ...).
    pub class: u8,
    /// The dimensions.
    pub dims: Vec<usize>,
    /// The real part, column-major, for numeric classes; `None` otherwise.
    pub values: Option<Vec<f64>>,
}

/// The name of MATLAB class `c`, for messages.
fn class_name(c: u8) -> &'static str {
    match c {
        1 => "cell",
        2 => "struct",
        3 => "object",
        4 => "char",
        5 => "sparse",
        6 => "double",
        7 => "single",
        8 => "int8",
        9 => "uint8",
        10 => "int16",
        11 => "uint16",
        12 => "int32",
        13 => "uint32",
        14 => "int64",
        15 => "uint64",
        _ => "unknown",
    }
}

/// Reads every variable of a level-5 `.mat` file held in `bytes`.
///
/// A file that ends inside an element is [`DataError::Truncated`]; a damaged
/// element is a [`DataError::Format`] naming the variable.
pub(crate) fn read_mat(path: &Path, bytes: &[u8]) -> Result<Vec<MatVar>> {
    let not_mat = |found: String| {
        DataError::format(
            path,
            "MATLAB v5 file",
            "a readable .mat (level 5) file, starting with \"MATLAB 5.0 MAT-file\"",
            found,
        )
    };
    if !bytes.starts_with(b"MATLAB") {
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
        return Err(not_mat(format!("{head:?}")));
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err(not_mat(
            "a v7.3 (HDF5) file; save it again in MATLAB with `save(..., '-v7')`".into(),
        ));
    }
    let header = slice(path, bytes, 0, HEADER)?;
    let big = match &header[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => {
            return Err(DataError::format(
                path,
                "MATLAB v5 endianness indicator (bytes 126-127)",
                "\"IM\" or \"MI\"",
                format!("{:?}", String::from_utf8_lossy(other)),
            ))
        }
    };
    let mut vars = Vec::new();
    let mut off = HEADER;
    while off < bytes.len() {
        // Padding at the very end of a file is allowed.
        if bytes.len() - off < 8 && bytes[off..].iter().all(|&b| b == 0) {
            break;
        }
        let ty = u32_at(path, bytes, off, big)?;
        let n = to_usize(
            path,
            "element size",
            u32_at(path, bytes, off + 4, big)?.into(),
        )?;
        let start = sum(path, "element offset", off, 8)?;
        let data = slice(path, bytes, start, n)?;
        let index = vars.len();
        match ty {
            MI_MATRIX => vars.push(matrix(path, data, big, index)?),
            MI_COMPRESSED => {
                let inner = inflate(path, data, big, index)?;
                vars.push(matrix(path, &inner, big, index)?);
            }
            _ => {} // not a variable (MATLAB writes none at the top level)
        }
        off = sum(path, "element offset", start, n)?;
        if ty != MI_COMPRESSED {
            off = off.saturating_add((8 - n % 8) % 8);
        }
    }
    Ok(vars)
}

/// Inflates a compressed element, which must hold one array element; reads
/// no more than the size that element announces.
fn inflate(path: &Path, data: &[u8], big: bool, index: usize) -> Result<Vec<u8>> {
    let what = format!("variable #{} (compressed)", index + 1);
    let zerr = |e: std::io::Error| {
        DataError::format(
            path,
            what.as_str(),
            "a complete zlib stream",
            format!("{e}; the file is damaged: download or copy it again"),
        )
    };
    let mut z = flate2::read::ZlibDecoder::new(data);
    let mut tag = Vec::with_capacity(8);
    (&mut z).take(8).read_to_end(&mut tag).map_err(zerr)?;
    if tag.len() < 8 {
        return Err(DataError::format(
            path,
            what.as_str(),
            "an array element after decompression",
            format!("{} bytes", tag.len()),
        ));
    }
    let ty = u32_at(path, &tag, 0, big)?;
    if ty != MI_MATRIX {
        return Err(DataError::format(
            path,
            what.as_str(),
            format!("an array element (type {MI_MATRIX})"),
            format!("type {ty}"),
        ));
    }
    let n = to_usize(path, "element size", u32_at(path, &tag, 4, big)?.into())?;
    let mut body = Vec::new();
    z.take(n as u64).read_to_end(&mut body).map_err(zerr)?;
    if body.len() < n {
        return Err(DataError::format(
            path,
            what.as_str(),
            format!("{n} bytes after decompression, as its header announces"),
            format!(
                "{} bytes; the file is incomplete: download or copy it again",
                body.len()
            ),
        ));
    }
    Ok(body)
}

/// One sub-element of an array element: its type, its data and the offset
/// of the next one.
fn sub<'a>(
    path: &Path,
    body: &'a [u8],
    at: usize,
    big: bool,
    what: &str,
) -> Result<(u32, &'a [u8], usize)> {
    let short = || {
        DataError::format(
            path,
            what,
            "an array element as long as its parts announce",
            "fewer bytes; the file is damaged: download or copy it again",
        )
    };
    let first = u32_at(path, body, at, big).map_err(|_| short())?;
    if first >> 16 != 0 {
        // small data element: type and size share the first word, data in the second
        let n = (first >> 16) as usize;
        if n > 4 {
            return Err(DataError::format(
                path,
                what,
                "a small data element of at most 4 bytes",
                format!("{n} bytes"),
            ));
        }
        let data = body.get(at + 4..at + 4 + n).ok_or_else(short)?;
        return Ok((first & 0xffff, data, at + 8));
    }
    let n = to_usize(
        path,
        "element size",
        u32_at(path, body, at + 4, big).map_err(|_| short())?.into(),
    )?;
    let start = sum(path, "element offset", at, 8)?;
    let end = sum(path, "element size", start, n)?;
    let data = body.get(start..end).ok_or_else(short)?;
    Ok((first, data, end.saturating_add((8 - n % 8) % 8)))
}

/// Bytes per value of numeric data type `ty`, or `None` for other types.
fn value_size(ty: u32) -> Option<usize> {
    match ty {
        1 | 2 => Some(1),
        3 | 4 => Some(2),
        5..=7 => Some(4),
        9 | 12 | 13 => Some(8),
        _ => None,
    }
}

/// Decodes numeric data of type `ty` as f64.
fn values(ty: u32, data: &[u8], big: bool) -> Vec<f64> {
    let size = value_size(ty).unwrap_or(1);
    data.chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            if big {
                b[8 - size..].copy_from_slice(c);
                b.reverse();
            } else {
                b[..size].copy_from_slice(c);
            }
            // `b` now holds the value little-endian in its first `size` bytes.
            match ty {
                1 => f64::from(b[0] as i8),
                2 => f64::from(b[0]),
                3 => f64::from(i16::from_le_bytes([b[0], b[1]])),
                4 => f64::from(u16::from_le_bytes([b[0], b[1]])),
                5 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                6 => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                7 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                9 => f64::from_le_bytes(b),
                12 => i64::from_le_bytes(b) as f64,
                _ => u64::from_le_bytes(b) as f64,
            }
        })
        .collect()
}

/// Reads an array element's body (flags, dimensions, name, real part).
fn matrix(path: &Path, body: &[u8], big: bool, index: usize) -> Result<MatVar> {
    let mut what = format!("variable #{}", index + 1);
    let (ty, flags, next) = sub(path, body, 0, big, &what)?;
    if ty != 6 || flags.len() != 8 {
        return Err(DataError::format(
            path,
            format!("{what} array flags"),
            "8 bytes of type miUINT32",
            format!("{} bytes of type {ty}", flags.len()),
        ));
    }
    let word = u32_at(path, flags, 0, big)?;
    let class = (word & 0xff) as u8;
    let (ty, dims_raw, next) = sub(path, body, next, big, &what)?;
    if ty != 5 || dims_raw.len() < 8 || !dims_raw.len().is_multiple_of(4) {
        return Err(DataError::format(
            path,
            format!("{what} dimensions"),
            "two or more miINT32 sizes",
            format!("{} bytes of type {ty}", dims_raw.len()),
        ));
    }
    let dims = dims_raw
        .chunks_exact(4)
        .map(|c| {
            let v = u32_at(path, c, 0, big)? as i32;
            usize::try_from(v)
                .map_err(|_| DataError::format(path, format!("{what} dimensions"), "sizes >= 0", v))
        })
        .collect::<Result<Vec<usize>>>()?;
    let (ty, name, next) = sub(path, body, next, big, &what)?;
    if ty != 1 {
        return Err(DataError::format(
            path,
            format!("{what} name"),
            "miINT8 text",
            format!("type {ty}"),
        ));
    }
    let name = String::from_utf8_lossy(name).into_owned();
    what = format!("variable `{name}`");
    if !(6..=15).contains(&class) {
        return Ok(MatVar {
            name,
            class,
            dims,
            values: None,
        });
    }
    let count = product(path, &format!("{what} dimensions"), &dims)?;
    let (ty, real, _) = sub(path, body, next, big, &what)?;
    let Some(size) = value_size(ty) else {
        return Err(DataError::format(
            path,
            format!("{what} data"),
            "numeric data (miINT8 .. miUINT64, miSINGLE, miDOUBLE)",
            format!("data type {ty}"),
        ));
    };
    if !real.len().is_multiple_of(size) || real.len() / size != count {
        let shown: Vec<String> = dims.iter().map(usize::to_string).collect();
        return Err(DataError::format(
            path,
            format!("{what} data"),
            format!("{count} values for its {} dimensions", shown.join("x")),
            format!(
                "{} bytes of {size}-byte values; the file is damaged: download or copy it again",
                real.len()
            ),
        ));
    }
    // The imaginary part of a complex array, if any, is not needed.
    Ok(MatVar {
        name,
        class,
        dims,
        values: Some(values(ty, real, big)),
    })
}

/// Reads numeric variable `var` of a `.mat` file as integers (Flowers102
/// stores its labels and ids as class double, with the data in
/// miUINT8/miUINT16 elements).
pub(crate) fn mat_integers(path: &Path, bytes: &[u8], var: &str) -> Result<Vec<i64>> {
    let vars = read_mat(path, bytes)?;
    let Some(v) = vars.iter().find(|v| v.name == var) else {
        let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
        return Err(DataError::format(
            path,
            format!("variable `{var}`"),
            "present",
            if names.is_empty() {
                "absent: the file holds no variables at all; it is cut short or not the \
                 right file: download or copy it again"
                    .to_string()
            } else {
                format!(
                    "absent (variables: {}); is it the right file?",
                    names.join(", ")
                )
            },
        ));
    };
    let Some(vals) = &v.values else {
        return Err(DataError::format(
            path,
            format!("variable `{var}`"),
            "a numeric array",
            format!("a {} array", class_name(v.class)),
        ));
    };
    vals.iter()
        .enumerate()
        .map(|(i, &x)| {
            if x.fract() == 0.0 && x.is_finite() && x.abs() < 9.0e15 {
                Ok(x as i64)
            } else {
                Err(DataError::format(
                    path,
                    format!("`{var}`[{i}]"),
                    "an integer",
                    x,
                ))
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A level-5 file with uncompressed 1xN double variables, in either byte order.
    fn mat(vars: &[(&str, &[f64])], big: bool) -> Vec<u8> {
        let vars: Vec<(&str, Vec<u32>, &[f64])> = vars
            .iter()
            .map(|&(n, v)| (n, vec![1, v.len() as u32], v))
            .collect();
        mat_dims(&vars, big)
    }

    /// The same with explicit dimensions.
    fn mat_dims(vars: &[(&str, Vec<u32>, &[f64])], big: bool) -> Vec<u8> {
        let u32b = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let el = |out: &mut Vec<u8>, ty: u32, data: &[u8]| {
            out.extend_from_slice(&u32b(ty));
            out.extend_from_slice(&u32b(data.len() as u32));
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
        };
        let mut out = b"MATLAB 5.0 MAT-file, test".to_vec();
        out.resize(124, b' ');
        out.extend_from_slice(if big { &[1, 0] } else { &[0, 1] });
        out.extend_from_slice(if big { b"MI" } else { b"IM" });
        for (name, dims, vals) in vars {
            let mut body = Vec::new();
            let mut flags = u32b(6).to_vec();
            flags.extend_from_slice(&[0; 4]);
            el(&mut body, 6, &flags);
            let d: Vec<u8> = dims.iter().flat_map(|&d| u32b(d)).collect();
            el(&mut body, 5, &d);
            el(&mut body, 1, name.as_bytes());
            let data: Vec<u8> = vals
                .iter()
                .flat_map(|v| {
                    if big {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    }
                })
                .collect();
            el(&mut body, 9, &data);
            el(&mut out, MI_MATRIX, &body);
        }
        out
    }

    #[test]
    fn reads_uncompressed_doubles_in_both_byte_orders() {
        for big in [false, true] {
            let f = mat(&[("a", &[1.0, 2.0, 3.0]), ("bb", &[7.0])], big);
            let vars = read_mat(Path::new("t.mat"), &f).unwrap();
            assert_eq!(vars.len(), 2);
            assert_eq!(vars[0].dims, vec![1, 3]);
            assert_eq!(vars[0].values, Some(vec![1.0, 2.0, 3.0]));
            assert_eq!(mat_integers(Path::new("t.mat"), &f, "bb").unwrap(), vec![7]);
        }
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_file() {
        let f = mat(&[("labels", &[1.0, 2.0, 3.0])], false);
        for cut in 1..f.len() {
            let e = mat_integers(Path::new("cut.mat"), &f[..cut], "labels");
            // Only the final padding may be cut off.
            if cut + 8 > f.len() && f[cut..].iter().all(|&b| b == 0) {
                assert_eq!(e.unwrap(), vec![1, 2, 3]);
                continue;
            }
            let e = e.unwrap_err().to_string();
            assert!(e.contains("cut.mat"), "cut at {cut}: {e}");
            if cut == HEADER {
                // a header alone is a valid file without variables
                assert!(e.contains("no variables") && e.contains("cut short"), "{e}");
            } else {
                assert!(!e.contains("absent"), "cut at {cut}: {e}");
            }
        }
    }

    #[test]
    fn dimensions_that_do_not_match_the_data_are_refused() {
        let f = mat_dims(&[("x", vec![1, 3], &[1.0, 2.0])], false);
        let e = read_mat(Path::new("d.mat"), &f).unwrap_err().to_string();
        assert!(e.contains("d.mat") && e.contains("3 values"), "{e}");
        let big = i32::MAX as u32;
        let f = mat_dims(&[("x", vec![big, big, big], &[1.0])], false);
        let e = read_mat(Path::new("d.mat"), &f).unwrap_err().to_string();
        assert!(e.contains("d.mat") && e.contains("overflows"), "{e}");
        let f = mat_dims(&[("x", vec![1, u32::MAX], &[1.0])], false);
        let e = read_mat(Path::new("d.mat"), &f).unwrap_err().to_string();
        assert!(e.contains("sizes >= 0"), "{e}");
        // not a .mat file at all, and a v7.3 one
        let e = read_mat(Path::new("h.mat"), b"hello")
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.mat") && e.contains("MATLAB"), "{e}");
        let e = read_mat(Path::new("h.mat"), b"MATLAB 7.3 MAT-file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("v7.3"), "{e}");
    }
}
