//! Checkpoints: model variables, optimizer state, step and RNG state in one
//! safetensors file, written atomically and verified on load.
//!
//! A checkpoint is never half-written under its final name (temp file, fsync,
//! rename), and a truncated or corrupted file is rejected with an error naming
//! it: safetensors checks the header and data length, and a CRC-32 of the data
//! stored in the metadata catches flipped bytes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};

use crate::optim::Optimizer;
use crate::rng::{RngState, SeededRng};
use crate::vars::VarStore;

/// Tensors by name.
pub type NamedTensors = HashMap<String, Tensor>;
/// safetensors string metadata.
pub type Metadata = HashMap<String, String>;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Filesystem error.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint.
    #[error("checkpoint {path} is not a valid kiln checkpoint: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The checkpoint does not fit the model or optimizer.
    #[error("checkpoint {path} does not match: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync,
/// rename, then fsync of the folder.
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
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
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

/// Serialises named tensors to safetensors bytes, adding a CRC-32 of the
/// tensor data to the metadata.
pub fn serialize_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut crc = crc32fast::Hasher::new();
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut owned = Vec::with_capacity(sorted.len());
    for (n, t) in sorted {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        crc.update(n.as_bytes());
        crc.update(&tensor_bytes(&t)?);
        owned.push((n.clone(), t));
    }
    let mut meta = metadata.unwrap_or_default();
    meta.insert("kiln.crc32".into(), format!("{:08x}", crc.finalize()));
    safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(candle_core::Error::wrap)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    use candle_core::DType::*;
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        U8 => flat.to_vec1::<u8>()?,
        U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => flat
            .to_dtype(F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

/// Reads a safetensors file written by [`serialize_tensors`], verifying its
/// structure and CRC. Returns tensors (on `device`) and metadata.
pub fn read_tensors(
    path: &Path,
    device: &Device,
) -> std::result::Result<(NamedTensors, Metadata), CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(format!("{e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("{e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let mut out = HashMap::new();
    let mut crc = crc32fast::Hasher::new();
    for n in names {
        let view = st
            .tensor(&n)
            .map_err(|e| invalid(format!("tensor {n}: {e}")))?;
        crc.update(n.as_bytes());
        crc.update(view.data());
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| invalid(format!("tensor {n}: {e}")))?;
        out.insert(n, t);
    }
    match meta.get("kiln.crc32") {
        Some(stored) if *stored == format!("{:08x}", crc.finalize()) => {}
        Some(stored) => {
            return Err(invalid(format!(
                "data checksum mismatch (stored {stored}): the file is corrupted"
            )))
        }
        None => return Err(invalid("no kiln.crc32 checksum in the metadata".into())),
    }
    Ok((out, meta))
}

/// Everything needed to continue training exactly where it stopped.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Completed epochs.
    pub epoch: u64,
    /// The training RNG (data order, masks, noise), if the run uses one.
    pub rng: Option<RngState>,
    /// The model's own RNG (dropout), from [`VarStore::rng`].
    pub model_rng: Option<RngState>,
    /// Free-form extra fields (e.g. best validation loss).
    pub extra: HashMap<String, String>,
}

/// Saves model variables, optimizer state and [`TrainState`] atomically.
/// Variables are stored under `model.<name>`, optimizer buffers under `optim.<name>`.
pub fn save(
    path: &Path,
    vars: &VarStore,
    opt: Option<&Optimizer>,
    state: &TrainState,
) -> std::result::Result<(), CheckpointError> {
    let wrap = |e: candle_core::Error| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut tensors: Vec<(String, Tensor)> = vars
        .tensors()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    let mut meta = HashMap::new();
    if let Some(o) = opt {
        let (ts, m) = o.state().map_err(wrap)?;
        tensors.extend(ts.into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        meta.extend(m);
    }
    meta.insert("kiln.format".into(), "kiln-checkpoint-1".into());
    meta.insert("train.step".into(), state.step.to_string());
    meta.insert("train.epoch".into(), state.epoch.to_string());
    if let Some(r) = &state.rng {
        meta.insert("train.rng".into(), r.to_hex());
    }
    if let Some(r) = &state.model_rng {
        meta.insert("train.model_rng".into(), r.to_hex());
    }
    for (k, v) in &state.extra {
        meta.insert(format!("extra.{k}"), v.clone());
    }
    let bytes = serialize_tensors(&tensors, Some(meta)).map_err(wrap)?;
    write_atomic(path, &bytes).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a checkpoint written by [`save`] into `vars` (and `opt`), returning the
/// [`TrainState`]. Nothing is modified unless the whole file verifies and fits.
pub fn load(
    path: &Path,
    vars: &VarStore,
    opt: Option<&mut Optimizer>,
) -> std::result::Result<TrainState, CheckpointError> {
    let (tensors, meta) = read_tensors(path, &Device::Cpu)?;
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let mismatch = |reason: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        reason,
    };
    if meta.get("kiln.format").map(String::as_str) != Some("kiln-checkpoint-1") {
        return Err(invalid(
            "metadata field kiln.format is not kiln-checkpoint-1".into(),
        ));
    }
    let num = |k: &str| -> std::result::Result<u64, CheckpointError> {
        meta.get(k)
            .ok_or_else(|| invalid(format!("metadata field {k} is missing")))?
            .parse()
            .map_err(|e| invalid(format!("metadata field {k}: {e}")))
    };
    let step = num("train.step")?;
    let epoch = num("train.epoch")?;
    let rng = meta
        .get("train.rng")
        .map(|s| RngState::from_hex(s))
        .transpose()
        .map_err(invalid)?;
    let model_rng = meta
        .get("train.model_rng")
        .map(|s| RngState::from_hex(s))
        .transpose()
        .map_err(invalid)?;
    let mut model = HashMap::new();
    let mut optim = HashMap::new();
    for (n, t) in tensors {
        if let Some(m) = n.strip_prefix("model.") {
            model.insert(m.to_string(), t);
        } else if let Some(o) = n.strip_prefix("optim.") {
            optim.insert(o.to_string(), t);
        }
    }
    // Validate the optimizer first on a copy, so a mismatch leaves everything untouched.
    let mut new_opt = None;
    if let Some(o) = &opt {
        let mut c = (*o).clone();
        c.load_state(&optim, &meta)
            .map_err(|e| mismatch(e.to_string()))?;
        new_opt = Some(c);
    }
    // `assign` checks every name and shape before writing anything.
    vars.assign(&model).map_err(|e| mismatch(e.to_string()))?;
    if let (Some(o), Some(n)) = (opt, new_opt) {
        *o = n;
    }
    if let Some(r) = &model_rng {
        *vars.rng().lock() = SeededRng::from_state(r);
    }
    let extra = meta
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone())))
        .collect();
    Ok(TrainState {
        step,
        epoch,
        rng,
        model_rng,
        extra,
    })
}

/// Restores a generator from a [`TrainState`], or seeds a new one.
pub fn restore_rng(state: &TrainState, seed: u64) -> SeededRng {
    state
        .rng
        .as_ref()
        .map(SeededRng::from_state)
        .unwrap_or_else(|| SeededRng::new(seed))
}
