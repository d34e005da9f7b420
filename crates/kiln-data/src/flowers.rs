//! Oxford Flowers102 in torchvision's layout:
//! `root/flowers-102/{jpg/image_00001.jpg.., imagelabels.mat, setid.mat}`.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::{ColorMode, Image};
use crate::mat::mat_integers;

/// Number of Flowers102 classes.
pub const FLOWERS102_CLASSES: usize = 102;

fn hint(root: &Path) -> String {
    format!(
        "run `cargo xtask download flowers102 --data-root {}` (or point --data-root at a folder holding flowers-102/)",
        root.display()
    )
}

/// Oxford Flowers102: 1020 train, 1020 val and 6149 test images, labels 0..101.
///
/// `root` is the data root holding `flowers-102/` (or that folder itself).
/// Images are decoded as RGB at their native size; use
/// [`open`](crate::open) or a [`Resize`](crate::transforms::Resize) for a fixed size.
#[derive(Debug, Clone)]
pub struct Flowers102 {
    dir: PathBuf,
    split: Split,
    items: Vec<(u32, usize)>,
    /// `imagelabels.mat`, `setid.mat` and `jpg/`.
    inputs: [PathBuf; 3],
}

impl Flowers102 {
    /// Reads the split and label files; images are decoded on [`Dataset::get`].
    pub fn new(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        let root = root.as_ref();
        let dir = if root.join("flowers-102").is_dir() {
            root.join("flowers-102")
        } else if root.join("imagelabels.mat").is_file() {
            root.to_path_buf()
        } else {
            return Err(DataError::Missing {
                path: root.join("flowers-102"),
                hint: hint(root),
            });
        };
        let lpath = dir.join("imagelabels.mat");
        let labels = mat_integers(&lpath, &read_file(&lpath, &hint(root))?, "labels")?;
        let spath = dir.join("setid.mat");
        let var = match split {
            Split::Train => "trnid",
            Split::Val => "valid",
            Split::Test => "tstid",
        };
        let ids = mat_integers(&spath, &read_file(&spath, &hint(root))?, var)?;
        let mut items = Vec::with_capacity(ids.len());
        for (k, &id) in ids.iter().enumerate() {
            if id < 1 || id as usize > labels.len() {
                return Err(DataError::format(
                    &spath,
                    format!("`{var}`[{k}]"),
                    format!("an image number in 1..={}", labels.len()),
                    id,
                ));
            }
            let l = labels[id as usize - 1];
            if !(1..=FLOWERS102_CLASSES as i64).contains(&l) {
                return Err(DataError::LabelOutOfRange {
                    path: lpath,
                    index: id as usize - 1,
                    label: l - 1,
                    classes: FLOWERS102_CLASSES,
                });
            }
            items.push((id as u32, (l - 1) as usize));
        }
        let inputs = [lpath, spath, dir.join("jpg")];
        Ok(Self {
            dir,
            split,
            items,
            inputs,
        })
    }

    /// The path of image number `id` (1-based, as in the .mat files).
    pub fn image_path(&self, id: u32) -> PathBuf {
        self.dir.join("jpg").join(format!("image_{id:05}.jpg"))
    }

    /// The folder holding `jpg/` and the .mat files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Dataset for Flowers102 {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index("flowers102", index, self.items.len())?;
        let (id, label) = self.items[index];
        let path = self.image_path(id);
        let bytes = read_file(
            &path,
            "the jpg/ folder is incomplete; run the download command again",
        )?;
        Ok(Sample {
            image: Image::decode(&bytes, ColorMode::Rgb, &path)?,
            label,
        })
    }
    fn num_classes(&self) -> usize {
        FLOWERS102_CLASSES
    }
    fn channels(&self) -> usize {
        3
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        None
    }
    fn name(&self) -> String {
        format!("flowers102/{}", self.split)
    }
    fn labels(&self) -> Option<Vec<usize>> {
        Some(self.items.iter().map(|&(_, l)| l).collect())
    }
    /// `imagelabels.mat`, `setid.mat` and the whole `jpg/` folder (every
    /// split's images: the split's 1020 or 6149 files would make as many
    /// fingerprints).
    fn input_paths(&self) -> Vec<&Path> {
        self.inputs.iter().map(PathBuf::as_path).collect()
    }
}
