//! CIFAR-10, binary version: `root/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::Image;

/// Bytes per record: one label byte and 3x32x32 pixel bytes (R, G, B planes).
pub const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// The CIFAR-10 class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// CIFAR-10 (binary): 50000 train and 10000 test 32x32 RGB images, 10 classes.
/// The split's files are read into memory (150 MB for train).
#[derive(Debug, Clone)]
pub struct Cifar10 {
    split: Split,
    data: Vec<u8>,
}

impl Cifar10 {
    /// Reads the split's batch files. `root` holds `cifar-10-batches-bin/`
    /// (or is that folder). There is no validation split.
    pub fn new(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        let root = root.as_ref();
        let hint = format!(
            "run `cargo xtask download cifar10 --data-root {}`",
            root.display()
        );
        let dir = if root.join("cifar-10-batches-bin").is_dir() {
            root.join("cifar-10-batches-bin")
        } else if root.join("test_batch.bin").is_file() {
            root.to_path_buf()
        } else {
            return Err(DataError::Missing {
                path: root.join("cifar-10-batches-bin"),
                hint,
            });
        };
        let files: Vec<PathBuf> = match split {
            Split::Train => (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect(),
            Split::Test => vec![dir.join("test_batch.bin")],
            Split::Val => {
                return Err(DataError::NoSplit {
                    dataset: "cifar10".into(),
                    split: split.as_str(),
                    hint: "it has train and test splits only".into(),
                })
            }
        };
        let mut data = Vec::new();
        for f in &files {
            let bytes = read_file(f, &hint)?;
            Self::check(f, &bytes)?;
            data.extend_from_slice(&bytes);
        }
        Ok(Self { split, data })
    }

    /// Checks one batch file: whole records, labels below 10.
    fn check(path: &Path, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
            let whole = bytes.len().div_ceil(CIFAR_RECORD).max(1) * CIFAR_RECORD;
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                expected: whole as u64,
                found: bytes.len() as u64,
            });
        }
        for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
            if rec[0] >= 10 {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index: i,
                    label: i64::from(rec[0]),
                    classes: 10,
                });
            }
        }
        Ok(())
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.data.len() / CIFAR_RECORD
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index("cifar10", index, self.len())?;
        let rec = &self.data[index * CIFAR_RECORD..(index + 1) * CIFAR_RECORD];
        Ok(Sample {
            image: Image::from_planar_u8(3, 32, 32, &rec[1..]),
            label: usize::from(rec[0]),
        })
    }
    fn num_classes(&self) -> usize {
        10
    }
    fn channels(&self) -> usize {
        3
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        Some((32, 32))
    }
    fn name(&self) -> String {
        format!("cifar10/{}", self.split)
    }
    fn labels(&self) -> Option<Vec<usize>> {
        Some(
            self.data
                .chunks_exact(CIFAR_RECORD)
                .map(|r| usize::from(r[0]))
                .collect(),
        )
    }
}
