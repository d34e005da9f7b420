//! Causal-LM training: the loss (with a label mask), and a pipeline that trains a
//! byte-level BPE tokenizer and a small GPT-2 from scratch on a corpus, with
//! checkpoints, exact resume and a Hugging Face folder at the end.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kiln_core::image::plot_metrics;
use kiln_core::optim::{LrSchedule, OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::session::{Record, Session};
use kiln_core::vars::VarStore;
use kiln_data::text::{TextSource, TokenBlocks};
use serde::{Deserialize, Serialize};

use crate::config::Gpt2Config;
use crate::error::{LmError, Result};
use crate::generate::{generate_text, GenerationConfig};
use crate::model::Gpt2;
use crate::tokenizer::Gpt2Tokenizer;

/// Mean negative log-likelihood of `targets [B, T]` given `inputs [B, T]`
/// (next-token prediction), over positions where `mask [B, T]` is 1 (all when
/// `None`): the completion/label mask of fine-tuning. `train` turns dropout on.
/// The log-softmax is never materialised ([`kiln_core::ops::token_logprobs`]).
pub fn next_token_loss(
    model: &Gpt2,
    inputs: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    train: bool,
) -> Result<Tensor> {
    if inputs.dims() != targets.dims() {
        return Err(LmError::Input(format!(
            "inputs {:?} and targets {:?} differ in shape",
            inputs.dims(),
            targets.dims()
        )));
    }
    let h = model.hidden_states(inputs, train)?;
    let logits = model.logits(&h)?;
    let lp = kiln_core::ops::token_logprobs(&logits, targets)?;
    Ok(match mask {
        None => lp.mean_all()?.neg()?,
        Some(m) => {
            if m.dims() != targets.dims() {
                return Err(LmError::Input(format!(
                    "mask {:?} does not match targets {:?}",
                    m.dims(),
                    targets.dims()
                )));
            }
            let m = m.to_dtype(DType::F32)?;
            let n = m.sum_all()?.to_scalar::<f32>()?;
            if n == 0.0 {
                return Err(LmError::Input("the label mask selects no tokens".into()));
            }
            ((lp * m)?.sum_all()?.neg()? / n as f64)?
        }
    })
}

/// Hugging Face's `labels=ids` loss: position `t` predicts `ids[t + 1]`, averaged
/// over the `B * (T - 1)` targets where `mask[:, 1:]` is 1.
pub fn causal_lm_loss(
    model: &Gpt2,
    ids: &Tensor,
    mask: Option<&Tensor>,
    train: bool,
) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    if t < 2 {
        return Err(LmError::Input("need at least 2 tokens per row".into()));
    }
    let inputs = ids.narrow(1, 0, t - 1)?;
    let targets = ids.narrow(1, 1, t - 1)?;
    let m = mask.map(|m| m.narrow(1, 1, t - 1)).transpose()?;
    next_token_loss(model, &inputs, &targets, m.as_ref(), train)
}

/// Settings of `train lm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The corpus (`synthetic-reviews[:N]`, `lines:PATH`, `files:PATH`).
    pub corpus: String,
    /// BPE vocabulary size.
    pub vocab_size: usize,
    /// Tokens per training block (also the model's context).
    pub block_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Width.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Dropout (embeddings, attention, residual).
    pub dropout: f64,
    /// Blocks per micro-batch (one forward and backward pass).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (transformers'
    /// `gradient_accumulation_steps`): a step sees `batch_size * grad_accum`
    /// blocks while memory holds the activations of `batch_size`. A config
    /// written before the field existed reads 1.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Passes over the training blocks.
    pub epochs: u64,
    /// Peak AdamW learning rate (linear warm-up, cosine decay to 10%).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this before each step (PyTorch's
    /// `clip_grad_norm_`, transformers' `max_grad_norm`); 0 turns it off.
    /// Default 1.0, as transformers' Trainer: unclipped, the demo's 3-epoch
    /// run ended at validation loss 0.73-1.62 over seeds 0-4 (seed 2 stuck
    /// near the unigram plateau), clipped at 0.62-0.64. A config written
    /// before the field existed reads 0, so an old run resumes as it began.
    #[serde(default = "no_clipping")]
    pub max_grad_norm: f64,
    /// Share of blocks held out for validation.
    pub val_fraction: f64,
    /// Seed of tokenizer corpus, weights, data order and dropout.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            corpus: "synthetic-reviews".into(),
            vocab_size: 512,
            block_size: 64,
            n_layer: 4,
            n_embd: 128,
            n_head: 4,
            dropout: 0.1,
            batch_size: 16,
            grad_accum: 1,
            epochs: 4,
            lr: 2e-3,
            warmup: 20,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            val_fraction: 0.1,
            seed: 0,
        }
    }
}

/// `grad_accum` of a config written before accumulation existed.
fn one() -> usize {
    1
}

/// `max_grad_norm` of a config written before clipping existed.
fn no_clipping() -> f64 {
    0.0
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(LmError::config("LM training", f, m));
        if self.batch_size == 0 || self.block_size < 2 || self.epochs == 0 {
            return bad(
                "batch_size/block_size/epochs",
                "need batch_size >= 1, block_size >= 2, epochs >= 1".into(),
            );
        }
        if self.grad_accum == 0 || self.batch_size.checked_mul(self.grad_accum).is_none() {
            return bad(
                "grad_accum",
                format!(
                    "need >= 1 micro-batches per step, and batch_size x grad_accum to fit in \
                     a usize, got {}",
                    self.grad_accum
                ),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("must be >= 0 (0 = off), got {}", self.max_grad_norm),
            );
        }
        if !(0.0..0.9).contains(&self.val_fraction) {
            return bad(
                "val_fraction",
                format!("must be in [0, 0.9), got {}", self.val_fraction),
            );
        }
        Ok(())
    }

    /// The model this trains.
    pub fn model_config(&self, vocab_size: usize, eos: Option<u32>) -> Gpt2Config {
        Gpt2Config {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            resid_pdrop: self.dropout,
            embd_pdrop: self.dropout,
            attn_pdrop: self.dropout,
            bos_token_id: eos,
            eos_token_id: eos,
            ..Gpt2Config::tiny(vocab_size, self.block_size)
        }
    }
}

/// What `train lm` saves as the run's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The model.
    pub model: Gpt2Config,
    /// The training settings.
    pub train: TrainConfig,
}

/// The run kind written to `config.toml`.
pub const RUN_KIND: &str = "lm";

/// Where the run folder keeps its Hugging Face folder.
pub const MODEL_DIR: &str = "model";

/// The run folder's tokenizer (trained at the start, reused on resume).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The config fields a resumed run may change (`--epochs`; the learning-rate
/// schedule then stretches to the new length).
pub const MAY_CHANGE_ON_RESUME: &[&str] = &["train.epochs"];

/// The outcome of [`train`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Mean training loss of the last epoch (nats/token).
    pub final_train_loss: f64,
    /// Validation loss (nats/token), if there is a validation split.
    pub val_loss: Option<f64>,
    /// Entropy of the training tokens' unigram distribution (nats/token): the
    /// loss of a model that ignores context.
    pub unigram_entropy: f64,
    /// Training tokens.
    pub train_tokens: usize,
    /// Epochs completed.
    pub epochs: u64,
    /// Training throughput.
    pub tokens_per_s: f64,
    /// A greedy sample from the trained model.
    pub sample: String,
    /// Whether the run was interrupted (Ctrl-C).
    pub interrupted: bool,
}

/// Entropy (nats) of the unigram distribution of `tokens`.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len().max(1) as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

/// Mean next-token loss over blocks `idx` (eval mode).
pub fn evaluate_blocks(
    model: &Gpt2,
    blocks: &TokenBlocks,
    idx: &[usize],
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = blocks.batch(chunk, device)?;
        let l = next_token_loss(model, &x, &y, None, false)?.to_scalar::<f32>()? as f64;
        sum += l * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(sum / n.max(1) as f64)
}

/// Refuses, before the run folder or a weight is made, a model whose
/// training state does not fit in the memory the machine has (`available`,
/// `None`: unknown, never refused), and then batches whose activations do
/// not: `--n-layer` and `--n-embd` reach trillions of parameters, and
/// `--batch-size` and `--block-size` otherwise get the process killed in
/// its first step.
fn check_training_memory(
    cfg: &Gpt2Config,
    batch: usize,
    block: usize,
    available: Option<u64>,
) -> Result<()> {
    use kiln_core::memory::{check_batch_fits, check_training_fits, TRAIN_BYTES_PER_PARAM};
    let model = format!(
        "this GPT-2 ({} layers of width {})",
        cfg.n_layer, cfg.n_embd
    );
    let params = cfg.num_params() as u64;
    let config = |field: &str, msg: String| LmError::Config {
        what: "training settings".into(),
        field: field.into(),
        msg: format!("{msg}; {}", kiln_core::memory::SKIP_HINT),
    };
    check_training_fits(&model, params, available).map_err(|e| {
        config(
            "n_embd",
            format!("{e}; use fewer or narrower layers (--n-layer, --n-embd)"),
        )
    })?;
    check_batch_fits(
        &model,
        &format!("block of {block} tokens"),
        params.saturating_mul(TRAIN_BYTES_PER_PARAM),
        cfg.training_bytes_per_sequence(block, true),
        batch as u64,
        available,
    )
    .map_err(|e| {
        let advice = match e.largest_batch() {
            0 => "not even one block fits: use a shorter --block-size or a smaller model".into(),
            n => format!(
                "--batch-size {n} or less fits (--grad-accum keeps the blocks per optimizer \
                 step), or use a shorter --block-size"
            ),
        };
        config("batch_size", format!("{e}; {advice}"))
    })
}

/// Trains a tokenizer and a GPT-2 from scratch on `tc.corpus`; writes
/// checkpoints, `metrics.jsonl`, `loss.png`, `samples.txt` and a Hugging Face
/// folder (`model/`) into the run folder.
pub fn train(tc: &TrainConfig, device: &Device, opts: &RunOptions) -> Result<TrainReport> {
    tc.validate()?;
    let source: TextSource = tc.corpus.parse()?;
    let texts = source.load(tc.seed)?;
    // A resumed run keeps its tokenizer; a new one trains it (and saves it
    // once the folder is held).
    opts.check_kind(RUN_KIND)?;
    let tokenizer = match &opts.resume {
        Some(dir) => Gpt2Tokenizer::from_file(&dir.join(TOKENIZER_FILE))?,
        None => Gpt2Tokenizer::train(&texts, tc.vocab_size)?,
    };
    let model_cfg = tc.model_config(tokenizer.vocab_size(), tokenizer.eos_id());
    model_cfg.validate()?;
    let blocks =
        TokenBlocks::from_texts(tokenizer.inner(), &texts, tc.block_size, tokenizer.eos_id())?;
    let n_val = ((blocks.len() as f64) * tc.val_fraction).round() as usize;
    let n_train = blocks.len() - n_val;
    if n_train == 0 {
        return Err(LmError::Input(format!(
            "corpus {} gives {} blocks of {} tokens; nothing to train on",
            tc.corpus,
            blocks.len(),
            tc.block_size
        )));
    }
    if device.is_cpu() {
        // A corpus smaller than a batch makes smaller batches.
        check_training_memory(
            &model_cfg,
            tc.batch_size.min(n_train),
            tc.block_size,
            kiln_core::memory::available(),
        )?;
    }
    let run_cfg = RunConfig {
        model: model_cfg.clone(),
        train: tc.clone(),
    };
    let run = opts.open("lm", RUN_KIND, &run_cfg, MAY_CHANGE_ON_RESUME)?;
    if let TextSource::Lines(p) | TextSource::Files(p) = &source {
        run.check_inputs(&[p])?;
    }
    let dir = run.dir().clone();
    if !run.resumed() {
        tokenizer.save(&dir.join(TOKENIZER_FILE))?;
    }
    let val_idx: Vec<usize> = (n_train..blocks.len()).collect();
    let train_tokens = &blocks.tokens()[..n_train * tc.block_size + 1];
    let unigram = unigram_entropy(train_tokens);

    let vs = VarStore::new(tc.seed);
    let model = Gpt2::new(&model_cfg, vs.builder(DType::F32, device), vs.rng().clone())?;
    // GPT-2 practice: no weight decay on biases, LayerNorm and position/token tables.
    let (decay, no_decay): (Vec<_>, Vec<_>) = vs.vars().into_iter().partition(|(n, _)| {
        n.ends_with("c_attn.weight") || n.ends_with("c_proj.weight") || n.ends_with("c_fc.weight")
    });
    let opt = Optimizer::new(
        OptimKind::adamw(),
        vec![
            kiln_core::optim::ParamGroup::new(decay, tc.lr).weight_decay(tc.weight_decay),
            kiln_core::optim::ParamGroup::new(no_decay, tc.lr),
        ],
    )?;
    // An optimizer step takes `per_step` blocks, in micro-batches of
    // `batch_size`.
    let per_step = tc.batch_size * tc.grad_accum;
    let steps_per_epoch = n_train.div_ceil(per_step) as u64;
    let total = tc.epochs * steps_per_epoch;
    let sched = LrSchedule::Cosine {
        warmup: tc.warmup.min(total / 2),
        total,
        min_factor: 0.1,
    };
    let mut b = Session::builder(run, tc.seed).part("model", &vs, opt);
    if tc.max_grad_norm > 0.0 {
        b = b.clip_grad_norm(tc.max_grad_norm);
    }
    let mut s = b
        .epochs(tc.epochs, steps_per_epoch)
        .observer(opts.observer())
        .start()?;
    let mut val_loss = None;
    let end = s.run_epochs(
        |epoch, start| {
            let order = SeededRng::derive(tc.seed, &[epoch]).permutation(n_train);
            let chunks: Vec<Vec<usize>> = order
                .chunks(per_step)
                .skip(start)
                .map(<[usize]>::to_vec)
                .collect();
            chunks.into_iter().map(Ok::<_, LmError>)
        },
        |s, chunk| {
            sched.apply(s.opt_mut("model")?);
            // Each micro-batch's mean loss weighted by its share of the
            // step's blocks: the gradients add up to the step's mean, as one
            // batch of `per_step` blocks gives (a share of 1 is exact).
            let mut v = 0.0;
            for micro in chunk.chunks(tc.batch_size) {
                let (x, y) = blocks.batch(micro, device)?;
                let loss = next_token_loss(&model, &x, &y, None, true)?;
                let share = micro.len() as f64 / chunk.len() as f64;
                v += s.backward("model", &(loss * share)?)?;
            }
            s.step("model")?;
            Ok(Record::new(chunk.len() * tc.block_size).with("loss", v))
        },
        |s| {
            if !val_idx.is_empty() {
                let v = evaluate_blocks(&model, &blocks, &val_idx, tc.batch_size, device)?;
                s.record("val", &[("loss", v), ("perplexity", v.exp())])?;
                val_loss = Some(v);
            }
            Ok(())
        },
    )?;
    let interrupted = !end.completed();
    let last = s.last_epoch("loss").unwrap_or(f64::NAN);
    if val_loss.is_none() && !interrupted && !val_idx.is_empty() {
        // Resumed after the last epoch's validation: eval mode is
        // deterministic, so this is the value that run logged.
        val_loss = Some(evaluate_blocks(
            &model,
            &blocks,
            &val_idx,
            tc.batch_size,
            device,
        )?);
    }
    let tokens_per_s = s.observer.throughput();
    let prompt = texts
        .first()
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or("The")
        .to_string();
    let sample = generate_text(
        &model,
        &tokenizer,
        &prompt,
        &GenerationConfig {
            max_new_tokens: 40,
            ..Default::default()
        },
        None,
    )?;
    let report = TrainReport {
        final_train_loss: last,
        val_loss,
        unigram_entropy: unigram,
        train_tokens: train_tokens.len(),
        epochs: s.epoch(),
        tokens_per_s,
        sample: format!("{prompt}{}", sample.text),
        interrupted,
    };
    if !interrupted {
        model.save_pretrained(&dir.join(MODEL_DIR), Some(&tokenizer))?;
        let samples = dir.join("samples.txt");
        kiln_core::files::write_atomic(&samples, format!("{}\n", report.sample).as_bytes())
            .map_err(|e| LmError::file(&samples, e.to_string()))?;
        let metrics = dir.join("metrics.jsonl");
        if metrics.exists() {
            plot_metrics(
                &metrics,
                &dir.join("loss.png"),
                "GPT-2: loss (nats/token)",
                &["loss"],
            )?;
        }
        s.finish(serde_json::to_value(&report).map_err(|e| LmError::Run {
            path: dir.path().to_path_buf(),
            msg: e.to_string(),
        })?)?;
    }
    Ok(report)
}

/// Loads a finished `train lm` run's model and tokenizer.
pub fn from_run(path: &Path, device: &Device) -> Result<(Gpt2, Gpt2Tokenizer)> {
    let run = RunDir::open(path)?;
    // The kind first, so a run of another model says so instead of failing
    // on the first field an LM config does not have.
    let (kind, raw): (String, serde_json::Value) = run.read_config()?;
    if kind != RUN_KIND {
        return Err(LmError::Run {
            path: path.to_path_buf(),
            msg: format!(
                "this is a {kind:?} run, not an LM run ({RUN_KIND:?}); pass the folder of a \
                 `train lm` run"
            ),
        });
    }
    let _cfg: RunConfig = serde_json::from_value(raw).map_err(|e| LmError::Run {
        path: path.to_path_buf(),
        msg: format!("config.toml: {e}"),
    })?;
    let files = crate::pretrained::ModelFiles::from_dir(&run.join(MODEL_DIR))?;
    Ok((Gpt2::from_files(&files, device)?, files.load_tokenizer()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A model whose training state does not fit is refused with its
    /// figures before anything is made; GPT-2 small (124M parameters, 2 GB
    /// of state) fits in 2 GiB, and unknown availability never refuses.
    #[test]
    fn a_gpt2_too_large_to_train_is_refused_up_front() {
        let c = Gpt2Config {
            n_layer: 96,
            n_embd: 12288,
            ..Gpt2Config::gpt2_small()
        };
        let e = check_training_memory(&c, 1, 64, Some(64 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training this GPT-2 (96 layers of width 12288) (174,"),
            "{e}"
        );
        assert!(e.contains("and this machine has 64.0 GiB available"), "{e}");
        assert!(e.contains("--n-layer, --n-embd"), "{e}");
        check_training_memory(&c, 1, 64, None).unwrap();
        let small = Gpt2Config::gpt2_small();
        let need = small.num_params() as u64 * kiln_core::memory::TRAIN_BYTES_PER_PARAM
            + small.training_bytes_per_sequence(1, true);
        check_training_memory(&small, 1, 1, Some(need)).unwrap();
        check_training_memory(&small, 1, 1, Some(need - 1)).unwrap_err();
        assert!(need < 2 << 30);
    }

    /// GPT-2 small on batches of 8 x 1024 tokens needs about 15 GiB of
    /// activations (the counting-allocator test checks the per-block
    /// figure): refused on a 12 GiB machine with the batch size that fits,
    /// and with no batch size where even one block is too much.
    #[test]
    fn batches_too_large_for_memory_are_refused_with_one_that_fits() {
        let small = Gpt2Config::gpt2_small();
        let per_block = small.training_bytes_per_sequence(1024, true);
        // About 1.9 GiB per block of 1024 tokens (logits alone are 200 MB).
        assert!((3 << 29..5 << 29).contains(&per_block), "{per_block}");
        let fixed = small.num_params() as u64 * kiln_core::memory::TRAIN_BYTES_PER_PARAM;
        let e = check_training_memory(&small, 8, 1024, Some(12 << 30)).unwrap_err();
        let fits = ((12u64 << 30) - fixed) / per_block;
        assert_eq!(fits, 5);
        let msg = e.to_string();
        assert!(
            msg.contains("on batches of 8 blocks of 1024 tokens: it needs about"),
            "{msg}"
        );
        assert!(
            msg.contains("of activations per block of 1024 tokens"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("--batch-size {fits} or less fits")),
            "{msg}"
        );
        assert!(msg.contains(kiln_core::memory::SKIP_HINT), "{msg}");
        assert!(matches!(e, LmError::Config { ref field, .. } if field == "batch_size"));
        // The batch that fits is accepted; one block more than memory is not.
        check_training_memory(&small, fits as usize, 1024, Some(12 << 30)).unwrap();
        let msg = check_training_memory(&small, 1, 1024, Some(fixed + per_block - 1))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not even one block fits"), "{msg}");
    }
}
