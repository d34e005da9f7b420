//! The [`Dataset`] trait, splits, and dataset adaptors.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use kiln_core::rng::SeededRng;
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::image::Image;
use crate::transforms::Transform;

/// One labelled picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The picture, `[C, H, W]`, values in [0, 1].
    pub image: Image,
    /// The class, `0..num_classes`.
    pub label: usize,
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Split {
    /// The training split.
    #[default]
    Train,
    /// The validation split.
    Val,
    /// The test split.
    Test,
}

impl Split {
    /// `"train"`, `"val"` or `"test"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(DataError::config(
                "split",
                format!("expected train, val or test, found {other:?}"),
            )),
        }
    }
}

/// A random-access collection of labelled images.
///
/// `get` is called from several threads at once by the
/// [`DataLoader`](crate::DataLoader), so implementations are `Send + Sync` and
/// decode lazily (or hold decoded data). Errors name the file; an undecodable
/// image is a [`DataError::Decode`], which the loader can skip on request.
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;

    /// Whether there are no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads (decodes) item `index`, `0 <= index < len()`.
    fn get(&self, index: usize) -> Result<Sample>;

    /// Number of classes; labels are `0..num_classes()`.
    fn num_classes(&self) -> usize;

    /// Channels of every item (1 or 3).
    fn channels(&self) -> usize;

    /// `(height, width)` when every item has the same size, else `None`.
    fn image_size(&self) -> Option<(usize, usize)>;

    /// A short name for logs (`"flowers102/train"`).
    fn name(&self) -> String;

    /// The labels of all items, if known without decoding images.
    fn labels(&self) -> Option<Vec<usize>> {
        None
    }

    /// The files and folders this dataset reads its items from (a folder
    /// stands for everything in it), so that a training run can record
    /// their fingerprints and a resume can check that it reads the same
    /// data (kiln-core's `Run::check_inputs`; see [`input_paths_of`]).
    ///
    /// The readers list what their split reads: [`Cifar10`](crate::Cifar10)
    /// its batch files, [`Mnist`](crate::Mnist) its images and labels files,
    /// [`Flowers102`](crate::Flowers102) its `.mat` files and `jpg/`,
    /// [`ImageFolder`](crate::ImageFolder) its folder (the split's folder
    /// under a `folder:PATH` with split folders). Datasets drawn in memory
    /// ([`SyntheticFlowers`](crate::SyntheticFlowers),
    /// [`SyntheticShapes`](crate::SyntheticShapes)) read none: the default.
    /// Adaptors ([`Mapped`], [`Subset`], [`Cached`], `Arc`, `Box`) list
    /// their source's; a dataset of your own that reads files should list
    /// them too, or resumes of runs on it are not checked.
    fn input_paths(&self) -> Vec<&Path> {
        Vec::new()
    }
}

/// The paths the datasets `sets` read ([`Dataset::input_paths`]), each
/// once, in order: the argument of kiln-core's `Run::check_inputs` for a run
/// that trains on them (a train split and a test split of Flowers102 share
/// their `.mat` files and `jpg/`, which are then fingerprinted once).
pub fn input_paths_of<'a, 'd: 'a>(
    sets: impl IntoIterator<Item = &'a (dyn Dataset + 'd)>,
) -> Vec<&'a Path> {
    let mut out: Vec<&Path> = Vec::new();
    for p in sets.into_iter().flat_map(|d| d.input_paths()) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn channels(&self) -> usize {
        (**self).channels()
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        (**self).image_size()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn labels(&self) -> Option<Vec<usize>> {
        (**self).labels()
    }
    fn input_paths(&self) -> Vec<&Path> {
        (**self).input_paths()
    }
}

impl<D: Dataset + ?Sized> Dataset for Box<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn channels(&self) -> usize {
        (**self).channels()
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        (**self).image_size()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn labels(&self) -> Option<Vec<usize>> {
        (**self).labels()
    }
    fn input_paths(&self) -> Vec<&Path> {
        (**self).input_paths()
    }
}

pub(crate) fn check_index(name: &str, index: usize, len: usize) -> Result<()> {
    if index >= len {
        return Err(DataError::config(
            "index",
            format!("{name}: index {index} out of range 0..{len}"),
        ));
    }
    Ok(())
}

/// A dataset with a deterministic transform applied to every item on read
/// (e.g. the resize that [`open`](crate::open) adds). The transform gets a
/// generator derived from `seed` and the index, so random transforms give the
/// same picture for the same index every time.
pub struct Mapped<D> {
    inner: D,
    transform: Arc<dyn Transform>,
    channels: usize,
    size: Option<(usize, usize)>,
    seed: u64,
}

impl<D: Dataset> Mapped<D> {
    /// Wraps `inner`; `channels`/`size` describe the transform's output.
    pub fn new(
        inner: D,
        transform: Arc<dyn Transform>,
        channels: usize,
        size: Option<(usize, usize)>,
    ) -> Self {
        Self {
            inner,
            transform,
            channels,
            size,
            seed: 0,
        }
    }
}

impl<D: Dataset> Dataset for Mapped<D> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        let s = self.inner.get(index)?;
        let mut rng = SeededRng::derive(self.seed, &[index as u64]);
        Ok(Sample {
            image: self.transform.apply(s.image, &mut rng)?,
            label: s.label,
        })
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        self.size
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn labels(&self) -> Option<Vec<usize>> {
        self.inner.labels()
    }
    fn input_paths(&self) -> Vec<&Path> {
        self.inner.input_paths()
    }
}

/// All items of a dataset decoded once and held in memory (decoded in
/// parallel). Worth it for small sets read for many epochs, such as
/// Flowers102's 1020 training images at 32x32.
pub struct Cached {
    name: String,
    classes: usize,
    samples: Vec<Sample>,
    /// The source's [`Dataset::input_paths`].
    inputs: Vec<PathBuf>,
}

impl Cached {
    /// Decodes every item of `inner`; the first error is returned.
    pub fn new(inner: &dyn Dataset) -> Result<Self> {
        let samples = (0..inner.len())
            .into_par_iter()
            .map(|i| inner.get(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: inner.name(),
            classes: inner.num_classes(),
            samples,
            inputs: inner
                .input_paths()
                .into_iter()
                .map(Path::to_path_buf)
                .collect(),
        })
    }

    /// The decoded samples.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

impl Dataset for Cached {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.samples.get(index).cloned().ok_or_else(|| {
            DataError::config("index", format!("{}: {index} out of range", self.name))
        })
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn channels(&self) -> usize {
        self.samples.first().map_or(3, |s| s.image.channels)
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        let f = self.samples.first()?;
        let (h, w) = (f.image.height, f.image.width);
        self.samples
            .iter()
            .all(|s| s.image.height == h && s.image.width == w)
            .then_some((h, w))
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn labels(&self) -> Option<Vec<usize>> {
        Some(self.samples.iter().map(|s| s.label).collect())
    }
    /// The source's: the pictures were decoded from them.
    fn input_paths(&self) -> Vec<&Path> {
        self.inputs.iter().map(PathBuf::as_path).collect()
    }
}

/// A subset of another dataset, by index list.
pub struct Subset<D> {
    inner: D,
    indices: Vec<usize>,
}

impl<D: Dataset> Subset<D> {
    /// The items `indices` of `inner`; errors if one is out of range.
    pub fn new(inner: D, indices: Vec<usize>) -> Result<Self> {
        let n = inner.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(DataError::config(
                "subset indices",
                format!("{}: index {bad} out of range 0..{n}", inner.name()),
            ));
        }
        Ok(Self { inner, indices })
    }

    /// The first `n` items (or all if fewer).
    pub fn first(inner: D, n: usize) -> Self {
        let indices = (0..n.min(inner.len())).collect();
        Self { inner, indices }
    }
}

impl<D: Dataset> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index(&self.name(), index, self.indices.len())?;
        self.inner.get(self.indices[index])
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        self.inner.image_size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn labels(&self) -> Option<Vec<usize>> {
        let all = self.inner.labels()?;
        Some(self.indices.iter().map(|&i| all[i]).collect())
    }
    fn input_paths(&self) -> Vec<&Path> {
        self.inner.input_paths()
    }
}
