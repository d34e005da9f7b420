//! Loading GPT-2 weights as trainable variables (a policy, a reward model's
//! backbone) or as a frozen copy (a reference), and finding the Hugging Face
//! folder inside a run folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use kiln_core::vars::{SharedRng, VarStore};
use kiln_lm::{Gpt2, Gpt2Config, ModelFiles};

use crate::error::{Result, RlhfError};

/// The Hugging Face folder of `path`: `path/model` when `path` is a kiln run
/// folder (`config.toml` beside a `model/` folder: `train lm`, `rlhf dpo`,
/// `rlhf reward`, ...), else `path` itself.
pub fn model_dir(path: &Path) -> PathBuf {
    let inner = path.join("model");
    if path.join("config.toml").is_file() && inner.join("config.json").is_file() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// [`model_dir`] of a policy: refuses a reward model (`architectures` names
/// a `...ForSequenceClassification` head), whose backbone would otherwise load
/// as a language model with a head it never trained.
pub fn policy_dir(path: &Path) -> Result<PathBuf> {
    let dir = model_dir(path);
    let config = dir.join("config.json");
    let arch: Vec<String> = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| serde_json::from_value(v.get("architectures")?.clone()).ok())
        .unwrap_or_default();
    if let Some(a) = arch
        .iter()
        .find(|a| a.ends_with("ForSequenceClassification"))
    {
        return Err(RlhfError::file(
            path,
            format!(
                "is a reward model ({a} in {}), not a language model: pass a GPT-2 folder or \
                 a `train lm` / `rlhf dpo` run as the policy",
                config.display()
            ),
        ));
    }
    Ok(dir)
}

/// The config and every tensor of a model folder, as f32 on `device`. The
/// original OpenAI layout (`h.0...` without `transformer.`) is renamed to
/// Hugging Face's, and its `attn.bias` / `attn.masked_bias` buffers dropped.
pub fn load_weights(
    files: &ModelFiles,
    device: &Device,
) -> Result<(Gpt2Config, HashMap<String, Tensor>)> {
    let cfg = Gpt2Config::from_file(&files.config)?;
    let mut out = HashMap::new();
    for w in &files.weights {
        let tensors = candle_core::safetensors::load(w, device)
            .map_err(|e| RlhfError::file(w, format!("not a readable safetensors file: {e}")))?;
        for (k, v) in tensors {
            out.insert(k, v.to_dtype(DType::F32)?);
        }
    }
    if !out.contains_key("transformer.wte.weight") && out.contains_key("wte.weight") {
        out = out
            .into_iter()
            .filter(|(k, _)| !(k.ends_with(".attn.bias") || k.ends_with(".attn.masked_bias")))
            .map(|(k, v)| {
                if k == "lm_head.weight" || k == "score.weight" {
                    (k, v)
                } else {
                    (format!("transformer.{k}"), v)
                }
            })
            .collect();
    }
    if !out.contains_key("transformer.wte.weight") {
        let first = files.weights.first().cloned().unwrap_or_default();
        return Err(RlhfError::file(
            first,
            "no `transformer.wte.weight` or `wte.weight`: not a GPT-2 checkpoint",
        ));
    }
    Ok((cfg, out))
}

/// A store whose variables are `tensors` (copied into new variables).
pub fn store_of(tensors: &HashMap<String, Tensor>, seed: u64) -> Result<VarStore> {
    let vs = VarStore::new(seed);
    {
        let mut data = vs.varmap().data().lock().unwrap_or_else(|p| p.into_inner());
        for (k, t) in tensors {
            data.insert(k.clone(), Var::from_tensor(&t.copy()?)?);
        }
    }
    Ok(vs)
}

/// Checks that building a model used every stored tensor (a misnamed or
/// foreign tensor in the folder is an error, not silently ignored).
pub(crate) fn check_all_used(
    vs: &VarStore,
    tensors: &HashMap<String, Tensor>,
    place: &Path,
) -> Result<()> {
    let used: std::collections::HashSet<String> = vs.names().into_iter().collect();
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    extra.sort();
    if !extra.is_empty() {
        return Err(RlhfError::file(
            place,
            format!(
                "tensors the model does not use: {}",
                extra
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(())
}

/// A GPT-2 language model whose weights are trainable variables in the
/// returned store, loaded from `files`. `seed` seeds the store's generator
/// (dropout).
pub fn trainable_lm(files: &ModelFiles, device: &Device, seed: u64) -> Result<(Gpt2, VarStore)> {
    let (cfg, tensors) = load_weights(files, device)?;
    trainable_from(&cfg, &tensors, device, seed, &files.config)
}

/// A frozen copy of the model whose variables are in `vs`: new tensors (not
/// variables, so nothing is recorded for backprop), unaffected by later
/// optimizer steps on `vs` (kiln's optimizers update in place).
pub fn frozen_copy(cfg: &Gpt2Config, vs: &VarStore, device: &Device) -> Result<Gpt2> {
    let map: HashMap<String, Tensor> = vs
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.copy()?.detach())))
        .collect::<Result<_>>()?;
    let vb = VarBuilder::from_tensors(map, DType::F32, device);
    Ok(Gpt2::new(cfg, vb, SharedRng::new(0))?)
}

/// A frozen view of the model whose variables are in `vs`, sharing their
/// storage (no copy): for a store that no optimizer updates, such as a
/// reference model's.
pub fn frozen_view(cfg: &Gpt2Config, vs: &VarStore, device: &Device) -> Result<Gpt2> {
    let map: HashMap<String, Tensor> = vs
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.detach()))
        .collect();
    let vb = VarBuilder::from_tensors(map, DType::F32, device);
    Ok(Gpt2::new(cfg, vb, SharedRng::new(0))?)
}

/// A GPT-2 language model whose weights are trainable variables in a new
/// store (a copy of `tensors`), checking that every tensor is used.
pub fn trainable_from(
    cfg: &Gpt2Config,
    tensors: &HashMap<String, Tensor>,
    device: &Device,
    seed: u64,
    place: &Path,
) -> Result<(Gpt2, VarStore)> {
    let vs = store_of(tensors, seed)?;
    let model = Gpt2::new(cfg, vs.builder(DType::F32, device), vs.rng().clone())?;
    check_all_used(&vs, tensors, place)?;
    Ok((model, vs))
}

/// A GPT-2 whose weights are the (non-trainable) `tensors`.
pub fn frozen_from(
    cfg: &Gpt2Config,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Gpt2> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(Gpt2::new(cfg, vb, SharedRng::new(0))?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A reward model's run folder is refused as a policy, naming its head;
    /// a language model's folder (bare or inside a run) is taken.
    #[test]
    fn a_reward_model_is_not_taken_for_a_policy() {
        let dir = tempfile::tempdir().unwrap();
        let write = |run: &Path, arch: &str| {
            std::fs::create_dir_all(run.join("model")).unwrap();
            std::fs::write(run.join("config.toml"), "kind = \"x\"\n").unwrap();
            std::fs::write(
                run.join("model/config.json"),
                format!("{{\"architectures\": [\"{arch}\"]}}"),
            )
            .unwrap();
        };
        let (rm, lm) = (dir.path().join("rm"), dir.path().join("lm"));
        write(&rm, "GPT2ForSequenceClassification");
        write(&lm, "GPT2LMHeadModel");
        let e = policy_dir(&rm).unwrap_err().to_string();
        assert!(
            e.contains("is a reward model (GPT2ForSequenceClassification"),
            "{e}"
        );
        assert_eq!(policy_dir(&lm).unwrap(), lm.join("model"));
        assert_eq!(policy_dir(&lm.join("model")).unwrap(), lm.join("model"));
    }
}
