//! The one atomic file write of kiln, and the clean-up of what an
//! interrupted one leaves behind.
//!
//! A file written with [`write_atomic`] is never seen half-written under its
//! final name: the bytes go to a temporary sibling (`.<name>.tmp-<pid>`),
//! which is fsynced and renamed over the target, and the folder is fsynced so
//! the rename itself survives a crash. A process killed in the middle leaves
//! only the temporary file, which [`remove_stale_temps`] deletes later.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling [`write_atomic`] writes first.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename,
/// then fsync of the folder. Creates the folder if needed. On error the
/// temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = temp_path(dir, &name);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the folder's entry is on disk.
        // Some filesystems cannot fsync a folder; the data itself is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// The process id in a temporary file's name (`.<name>.tmp-<pid>`), if it is one.
fn temp_owner(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (_, pid) = file_name.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Whether process `pid` is running (on Linux, from `/proc`; elsewhere every
/// other process is taken as gone, which is safe for callers that hold the
/// folder's lock).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        false
    }
}

/// Deletes the temporary files that writers killed mid-write left in `dir`
/// (not in sub-folders): those named `.<name>.tmp-<pid>` whose process is no
/// longer running. Returns the paths removed.
pub fn remove_stale_temps(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if !process_alive(pid) && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Copies the folder `from` into `to` (created), recursively: e.g. to
/// branch a run folder before resuming it with other settings.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("sub").join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // No pid reaches 4e9 (Linux caps them at 2^22); ours is alive.
        let dead = d.join(".last.safetensors.tmp-4000000000");
        let live = d.join(format!(".x.tmp-{}", std::process::id()));
        let other = d.join("notes.tmp-1");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let removed = remove_stale_temps(d).unwrap();
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && other.exists());
        assert!(remove_stale_temps(&d.join("missing")).unwrap().is_empty());
        assert_eq!(temp_owner(".a.tmp-12"), Some(12));
        assert_eq!(temp_owner(".a.tmp-x"), None);
    }
}
