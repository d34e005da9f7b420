//! Run folders: `runs/<task>-<timestamp>/` with `config.toml`, `metrics.jsonl`,
//! `checkpoints/`, figures and `summary.json`; [`RunOptions`], the flags every
//! training command shares; and [`Run`], a folder held by one process.
//!
//! A run folder is never lost or overwritten by accident: a new run refuses a
//! folder that already holds one (unless [`RunOptions::overwrite`] says so), a
//! resumed run must be of the same kind and keep its config (except the
//! fields its trainer lets change), and one process at a time holds a folder
//! through an OS lock on `.lock` (released even on `kill -9`). A run whose
//! start was refused after its folder was made, and which so never began,
//! does not block a new run there. `--overwrite`
//! deletes only what kiln runs write there ([`RUN_FILES`]): a folder that
//! also holds anything else (a user's `notes.md`, `my-plots/`) is refused,
//! with nothing deleted ([`RunError::ForeignFiles`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a run folder operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Filesystem error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file in the run folder has unexpected content.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A new run was asked for in a folder that already holds one.
    #[error(
        "{path} already holds a run; continue it with --resume {path}, or pass --overwrite \
         to delete it and start again"
    )]
    Exists {
        /// The folder.
        path: PathBuf,
    },
    /// A new run was asked for in a folder with other files in it.
    #[error(
        "{path} is not empty and holds no kiln run (no config.toml); choose a new folder for \
         --out (kiln never deletes files it did not write)"
    )]
    NotEmpty {
        /// The folder.
        path: PathBuf,
    },
    /// Another process holds the folder.
    #[error(
        "{path} is in use by another kiln process{}; wait for it to finish (a folder is \
         written by one process at a time)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The folder.
        path: PathBuf,
        /// The holder's process id, when it wrote one.
        holder: Option<u32>,
    },
    /// The folder holds a run of another kind.
    #[error("{path} is a {found:?} run, not a {expected:?} run; pass a {expected} run folder")]
    WrongKind {
        /// The folder.
        path: PathBuf,
        /// The kind in its `config.toml`.
        found: String,
        /// The kind the caller trains.
        expected: String,
    },
    /// A resumed run was given settings that differ from its `config.toml`.
    #[error(
        "cannot resume {path} with other settings: {}. A resumed run keeps its own \
         config.toml{}; start a new run (--out) to change the others",
        changes.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if may_change.is_empty() { String::new() } else {
            format!(" except {}", may_change.join(", "))
        }
    )]
    ConfigChanged {
        /// The folder.
        path: PathBuf,
        /// What differs.
        changes: Vec<ConfigChange>,
        /// The fields that may change on resume.
        may_change: Vec<String>,
    },
    /// `--overwrite` was asked for a folder that holds one of the new run's
    /// own inputs (a base model, a data file), which clearing it would delete.
    #[error(
        "--overwrite would delete {input}, the run's {field} (in its config), which lies \
         inside {path}; move the input out of that folder or choose another --out"
    )]
    InputInside {
        /// The run folder to be cleared.
        path: PathBuf,
        /// The input inside it, as the config names it.
        input: PathBuf,
        /// Its field in the config, as a dotted path (`policy.model`).
        field: String,
    },
    /// `--overwrite` was asked for a run folder that also holds entries no
    /// kiln run writes (see [`RUN_FILES`]); nothing was deleted.
    #[error(
        "--overwrite: {path} holds {}, which no kiln run writes, so nothing was deleted; move \
         {} out of the folder or choose another --out (--overwrite deletes only the files kiln \
         runs write)",
        list_entries(entries),
        if entries.len() == 1 { "it" } else { "them" }
    )]
    ForeignFiles {
        /// The run folder.
        path: PathBuf,
        /// The entries, relative to the folder (a folder with a trailing `/`).
        entries: Vec<String>,
    },
}

/// `a, b and c`, at most ten names, then how many more: how refusals that
/// name a folder's entries list them (also kiln-rlhf's task folders).
pub fn list_entries(entries: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut names: Vec<&str> = entries.iter().take(SHOWN).map(String::as_str).collect();
    let more = entries.len().saturating_sub(SHOWN);
    let more = format!("{more} more");
    if entries.len() > SHOWN {
        names.push(&more);
    }
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// One setting that differs between a run's `config.toml` and a resume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    /// The field, as a dotted path (`train.lr`).
    pub field: String,
    /// Its value in the run's `config.toml` (`absent` if missing).
    pub run: String,
    /// The requested value (`absent` if missing).
    pub requested: String,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} in the run, {} now",
            self.field, self.run, self.requested
        )
    }
}

/// Flattens a TOML value into `(dotted path, value)` pairs (arrays whole).
fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// The fields in which `requested` differs from `saved` (both as TOML), in
/// path order, skipping those in `may_change` (dotted paths; a path also
/// covers the fields under it).
pub fn config_changes(
    saved: &toml::Value,
    requested: &toml::Value,
    may_change: &[&str],
) -> Vec<ConfigChange> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", saved, &mut a);
    flatten("", requested, &mut b);
    let a: std::collections::BTreeMap<_, _> = a.into_iter().collect();
    let b: std::collections::BTreeMap<_, _> = b.into_iter().collect();
    let allowed = |f: &str| {
        may_change
            .iter()
            .any(|m| f == *m || f.strip_prefix(m).is_some_and(|r| r.starts_with('.')))
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&toml::Value>| v.map_or_else(|| "absent".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| !allowed(k) && a.get(*k) != b.get(*k))
        .map(|k| ConfigChange {
            field: k.clone(),
            run: show(a.get(k)),
            requested: show(b.get(k)),
        })
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A UTC timestamp for folder names: `20261129-134501`.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One training run's folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates `out` if given, else `runs/<task>-<timestamp>` under the current
    /// directory (with a numeric suffix if that exists already). Refuses a
    /// folder that already holds a run ([`RunError::Exists`]) or other files
    /// ([`RunError::NotEmpty`]); an empty folder is used.
    pub fn create(task: &str, out: Option<&Path>) -> Result<Self, RunError> {
        let root = match out {
            Some(p) => {
                check_new_folder(p)?;
                p.to_path_buf()
            }
            None => new_run_folder(task),
        };
        std::fs::create_dir_all(root.join("checkpoints")).map_err(io(&root))?;
        Ok(Self { root })
    }

    /// Opens an existing run folder (for `--resume`, `eval`, `sample`).
    pub fn open(path: &Path) -> Result<Self, RunError> {
        let cfg = path.join("config.toml");
        if !cfg.is_file() {
            return Err(RunError::Invalid {
                path: path.to_path_buf(),
                reason: "not a kiln run folder (no config.toml); pass the folder a training command printed".into(),
            });
        }
        Ok(Self {
            root: path.to_path_buf(),
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A path inside the folder.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// The latest checkpoint path (`checkpoints/last.safetensors`).
    pub fn last_checkpoint(&self) -> PathBuf {
        self.join("checkpoints").join("last.safetensors")
    }

    /// Writes `config.toml` atomically. `kind` names the model kind so `eval`
    /// and `sample` know what the run is; it is stored as the `kind` key.
    pub fn write_config<C: Serialize>(&self, kind: &str, config: &C) -> Result<(), RunError> {
        let path = self.join("config.toml");
        let mut table = toml::Table::new();
        table.insert("kind".into(), toml::Value::String(kind.into()));
        let body = toml::Value::try_from(config).map_err(|e| RunError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        match body {
            toml::Value::Table(t) => table.extend(t),
            other => {
                table.insert("config".into(), other);
            }
        }
        let text = toml::to_string_pretty(&table).map_err(|e| RunError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::files::write_atomic(&path, text.as_bytes()).map_err(io(&path))
    }

    /// Reads `config.toml`: the model kind and the config.
    pub fn read_config<C: serde::de::DeserializeOwned>(&self) -> Result<(String, C), RunError> {
        let path = self.join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| RunError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let kind = match table.remove("kind") {
            Some(toml::Value::String(s)) => s,
            _ => {
                return Err(RunError::Invalid {
                    path,
                    reason: "missing string field `kind`".into(),
                })
            }
        };
        let cfg = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| RunError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok((kind, cfg))
    }

    /// Reads `config.toml` of a run that must be of `kind`: the kind is checked
    /// before the fields, so a run of another model says what it is
    /// ([`RunError::WrongKind`]) instead of failing on a missing field.
    pub fn read_config_of<C: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<C, RunError> {
        let (found, raw): (String, toml::Value) = self.read_config()?;
        if found != kind {
            return Err(RunError::WrongKind {
                path: self.root.clone(),
                found,
                expected: kind.into(),
            });
        }
        raw.try_into()
            .map_err(|e: toml::de::Error| RunError::Invalid {
                path: self.join("config.toml"),
                reason: e.to_string(),
            })
    }

    /// Appends metrics to `metrics.jsonl`.
    pub fn metrics(&self) -> Result<MetricsLog, RunError> {
        MetricsLog::open(&self.join("metrics.jsonl"))
    }

    /// Writes `summary.json` atomically, adding seed/threads/versions/git commit.
    pub fn write_summary(&self, seed: u64, metrics: serde_json::Value) -> Result<(), RunError> {
        let path = self.join("summary.json");
        let mut obj = serde_json::json!({
            "seed": seed,
            "threads": crate::device::threads(),
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "candle_version": "0.11",
            "git_commit": git_commit(),
            "metrics": metrics,
        });
        if let Some(o) = obj.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        let text = serde_json::to_string_pretty(&obj).map_err(|e| RunError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::files::write_atomic(&path, text.as_bytes()).map_err(io(&path))
    }
}

/// A fresh folder name for a run of `task`: `runs/<task>-<timestamp>`, with a
/// numeric suffix if that exists already.
pub fn new_run_folder(task: &str) -> PathBuf {
    let base = PathBuf::from("runs").join(format!("{task}-{}", timestamp()));
    let mut p = base.clone();
    let mut i = 1;
    while p.exists() {
        p = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    p
}

/// Whether `path` can take a new run: absent, empty, or holding only the
/// lock file and the empty folders a refused start may have made.
fn check_new_folder(path: &Path) -> Result<(), RunError> {
    if path.join("config.toml").exists() {
        return Err(RunError::Exists {
            path: path.to_path_buf(),
        });
    }
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            // `--out a-file` or `--out a-file/run`: name the file.
            let file = path
                .ancestors()
                .find(|p| p.is_file())
                .unwrap_or(path)
                .display()
                .to_string();
            return Err(RunError::Invalid {
                path: path.to_path_buf(),
                reason: format!("{file} is a file, not a folder; choose a folder for the run"),
            });
        }
        Err(e) => return Err(io(path)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(path))?;
        let name = entry.file_name();
        let empty_dir = entry.file_type().is_ok_and(|t| t.is_dir())
            && std::fs::read_dir(entry.path()).is_ok_and(|mut d| d.next().is_none());
        let view =
            entry.file_type().is_ok_and(|t| t.is_file()) && is_os_metadata(&name.to_string_lossy());
        if name != LOCK_FILE && !empty_dir && !view {
            return Err(RunError::NotEmpty {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// The lock file in every run folder.
pub const LOCK_FILE: &str = ".lock";

/// Where and how a training run is written: the options every training
/// command shares (`--out`, `--resume`, `--overwrite`, `--device`,
/// `--threads`, `--quiet`). The run's own settings, seed included, live in its
/// config and `config.toml`, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Folder of a new run (default `runs/<task>-<timestamp>`).
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    pub resume: Option<PathBuf>,
    /// With `out`: delete the run already there (the files kiln runs write,
    /// [`RUN_FILES`]) and start again. A folder that also holds anything
    /// else is refused with nothing deleted ([`RunError::ForeignFiles`]).
    pub overwrite: bool,
    /// Device: `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// CPU threads (default: all cores).
    pub threads: Option<usize>,
    /// No progress bar and no periodic lines.
    pub quiet: bool,
    /// Not even epoch summaries (see [`crate::observer::ObserverConfig::silent`]):
    /// for a run inside a larger task that reports on it itself.
    pub silent: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            out: None,
            resume: None,
            overwrite: false,
            device: "cpu".into(),
            threads: None,
            quiet: false,
            silent: false,
        }
    }
}

impl RunOptions {
    /// A new run in `out` (`None`: `runs/<task>-<timestamp>`).
    pub fn new_run(out: Option<&Path>) -> Self {
        Self {
            out: out.map(Path::to_path_buf),
            ..Self::default()
        }
    }

    /// Continues the run in `path`.
    pub fn resume(path: &Path) -> Self {
        Self {
            resume: Some(path.to_path_buf()),
            ..Self::default()
        }
    }

    /// The same options, quiet or not.
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The same options, silent or not (a silent run prints nothing, not
    /// even epoch summaries; warnings still go to standard error).
    pub fn silent(mut self, silent: bool) -> Self {
        self.silent = silent;
        self
    }

    /// Whether this continues an existing run.
    pub fn is_resume(&self) -> bool {
        self.resume.is_some()
    }

    /// Sets the thread count (if given) and opens the device.
    pub fn device(&self) -> Result<candle_core::Device, crate::device::DeviceError> {
        if let Some(t) = self.threads {
            crate::device::set_threads(t)?;
        }
        crate::device::device(&self.device)
    }

    /// On a resumed run, checks that the folder holds a run of `kind`
    /// (for trainers that read files of the run before opening it); a new
    /// run passes.
    pub fn check_kind(&self, kind: &str) -> Result<(), RunError> {
        let Some(path) = &self.resume else {
            return Ok(());
        };
        let (found, _): (String, toml::Value) = RunDir::open(path)?.read_config()?;
        if found != kind {
            return Err(RunError::WrongKind {
                path: path.clone(),
                found,
                expected: kind.into(),
            });
        }
        Ok(())
    }

    /// Opens the run folder for a trainer of `kind` whose settings are
    /// `config`, and takes its lock. Call it after validating the config, so a
    /// bad setting never leaves a folder behind.
    ///
    /// - New run: refuses a folder that already holds a run unless
    ///   [`RunOptions::overwrite`] (then deletes the run's files first, under
    ///   its lock, after checking that the folder holds nothing but what kiln
    ///   runs write, [`RUN_FILES`], and none of the new run's inputs),
    ///   creates the folder and writes `config.toml`. A run that never
    ///   began (its start was refused after the folder was made, such as
    ///   a model too large for memory: the folder holds its `config.toml`
    ///   and what a trainer writes before training, nothing else) is
    ///   cleared as with `overwrite`, so a refused start does not block the
    ///   next attempt.
    /// - Resume: refuses a run of another kind, and a `config` that differs
    ///   from the saved one in any field but `may_change` (dotted paths such
    ///   as `train.epochs`), listing what differs; rewrites `config.toml` when
    ///   an allowed field changed.
    ///
    /// Both remove temporary files that a killed writer left.
    pub fn open<C: Serialize + serde::de::DeserializeOwned>(
        &self,
        task: &str,
        kind: &str,
        config: &C,
        may_change: &[&str],
    ) -> Result<Run, RunError> {
        let run = match &self.resume {
            Some(path) => {
                let dir = RunDir::open(path)?;
                let lock = RunLock::acquire(dir.path())?;
                let (found, saved): (String, toml::Value) = dir.read_config()?;
                if found != kind {
                    return Err(RunError::WrongKind {
                        path: path.clone(),
                        found,
                        expected: kind.into(),
                    });
                }
                let requested = config_value(&dir.join("config.toml"), config)?;
                let saved = with_defaults::<C>(&dir.join("config.toml"), saved);
                let changes = config_changes(&saved, &requested, may_change);
                if !changes.is_empty() {
                    return Err(RunError::ConfigChanged {
                        path: path.clone(),
                        changes,
                        may_change: may_change.iter().map(|s| (*s).to_string()).collect(),
                    });
                }
                let mut previous_config = None;
                if saved != requested {
                    let path = dir.join("config.toml");
                    previous_config = Some(std::fs::read(&path).map_err(io(&path))?);
                    dir.write_config(kind, config)?;
                }
                Run {
                    dir,
                    _lock: lock,
                    resumed: true,
                    previous_config,
                }
            }
            None => {
                let dir = match (&self.out, self.overwrite) {
                    // A run whose start was refused after its folder was
                    // made never began: a new run takes its place, as with
                    // --overwrite.
                    (Some(out), overwrite)
                        if out.join("config.toml").exists()
                            && (overwrite || never_began(out, config)) =>
                    {
                        refuse_non_kiln_config(out)?;
                        refuse_inputs_inside(out, config)?;
                        // Checked before the lock too, so a refused command
                        // leaves the folder as it was (not even a `.lock`).
                        refuse_foreign_entries(out)?;
                        let lock = RunLock::acquire(out)?;
                        // Another process may have begun it since the check.
                        if !overwrite && !never_began(out, config) {
                            return Err(RunError::Exists { path: out.clone() });
                        }
                        clear_run_folder(out)?;
                        let dir = RunDir::create(task, Some(out))?;
                        dir.write_config(kind, config)?;
                        return Ok(Run {
                            dir,
                            _lock: lock,
                            resumed: false,
                            previous_config: None,
                        });
                    }
                    (out, _) => RunDir::create(task, out.as_deref())?,
                };
                let lock = RunLock::acquire(dir.path())?;
                // Another process may have started a run here since the check.
                if dir.join("config.toml").exists() {
                    return Err(RunError::Exists {
                        path: dir.path().to_path_buf(),
                    });
                }
                dir.write_config(kind, config)?;
                Run {
                    dir,
                    _lock: lock,
                    resumed: false,
                    previous_config: None,
                }
            }
        };
        for d in [run.dir.path().to_path_buf(), run.dir.join("checkpoints")] {
            crate::files::remove_stale_temps(&d).map_err(io(&d))?;
        }
        Ok(run)
    }
}

/// `config` as the TOML body `write_config` would write (without `kind`).
/// The saved config as today's `C` reads it: a field added since the run
/// began takes its serde default, so the run is compared on what it will
/// actually use, not refused for a field it never wrote. A config `C` cannot
/// read is left as saved (the comparison then names what differs).
fn with_defaults<C: Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    saved: toml::Value,
) -> toml::Value {
    let typed: Option<C> = saved.clone().try_into().ok().or_else(|| match &saved {
        // `config_value` wraps a non-table config under `config`.
        toml::Value::Table(t) if t.len() == 1 => t.get("config")?.clone().try_into().ok(),
        _ => None,
    });
    typed
        .and_then(|c| config_value(path, &c).ok())
        .unwrap_or(saved)
}

fn config_value<C: Serialize>(path: &Path, config: &C) -> Result<toml::Value, RunError> {
    let v = toml::Value::try_from(config).map_err(|e| RunError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(match v {
        t @ toml::Value::Table(_) => t,
        other => {
            let mut t = toml::Table::new();
            t.insert("config".into(), other);
            toml::Value::Table(t)
        }
    })
}

/// Refuses to clear `out` for `--overwrite` when a path the new run reads
/// lies inside it. The inputs are found in the config itself: every string
/// field that names an existing file or folder, as written or after a
/// `scheme:` prefix (`lines:PATH`, `cifar10:DIR`). That covers every trainer,
/// a library caller's too, without each one listing its inputs.
fn refuse_inputs_inside<C: Serialize>(out: &Path, config: &C) -> Result<(), RunError> {
    let Ok(root) = out.canonicalize() else {
        return Ok(());
    };
    let mut fields = Vec::new();
    if let Ok(v) = toml::Value::try_from(config) {
        flatten_all("", &v, &mut fields);
    }
    for (field, value) in fields {
        let toml::Value::String(s) = value else {
            continue;
        };
        let after_scheme = s.split_once(':').map(|(_, p)| p).filter(|p| !p.is_empty());
        for cand in std::iter::once(s.as_str()).chain(after_scheme) {
            let input = Path::new(cand);
            if input
                .canonicalize()
                .is_ok_and(|c| c.starts_with(&root) && c != root.join(LOCK_FILE))
            {
                return Err(RunError::InputInside {
                    path: out.to_path_buf(),
                    input: input.to_path_buf(),
                    field: if field.is_empty() {
                        "config".into()
                    } else {
                        field
                    },
                });
            }
        }
    }
    Ok(())
}

/// Like [`flatten`], but into arrays too (`paths.0`), for strings in lists.
fn flatten_all(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| flatten_all(&join(k), v, out)),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten_all(&join(&i.to_string()), v, out)),
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// Everything kiln runs write in a run folder, relative to it (`/` between
/// folders), and so everything `--overwrite` deletes: any other entry makes
/// it refuse, deleting nothing ([`RunError::ForeignFiles`]). In a pattern,
/// `*` stands for any text within a name and `#` for one or more digits.
/// Temporary files of [`crate::files::write_atomic`] (`.<name>.tmp-<pid>`)
/// in the folder or in one of its folders below count as kiln's too.
///
/// A file a kiln crate or `cargo xtask` writes into a run folder must be
/// listed here (with its writer), or `--overwrite` refuses the runs that
/// hold it; [`is_run_file`] checks a name.
pub const RUN_FILES: &[&str] = &[
    // kiln-core: RunDir, Run, Session.
    LOCK_FILE,
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    INPUTS_FILE,
    "checkpoints/last.safetensors",
    // Figures: loss curves (every trainer), the VAE's and GAN's grids
    // (`samples.png`, `samples-ema.png`, `reconstructions.png`,
    // `interpolation.png`), the GAN's D outputs, the inpainting figure.
    "loss.png",
    "samples.png",
    "samples-ema.png",
    "reconstructions.png",
    "interpolation.png",
    "d_outputs.png",
    "figure_14_2.png",
    // `cargo xtask sample vae|gan` without --out:
    // `samples-<seed>[-<checkpoint>][-class<k>][-ema].png`.
    "samples-#.png",
    "samples-#-*.png",
    // `cargo xtask eval gan`: `eval-<checkpoint>[-ema]-<split>-n<N>-...-seed<S>-...-<hash>.json`.
    "eval-*-seed#-*.json",
    // kiln-gan: the FID extractor record, per-epoch grids, extra checkpoints.
    "fid-extractor.json",
    "samples/epoch-#.png",
    "samples/epoch-#-ema.png",
    "checkpoints/healthy.safetensors",
    "checkpoints/best-fid.safetensors",
    // kiln-lm: the run's tokenizer and a sample.
    "tokenizer.json",
    "samples.txt",
    // kiln-rlhf DPO: the reference log-probabilities.
    "ref_logps.safetensors",
    // kiln-lm / kiln-rlhf: the trained model, in transformers' layout.
    "model/config.json",
    "model/generation_config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "model/tokenizer_config.json",
    "model/chat_template.jinja",
];

/// Whether `pattern` (`*`: any text but `/`, `#`: one or more digits)
/// matches `name`.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len())
            .take_while(|&i| i == 0 || name[i - 1] != b'/')
            .any(|i| glob(rest, &name[i..])),
        Some((b'#', rest)) => (1..=name.len())
            .take_while(|&i| name[i - 1].is_ascii_digit())
            .any(|i| glob(rest, &name[i..])),
        Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
    }
}

/// Whether a file at `rel` (relative to a run folder) is one kiln runs write:
/// it matches [`RUN_FILES`], or it is a temporary file of
/// [`crate::files::write_atomic`] in the folder or in a folder of `RUN_FILES`.
pub fn is_run_file(rel: &Path) -> bool {
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    let Some(parts) = parts else {
        return false;
    };
    let Some((name, dirs)) = parts.split_last() else {
        return false;
    };
    let dir = dirs.join("/");
    if glob(b".*.tmp-#", name.as_bytes()) && (dir.is_empty() || is_run_folder(&dir)) {
        return true;
    }
    let path = parts.join("/");
    RUN_FILES
        .iter()
        .any(|p| glob(p.as_bytes(), path.as_bytes()))
}

/// Whether `name` is a file an operating system's file browser leaves in
/// the folders it shows: Finder's `.DS_Store` and `._NAME` (AppleDouble),
/// Windows Explorer's `Thumbs.db`, `ehthumbs.db` and `desktop.ini`. They
/// describe how a folder was viewed, not what it holds: a run folder that
/// holds them is still only kiln's (`--overwrite` deletes them with the
/// run), and [`fingerprint`] leaves them out of a dataset's.
pub fn is_os_metadata(name: &str) -> bool {
    name == ".DS_Store"
        || name.starts_with("._")
        || ["Thumbs.db", "ehthumbs.db", "desktop.ini"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether kiln runs write files in the folder `rel` of a run folder.
fn is_run_folder(rel: &str) -> bool {
    RUN_FILES
        .iter()
        .any(|p| p.strip_prefix(rel).is_some_and(|r| r.starts_with('/')))
}

/// A run folder's entries, sorted into kiln's and the others.
struct Contents {
    /// Kiln's files (the lock file left out).
    files: Vec<PathBuf>,
    /// Kiln's folders, deepest first.
    folders: Vec<PathBuf>,
    /// The entries no kiln run writes, relative to the folder (folders with
    /// a trailing `/`).
    foreign: Vec<String>,
}

/// What `--overwrite` would delete in `root`, and what it must leave. Kiln's
/// folders are looked into: a user's file in `checkpoints/` is foreign, the
/// folder is not. A symbolic link is always foreign (kiln writes none) and
/// is not followed.
fn run_folder_contents(root: &Path) -> Result<Contents, RunError> {
    fn visit(root: &Path, rel: &Path, c: &mut Contents) -> Result<(), RunError> {
        let dir = root.join(rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel.join(entry.file_name());
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            let shown = rel.to_string_lossy().replace('\\', "/");
            if kind.is_dir() {
                if is_run_folder(&shown) {
                    visit(root, &rel, c)?;
                    c.folders.push(path);
                } else {
                    c.foreign.push(format!("{shown}/"));
                }
            } else if kind.is_file()
                && (is_run_file(&rel) || is_os_metadata(&entry.file_name().to_string_lossy()))
            {
                if rel != Path::new(LOCK_FILE) {
                    c.files.push(path);
                }
            } else {
                c.foreign.push(shown);
            }
        }
        Ok(())
    }
    let mut c = Contents {
        files: Vec::new(),
        folders: Vec::new(),
        foreign: Vec::new(),
    };
    visit(root, Path::new(""), &mut c)?;
    Ok(c)
}

/// The entries of the run folder `dir` that no kiln run writes (see
/// [`RUN_FILES`]), relative to it, folders with a trailing `/`: what a tool
/// that deletes run folders (such as `rlhf experiment --overwrite`) must
/// leave alone.
pub fn foreign_entries(dir: &Path) -> Result<Vec<String>, RunError> {
    Ok(run_folder_contents(dir)?.foreign)
}

/// The files a run folder holds before its training begins: those
/// [`RunOptions::open`] writes (`config.toml`, the lock), the inputs'
/// fingerprints ([`Run::check_inputs`]) and what trainers write between
/// opening the folder and starting their session (kiln-lm's tokenizer,
/// kiln-gan's FID extractor record, kiln-rlhf DPO's reference
/// log-probabilities). A session's start writes `metrics.jsonl`.
const PRE_START_FILES: &[&str] = &[
    LOCK_FILE,
    "config.toml",
    INPUTS_FILE,
    "tokenizer.json",
    "fid-extractor.json",
    "ref_logps.safetensors",
];

/// Whether the run folder `path` holds a run that never began: a start
/// refused after the folder was made (a model too large for memory, a
/// loader that failed) leaves its `config.toml`. It holds nothing but
/// [`PRE_START_FILES`] and empty folders (no metrics, no checkpoint, no
/// figure), its config is a kiln run's, and no input of the new run
/// (`config`) lies inside it: then a new run may clear it without
/// `--overwrite`, as nothing in it was trained or written by anyone else.
fn never_began<C: Serialize>(path: &Path, config: &C) -> bool {
    // Kiln takes the lock before it writes `config.toml`: a folder without
    // `.lock` was not made by a kiln run (a user's own `config.toml`).
    if !path.join(LOCK_FILE).is_file() {
        return false;
    }
    let Ok(c) = run_folder_contents(path) else {
        return false;
    };
    c.foreign.is_empty()
        && c.files.iter().all(|f| {
            f.strip_prefix(path).is_ok_and(|rel| {
                PRE_START_FILES.iter().any(|p| rel == Path::new(p))
                    || rel
                        .file_name()
                        .is_some_and(|n| is_os_metadata(&n.to_string_lossy()))
            })
        })
        && refuse_non_kiln_config(path).is_ok()
        && refuse_inputs_inside(path, config).is_ok()
}

/// Refuses `--overwrite` on a folder holding anything no kiln run writes.
fn refuse_foreign_entries(path: &Path) -> Result<Contents, RunError> {
    let c = run_folder_contents(path)?;
    if c.foreign.is_empty() {
        Ok(c)
    } else {
        Err(RunError::ForeignFiles {
            path: path.to_path_buf(),
            entries: c.foreign,
        })
    }
}

/// Refuses `--overwrite` on a folder whose `config.toml` is not a kiln run's
/// (every kiln run's names its `kind`): the folder is someone else's.
fn refuse_non_kiln_config(path: &Path) -> Result<(), RunError> {
    let file = path.join("config.toml");
    let text = std::fs::read_to_string(&file).map_err(io(&file))?;
    let kind = toml::from_str::<toml::Table>(&text)
        .ok()
        .is_some_and(|t| matches!(t.get("kind"), Some(toml::Value::String(_))));
    if kind {
        return Ok(());
    }
    Err(RunError::Invalid {
        path: file,
        reason: format!(
            "not a kiln run's config (no string `kind` key), so --overwrite deleted nothing in \
             {}: kiln never deletes files it did not write; choose another --out",
            path.display()
        ),
    })
}

/// Deletes what kiln runs wrote in a run folder, all but its lock file (for
/// `--overwrite`), after checking that it holds nothing else
/// ([`RunError::ForeignFiles`], nothing deleted).
fn clear_run_folder(path: &Path) -> Result<(), RunError> {
    let c = refuse_foreign_entries(path)?;
    for f in &c.files {
        std::fs::remove_file(f).map_err(io(f))?;
    }
    // Deepest first; `remove_dir` (not `_all`) fails rather than delete
    // anything that appeared since the check.
    for d in &c.folders {
        std::fs::remove_dir(d).map_err(io(d))?;
    }
    Ok(())
}

/// An exclusive OS lock on a run folder's `.lock` file, held until dropped
/// (or the process ends, however it ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of the run folder `dir` without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, RunError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        // A lock can outlive its holder's release by a moment: a child the
        // holder's process forked (e.g. `git rev-parse` for a summary) keeps a
        // copy of the descriptor until it execs. Wait up to half a second
        // before calling the folder busy.
        let mut tries = 0;
        let mut res = file.try_lock();
        while matches!(res, Err(std::fs::TryLockError::WouldBlock)) && tries < 25 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tries += 1;
            res = file.try_lock();
        }
        match res {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Err(RunError::Locked {
                    path: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        // The pid is only for the message a second process prints.
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        Ok(Self { _file: file })
    }
}

/// A run folder held by this process: its [`RunDir`] and its lock.
#[derive(Debug)]
pub struct Run {
    dir: RunDir,
    _lock: RunLock,
    resumed: bool,
    /// `config.toml` as it was before a resume changed an allowed field, so
    /// a resume that trains nothing can put it back ([`Run::restore_config`]).
    previous_config: Option<Vec<u8>>,
}

/// The file of a run folder holding its inputs' fingerprints.
pub const INPUTS_FILE: &str = "inputs.json";

/// A file's or folder's fingerprint: its size and CRC-32 (a folder: its
/// files by relative path, size and content, leaving out hidden files and
/// those a file browser leaves, [`is_os_metadata`]: Explorer writes a
/// `Thumbs.db` into a folder of pictures it shows, and that must not make
/// a resumed run refuse its dataset).
pub fn fingerprint(path: &Path) -> Result<String, RunError> {
    fingerprint_with(path, true)
}

/// [`fingerprint`], or with `skip_view_files` false the fingerprint runs
/// recorded before file browsers' files ([`is_os_metadata`]) were left out
/// (then only hidden files were), which a resume also accepts.
fn fingerprint_with(path: &Path, skip_view_files: bool) -> Result<String, RunError> {
    let walk_skip = skip_view_files;
    fn walk(
        root: &Path,
        dir: &Path,
        h: &mut crc32fast::Hasher,
        n: &mut u64,
        skip_view_files: bool,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || (skip_view_files && is_os_metadata(&name)) {
                continue;
            }
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(root, &p, h, n, skip_view_files)?;
            } else {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                h.update(rel.to_string_lossy().as_bytes());
                let bytes = std::fs::read(&p)?;
                h.update(&(bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
                *n += 1;
            }
        }
        Ok(())
    }
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.is_dir() {
        let (mut h, mut n) = (crc32fast::Hasher::new(), 0);
        walk(path, path, &mut h, &mut n, walk_skip).map_err(io(path))?;
        Ok(format!("{n} files, crc32 {:08x}", h.finalize()))
    } else {
        let bytes = std::fs::read(path).map_err(io(path))?;
        Ok(format!(
            "{} bytes, crc32 {:08x}",
            bytes.len(),
            crc32fast::hash(&bytes)
        ))
    }
}

impl Run {
    /// The `config.toml` a resume rewrote (a field it lets change, such as
    /// `epochs`), for a resume that ends up training nothing (an
    /// already-finished run, a checkpoint that does not load): its config
    /// then still describes what it holds.
    pub(crate) fn previous_config(&self) -> Option<&[u8]> {
        self.previous_config.as_deref()
    }

    /// Puts back the `config.toml` a resume rewrote (the one `previous_config` kept).
    pub fn restore_config(&self) -> Result<(), RunError> {
        if let Some(bytes) = &self.previous_config {
            let path = self.dir.join("config.toml");
            crate::files::write_atomic(&path, bytes).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Records the fingerprints of the files a new run reads (a corpus,
    /// preference pairs), or, on resume, checks that they are unchanged: a
    /// resumed run on other data would continue its epoch over different
    /// examples and report figures that belong to neither. A run written
    /// before inputs were recorded gets them recorded now. On resume, a path
    /// the run did not read before, given while one it did read is no longer
    /// given (a dataset root pointed elsewhere), must hold the same data (the
    /// same fingerprint: the data moved); other data is refused. An input
    /// added beside all the recorded ones is recorded.
    pub fn check_inputs(&self, inputs: &[&Path]) -> Result<(), RunError> {
        let file = self.dir.join(INPUTS_FILE);
        let mut saved: std::collections::BTreeMap<String, String> = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RunError::Invalid {
                path: file.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(io(&file)(e)),
        };
        let mut changed = false;
        // Inputs the run began with that are not read now: on resume, a new
        // path is accepted only as one of them moved (the same fingerprint),
        // so `--data-root` pointed elsewhere cannot swap the data unnoticed.
        let given: std::collections::BTreeSet<String> =
            inputs.iter().map(|p| p.display().to_string()).collect();
        let mut gone: Vec<(String, String)> = saved
            .iter()
            .filter(|(k, _)| !given.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for p in inputs {
            let now = fingerprint(p)?;
            let key = p.display().to_string();
            let mut legacy = None;
            if self.resumed && !gone.is_empty() && !saved.contains_key(&key) {
                let mut moved = None;
                for (i, (_, was)) in gone.iter().enumerate() {
                    if same_data(was, &now, p, &mut legacy)? {
                        moved = Some(i);
                        break;
                    }
                }
                match moved {
                    Some(i) => {
                        saved.remove(&gone.remove(i).0);
                    }
                    None => {
                        let began: Vec<String> =
                            gone.iter().map(|(k, v)| format!("{k} ({v})")).collect();
                        return Err(RunError::Invalid {
                            path: p.to_path_buf(),
                            reason: format!(
                                "not the data the run began with: it read {}, and this is \
                                 {now}; a resumed run must read the same data: point it back \
                                 at what it read, or start a new run",
                                began.join(", ")
                            ),
                        });
                    }
                }
            }
            match saved.get(&key) {
                Some(was) if self.resumed && !same_data(was, &now, p, &mut legacy)? => {
                    return Err(RunError::Invalid {
                        path: p.to_path_buf(),
                        reason: format!(
                            "changed since the run began (then {was}, now {now}); a resumed run \
                             must read the same data: put it back, or start a new run"
                        ),
                    })
                }
                Some(was) if *was == now => {}
                // New, or recorded with the older fingerprint of the same data.
                _ => {
                    saved.insert(key, now);
                    changed = true;
                }
            }
        }
        if changed {
            let text = serde_json::to_string_pretty(&saved).map_err(|e| RunError::Invalid {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            crate::files::write_atomic(&file, text.as_bytes()).map_err(io(&file))?;
        }
        Ok(())
    }

    /// The folder.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether this continues an existing run.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
}

/// Whether the input `p`, whose fingerprint is now `now`, holds the data a
/// run recorded as `was`: the same fingerprint, or for a folder the one
/// recorded before file browsers' files were left out (computed once, into
/// `legacy`, and only when needed: it reads the folder again).
fn same_data(
    was: &str,
    now: &str,
    p: &Path,
    legacy: &mut Option<String>,
) -> Result<bool, RunError> {
    if was == now {
        return Ok(true);
    }
    if !p.is_dir() {
        return Ok(false);
    }
    if legacy.is_none() {
        *legacy = Some(fingerprint_with(p, false)?);
    }
    Ok(legacy.as_deref() == Some(was))
}

/// The current git commit of the working directory, when known.
pub fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An append-only `metrics.jsonl`: one JSON object per line with `step`,
/// `epoch`, `split` and metric fields.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens (creating) a metrics file for appending.
    pub fn open(path: &Path) -> Result<Self, RunError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record.
    pub fn log(
        &mut self,
        step: u64,
        epoch: u64,
        split: &str,
        fields: &[(&str, f64)],
    ) -> Result<(), RunError> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        obj.insert("epoch".into(), epoch.into());
        obj.insert("split".into(), split.into());
        for (k, v) in fields {
            // JSON has no NaN/Inf: write them as null so every line parses.
            let val = serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null);
            obj.insert((*k).to_string(), val);
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}").map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))
    }

    /// Cuts the file back to its first `len` bytes (the length a checkpoint
    /// recorded), dropping the lines written after that checkpoint. Returns
    /// false (changing nothing) if the file is shorter than `len`.
    pub fn truncate_to(path: &Path, len: u64) -> Result<bool, RunError> {
        let cur = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(len == 0),
            Err(e) => return Err(io(path)(e)),
        };
        if cur < len {
            return Ok(false);
        }
        if cur > len {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            f.set_len(len).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
        }
        Ok(true)
    }

    /// The current length of the file in bytes (every line is flushed).
    pub fn len(&self) -> Result<u64, RunError> {
        Ok(self.file.metadata().map_err(io(&self.path))?.len())
    }

    /// Whether nothing has been logged.
    pub fn is_empty(&self) -> Result<bool, RunError> {
        Ok(self.len()? == 0)
    }

    /// Drops records with `step > max_step` (used when resuming from a
    /// checkpoint older than the last logged line).
    pub fn truncate_after(path: &Path, max_step: u64) -> Result<(), RunError> {
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_none_or(|s| s <= max_step)
            })
            .collect();
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        crate::files::write_atomic(path, out.as_bytes()).map_err(io(path))
    }
}

/// One parsed line of `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct MetricRecord {
    /// Step.
    pub step: u64,
    /// Epoch.
    pub epoch: u64,
    /// Split (`train`, `val`, ...).
    pub split: String,
    /// Numeric fields.
    pub values: Vec<(String, f64)>,
}

/// Reads `metrics.jsonl`, with errors naming the line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>, RunError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| RunError::Invalid {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let step = obj
            .get("step")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("missing integer field `step`".into()))?;
        let epoch = obj.get("epoch").and_then(|x| x.as_u64()).unwrap_or(0);
        let split = obj
            .get("split")
            .and_then(|x| x.as_str())
            .unwrap_or("train")
            .to_string();
        let values = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "split"))
            .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
            .collect();
        out.push(MetricRecord {
            step,
            epoch,
            split,
            values,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
        assert_eq!(timestamp().len(), 15);
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Cfg {
        lr: f64,
        layers: Vec<usize>,
    }

    /// A run that recorded a folder's fingerprint before file browsers'
    /// files were left out resumes on the same folder (and its record is
    /// brought up to date), also after the folder moved; changed data is
    /// still refused.
    #[test]
    fn a_fingerprint_recorded_with_view_files_still_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let (run, data) = (tmp.path().join("r"), tmp.path().join("imgs"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("a.png"), "pixels").unwrap();
        std::fs::write(data.join("Thumbs.db"), "thumbnails").unwrap();
        let cfg = Cfg {
            lr: 1e-3,
            layers: vec![3],
        };
        let open = |resume: bool| {
            let o = if resume {
                RunOptions::resume(&run)
            } else {
                RunOptions::new_run(Some(&run))
            };
            o.open("t", "toy", &cfg, &[]).unwrap()
        };
        let new = fingerprint(&data).unwrap();
        let old = fingerprint_with(&data, false).unwrap();
        assert_ne!(new, old);
        let record = |path: &Path, fp: &str| {
            let m = std::collections::BTreeMap::from([(path.display().to_string(), fp)]);
            std::fs::write(run.join(INPUTS_FILE), serde_json::to_string(&m).unwrap()).unwrap();
        };
        open(false).check_inputs(&[&data]).unwrap();
        record(&data, &old);
        open(true).check_inputs(&[&data]).unwrap();
        let saved = std::fs::read_to_string(run.join(INPUTS_FILE)).unwrap();
        assert!(saved.contains(&new) && !saved.contains(&old), "{saved}");
        // Moved since, with the old record under the old path.
        record(&tmp.path().join("gone"), &old);
        open(true).check_inputs(&[&data]).unwrap();
        // Changed data is refused whichever fingerprint was recorded.
        std::fs::write(data.join("b.png"), "more").unwrap();
        for fp in [&old, &new] {
            record(&data, fp);
            let e = open(true).check_inputs(&[&data]).unwrap_err().to_string();
            assert!(e.contains("changed since the run began"), "{e}");
        }
    }

    #[test]
    fn config_metrics_summary_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create("t", Some(&tmp.path().join("r"))).unwrap();
        let cfg = Cfg {
            lr: 1e-3,
            layers: vec![3, 4],
        };
        run.write_config("vae-mlp", &cfg).unwrap();
        let (kind, back): (String, Cfg) = RunDir::open(run.path()).unwrap().read_config().unwrap();
        assert_eq!((kind.as_str(), &back), ("vae-mlp", &cfg));
        let mut m = run.metrics().unwrap();
        m.log(1, 0, "train", &[("loss", 2.5)]).unwrap();
        m.log(2, 0, "train", &[("loss", f64::NAN)]).unwrap();
        m.log(3, 1, "val", &[("loss", 1.5)]).unwrap();
        let recs = read_metrics(&run.join("metrics.jsonl")).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].values, vec![("loss".to_string(), 2.5)]);
        assert!(recs[1].values.is_empty(), "NaN is written as null");
        MetricsLog::truncate_after(&run.join("metrics.jsonl"), 2).unwrap();
        assert_eq!(read_metrics(&run.join("metrics.jsonl")).unwrap().len(), 2);
        run.write_summary(7, serde_json::json!({"loss": 1.0}))
            .unwrap();
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(s["seed"], 7);
        std::fs::write(run.join("metrics.jsonl"), "{\"step\":1}\nnot json\n").unwrap();
        let e = read_metrics(&run.join("metrics.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(RunDir::open(tmp.path()).is_err());
        // Another kind is named before any field is read.
        let e = run.read_config_of::<Cfg>("gan").unwrap_err().to_string();
        assert!(e.contains("is a \"vae-mlp\" run, not a \"gan\" run"), "{e}");
        assert_eq!(run.read_config_of::<Cfg>("vae-mlp").unwrap(), cfg);
    }
}
