//! Verified downloads: md5-checked, resumable (HTTP `Range`), with a progress
//! bar, safe archive extraction, and installation from files already on disk
//! (`--from FOLDER`). A second run over a complete install does nothing.
//!
//! Layouts match torchvision's, so an existing torchvision download works as is:
//! `DIR/flowers-102/{jpg/, imagelabels.mat, setid.mat}`,
//! `DIR/cifar-10-batches-bin/*.bin`, `DIR/MNIST/raw/*-ubyte.gz`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::error::{DataError, Result};
use crate::util::with_suffix;

/// One file of a dataset: where to get it and its published md5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name on disk (and in `--from` folders).
    pub name: String,
    /// URLs to try in order (mirrors).
    pub urls: Vec<String>,
    /// Published md5, lowercase hex.
    pub md5: String,
    /// A `.tar.gz`/`.tgz` to extract into the dataset folder.
    pub extract: bool,
}

/// Everything needed to install one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Name for messages (`flowers102`).
    pub name: String,
    /// Folder under the data root (`flowers-102`; empty for the root itself).
    pub folder: PathBuf,
    /// The files to fetch.
    pub files: Vec<RemoteFile>,
    /// Paths (relative to the folder) that exist once the archives are
    /// extracted; when all exist, archives are neither fetched nor extracted.
    pub extracted: Vec<PathBuf>,
}

/// The datasets `cargo xtask download` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnownDataset {
    /// Oxford Flowers102 (three files, the images in a .tgz).
    Flowers102,
    /// CIFAR-10, binary version.
    Cifar10,
    /// MNIST, gzipped IDX files.
    Mnist,
}

impl FromStr for KnownDataset {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "flowers102" | "flowers-102" => Ok(Self::Flowers102),
            "cifar10" | "cifar-10" => Ok(Self::Cifar10),
            "mnist" => Ok(Self::Mnist),
            _ => Err(DataError::config(
                "dataset",
                format!("cannot download {s:?}; expected flowers102, cifar10 or mnist"),
            )),
        }
    }
}

fn file(name: &str, urls: &[String], md5: &str, extract: bool) -> RemoteFile {
    RemoteFile {
        name: name.into(),
        urls: urls.to_vec(),
        md5: md5.into(),
        extract,
    }
}

impl KnownDataset {
    /// The dataset's files, published checksums and layout.
    pub fn manifest(self) -> Manifest {
        match self {
            Self::Flowers102 => {
                let base = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/";
                let u = |n: &str| vec![format!("{base}{n}")];
                Manifest {
                    name: "flowers102".into(),
                    folder: "flowers-102".into(),
                    files: vec![
                        file(
                            "102flowers.tgz",
                            &u("102flowers.tgz"),
                            "52808999861908f626f3c1f4e79d11fa",
                            true,
                        ),
                        file(
                            "imagelabels.mat",
                            &u("imagelabels.mat"),
                            "e0620be6f572b9609742df49c70aed4d",
                            false,
                        ),
                        file(
                            "setid.mat",
                            &u("setid.mat"),
                            "a5357ecc9cb78c4bef273ce3793fc85c",
                            false,
                        ),
                    ],
                    extracted: vec!["jpg/image_00001.jpg".into(), "jpg/image_08189.jpg".into()],
                }
            }
            Self::Cifar10 => Manifest {
                name: "cifar10".into(),
                folder: PathBuf::new(),
                files: vec![file(
                    "cifar-10-binary.tar.gz",
                    &["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".to_string()],
                    "c32a1d4ab5d03f1284b67883e8d87530",
                    true,
                )],
                extracted: (1..=5)
                    .map(|i| PathBuf::from(format!("cifar-10-batches-bin/data_batch_{i}.bin")))
                    .chain([PathBuf::from("cifar-10-batches-bin/test_batch.bin")])
                    .collect(),
            },
            Self::Mnist => {
                let mirrors = [
                    "https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/",
                ];
                let u = |n: &str| {
                    mirrors
                        .iter()
                        .map(|m| format!("{m}{n}"))
                        .collect::<Vec<_>>()
                };
                let f = |n: &str, md5: &str| file(n, &u(n), md5, false);
                Manifest {
                    name: "mnist".into(),
                    folder: PathBuf::from("MNIST").join("raw"),
                    files: vec![
                        f(
                            "train-images-idx3-ubyte.gz",
                            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                        ),
                        f(
                            "train-labels-idx1-ubyte.gz",
                            "d53e105ee54ea40749a09fcbcd1e9432",
                        ),
                        f(
                            "t10k-images-idx3-ubyte.gz",
                            "9fb629c4189551a2d022fa330f9573f3",
                        ),
                        f(
                            "t10k-labels-idx1-ubyte.gz",
                            "ec29112dd5afa0611ce80d1b7f02629c",
                        ),
                    ],
                    extracted: vec![],
                }
            }
        }
    }
}

/// How [`install`] gets files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Take the files from this folder instead of the network (verified the same way).
    pub from: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstallReport {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Files downloaded or copied in this run.
    pub fetched: Vec<String>,
    /// Archives extracted in this run.
    pub extracted: Vec<String>,
    /// Files already present and verified.
    pub verified: Vec<String>,
}

impl InstallReport {
    /// Whether the run changed nothing (everything was already in place).
    pub fn was_complete(&self) -> bool {
        self.fetched.is_empty() && self.extracted.is_empty()
    }
}

/// The md5 of a file, lowercase hex.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn verified(path: &Path, md5: &str) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    Ok(md5_file(path)?.eq_ignore_ascii_case(md5))
}

/// Checks the md5 of `part`, then renames it to `dest`; on mismatch removes
/// `part` (kiln's own temporary copy, never the user's file) and reports a
/// [`DataError::Checksum`] for `shown` with `hint`.
fn finish(part: &Path, dest: &Path, md5: &str, shown: &Path, hint: String) -> Result<()> {
    let got = md5_file(part)?;
    if !got.eq_ignore_ascii_case(md5) {
        let _ = fs::remove_file(part);
        return Err(DataError::Checksum {
            path: shown.to_path_buf(),
            expected: md5.to_string(),
            found: got,
            hint,
        });
    }
    fs::rename(part, dest).map_err(|e| DataError::io(dest, e))
}

fn progress_bar(show: bool, total: Option<u64>, name: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(name.to_string());
    pb
}

/// Downloads `url` into `part`, resuming from its current length with an
/// HTTP `Range` request (a server that ignores it makes the download restart).
fn download_to_part(url: &str, part: &Path, progress: bool) -> Result<()> {
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .redirects(8)
        .build();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let http = |msg: String| DataError::Http {
        url: url.to_string(),
        msg,
    };
    let resp = match req.call() {
        Ok(r) => r,
        // the part file already holds everything: let the checksum decide
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            return Err(http(format!("HTTP {code} {}", r.status_text())))
        }
        Err(e) => return Err(http(e.to_string())),
    };
    let resume = resp.status() == 206;
    let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let start = if resume { have } else { 0 };
    let total = len.map(|l| l + start);
    let mut out = if resume {
        OpenOptions::new().append(true).open(part)
    } else {
        File::create(part)
    }
    .map_err(|e| DataError::io(part, e))?;
    let name = part
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".part").to_string())
        .unwrap_or_default();
    let pb = progress_bar(progress, total, &name);
    pb.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                pb.abandon();
                return Err(http(format!(
                    "transfer interrupted after {} bytes ({e}); run again to resume",
                    start + got
                )));
            }
        };
        out.write_all(&buf[..n])
            .map_err(|e| DataError::io(part, e))?;
        got += n as u64;
        pb.inc(n as u64);
    }
    out.flush().map_err(|e| DataError::io(part, e))?;
    pb.finish_and_clear();
    if let Some(l) = len {
        if got < l {
            return Err(http(format!(
                "transfer ended after {got} of {l} bytes; run again to resume"
            )));
        }
    }
    Ok(())
}

/// Downloads `dest` from the first working URL of `urls`, resuming a partial
/// `dest.part`, and checks its md5. Nothing is ever left under `dest` unless
/// verified; a file with a bad checksum is removed.
pub fn fetch_file(urls: &[String], dest: &Path, md5: &str, progress: bool) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let part = with_suffix(dest, ".part");
    let mut last = None;
    for url in urls {
        match download_to_part(url, &part, progress) {
            Ok(()) => {
                let hint = format!(
                    "the downloaded data was discarded, not installed as {}: run the \
                     command again; if it keeps failing, the server or a proxy alters the file",
                    dest.display()
                );
                return finish(&part, dest, md5, dest, hint);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| DataError::config("urls", "no URL to download from")))
}

/// Copies `src` to `dest` (through `dest.part`), verifying the md5.
fn copy_verified(src: &Path, dest: &Path, md5: &str) -> Result<()> {
    let part = with_suffix(dest, ".part");
    fs::copy(src, &part).map_err(|e| DataError::io(src, e))?;
    let hint = format!(
        "this --from file is not the published one; it was left untouched and not \
         installed as {}: replace it with a good copy, or drop --from to download it",
        dest.display()
    );
    let r = finish(&part, dest, md5, src, hint);
    if r.is_err() {
        let _ = fs::remove_file(&part);
    }
    r
}

/// Whether every path in `rel` exists under `dir`.
fn all_exist(dir: &Path, rel: &[PathBuf]) -> bool {
    !rel.is_empty() && rel.iter().all(|p| dir.join(p).exists())
}

/// Installs `manifest` under `data_root`: verifies what is there, fetches (or
/// copies from `opts.from`) what is missing or bad, and extracts archives.
pub fn install(
    manifest: &Manifest,
    data_root: &Path,
    opts: &DownloadOptions,
) -> Result<InstallReport> {
    let dir = data_root.join(&manifest.folder);
    fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let mut report = InstallReport {
        dir: dir.clone(),
        ..Default::default()
    };
    let unpacked = all_exist(&dir, &manifest.extracted);
    for f in &manifest.files {
        let dest = dir.join(&f.name);
        if f.extract && unpacked {
            report.verified.push(f.name.clone());
            continue;
        }
        if verified(&dest, &f.md5)? {
            report.verified.push(f.name.clone());
        } else {
            if dest.exists() {
                fs::remove_file(&dest).map_err(|e| DataError::io(&dest, e))?;
            }
            match &opts.from {
                Some(src_dir) => {
                    let src = src_dir.join(&f.name);
                    if !src.is_file() {
                        return Err(DataError::Missing {
                            path: src,
                            hint: format!(
                                "--from needs the original files of {}: {}",
                                manifest.name,
                                manifest
                                    .files
                                    .iter()
                                    .map(|f| f.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                    copy_verified(&src, &dest, &f.md5)?;
                }
                None => fetch_file(&f.urls, &dest, &f.md5, opts.progress)?,
            }
            report.fetched.push(f.name.clone());
        }
        if f.extract {
            extract_tar_gz(&dest, &dir)?;
            report.extracted.push(f.name.clone());
        }
    }
    if !manifest.extracted.is_empty() && !all_exist(&dir, &manifest.extracted) {
        let missing = manifest
            .extracted
            .iter()
            .find(|p| !dir.join(p).exists())
            .cloned()
            .unwrap_or_default();
        return Err(DataError::Missing {
            path: dir.join(missing),
            hint: "the archive did not contain it; is it the right file?".into(),
        });
    }
    Ok(report)
}

/// Normalises a relative path lexically; `None` if it is absolute or climbs
/// above its start with `..`.
fn contained(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Extracts a `.tar.gz` into `dest` safely: entries with absolute paths or
/// `..`, and links pointing outside `dest`, are refused before anything is
/// written. Entries are unpacked into a temporary folder inside `dest` and
/// moved into place only once the whole archive has been read, so an
/// interrupted extraction leaves nothing half-written under the final names.
/// Returns the number of entries.
pub fn extract_tar_gz(archive: &Path, dest: &Path) -> Result<usize> {
    let open = || -> Result<tar::Archive<flate2::read::GzDecoder<File>>> {
        let f = File::open(archive).map_err(|e| DataError::io(archive, e))?;
        Ok(tar::Archive::new(flate2::read::GzDecoder::new(f)))
    };
    let bad = |entry: &Path, reason: &str| DataError::UnsafeArchive {
        archive: archive.to_path_buf(),
        entry: entry.display().to_string(),
        reason: reason.to_string(),
    };
    let tar_err = |e: std::io::Error| {
        DataError::format(archive, "tar.gz archive", "a readable gzip'd tar", e)
    };
    // pass 1: validate every entry
    let mut tops = std::collections::BTreeSet::new();
    let mut count = 0;
    {
        let mut ar = open()?;
        for entry in ar.entries().map_err(tar_err)? {
            let entry = entry.map_err(tar_err)?;
            let path = entry.path().map_err(tar_err)?.into_owned();
            let Some(norm) = contained(&path) else {
                return Err(bad(
                    &path,
                    "absolute path or `..` escapes the target folder",
                ));
            };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(tar_err)?
                    .ok_or_else(|| bad(&path, "link without a target"))?
                    .into_owned();
                let resolved = if kind.is_symlink() {
                    norm.parent().unwrap_or(Path::new("")).join(&target)
                } else {
                    target.clone()
                };
                if target.is_absolute() || contained(&resolved).is_none() {
                    return Err(bad(
                        &path,
                        &format!(
                            "link to {} points outside the target folder",
                            target.display()
                        ),
                    ));
                }
            }
            if let Some(Component::Normal(t)) = norm.components().next() {
                tops.insert(t.to_os_string());
            }
            count += 1;
        }
    }
    // pass 2: unpack into a temporary folder, then move the top-level entries
    let tmp = dest.join(format!(".extract-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let res = (|| -> Result<()> {
        let mut ar = open()?;
        ar.set_preserve_permissions(false);
        for entry in ar.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link()) {
                continue; // devices, fifos, pax headers: nothing to write
            }
            let ok = entry.unpack_in(&tmp).map_err(tar_err)?;
            if !ok {
                let p = entry.path().map_err(tar_err)?.into_owned();
                return Err(bad(&p, "escapes the target folder"));
            }
        }
        for t in &tops {
            let from = tmp.join(t);
            let to = dest.join(t);
            if !from.exists() && fs::symlink_metadata(&from).is_err() {
                continue;
            }
            if to.is_dir() {
                fs::remove_dir_all(&to).map_err(|e| DataError::io(&to, e))?;
            } else if fs::symlink_metadata(&to).is_ok() {
                fs::remove_file(&to).map_err(|e| DataError::io(&to, e))?;
            }
            fs::rename(&from, &to).map_err(|e| DataError::io(&to, e))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp);
    res.map(|()| count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn contained_rejects_escapes() {
        assert_eq!(contained(Path::new("a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(contained(Path::new("a/../b")), Some(PathBuf::from("b")));
        assert!(contained(Path::new("../x")).is_none());
        assert!(contained(Path::new("a/../../x")).is_none());
        assert!(contained(Path::new("/etc/passwd")).is_none());
    }

    #[test]
    fn manifests_have_the_published_checksums() {
        let f = KnownDataset::Flowers102.manifest();
        assert_eq!(f.files.len(), 3);
        assert_eq!(f.files[0].md5, "52808999861908f626f3c1f4e79d11fa");
        assert_eq!(KnownDataset::Mnist.manifest().files[0].urls.len(), 2);
        assert!("imagenet".parse::<KnownDataset>().is_err());
    }
}
