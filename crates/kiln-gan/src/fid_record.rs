//! What a run's FIDs were computed with: the extractor (its name and hash,
//! and, when the caller says, where it came from with a content
//! fingerprint) and the evaluation's sizes and seed, kept in the run folder
//! as [`FID_RECORD_FILE`]. [`train_with_eval`](crate::train::train_with_eval)
//! writes it with the first evaluation settings of a run and refuses a
//! resume whose evaluation differs, since `checkpoints/best-fid.safetensors`
//! is picked by comparing the FIDs of every evaluation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{GanError, Result};
use crate::train::FidEval;

/// The file of a run folder naming what its FIDs were computed with.
pub const FID_RECORD_FILE: &str = "fid-extractor.json";

/// Where a feature extractor came from, so that a resumed run can load it
/// again and check that it is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractorSource {
    /// What `path` holds, in the caller's words (xtask: `inception`, a
    /// weights file, or `ssl-run`, a SimCLR run folder).
    pub kind: String,
    /// The path as it was given.
    pub path: PathBuf,
    /// A fingerprint of the content the extractor was read from
    /// (`kiln_core::run::fingerprint`: size and CRC-32).
    pub fingerprint: String,
    /// How images are resized for it (`pytorch-fid` or `clean`).
    pub resize: String,
}

/// What a run's FIDs were computed with ([`FID_RECORD_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FidRecord {
    /// The extractor's name.
    pub extractor: String,
    /// The extractor's hash (weights and settings).
    pub hash: String,
    /// Where the extractor came from, when the caller said.
    pub source: Option<ExtractorSource>,
    /// Generated images per evaluation.
    pub n: usize,
    /// Reference images the FIDs compare with.
    pub n_reference: usize,
    /// Seed of the evaluation's latents.
    pub seed: u64,
}

impl FidRecord {
    /// The record of an evaluation.
    pub fn of(ev: &FidEval<'_>) -> Self {
        Self {
            extractor: ev.extractor.name(),
            hash: ev.extractor.hash(),
            source: ev.source.clone(),
            n: ev.n,
            n_reference: ev.reference.len(),
            seed: ev.seed,
        }
    }

    /// The record in run folder `run`, if it has one.
    pub fn read(run: &Path) -> Result<Option<Self>> {
        let path = run.join(FID_RECORD_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| GanError::Run {
                    path: run.to_path_buf(),
                    msg: format!(
                        "{FID_RECORD_FILE} is damaged ({e}); it names the extractor the run's \
                         FIDs were computed with: restore it, or start a new run"
                    ),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(GanError::Run {
                path: run.to_path_buf(),
                msg: format!("{FID_RECORD_FILE}: {e}"),
            }),
        }
    }

    /// Writes the record into run folder `run` (atomically).
    pub fn write(&self, run: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| GanError::Run {
            path: run.to_path_buf(),
            msg: format!("{FID_RECORD_FILE}: {e}"),
        })?;
        kiln_core::files::write_atomic(&run.join(FID_RECORD_FILE), text.as_bytes()).map_err(|e| {
            GanError::Run {
                path: run.to_path_buf(),
                msg: format!("{FID_RECORD_FILE}: {e}"),
            }
        })
    }

    /// What differs between this record and `now` such that their FIDs do
    /// not compare (empty when they do): the extractor's hash, its kind and
    /// fingerprint (when both records have a source), the image counts or
    /// the seed. The name and the path may differ (a moved folder).
    pub fn differences(&self, now: &FidRecord) -> Vec<String> {
        let mut d = Vec::new();
        if let (Some(a), Some(b)) = (&self.source, &now.source) {
            if a.kind != b.kind {
                d.push(format!("extractor kind {} then, {} now", a.kind, b.kind));
            } else if a.fingerprint != b.fingerprint {
                d.push(format!(
                    "{} content {} then, {} now",
                    a.kind, a.fingerprint, b.fingerprint
                ));
            }
            if a.resize != b.resize {
                d.push(format!("resize {} then, {} now", a.resize, b.resize));
            }
        }
        if self.hash != now.hash {
            d.push(format!(
                "extractor hash {} then, {} now",
                self.hash, now.hash
            ));
        }
        if self.n != now.n {
            d.push(format!(
                "{} generated images per evaluation then, {} now",
                self.n, now.n
            ));
        }
        if self.n_reference != now.n_reference {
            d.push(format!(
                "{} reference images then, {} now",
                self.n_reference, now.n_reference
            ));
        }
        if self.seed != now.seed {
            d.push(format!("latent seed {} then, {} now", self.seed, now.seed));
        }
        d
    }

    /// The extractor in a few words: its source (kind, path, resize) and
    /// hash, or without a source its name and hash.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(src) => format!(
                "{} {} (hash {}, resize {})",
                src.kind,
                src.path.display(),
                self.hash,
                src.resize
            ),
            None => format!("{} (hash {})", self.extractor, self.hash),
        }
    }
}

/// Records `now` in run folder `run` (a new run, or one that had none), or,
/// on a resume, checks it against the record there: an evaluation whose FIDs
/// would not compare with the run's earlier ones is refused. A record that
/// matches but names another path (a moved extractor) is updated.
pub(crate) fn check_or_record(run: &Path, now: &FidRecord, resumed: bool) -> Result<()> {
    let was = match resumed {
        true => FidRecord::read(run)?,
        false => None,
    };
    match was {
        Some(was) => {
            let diff = was.differences(now);
            if !diff.is_empty() {
                return Err(GanError::Run {
                    path: run.to_path_buf(),
                    msg: format!(
                        "this run evaluates FID with {} (recorded in {FID_RECORD_FILE}), this \
                         resume with {}: {}. checkpoints/{} would then be picked by comparing \
                         FIDs that do not compare; resume with the recorded extractor and \
                         settings, or start a new run",
                        was.describe(),
                        now.describe(),
                        diff.join("; "),
                        crate::train::BEST_FID_CHECKPOINT,
                    ),
                });
            }
            if was.source != now.source && now.source.is_some() {
                now.write(run)?;
            }
            Ok(())
        }
        None => now.write(run),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record() -> FidRecord {
        FidRecord {
            extractor: "net of run a".into(),
            hash: "00ff".into(),
            source: Some(ExtractorSource {
                kind: "ssl-run".into(),
                path: "a".into(),
                fingerprint: "3 files, crc32 01020304".into(),
                resize: "pytorch-fid".into(),
            }),
            n: 100,
            n_reference: 80,
            seed: 0,
        }
    }

    #[test]
    fn a_moved_extractor_compares_and_any_other_change_does_not() {
        let was = record();
        let mut moved = record();
        moved.extractor = "net of run b".into();
        moved.source.as_mut().unwrap().path = "b".into();
        assert!(was.differences(&moved).is_empty());
        let mut unsourced = record();
        unsourced.source = None;
        assert!(was.differences(&unsourced).is_empty());
        let mut other = record();
        other.source.as_mut().unwrap().fingerprint = "3 files, crc32 ffffffff".into();
        other.source.as_mut().unwrap().resize = "clean".into();
        other.n_reference = 70;
        other.seed = 1;
        let d = was.differences(&other);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(
            d[0].contains("ssl-run content 3 files, crc32 01020304 then"),
            "{d:?}"
        );
        assert!(d[1].contains("resize pytorch-fid then, clean now"), "{d:?}");
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_one_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FidRecord::read(dir.path()).unwrap(), None);
        record().write(dir.path()).unwrap();
        assert_eq!(FidRecord::read(dir.path()).unwrap(), Some(record()));
        std::fs::write(dir.path().join(FID_RECORD_FILE), "{").unwrap();
        let e = FidRecord::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("fid-extractor.json is damaged") && e.contains("restore it"),
            "{e}"
        );
    }
}
