//! Checkpoints: the variables and optimizer state of every part of a
//! training session, its position and RNG states, in one safetensors file,
//! written atomically and verified on load.
//!
//! Format `kiln-checkpoint-2` keeps each part under its name: variables as
//! `parts.<part>.vars.<name>`, optimizer buffers as `parts.<part>.optim.<name>`,
//! optimizer settings and the part's own RNG (dropout) in the metadata under
//! `parts.<part>.`. Files of the first format (`kiln-checkpoint-1`: one model
//! under `model.*`, its optimizer under `optim.*`) still load into a session
//! with one part.
//!
//! A checkpoint is never half-written under its final name (temp file, fsync,
//! rename), and a truncated or corrupted file is rejected with an error naming
//! it: safetensors checks the header and data length, and a CRC-32 of the data
//! stored in the metadata catches flipped bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};

use crate::files::write_atomic;
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
    /// The file is not there. A run's `checkpoints/last.safetensors` is
    /// missing when the run stopped before its first checkpoint.
    #[error("checkpoint {path} does not exist{}", missing_hint(path))]
    Missing {
        /// The file.
        path: PathBuf,
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
    let bytes = safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(candle_core::Error::wrap)?;
    sort_metadata(bytes)
}

/// Rewrites the header in one canonical form: `__metadata__` first with its
/// keys in order, then the tensors in data order, each as `dtype`, `shape`,
/// `data_offsets`. safetensors writes the metadata from a `HashMap`, whose
/// order changes from run to run, so two saves of equal tensors differed in
/// bytes (and checksums); and serde_json's maps keep insertion order in some
/// builds (its `preserve_order` feature) and sort in others, so the header is
/// written by hand. The data keeps its place: its offsets count from the end
/// of the header, whatever the header's length.
fn sort_metadata(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use serde_json::Value;
    let bad = |why: &str| candle_core::Error::Msg(format!("safetensors header: {why}"));
    fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
        serde_json::to_string(v).map_err(candle_core::Error::wrap)
    }
    let len = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| bad("shorter than 8 bytes"))?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("length past the end"))?;
    let header: Value = serde_json::from_slice(&bytes[8..end]).map_err(candle_core::Error::wrap)?;
    let Value::Object(entries) = header else {
        return Err(bad("not a JSON object"));
    };
    let mut parts = Vec::with_capacity(entries.len());
    if let Some(meta) = entries.get("__metadata__") {
        let Value::Object(meta) = meta else {
            return Err(bad("__metadata__ is not an object"));
        };
        let mut pairs: Vec<_> = meta.iter().collect();
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        let mut fields = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            fields.push(format!("{}:{}", json(k)?, json(v)?));
        }
        parts.push(format!("\"__metadata__\":{{{}}}", fields.join(",")));
    }
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, info) in entries.iter().filter(|(k, _)| *k != "__metadata__") {
        let field = |f: &str| {
            info.get(f)
                .ok_or_else(|| bad(&format!("tensor {name:?} has no {f}")))
        };
        let (dtype, shape, offsets) = (field("dtype")?, field("shape")?, field("data_offsets")?);
        let start = offsets.get(0).and_then(Value::as_u64).unwrap_or(0);
        let text = format!(
            "{}:{{\"dtype\":{},\"shape\":{},\"data_offsets\":{}}}",
            json(name)?,
            json(dtype)?,
            json(shape)?,
            json(offsets)?
        );
        tensors.push((start, name.clone(), text));
    }
    tensors.sort();
    parts.extend(tensors.into_iter().map(|(_, _, t)| t));
    let mut text = format!("{{{}}}", parts.join(","));
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
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

/// Writes named tensors to a safetensors file atomically (temp file, fsync, rename).
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let bytes = serialize_tensors(tensors, metadata)?;
    write_atomic(path, &bytes).map_err(candle_core::Error::wrap)
}

/// What to do about a missing run checkpoint (`RUN/checkpoints/last...`):
/// the run has not written one yet.
fn missing_hint(path: &Path) -> String {
    let run = path
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "checkpoints"))
        .and_then(Path::parent);
    match run {
        Some(run) if path.file_name().is_some_and(|n| n == "last.safetensors") => format!(
            "; {} has no checkpoint yet (it stopped before its first one): continue it with \
             --resume {}",
            run.display(),
            run.display()
        ),
        _ => String::new(),
    }
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
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
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

/// The current format's name, in the `kiln.format` metadata field.
pub const FORMAT: &str = "kiln-checkpoint-2";
/// The first format (one model, one optimizer), still read.
pub const FORMAT_V1: &str = "kiln-checkpoint-1";

/// Everything needed to continue training exactly where it stopped, besides
/// the parts' tensors.
#[derive(Debug, Clone, Default)]
pub struct TrainState {
    /// Batches (loop steps) done.
    pub step: u64,
    /// Completed epochs.
    pub epoch: u64,
    /// The training RNG (masks, noise), if the run uses one.
    pub rng: Option<RngState>,
    /// The RNG of the single part of a first-format file (format 2 restores
    /// each part's RNG into its [`VarStore`] directly).
    pub model_rng: Option<RngState>,
    /// Free-form fields (the session's loop position and epoch sums, a
    /// trainer's best validation loss, ...).
    pub extra: HashMap<String, String>,
}

/// One part's tensors to save: its variables and, when trained, its optimizer.
#[derive(Debug, Clone, Copy)]
pub struct PartRef<'a> {
    /// The part's name (letters, digits, `_`, `-`).
    pub name: &'a str,
    /// Its variables.
    pub vars: &'a VarStore,
    /// Its optimizer, if it is trained.
    pub opt: Option<&'a Optimizer>,
}

/// One part to load into.
#[derive(Debug)]
pub struct PartMut<'a> {
    /// The part's name.
    pub name: &'a str,
    /// Its variables (written only if the whole file fits).
    pub vars: &'a VarStore,
    /// Its optimizer (replaced only if the whole file fits).
    pub opt: Option<&'a mut Optimizer>,
}

/// Saves the parts and the [`TrainState`] atomically in format 2.
pub fn save_parts(
    path: &Path,
    parts: &[PartRef<'_>],
    state: &TrainState,
) -> std::result::Result<(), CheckpointError> {
    let wrap = |e: candle_core::Error| CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut tensors = Vec::new();
    let mut meta = HashMap::new();
    for p in parts {
        tensors.extend(
            p.vars
                .tensors()
                .into_iter()
                .map(|(n, t)| (format!("parts.{}.vars.{n}", p.name), t)),
        );
        meta.insert(
            format!("parts.{}.rng", p.name),
            p.vars.rng().lock().state().to_hex(),
        );
        if let Some(o) = p.opt {
            let (ts, m) = o.state().map_err(wrap)?;
            tensors.extend(
                ts.into_iter()
                    .map(|(n, t)| (format!("parts.{}.optim.{n}", p.name), t)),
            );
            meta.extend(
                m.into_iter()
                    .map(|(k, v)| (format!("parts.{}.{k}", p.name), v)),
            );
        }
    }
    let names: Vec<&str> = parts.iter().map(|p| p.name).collect();
    meta.insert("kiln.format".into(), FORMAT.into());
    meta.insert("kiln.parts".into(), names.join(","));
    meta.insert("train.step".into(), state.step.to_string());
    meta.insert("train.epoch".into(), state.epoch.to_string());
    if let Some(r) = &state.rng {
        meta.insert("train.rng".into(), r.to_hex());
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

/// Saves one model (and its optimizer) as the part `model`: the
/// single-model form of [`save_parts`].
pub fn save(
    path: &Path,
    vars: &VarStore,
    opt: Option<&Optimizer>,
    state: &TrainState,
) -> std::result::Result<(), CheckpointError> {
    save_parts(
        path,
        &[PartRef {
            name: "model",
            vars,
            opt,
        }],
        state,
    )
}

/// The tensors, optimizer metadata and RNG of one part, read from a file.
struct PartData {
    vars: HashMap<String, Tensor>,
    optim: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
    rng: Option<RngState>,
}

/// Loads a checkpoint into `parts`, returning the [`TrainState`]. Every part
/// in the file must be given and every given part must be in the file (a
/// first-format file holds one part, which fits a single given part whatever
/// its name). Nothing is modified unless the whole file verifies and fits.
pub fn load_parts(
    path: &Path,
    parts: &mut [PartMut<'_>],
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
    let format = meta.get("kiln.format").map(String::as_str);
    let mut data: Vec<(String, PartData)> = match format {
        Some(FORMAT) => {
            let names: Vec<String> = meta
                .get("kiln.parts")
                .ok_or_else(|| invalid("metadata field kiln.parts is missing".into()))?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let mut out: Vec<(String, PartData)> = Vec::new();
            for n in &names {
                let rng = meta
                    .get(&format!("parts.{n}.rng"))
                    .map(|s| RngState::from_hex(s))
                    .transpose()
                    .map_err(|e| invalid(format!("metadata field parts.{n}.rng: {e}")))?;
                let pm = meta
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&format!("parts.{n}."))
                            .map(|k| (k.to_string(), v.clone()))
                    })
                    .collect();
                out.push((
                    n.clone(),
                    PartData {
                        vars: HashMap::new(),
                        optim: HashMap::new(),
                        meta: pm,
                        rng,
                    },
                ));
            }
            for (t_name, t) in tensors {
                let placed = out.iter_mut().find_map(|(n, d)| {
                    let rest = t_name.strip_prefix(&format!("parts.{n}."))?;
                    if let Some(v) = rest.strip_prefix("vars.") {
                        d.vars.insert(v.to_string(), t.clone());
                    } else if let Some(o) = rest.strip_prefix("optim.") {
                        d.optim.insert(o.to_string(), t.clone());
                    } else {
                        return None;
                    }
                    Some(())
                });
                if placed.is_none() {
                    return Err(invalid(format!(
                        "tensor {t_name} belongs to no part ({})",
                        names.join(", ")
                    )));
                }
            }
            out
        }
        Some(FORMAT_V1) => {
            let (mut vars, mut optim) = (HashMap::new(), HashMap::new());
            for (n, t) in tensors {
                if let Some(m) = n.strip_prefix("model.") {
                    vars.insert(m.to_string(), t);
                } else if let Some(o) = n.strip_prefix("optim.") {
                    optim.insert(o.to_string(), t);
                }
            }
            let rng = meta
                .get("train.model_rng")
                .map(|s| RngState::from_hex(s))
                .transpose()
                .map_err(invalid)?;
            let [only] = parts else {
                return Err(mismatch(format!(
                    "it holds one model (format {FORMAT_V1}), but {} parts were given",
                    parts.len()
                )));
            };
            vec![(
                only.name.to_string(),
                PartData {
                    vars,
                    optim,
                    meta: meta.clone(),
                    rng,
                },
            )]
        }
        other => {
            return Err(invalid(format!(
                "metadata field kiln.format is {other:?}, expected {FORMAT:?} or {FORMAT_V1:?}"
            )))
        }
    };
    // Pair the file's parts with the given ones, by name.
    let file_names: Vec<String> = data.iter().map(|(n, _)| n.clone()).collect();
    let given: Vec<&str> = parts.iter().map(|p| p.name).collect();
    if file_names.len() != given.len() || given.iter().any(|g| !file_names.iter().any(|f| f == g)) {
        return Err(mismatch(format!(
            "it holds the parts [{}], the session has [{}]",
            file_names.join(", "),
            given.join(", ")
        )));
    }
    // Validate everything on copies first, so a mismatch changes nothing.
    let mut new_opts = Vec::with_capacity(parts.len());
    for p in parts.iter() {
        let Some(i) = data.iter().position(|(n, _)| n == p.name) else {
            continue;
        };
        let d = &data[i].1;
        p.vars
            .check(&d.vars)
            .map_err(|e| mismatch(format!("part {}: {e}", p.name)))?;
        match (&p.opt, d.meta.contains_key("optim.kind")) {
            (Some(o), true) => {
                let mut c = (**o).clone();
                c.load_state(&d.optim, &d.meta)
                    .map_err(|e| mismatch(format!("part {}: {e}", p.name)))?;
                new_opts.push(Some(c));
            }
            (Some(_), false) => {
                return Err(mismatch(format!(
                    "part {} has no optimizer state in the file, but is trained",
                    p.name
                )))
            }
            (None, _) => new_opts.push(None),
        }
    }
    for (p, new_opt) in parts.iter_mut().zip(new_opts) {
        let Some(i) = data.iter().position(|(n, _)| n == p.name) else {
            continue;
        };
        let (_, d) = data.swap_remove(i);
        p.vars
            .assign(&d.vars)
            .map_err(|e| mismatch(format!("part {}: {e}", p.name)))?;
        if let (Some(o), Some(n)) = (p.opt.as_deref_mut(), new_opt) {
            *o = n;
        }
        if let Some(r) = &d.rng {
            *p.vars.rng().lock() = SeededRng::from_state(r);
        }
    }
    let num = |k: &str| -> std::result::Result<u64, CheckpointError> {
        meta.get(k)
            .ok_or_else(|| invalid(format!("metadata field {k} is missing")))?
            .parse()
            .map_err(|e| invalid(format!("metadata field {k}: {e}")))
    };
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
    let extra = meta
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone())))
        .collect();
    Ok(TrainState {
        step: num("train.step")?,
        epoch: num("train.epoch")?,
        rng,
        model_rng,
        extra,
    })
}

/// Loads one model (and its optimizer) from a file holding a single part, in
/// either format: the single-model form of [`load_parts`].
pub fn load(
    path: &Path,
    vars: &VarStore,
    opt: Option<&mut Optimizer>,
) -> std::result::Result<TrainState, CheckpointError> {
    let (_, meta) = read_tensors(path, &Device::Cpu)?;
    let name = match meta.get("kiln.parts") {
        Some(p) if !p.contains(',') => p.clone(),
        Some(p) => {
            return Err(CheckpointError::Mismatch {
                path: path.to_path_buf(),
                reason: format!("it holds several parts ({p}); load them with load_part"),
            })
        }
        None => "model".into(),
    };
    load_parts(
        path,
        &mut [PartMut {
            name: &name,
            vars,
            opt,
        }],
    )
}

/// Loads the variables of one part of a checkpoint (for evaluation or
/// sampling), leaving the other parts and every optimizer aside. A
/// first-format file's single model is its only part, whatever `name` says.
pub fn load_part(
    path: &Path,
    name: &str,
    vars: &VarStore,
) -> std::result::Result<(), CheckpointError> {
    let (tensors, meta) = read_tensors(path, &Device::Cpu)?;
    let prefix = match meta.get("kiln.format").map(String::as_str) {
        Some(FORMAT_V1) => "model.".to_string(),
        _ => format!("parts.{name}.vars."),
    };
    let values: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|n| (n.to_string(), t)))
        .collect();
    if values.is_empty() {
        return Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            reason: format!(
                "it has no part {name:?} (its parts: {})",
                meta.get("kiln.parts").map_or("model", String::as_str)
            ),
        });
    }
    vars.assign(&values)
        .map_err(|e| CheckpointError::Mismatch {
            path: path.to_path_buf(),
            reason: format!("part {name}: {e}"),
        })?;
    if let Some(r) = meta
        .get(&format!("parts.{name}.rng"))
        .and_then(|s| RngState::from_hex(s).ok())
    {
        *vars.rng().lock() = SeededRng::from_state(&r);
    }
    Ok(())
}

/// Restores a generator from a [`TrainState`], or seeds a new one.
pub fn restore_rng(state: &TrainState, seed: u64) -> SeededRng {
    state
        .rng
        .as_ref()
        .map(SeededRng::from_state)
        .unwrap_or_else(|| SeededRng::new(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            ("b".into(), Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap()),
            (
                "a".into(),
                Tensor::new(&[[7u32, 8], [9, 10]], &dev).unwrap(),
            ),
        ]
    }

    fn metadata(order: impl Iterator<Item = usize>) -> Metadata {
        let mut m = Metadata::new();
        for i in order {
            m.insert(format!("key.{i:02}"), format!("value \"{i}\""));
        }
        m
    }

    #[test]
    fn equal_tensors_and_metadata_give_equal_bytes() {
        // Each HashMap has its own random iteration order: before the header
        // was rewritten, two saves of these differed in the metadata's order.
        let first = serialize_tensors(&tensors(), Some(metadata(0..40))).unwrap();
        for _ in 0..5 {
            let again = serialize_tensors(&tensors(), Some(metadata((0..40).rev()))).unwrap();
            assert_eq!(first, again);
        }
        // A valid safetensors file whose metadata and tensors survive.
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.names().len(), 2);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["key.07"], "value \"7\"");
        assert_eq!(meta.len(), 41); // and kiln.crc32
        let dev = Device::Cpu;
        let b = st.tensor("b").unwrap();
        let b = candle_core::safetensors::Load::load(&b, &dev).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        // The metadata keys are in order in the header text.
        let len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(len % 8, 0);
        let text = std::str::from_utf8(&first[8..8 + len]).unwrap();
        let pos: Vec<usize> = (0..40)
            .map(|i| text.find(&format!("\"key.{i:02}\"")).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{text}");
        // One form whatever serde_json's map order (its `preserve_order`
        // feature differs between builds): metadata first, then each tensor's
        // fields in safetensors' own order.
        assert!(text.starts_with("{\"__metadata__\":{\"key.00\":"), "{text}");
        assert!(
            text.contains("\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":["),
            "{text}"
        );
        assert!(
            text.contains("\"a\":{\"dtype\":\"U32\",\"shape\":[2,2],\"data_offsets\":["),
            "{text}"
        );
    }

    #[test]
    fn a_header_that_is_not_safetensors_is_an_error() {
        assert!(sort_metadata(vec![1, 2]).is_err());
        let mut b = 100u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(sort_metadata(b).is_err());
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"[]");
        assert!(sort_metadata(b).is_err());
        // A tensor entry without its shape and offsets.
        let entry = br#"{"t":{"dtype":1}}"#;
        let mut b = (entry.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(entry);
        assert!(sort_metadata(b).is_err());
    }
}
