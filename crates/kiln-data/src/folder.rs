//! [`ImageFolder`]: one sub-folder per class holding `.jpg`/`.jpeg`/`.png` files.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{read_file, DataError, Result};
use crate::image::{ColorMode, Image};

/// Pictures sorted into one sub-folder per class (torchvision's `ImageFolder`).
///
/// Classes are the sub-folder names in sorted order, so the label of a class
/// depends only on the folder names, never on which folders hold images;
/// files are sorted by name. A class folder without images is refused
/// unless [`FolderOptions::allow_empty`] is set (then the class keeps its
/// label and has no items), as torchvision's `allow_empty`.
///
/// Hidden entries, whose names start with `.`, are skipped: hidden folders
/// are not classes, and hidden files are not images even with an image
/// extension (macOS's `._photo.jpg` resource forks, `.DS_Store`), so they
/// neither become items nor make a class folder count as non-empty.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
    mode: ColorMode,
}

/// How [`ImageFolder`] scans a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FolderOptions {
    /// How pictures decode ([`ColorMode::Native`] is read as RGB).
    pub mode: ColorMode,
    /// Keep class folders that hold no image (the class keeps its label and
    /// has no items) instead of refusing them.
    pub allow_empty: bool,
}

/// The split sub-folder names [`ImageFolder::for_split`] recognises.
const SPLIT_DIRS: [(Split, &[&str]); 3] = [
    (Split::Train, &["train"]),
    (Split::Val, &["val", "valid", "validation"]),
    (Split::Test, &["test"]),
];

/// Whether the entry's name starts with `.` (`.DS_Store`, `._photo.jpg`).
fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
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

/// The class sub-folders of `dir` (hidden ones skipped), sorted by name.
fn class_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir() && !is_hidden(p))
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some((name, p))
        })
        .collect())
}

/// The split folder of `split` under `root`, if there is one.
fn split_dir(root: &Path, split: Split) -> Option<PathBuf> {
    SPLIT_DIRS
        .iter()
        .filter(|(s, _)| *s == split)
        .flat_map(|(_, names)| names.iter())
        .map(|n| root.join(n))
        .find(|p| p.is_dir())
}

impl ImageFolder {
    /// Scans `root`; pictures decode as RGB; empty class folders are refused.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        Self::with_options(root, &FolderOptions::default())
    }

    /// Scans `root`; pictures decode as `mode` ([`ColorMode::Native`] is read
    /// as RGB); empty class folders are refused.
    pub fn with_mode(root: impl AsRef<Path>, mode: ColorMode) -> Result<Self> {
        Self::with_options(
            root,
            &FolderOptions {
                mode,
                ..Default::default()
            },
        )
    }

    /// Scans `root` with all options.
    pub fn with_options(root: impl AsRef<Path>, opts: &FolderOptions) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mode = if opts.mode == ColorMode::Native {
            ColorMode::Rgb
        } else {
            opts.mode
        };
        let mut classes = Vec::new();
        let mut items = Vec::new();
        for (name, dir) in class_dirs(&root)? {
            let label = classes.len();
            let files: Vec<PathBuf> = sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && !is_hidden(p) && is_image(p))
                .collect();
            if files.is_empty() && !opts.allow_empty {
                return Err(DataError::format(
                    &dir,
                    "class folder",
                    "at least one .jpg/.jpeg/.png file (one sub-folder per class)",
                    format!(
                        "none; add images of class {name:?}, keep it as a class without \
                         images (FolderOptions::allow_empty; `--allow-empty-classes` in \
                         cargo xtask), or remove the folder (removing it renumbers the \
                         classes after it, so do the same in every split)"
                    ),
                ));
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

    /// For `folder:PATH` specs: `PATH/<split>` (`train`, `val`/`valid`/`validation`,
    /// `test`), with empty class folders refused. See [`ImageFolder::for_split_with`].
    pub fn for_split(root: impl AsRef<Path>, split: Split, mode: ColorMode) -> Result<Self> {
        Self::for_split_with(
            root,
            split,
            &FolderOptions {
                mode,
                ..Default::default()
            },
        )
    }

    /// For `folder:PATH` specs: `PATH/<split>` (`train`, `val`/`valid`/`validation`,
    /// `test`) when `PATH` has split folders; their class folders must have
    /// the same names, so every split numbers the classes alike. Without
    /// split folders, `PATH` itself is the train split and the other splits
    /// are [`DataError::NoSplit`]: the same pictures are never used for
    /// training and testing.
    pub fn for_split_with(
        root: impl AsRef<Path>,
        split: Split,
        opts: &FolderOptions,
    ) -> Result<Self> {
        let root = root.as_ref();
        let present: Vec<(Split, PathBuf)> = SPLIT_DIRS
            .iter()
            .filter_map(|(s, _)| split_dir(root, *s).map(|d| (*s, d)))
            .collect();
        let dataset = format!("folder:{}", root.display());
        let Some((_, dir)) = present.iter().find(|(s, _)| *s == split) else {
            if present.is_empty() {
                if split == Split::Train {
                    return Self::with_options(root, opts);
                }
                return Err(DataError::NoSplit {
                    dataset,
                    split: split.as_str(),
                    hint: format!(
                        "{} has no train/ and {split}/ sub-folders, so all its pictures are \
                         the training split; to evaluate on held-out pictures, put them in \
                         {split}/<class>/ and the training ones in train/<class>/",
                        root.display()
                    ),
                });
            }
            let names: Vec<String> = present
                .iter()
                .map(|(_, d)| format!("{}/", d.file_name().unwrap_or_default().to_string_lossy()))
                .collect();
            if split == Split::Train {
                return Err(DataError::Missing {
                    path: root.join("train"),
                    hint: format!(
                        "{} has split folders ({}) but no train/: put the training pictures \
                         in train/<class>/",
                        root.display(),
                        names.join(", ")
                    ),
                });
            }
            return Err(DataError::NoSplit {
                dataset,
                split: split.as_str(),
                hint: format!(
                    "{} has {} but no {split}/ sub-folder",
                    root.display(),
                    names.join(", ")
                ),
            });
        };
        let folder = Self::with_options(dir, opts)?;
        for (other, odir) in present.iter().filter(|(s, _)| *s != split) {
            let theirs: Vec<String> = class_dirs(odir)?.into_iter().map(|(n, _)| n).collect();
            if theirs != folder.classes {
                let only = |a: &[String], b: &[String]| -> String {
                    let v: Vec<&str> = a
                        .iter()
                        .filter(|x| !b.contains(x))
                        .map(String::as_str)
                        .collect();
                    if v.is_empty() {
                        "none".into()
                    } else {
                        v.join(", ")
                    }
                };
                return Err(DataError::format(
                    root,
                    "class folders",
                    format!(
                        "the same class folders in {split}/ and {other}/, so both number the \
                         classes alike"
                    ),
                    format!(
                        "only in {split}/: {}; only in {other}/: {}; rename, add or remove \
                         class folders so every split has the same ones",
                        only(&folder.classes, &theirs),
                        only(&theirs, &folder.classes)
                    ),
                ));
            }
        }
        Ok(folder)
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
    /// The scanned folder (under a `folder:PATH` with split folders, the
    /// split's: `PATH/train`, `PATH/test`, ...). Every file in it counts,
    /// images or not, hidden ones aside.
    fn input_paths(&self) -> Vec<&Path> {
        vec![self.root.as_path()]
    }
}
