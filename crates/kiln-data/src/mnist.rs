//! MNIST in IDX format, raw or gzipped (`train-images-idx3-ubyte[.gz]`, ...),
//! found in `root/MNIST/raw/` (torchvision), `root/mnist/` or `root/`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::Image;
use crate::sizes::{product, sum, to_usize, u32_at};

/// Magic number of an IDX file of u8 images (3 dimensions).
pub const IDX_IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX file of u8 labels (1 dimension).
pub const IDX_LABELS_MAGIC: u32 = 2049;

/// Reads up to `n` more bytes from `src` into `buf` (fewer at the end of the data).
fn read_more(src: &mut dyn Read, buf: &mut Vec<u8>, n: usize, path: &Path) -> Result<()> {
    src.take(n as u64)
        .read_to_end(buf)
        .map_err(|e| DataError::format(path, "gzip stream", "a complete gzip file", e))?;
    Ok(())
}

/// Reads an IDX file (gunzipping it if it starts with the gzip magic) and
/// checks its magic number; returns the dimensions and the u8 data.
///
/// Sizes come from the header through checked arithmetic: a header whose
/// dimensions overflow, or that announces more data than the file holds, is
/// an error naming the file. A gzipped file is decompressed only as far as
/// its header announces, so memory stays bounded by the real data.
pub fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = read_file(path, "run `cargo xtask download mnist --data-root DIR`")?;
    let gz = raw.starts_with(&[0x1f, 0x8b]);
    let mut src: Box<dyn Read + '_> = if gz {
        Box::new(flate2::read::GzDecoder::new(&raw[..]))
    } else {
        Box::new(&raw[..])
    };
    let mut bytes = Vec::new();
    // The data ends before byte `need`: say so (in decompressed bytes for a .gz).
    let short = |need: usize, found: usize| {
        if gz {
            DataError::format(
                path,
                "decompressed data",
                format!("{need} bytes as the IDX header announces"),
                format!("{found} bytes; the file is incomplete: download or copy it again"),
            )
        } else {
            DataError::Truncated {
                path: path.to_path_buf(),
                expected: need as u64,
                found: found as u64,
            }
        }
    };
    read_more(&mut src, &mut bytes, 4, path)?;
    if bytes.len() < 4 {
        return Err(short(4, bytes.len()));
    }
    let m = u32_at(path, &bytes, 0, true)?;
    if m != magic {
        return Err(DataError::format(path, "IDX magic number", magic, m));
    }
    let ndims = (magic & 0xff) as usize;
    let start = 4 * (ndims + 1);
    read_more(&mut src, &mut bytes, start - 4, path)?;
    if bytes.len() < start {
        return Err(short(start, bytes.len()));
    }
    let dims: Vec<usize> = (1..=ndims)
        .map(|k| {
            u32_at(path, &bytes, 4 * k, true)
                .and_then(|d| to_usize(path, "IDX dimension", d.into()))
        })
        .collect::<Result<_>>()?;
    let len = product(path, "IDX dimensions", &dims)?;
    let need = sum(path, "IDX data size", start, len)?;
    read_more(&mut src, &mut bytes, len, path)?;
    if bytes.len() < need {
        return Err(short(need, bytes.len()));
    }
    bytes.truncate(need);
    bytes.drain(..start);
    Ok((dims, bytes))
}

/// MNIST: 60000 train and 10000 test 28x28 grayscale digits (1 channel).
#[derive(Debug, Clone)]
pub struct Mnist {
    split: Split,
    rows: usize,
    cols: usize,
    images: Vec<u8>,
    labels: Vec<u8>,
    /// The images and labels files read.
    files: [PathBuf; 2],
}

fn find(root: &Path, name: &str) -> Result<PathBuf> {
    let dirs = [
        root.join("MNIST").join("raw"),
        root.join("mnist"),
        root.to_path_buf(),
    ];
    for d in &dirs {
        for n in [name.to_string(), format!("{name}.gz")] {
            let p = d.join(&n);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::Missing {
        path: root.join("MNIST").join("raw").join(format!("{name}.gz")),
        hint: format!(
            "run `cargo xtask download mnist --data-root {}` (also looked in mnist/ and the root)",
            root.display()
        ),
    })
}

impl Mnist {
    /// Reads the split's image and label files. There is no validation split.
    pub fn new(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        let root = root.as_ref();
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
            Split::Val => {
                return Err(DataError::NoSplit {
                    dataset: "mnist".into(),
                    split: split.as_str(),
                    hint: "it has train and test splits only".into(),
                })
            }
        };
        let ip = find(root, &format!("{prefix}-images-idx3-ubyte"))?;
        let lp = find(root, &format!("{prefix}-labels-idx1-ubyte"))?;
        let (idims, images) = read_idx(&ip, IDX_IMAGES_MAGIC)?;
        let (ldims, labels) = read_idx(&lp, IDX_LABELS_MAGIC)?;
        // The magic numbers fix the number of dimensions (3 and 1).
        let (count, rows, cols) = match idims[..] {
            [n, r, c] => (n, r, c),
            _ => return Err(DataError::format(&ip, "IDX dimensions", 3, idims.len())),
        };
        if count == 0 {
            return Err(DataError::format(
                &ip,
                "image count",
                "at least 1 image",
                "0 images; the file is empty or not MNIST: download it again",
            ));
        }
        if rows == 0 || cols == 0 {
            return Err(DataError::format(
                &ip,
                "image size",
                "images of at least 1x1 pixels (MNIST's are 28x28)",
                format!("{rows}x{cols}; the header is corrupt: download the file again"),
            ));
        }
        if ldims.first() != Some(&count) {
            return Err(DataError::format(
                &lp,
                "label count",
                format!("{count} (one per image in {})", ip.display()),
                ldims.first().copied().unwrap_or(0),
            ));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= 10) {
            return Err(DataError::LabelOutOfRange {
                path: lp,
                index: i,
                label: i64::from(l),
                classes: 10,
            });
        }
        Ok(Self {
            split,
            rows,
            cols,
            images,
            labels,
            files: [ip, lp],
        })
    }
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index("mnist", index, self.len())?;
        // `new` checked that the images hold `len * rows * cols` bytes.
        let n = self.rows * self.cols;
        let pixels = index
            .checked_mul(n)
            .and_then(|a| self.images.get(a..a.checked_add(n)?))
            .ok_or_else(|| {
                DataError::config("index", format!("mnist: image {index} out of range"))
            })?;
        Ok(Sample {
            image: Image::from_planar_u8(1, self.rows, self.cols, pixels),
            label: usize::from(self.labels[index]),
        })
    }
    fn num_classes(&self) -> usize {
        10
    }
    fn channels(&self) -> usize {
        1
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        Some((self.rows, self.cols))
    }
    fn name(&self) -> String {
        format!("mnist/{}", self.split)
    }
    fn labels(&self) -> Option<Vec<usize>> {
        Some(self.labels.iter().map(|&l| usize::from(l)).collect())
    }
    /// The split's images and labels files (as found: raw or `.gz`).
    fn input_paths(&self) -> Vec<&Path> {
        self.files.iter().map(PathBuf::as_path).collect()
    }
}
