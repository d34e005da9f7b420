//! [`ImageFolder`]: one sub-folder per class holding `.jpg`/`.jpeg`/`.png` files.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::{ColorMode, Image};

/// Pictures sorted into one sub-folder per class (torchvision's `ImageFolder`).
/// Classes are the sub-folder names in sorted order; files are sorted by name.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
    mode: ColorMode,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: dir.to_path_buf(),
                hint: "expected a folder with one sub-folder of .jpg/.png files per class".into(),
            }
        } else {
            DataError::io(dir, e)
        }
    })?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

impl ImageFolder {
    /// Scans `root`; pictures decode as RGB.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        Self::with_mode(root, ColorMode::Rgb)
    }

    /// Scans `root`; pictures decode as `mode` ([`ColorMode::Native`] is read as RGB).
    pub fn with_mode(root: impl AsRef<Path>, mode: ColorMode) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mode = if mode == ColorMode::Native {
            ColorMode::Rgb
        } else {
            mode
        };
        let mut classes = Vec::new();
        let mut items = Vec::new();
        for dir in sorted_entries(&root)?.into_iter().filter(|p| p.is_dir()) {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            let label = classes.len();
            let files: Vec<PathBuf> = sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if files.is_empty() {
                continue;
            }
            classes.push(name);
            items.extend(files.into_iter().map(|f| (f, label)));
        }
        if items.is_empty() {
            return Err(DataError::format(
                &root,
                "class folders",
                "one sub-folder per class holding .jpg/.jpeg/.png files",
                "no such files",
            ));
        }
        Ok(Self {
            root,
            classes,
            items,
            mode,
        })
    }

    /// For `folder:PATH` specs: `PATH/<split>` (`train`, `val`/`valid`, `test`)
    /// when it exists, else `PATH` for every split.
    pub fn for_split(root: impl AsRef<Path>, split: Split, mode: ColorMode) -> Result<Self> {
        let root = root.as_ref();
        let names: &[&str] = match split {
            Split::Train => &["train"],
            Split::Val => &["val", "valid", "validation"],
            Split::Test => &["test"],
        };
        for n in names {
            if root.join(n).is_dir() {
                return Self::with_mode(root.join(n), mode);
            }
        }
        Self::with_mode(root, mode)
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The files and labels.
    pub fn items(&self) -> &[(PathBuf, usize)] {
        &self.items
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        check_index("image folder", index, self.items.len())?;
        let (path, label) = &self.items[index];
        let bytes = read_file(path, "the file was removed after the folder was scanned")?;
        Ok(Sample {
            image: Image::decode(&bytes, self.mode, path)?,
            label: *label,
        })
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn channels(&self) -> usize {
        if self.mode == ColorMode::Gray {
            1
        } else {
            3
        }
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        None
    }
    fn name(&self) -> String {
        format!("folder:{}", self.root.display())
    }
    fn labels(&self) -> Option<Vec<usize>> {
        Some(self.items.iter().map(|(_, l)| *l).collect())
    }
}
