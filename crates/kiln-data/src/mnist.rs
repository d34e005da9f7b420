//! MNIST in IDX format, raw or gzipped (`train-images-idx3-ubyte[.gz]`, ...),
//! found in `root/MNIST/raw/` (torchvision), `root/mnist/` or `root/`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::Image;

/// Magic number of an IDX file of u8 images (3 dimensions).
pub const IDX_IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX file of u8 labels (1 dimension).
pub const IDX_LABELS_MAGIC: u32 = 2049;

/// Reads an IDX file (gunzipping it if it starts with the gzip magic) and
/// checks its magic number; returns the dimensions and the u8 data.
pub fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = read_file(path, "run `cargo xtask download mnist --data-root DIR`")?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, "gzip stream", "a complete gzip file", e))?;
        out
    } else {
        raw
    };
    let header = |k: usize| -> Result<u32> {
        bytes
            .get(4 * k..4 * k + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(DataError::Truncated {
                path: path.to_path_buf(),
                expected: 4 * k as u64 + 4,
                found: bytes.len() as u64,
            })
    };
    let m = header(0)?;
    if m != magic {
        return Err(DataError::format(path, "IDX magic number", magic, m));
    }
    let ndims = (magic & 0xff) as usize;
    let dims: Vec<usize> = (1..=ndims)
        .map(|k| header(k).map(|d| d as usize))
        .collect::<Result<_>>()?;
    let start = 4 * (ndims + 1);
    let need = start as u64 + dims.iter().map(|&d| d as u64).product::<u64>();
    if (bytes.len() as u64) < need {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: need,
            found: bytes.len() as u64,
        });
    }
    let data = bytes[start..need as usize].to_vec();
    Ok((dims, data))
}

/// MNIST: 60000 train and 10000 test 28x28 grayscale digits (1 channel).
#[derive(Debug, Clone)]
pub struct Mnist {
    split: Split,
    rows: usize,
    cols: usize,
    images: Vec<u8>,
    labels: Vec<u8>,
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
                return Err(DataError::config(
                    "split",
                    "MNIST has train and test splits only, found val",
                ))
            }
        };
        let ip = find(root, &format!("{prefix}-images-idx3-ubyte"))?;
        let lp = find(root, &format!("{prefix}-labels-idx1-ubyte"))?;
        let (idims, images) = read_idx(&ip, IDX_IMAGES_MAGIC)?;
        let (ldims, labels) = read_idx(&lp, IDX_LABELS_MAGIC)?;
        if idims[0] != ldims[0] {
            return Err(DataError::format(
                &lp,
                "label count",
                format!("{} (one per image in {})", idims[0], ip.display()),
                ldims[0],
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
            rows: idims[1],
            cols: idims[2],
            images,
            labels,
        })
    }
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index("mnist", index, self.len())?;
        let n = self.rows * self.cols;
        Ok(Sample {
            image: Image::from_planar_u8(
                1,
                self.rows,
                self.cols,
                &self.images[index * n..(index + 1) * n],
            ),
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
}
