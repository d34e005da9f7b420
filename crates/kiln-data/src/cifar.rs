//! CIFAR-10, binary version: `root/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::Image;

/// Bytes per record: one label byte and 3x32x32 pixel bytes (R, G, B planes).
pub const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// Records in every batch file of the published set (`data_batch_1..5.bin`
/// and `test_batch.bin` alike).
pub const CIFAR_BATCH_RECORDS: usize = 10_000;

/// Bytes in every batch file: [`CIFAR_BATCH_RECORDS`] records of
/// [`CIFAR_RECORD`] bytes (30730000).
pub const CIFAR_BATCH_BYTES: usize = CIFAR_BATCH_RECORDS * CIFAR_RECORD;

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
    /// The batch files read.
    files: Vec<PathBuf>,
}

impl Cifar10 {
    /// Reads the split's batch files. `root` holds `cifar-10-batches-bin/`
    /// (or is that folder). There is no validation split.
    ///
    /// Every batch file must be exactly [`CIFAR_BATCH_BYTES`] long (10000
    /// records, as published): a shorter file is [`DataError::Truncated`], a
    /// longer one [`DataError::Format`], both naming the file and the
    /// expected and found sizes. A label of 10 or more is
    /// [`DataError::LabelOutOfRange`].
    pub fn new(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        Self::with_batch_records(root, split, CIFAR_BATCH_RECORDS)
    }

    /// [`Cifar10::new`] with `records` records expected in each batch file
    /// instead of [`CIFAR_BATCH_RECORDS`]. Crate-internal on purpose: the
    /// public loader accepts only the published sizes; this lets the crate's
    /// unit tests (and property tests) use small fixtures in the real record
    /// format.
    pub(crate) fn with_batch_records(
        root: impl AsRef<Path>,
        split: Split,
        records: usize,
    ) -> Result<Self> {
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
            Self::check(f, &bytes, records)?;
            data.extend_from_slice(&bytes);
        }
        Ok(Self { split, data, files })
    }

    /// Checks one batch file: exactly `records` records, labels below 10.
    fn check(path: &Path, bytes: &[u8], records: usize) -> Result<()> {
        let expected = records.saturating_mul(CIFAR_RECORD);
        if bytes.len() < expected {
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                expected: expected as u64,
                found: bytes.len() as u64,
            });
        }
        if bytes.len() > expected {
            return Err(DataError::format(
                path,
                "file size",
                format!("{expected} bytes ({records} records of {CIFAR_RECORD} bytes)"),
                format!(
                    "{} bytes; this is not a CIFAR-10 binary batch: download it again with \
                     `cargo xtask download cifar10`",
                    bytes.len()
                ),
            ));
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
    /// The split's batch files (`data_batch_1..5.bin` or `test_batch.bin`).
    fn input_paths(&self) -> Vec<&Path> {
        self.files.iter().map(PathBuf::as_path).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Small fixtures in the real record format, read through
    //! [`Cifar10::with_batch_records`] (the public loader wants 10000
    //! records per file; `tests/formats.rs` and `tests/hostile.rs` check it
    //! with full-size files).
    use super::*;
    use proptest::prelude::*;

    fn records(n: usize, label_of: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(label_of(i));
            for c in 0..3u8 {
                out.extend(std::iter::repeat_n(c * 100 + i as u8, 1024));
            }
        }
        out
    }

    #[test]
    fn train_split_reads_the_five_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir_all(&b).unwrap();
        for i in 1..=5 {
            std::fs::write(
                b.join(format!("data_batch_{i}.bin")),
                records(2, |k| (k + i) as u8),
            )
            .unwrap();
        }
        std::fs::write(b.join("test_batch.bin"), records(3, |k| k as u8)).unwrap();
        let train = Cifar10::with_batch_records(dir.path(), Split::Train, 2).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(train.labels().unwrap(), [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
        let s = train.get(3).unwrap(); // file 2, record 1
        assert_eq!(s.label, 3);
        assert_eq!(s.image.shape(), [3, 32, 32]);
        // byte / 255 is elementwise (a division, or a product by 1/255: two
        // roundings of a value at most 1), so 4 u on any CPU.
        let px = 2.0 * f32::EPSILON;
        assert!((s.image.at(0, 5, 5) - 1.0 / 255.0).abs() <= px);
        assert!((s.image.at(2, 31, 31) - 201.0 / 255.0).abs() <= px);
        let test = Cifar10::with_batch_records(dir.path(), Split::Test, 3).unwrap();
        assert_eq!(test.len(), 3);
        // each split names the files it read, for a run to fingerprint
        let names = |d: &Cifar10| -> Vec<PathBuf> {
            d.input_paths().iter().map(|p| p.to_path_buf()).collect()
        };
        let want: Vec<PathBuf> = (1..=5)
            .map(|i| b.join(format!("data_batch_{i}.bin")))
            .collect();
        assert_eq!(names(&train), want);
        assert_eq!(names(&test), [b.join("test_batch.bin")]);
        assert!(test.get(3).is_err());
        // the records expected per file are checked for every file
        let e = Cifar10::with_batch_records(dir.path(), Split::Test, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test_batch.bin") && e.contains("6146 bytes (2 records of 3073 bytes)"),
            "{e}"
        );
        std::fs::write(b.join("test_batch.bin"), records(2, |_| 10)).unwrap();
        let e = Cifar10::with_batch_records(dir.path(), Split::Test, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 10") && e.contains("0..10"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x6b69_6c6e),
            ..ProptestConfig::default()
        })]

        /// Structured mutations of a valid batch never panic, and a valid
        /// batch reads back its labels (moved here from `tests/prop_data.rs`
        /// when the public loader began to want full-size files).
        #[test]
        fn mutations_never_panic_and_valid_batches_round_trip(
            labels in proptest::collection::vec(0u8..10, 1..3),
            sets in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::option::of(any::<u8>()),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes: Vec<u8> = labels
                .iter()
                .enumerate()
                .flat_map(|(i, &l)| std::iter::once(l).chain((0..3072).map(move |k| (k + i) as u8)))
                .collect();
            for &(at, b) in &sets {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c % bytes.len());
            }
            if let Some(b) = extra {
                bytes.push(b);
            }
            let edited = !sets.is_empty() || cut.is_some() || extra.is_some();
            std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();
            match Cifar10::with_batch_records(dir.path(), Split::Test, labels.len()) {
                Ok(ds) => {
                    prop_assert_eq!(ds.len(), labels.len());
                    for (i, &want) in labels.iter().enumerate() {
                        let s = ds.get(i).unwrap();
                        prop_assert!(s.label < 10);
                        if !edited {
                            prop_assert_eq!(s.label, want as usize);
                        }
                    }
                }
                Err(e) => {
                    prop_assert!(edited, "valid batch refused: {e}");
                    prop_assert!(e.to_string().contains("test_batch.bin"), "{e}");
                }
            }
        }
    }
}
