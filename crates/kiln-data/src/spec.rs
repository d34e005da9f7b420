//! Dataset names on the command line (`--dataset synthetic-flowers`) and
//! [`open`]ing them at a requested image size.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::cifar::Cifar10;
use crate::dataset::{Cached, Dataset, Mapped, Split};
use crate::error::{DataError, Result};
use crate::flowers::Flowers102;
use crate::folder::{FolderOptions, ImageFolder};
use crate::image::ColorMode;
use crate::mnist::Mnist;
use crate::shapes::{SyntheticShapes, SyntheticShapesConfig};
use crate::synthetic::{SyntheticFlowers, SyntheticFlowersConfig};
use crate::transforms::{Compose, Filter, Resize, ToRgb, Transform};

/// A dataset named on the command line.
///
/// The files an opened spec reads (none for the synthetic ones; under the
/// data root for the downloaded ones, wherever the reader found them) are
/// its dataset's [`Dataset::input_paths`]: trainers record their
/// fingerprints so that `--resume` refuses data that changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DatasetSpec {
    /// `synthetic-flowers`: procedural, no download (the default).
    SyntheticFlowers,
    /// `synthetic-shapes`: procedural shapes whose classes differ only in
    /// geometry (colours are random), no download.
    SyntheticShapes,
    /// `flowers102`: Oxford Flowers102 under `DATA_ROOT/flowers-102`.
    Flowers102,
    /// `cifar10`: CIFAR-10 binary under `DATA_ROOT/cifar-10-batches-bin`.
    Cifar10,
    /// `mnist`: MNIST IDX under `DATA_ROOT/MNIST/raw` (or `mnist/`).
    Mnist,
    /// `folder:PATH`: an image folder (one sub-folder per class; `train/`,
    /// `val/`, `test/` sub-folders are used as splits when present).
    Folder(PathBuf),
}

/// The names [`DatasetSpec`] accepts, for help texts.
pub const DATASET_NAMES: &str =
    "synthetic-flowers, synthetic-shapes, flowers102, cifar10, mnist, folder:PATH";

impl FromStr for DatasetSpec {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("folder:") {
            if p.is_empty() {
                return Err(DataError::config(
                    "dataset",
                    "folder: needs a path, as in folder:data/my-images",
                ));
            }
            return Ok(DatasetSpec::Folder(PathBuf::from(p)));
        }
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "synthetic-flowers" | "synthetic" => Ok(DatasetSpec::SyntheticFlowers),
            "synthetic-shapes" | "shapes" => Ok(DatasetSpec::SyntheticShapes),
            "flowers102" | "flowers-102" | "oxford-flowers102" => Ok(DatasetSpec::Flowers102),
            "cifar10" | "cifar-10" => Ok(DatasetSpec::Cifar10),
            "mnist" => Ok(DatasetSpec::Mnist),
            _ => Err(DataError::config(
                "dataset",
                format!("unknown dataset {s:?}; expected one of {DATASET_NAMES}"),
            )),
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::SyntheticFlowers => f.write_str("synthetic-flowers"),
            DatasetSpec::SyntheticShapes => f.write_str("synthetic-shapes"),
            DatasetSpec::Flowers102 => f.write_str("flowers102"),
            DatasetSpec::Cifar10 => f.write_str("cifar10"),
            DatasetSpec::Mnist => f.write_str("mnist"),
            DatasetSpec::Folder(p) => write!(f, "folder:{}", p.display()),
        }
    }
}

impl DatasetSpec {
    /// Checks that this dataset can be drawn at `size` pixels a side, with
    /// the generators' own ranges (synthetic-flowers from 4, synthetic-shapes
    /// from 8, up to 4096); the others are resized to any side. The error's
    /// message says what is accepted, for a caller to name its own flag.
    pub fn check_side(&self, size: usize) -> Result<()> {
        match self {
            DatasetSpec::SyntheticFlowers => SyntheticFlowersConfig {
                size,
                ..Default::default()
            }
            .validate(),
            DatasetSpec::SyntheticShapes => SyntheticShapesConfig {
                size,
                ..Default::default()
            }
            .validate(),
            _ => Ok(()),
        }
    }

    /// Whether the data must be downloaded first (and with which `download` name).
    pub fn download_name(&self) -> Option<&'static str> {
        match self {
            DatasetSpec::Flowers102 => Some("flowers102"),
            DatasetSpec::Cifar10 => Some("cifar10"),
            DatasetSpec::Mnist => Some("mnist"),
            _ => None,
        }
    }
}

/// How [`open_with`] prepares a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenOptions {
    /// The split.
    pub split: Split,
    /// Square side every image is resized to (`None` keeps native sizes).
    pub image_size: Option<usize>,
    /// Convert 1-channel sets (MNIST) to 3 channels.
    pub rgb: bool,
    /// Resize filter.
    pub filter: Filter,
    /// Options of `synthetic-flowers` (its `size` is replaced by `image_size`).
    pub synthetic: SyntheticFlowersConfig,
    /// Options of `synthetic-shapes` (its `size` is replaced by `image_size`).
    pub shapes: SyntheticShapesConfig,
    /// Decode (and resize) every image once, in parallel, and keep them in
    /// memory ([`Cached`]): worth it for small sets read for
    /// many epochs, such as Flowers102's 1020 training images at 32x32.
    pub cache: bool,
    /// `folder:PATH` only: keep class folders without pictures (the class
    /// keeps its label and has no items) instead of refusing them.
    pub allow_empty_classes: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            split: Split::Train,
            image_size: Some(32),
            rgb: false,
            filter: Filter::Bilinear,
            synthetic: SyntheticFlowersConfig::default(),
            shapes: SyntheticShapesConfig::default(),
            cache: false,
            allow_empty_classes: false,
        }
    }
}

/// Opens `spec` under `data_root`, every image resized to
/// `image_size x image_size` (0 keeps native sizes); MNIST stays 1-channel
/// (see [`open_with`] to convert it to RGB).
///
/// See the crate-level example.
pub fn open(
    spec: &DatasetSpec,
    data_root: &Path,
    split: Split,
    image_size: usize,
) -> Result<Box<dyn Dataset>> {
    open_with(
        spec,
        data_root,
        &OpenOptions {
            split,
            image_size: (image_size > 0).then_some(image_size),
            ..Default::default()
        },
    )
}

/// Opens `spec` under `data_root` with all options.
pub fn open_with(
    spec: &DatasetSpec,
    data_root: &Path,
    opts: &OpenOptions,
) -> Result<Box<dyn Dataset>> {
    let split = opts.split;
    let base: Box<dyn Dataset> = match spec {
        DatasetSpec::SyntheticFlowers => {
            let cfg = SyntheticFlowersConfig {
                size: opts.image_size.unwrap_or(opts.synthetic.size),
                ..opts.synthetic.clone()
            };
            Box::new(SyntheticFlowers::new(cfg, split)?)
        }
        DatasetSpec::SyntheticShapes => {
            let cfg = SyntheticShapesConfig {
                size: opts.image_size.unwrap_or(opts.shapes.size),
                ..opts.shapes.clone()
            };
            Box::new(SyntheticShapes::new(cfg, split)?)
        }
        DatasetSpec::Flowers102 => Box::new(Flowers102::new(data_root, split)?),
        DatasetSpec::Cifar10 => Box::new(Cifar10::new(data_root, split)?),
        DatasetSpec::Mnist => Box::new(Mnist::new(data_root, split)?),
        DatasetSpec::Folder(p) => Box::new(ImageFolder::for_split_with(
            p,
            split,
            &FolderOptions {
                mode: ColorMode::Rgb,
                allow_empty: opts.allow_empty_classes,
            },
        )?),
    };
    let mut steps = Compose::new();
    let mut channels = base.channels();
    if opts.rgb && channels == 1 {
        steps = steps.then(ToRgb);
        channels = 3;
    }
    let mut size = base.image_size();
    if let Some(s) = opts.image_size {
        if size != Some((s, s)) {
            steps = steps.then(Resize::new(s, s).with_filter(opts.filter));
            size = Some((s, s));
        }
    }
    let ds: Box<dyn Dataset> = if steps.is_empty() {
        base
    } else {
        let t: Arc<dyn Transform> = Arc::new(steps);
        Box::new(Mapped::new(base, t, channels, size))
    };
    if opts.cache {
        return Ok(Box::new(Cached::new(ds.as_ref())?));
    }
    Ok(ds)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_checked_with_the_generators_ranges() {
        let flowers = DatasetSpec::SyntheticFlowers;
        let shapes = DatasetSpec::SyntheticShapes;
        flowers.check_side(4).unwrap();
        shapes.check_side(8).unwrap();
        for (spec, bad, want) in [
            (&flowers, 3, "4..=4096"),
            (&shapes, 7, "8..=4096"),
            (&shapes, 4097, "8..=4096"),
        ] {
            let e = spec.check_side(bad).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains(&bad.to_string()),
                "{spec} {bad}: {e}"
            );
        }
        // resized datasets take any side
        DatasetSpec::Mnist.check_side(1).unwrap();
    }

    #[test]
    fn parses_names_and_round_trips() {
        for s in [
            "synthetic-flowers",
            "synthetic-shapes",
            "flowers102",
            "cifar10",
            "mnist",
            "folder:some/dir",
        ] {
            let spec: DatasetSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "CIFAR-10".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Cifar10
        );
        let e = "imagenet".parse::<DatasetSpec>().unwrap_err().to_string();
        assert!(e.contains("imagenet") && e.contains("flowers102"), "{e}");
        assert!("folder:".parse::<DatasetSpec>().is_err());
    }

    #[test]
    fn synthetic_opens_at_the_requested_size_and_caches() {
        let spec: DatasetSpec = "synthetic-flowers".parse().unwrap();
        let ds = open(&spec, "data".as_ref(), Split::Test, 16).unwrap();
        assert_eq!(ds.get(0).unwrap().image.shape(), [3, 16, 16]);
        let opts = OpenOptions {
            split: Split::Test,
            image_size: Some(8),
            cache: true,
            synthetic: SyntheticFlowersConfig {
                test: 20,
                ..Default::default()
            },
            ..Default::default()
        };
        let c = open_with(&spec, "data".as_ref(), &opts).unwrap();
        assert_eq!((c.len(), c.image_size()), (20, Some((8, 8))));
        assert_eq!(c.labels().unwrap()[3], 3);
        let shapes: DatasetSpec = "synthetic-shapes".parse().unwrap();
        let ds = open(&shapes, "data".as_ref(), Split::Train, 24).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (4096, 8));
        assert_eq!(ds.get(5).unwrap().image.shape(), [3, 24, 24]);
        assert_eq!(ds.name(), "synthetic-shapes/train");
    }

    /// What each dataset reads, for a run to fingerprint
    /// (`Run::check_inputs`): the files or folder of the split opened,
    /// through the adaptors `open_with` adds; the synthetic sets none.
    #[test]
    fn input_paths_name_what_each_split_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spec = DatasetSpec::Folder(root.join("pics"));
        for split in ["train", "test"] {
            let class = root.join("pics").join(split).join("a");
            std::fs::create_dir_all(&class).unwrap();
            crate::image::Image::zeros(3, 4, 4)
                .save_png(&class.join("0.png"))
                .unwrap();
        }
        let opts = |split, cache| OpenOptions {
            split,
            image_size: Some(8),
            cache,
            ..Default::default()
        };
        // resized (Mapped), then also decoded once (Cached)
        for cache in [false, true] {
            let tr = open_with(&spec, root, &opts(Split::Train, cache)).unwrap();
            let te = open_with(&spec, root, &opts(Split::Test, cache)).unwrap();
            assert_eq!(tr.input_paths(), [root.join("pics/train")]);
            assert_eq!(
                crate::dataset::input_paths_of([tr.as_ref(), te.as_ref(), tr.as_ref()]),
                [root.join("pics/train"), root.join("pics/test")]
            );
        }
        // MNIST: the split's images and labels files, as found (.gz or raw)
        let idx = |magic: u32, dims: &[u32], data: &[u8]| -> Vec<u8> {
            let mut v = magic.to_be_bytes().to_vec();
            dims.iter().for_each(|d| v.extend(d.to_be_bytes()));
            v.extend(data);
            v
        };
        let raw = root.join("MNIST").join("raw");
        std::fs::create_dir_all(&raw).unwrap();
        let images = raw.join("t10k-images-idx3-ubyte");
        let labels = raw.join("t10k-labels-idx1-ubyte");
        std::fs::write(&images, idx(2051, &[1, 2, 2], &[0; 4])).unwrap();
        std::fs::write(&labels, idx(2049, &[1], &[3])).unwrap();
        let m = open(&DatasetSpec::Mnist, root, Split::Test, 4).unwrap();
        assert_eq!(m.input_paths(), [images, labels]);
        for spec in [DatasetSpec::SyntheticFlowers, DatasetSpec::SyntheticShapes] {
            let ds = open(&spec, root, Split::Test, 8).unwrap();
            assert!(ds.input_paths().is_empty(), "{spec}");
        }
    }

    #[test]
    fn missing_downloads_say_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        for spec in [
            DatasetSpec::Flowers102,
            DatasetSpec::Cifar10,
            DatasetSpec::Mnist,
        ] {
            let e = open(&spec, dir.path(), Split::Train, 32)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("cargo xtask download"), "{e}");
        }
    }
}
