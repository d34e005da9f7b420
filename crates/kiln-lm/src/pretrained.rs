//! Hugging Face folders: find a model's files (a local folder, the hub cache, or
//! a download), load them, and write `save_pretrained` folders transformers reads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::vars::SharedRng;

use crate::config::Gpt2Config;
use crate::error::{LmError, Result};
use crate::model::Gpt2;
use crate::tokenizer::Gpt2Tokenizer;

/// The files of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if there is one.
    pub tokenizer: Option<PathBuf>,
}

/// How to reach the Hugging Face Hub. The library reads no environment
/// variables; callers map `HF_HOME`/`HF_HUB_CACHE`/`HF_ENDPOINT`/`HF_TOKEN`/
/// `HF_HUB_OFFLINE` onto these fields (as `cargo xtask generate` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (`~/.cache/huggingface/hub` by convention).
    pub cache_dir: PathBuf,
    /// The endpoint (`https://huggingface.co`).
    pub endpoint: Option<String>,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
    /// Branch, tag or commit (`main`).
    pub revision: String,
    /// Use only the cache, never the network.
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// Options with `cache_dir`, revision `main`, online, no progress bars.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            endpoint: None,
            token: None,
            revision: "main".into(),
            offline: false,
            progress: false,
        }
    }
}

const WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

impl ModelFiles {
    /// The files of a local folder holding `config.json`, `model.safetensors`
    /// (or a sharded index) and optionally `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(LmError::NotFound(format!(
                "{} is not a folder; expected a folder with config.json, model.safetensors and tokenizer.json",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        let mut missing = Vec::new();
        if !config.is_file() {
            missing.push("config.json");
        }
        let weights = if dir.join(WEIGHTS).is_file() {
            vec![dir.join(WEIGHTS)]
        } else if dir.join(INDEX).is_file() {
            shard_names(&dir.join(INDEX))?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        } else {
            missing.push(if dir.join("pytorch_model.bin").is_file() {
                "model.safetensors (only pytorch_model.bin is there; convert it with transformers: \
                 `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
            } else {
                WEIGHTS
            });
            Vec::new()
        };
        if !missing.is_empty() {
            return Err(LmError::NotFound(format!(
                "{}: missing {}",
                dir.display(),
                missing.join(", ")
            )));
        }
        let tok = dir.join("tokenizer.json");
        Ok(Self {
            config,
            weights,
            tokenizer: tok.is_file().then_some(tok),
        })
    }

    /// Resolves `model`: a local folder if one exists at that path, otherwise a
    /// hub repository id (`gpt2`, `openai-community/gpt2-medium`,
    /// `distilbert/distilgpt2`), read from the cache and downloaded when missing
    /// (unless `opts.offline`).
    ///
    /// A path to a file (an existing one, or a name ending in a weights or
    /// config extension such as `.safetensors`, `.bin` or `.json`) is refused
    /// with a message saying to pass its folder, instead of being looked up
    /// on the hub as a repository id.
    pub fn resolve(model: &str, opts: &HubOptions) -> Result<Self> {
        let p = Path::new(model);
        if p.is_dir() {
            return Self::from_dir(p);
        }
        let folder_hint = || match p.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => format!(" (here: {})", d.display()),
            None => String::new(),
        };
        if p.is_file() {
            return Err(LmError::NotFound(format!(
                "{model} is a file; pass the folder that holds config.json, model.safetensors and \
                 tokenizer.json{}, a `train lm` run folder, or a hub repository id",
                folder_hint()
            )));
        }
        let file_like = p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            matches!(
                e.to_ascii_lowercase().as_str(),
                "safetensors" | "bin" | "json" | "pt" | "pth" | "ckpt" | "gguf" | "toml"
            )
        });
        if model.starts_with('.')
            || model.starts_with('/')
            || model.starts_with('~')
            || model.contains('\\')
            || model.matches('/').count() > 1
            || file_like
        {
            return Err(LmError::NotFound(format!(
                "{model} looks like a path but no such folder exists (and it is not a hub \
                 repository id such as `gpt2` or `openai-community/gpt2-medium`); pass an \
                 existing folder holding config.json, model.safetensors and tokenizer.json{}",
                if file_like {
                    folder_hint()
                } else {
                    String::new()
                }
            )));
        }
        hub_files(model, opts)
    }

    /// The tokenizer, or an error naming the missing file.
    pub fn load_tokenizer(&self) -> Result<Gpt2Tokenizer> {
        match &self.tokenizer {
            Some(p) => Gpt2Tokenizer::from_file(p),
            None => Err(LmError::NotFound(format!(
                "no tokenizer.json beside {}; put one there (e.g. `AutoTokenizer.from_pretrained(...).save_pretrained(dir)` writes it)",
                self.config.display()
            ))),
        }
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| LmError::file(index, e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LmError::file(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LmError::file(index, "expected an object field `weight_map`"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(LmError::file(index, "`weight_map` names no files"));
    }
    Ok(names)
}

fn missing_hint(model: &str, missing: &[String], opts: &HubOptions, why: &str) -> LmError {
    LmError::NotFound(format!(
        "model {model:?} (revision {}) is not available {why}: missing {} in the hub cache {}. \
         Either connect to the network once (files are cached and later runs work offline), \
         or download them elsewhere (`huggingface-cli download {model} config.json model.safetensors tokenizer.json`) \
         and point --model at a folder holding config.json, model.safetensors and tokenizer.json",
        opts.revision,
        missing.join(", "),
        opts.cache_dir.display()
    ))
}

#[cfg(feature = "hub")]
fn hub_files(model: &str, opts: &HubOptions) -> Result<ModelFiles> {
    use hf_hub::{Cache, Repo, RepoType};
    let repo = Repo::with_revision(model.to_string(), RepoType::Model, opts.revision.clone());
    let cache = Cache::new(opts.cache_dir.clone()).repo(repo.clone());
    let cached = |f: &str| cache.get(f);
    // The cache alone first, so a cached model needs no network.
    if let (Some(c), Some(w)) = (cached("config.json"), cached(WEIGHTS)) {
        return Ok(ModelFiles {
            config: c,
            weights: vec![w],
            tokenizer: cached("tokenizer.json"),
        });
    }
    let wanted = ["config.json", WEIGHTS, "tokenizer.json"];
    let missing = || -> Vec<String> {
        wanted
            .iter()
            .filter(|f| cached(f).is_none())
            .map(|s| s.to_string())
            .collect()
    };
    if opts.offline {
        return Err(missing_hint(model, &missing(), opts, "offline"));
    }
    let mut b = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_progress(opts.progress)
        .with_token(opts.token.clone());
    if let Some(e) = &opts.endpoint {
        b = b.with_endpoint(e.clone());
    }
    let api = b
        .build()
        .map_err(|e| LmError::NotFound(format!("cannot set up the hub client: {e}")))?;
    let r = api.repo(repo);
    let get = |f: &str| r.get(f);
    let config =
        get("config.json").map_err(|e| missing_hint(model, &missing(), opts, &format!("({e})")))?;
    let weights = match get(WEIGHTS) {
        Ok(w) => vec![w],
        Err(e) => match get(INDEX) {
            Ok(idx) => shard_names(&idx)?
                .iter()
                .map(|n| {
                    get(n).map_err(|e| {
                        missing_hint(model, std::slice::from_ref(n), opts, &format!("({e})"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Err(_) => {
                return Err(missing_hint(
                    model,
                    &[WEIGHTS.into()],
                    opts,
                    &format!("({e})"),
                ))
            }
        },
    };
    Ok(ModelFiles {
        config,
        weights,
        tokenizer: get("tokenizer.json").ok(),
    })
}

#[cfg(not(feature = "hub"))]
fn hub_files(model: &str, opts: &HubOptions) -> Result<ModelFiles> {
    // Without the `hub` feature the cache layout is still readable.
    let snap = opts
        .cache_dir
        .join(format!("models--{}", model.replace('/', "--")));
    let rev = std::fs::read_to_string(snap.join("refs").join(&opts.revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| opts.revision.clone());
    let dir = snap.join("snapshots").join(rev);
    ModelFiles::from_dir(&dir).map_err(|_| {
        missing_hint(
            model,
            &[
                "config.json".into(),
                WEIGHTS.into(),
                "tokenizer.json".into(),
            ],
            opts,
            "(kiln-lm was built without the `hub` feature)",
        )
    })
}

impl Gpt2 {
    /// Loads a model from its files (memory-mapped safetensors, converted to f32).
    /// Reads Hugging Face's names (`transformer.h.0...`) and the original OpenAI
    /// port's (`h.0...`, with `attn.bias` mask buffers, which are ignored).
    pub fn from_files(files: &ModelFiles, device: &Device) -> Result<Self> {
        let cfg = Gpt2Config::from_file(&files.config)?;
        for w in &files.weights {
            check_safetensors(w)?;
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap user we
        // rely on them not being truncated while the model is alive.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, DType::F32, device)? };
        let first = files.weights[0].clone();
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb
        } else if vb.contains_tensor("wte.weight") {
            vb.rename_f(|n: &str| n.strip_prefix("transformer.").unwrap_or(n).to_string())
        } else {
            return Err(LmError::file(
                first,
                "no `transformer.wte.weight` or `wte.weight`: not a GPT-2 checkpoint",
            ));
        };
        Gpt2::new(&cfg, vb, SharedRng::new(0)).map_err(|e| match e {
            LmError::Tensor(t) => LmError::file(first, format!("does not match config.json: {t}")),
            other => other,
        })
    }

    /// Loads a local Hugging Face folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_files(&ModelFiles::from_dir(dir)?, device)
    }

    /// The named weights in Hugging Face's layout (`transformer.*`, plus
    /// `lm_head.weight` when untied).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.weights_for_save()
    }

    /// Writes a folder transformers' `GPT2LMHeadModel.from_pretrained` and kiln
    /// read: `config.json`, `generation_config.json`, `model.safetensors`
    /// (written atomically), plus `tokenizer.json` and `tokenizer_config.json`
    /// when a tokenizer is given.
    pub fn save_pretrained(&self, dir: &Path, tokenizer: Option<&Gpt2Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LmError::file(dir, e.to_string()))?;
        let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            let s =
                serde_json::to_string_pretty(v).map_err(|e| LmError::file(&p, e.to_string()))?;
            kiln_core::files::write_atomic(&p, s.as_bytes())
                .map_err(|e| LmError::file(&p, e.to_string()))
        };
        let cfg = self.config();
        let tensors = self.named_weights();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let p = dir.join(WEIGHTS);
        kiln_core::checkpoint::save_safetensors(&tensors, Some(meta), &p)
            .map_err(|e| LmError::file(&p, e.to_string()))?;
        write_json("config.json", &cfg.to_hf_json())?;
        let mut gen = serde_json::json!({ "_from_model_config": true });
        if let Some(b) = cfg.bos_token_id {
            gen["bos_token_id"] = b.into();
        }
        if let Some(e) = cfg.eos_token_id {
            gen["eos_token_id"] = e.into();
        }
        write_json("generation_config.json", &gen)?;
        if let Some(t) = tokenizer {
            t.save(&dir.join("tokenizer.json"))?;
            let mut tc = serde_json::json!({
                "tokenizer_class": "GPT2TokenizerFast",
                "model_max_length": cfg.n_positions,
                "add_prefix_space": false,
            });
            if t.eos_id().is_some() {
                for k in ["bos_token", "eos_token", "unk_token"] {
                    tc[k] = crate::tokenizer::END_OF_TEXT.into();
                }
            }
            write_json("tokenizer_config.json", &tc)?;
        }
        Ok(())
    }
}

/// Checks a safetensors header before mmap-loading, so a truncated or foreign
/// file is reported by name instead of failing deep inside candle.
fn check_safetensors(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| LmError::file(path, e.to_string()))?;
    // SAFETY: read-only map of a file we just opened.
    let mm = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| LmError::file(path, e.to_string()))?;
    safetensors::SafeTensors::deserialize(&mm)
        .map(|_| ())
        .map_err(|e| LmError::file(path, format!("not a valid safetensors file: {e}")))
}
