//! Run folders: `runs/<task>-<timestamp>/` with `config.toml`, `metrics.jsonl`,
//! `checkpoints/`, figures and `summary.json`.

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
    /// directory (with a numeric suffix if that exists already).
    pub fn create(task: &str, out: Option<&Path>) -> Result<Self, RunError> {
        let root = match out {
            Some(p) => p.to_path_buf(),
            None => {
                let base = PathBuf::from("runs").join(format!("{task}-{}", timestamp()));
                let mut p = base.clone();
                let mut i = 1;
                while p.exists() {
                    p = PathBuf::from(format!("{}-{i}", base.display()));
                    i += 1;
                }
                p
            }
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
        crate::checkpoint::write_atomic(&path, text.as_bytes()).map_err(io(&path))
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
        crate::checkpoint::write_atomic(&path, text.as_bytes()).map_err(io(&path))
    }
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
        crate::checkpoint::write_atomic(path, out.as_bytes()).map_err(io(path))
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
    }
}
