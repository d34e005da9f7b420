//! kiln-rlhf's commands: `rlhf reward`, `rlhf dpo`, `rlhf sample`,
//! `rlhf best-of-n`, `rlhf rwft` and `rlhf experiment`; the `rlhf` demo part
//! (the experiment's short version) and the `dpo_train_step` /
//! `dpo_step_memory` benchmarks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunDir;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_lm::{GenerationConfig, Gpt2, Gpt2Config, ModelFiles};
use kiln_rlhf::dpo::{train_dpo_with, Control, DpoConfig};
use kiln_rlhf::experiment::{run_experiment, ExperimentConfig};
use kiln_rlhf::logps::pair_logps;
use kiln_rlhf::loss::{dpo_loss, DpoLossType, LossScale};
use kiln_rlhf::models::{frozen_from, load_weights, model_dir, policy_dir};
use kiln_rlhf::prefs::{chat_template_for, EncodedPair};
use kiln_rlhf::reward_train::{train_reward_with, RewardConfig};
use kiln_rlhf::sample::{best_of_n, read_prompts, sample_completions, train_rwft, RwftConfig};
use kiln_rlhf::RewardModel;

#[path = "rlhf_online.rs"]
mod online;

use super::{
    exit_if_interrupted, float_in, int_in, parse, parse_given, resume_config, threads_flag, Bench,
    Component, DemoPart, Given, RunArgs, MAX_BATCH, MAX_EPOCHS,
};

/// Registers kiln-rlhf's command, demo part and benchmarks.
pub fn component() -> Component {
    let mut c = Component {
        demos: vec![DemoPart {
            name: "rlhf",
            about: "RLHF on a tiny review LM: lexicon-labelled pairs, reward model, DPO, best-of-n, reward-weighted fine-tuning",
            run: demo,
        }],
        benches: vec![
            Bench {
                name: "dpo_train_step",
                run: bench_dpo,
                gpu_batches: &[],
                cpu_batch: false,
            },
            Bench {
                name: "dpo_step_memory",
                run: bench_memory,
                gpu_batches: &[],
                cpu_batch: false,
            },
        ],
        commands: vec![(
            "rlhf",
            "<reward|dpo|sample|best-of-n|rwft|grpo|rloo|ppo|experiment|arithmetic|label|serve|agreement|export> [args]  preference training, online RL, sampling and labelling (TRL formats)",
            rlhf_cmd,
        )],
        ..Default::default()
    };
    c.demos.extend(online::demos());
    c.benches.extend(online::benches());
    c
}

const RLHF_USAGE: &str = "usage: cargo xtask rlhf <command> [args]

commands:
  reward --prefs FILE --model DIR        train a reward model (GPT2ForSequenceClassification)
  dpo --prefs FILE --model DIR           DPO and its family (--loss-type sigmoid,sft --loss-weights 1,0.5)
  sample --model DIR --prompts FILE      write n completions per prompt (or pairs to label) as JSONL
  best-of-n --model DIR --reward-model DIR --prompts FILE --n N
  rwft --model DIR --reward-model DIR --prompts FILE   reward-weighted fine-tuning
  experiment [--quick] [--out DIR]       the offline experiment: table and reward-vs-KL frontier
{ONLINE}
{FEEDBACK}

Each takes --help.";

fn usage() -> String {
    RLHF_USAGE.replace("{ONLINE}", online::USAGE).replace(
        "{FEEDBACK}",
        super::feedback::USAGE.trim_start_matches('\n'),
    )
}

fn rlhf_cmd(args: &[String]) -> Result<()> {
    let usage = usage();
    let Some(sub) = args.first() else {
        println!("{usage}");
        return Ok(());
    };
    let rest = &args[1..];
    if let Some(r) = online::dispatch(sub, rest) {
        return r;
    }
    match sub.as_str() {
        "reward" => reward_cmd(rest),
        "dpo" => dpo_cmd(rest),
        "sample" => sample_cmd(rest),
        "best-of-n" => bon_cmd(rest),
        "rwft" => rwft_cmd(rest),
        "experiment" => experiment_cmd(rest),
        s if super::feedback::SUBCOMMANDS.contains(&s) => super::feedback::run(s, rest),
        "-h" | "--help" | "help" => {
            println!("{usage}");
            Ok(())
        }
        other => bail!("unknown rlhf command {other:?}\n\n{usage}"),
    }
}

/// Optimisation flags shared by the trainers (transformers' names).
#[derive(Debug, Clone, clap::Args)]
struct TrainFlags {
    /// Passes over the training pairs (may be raised on --resume).
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: Option<u64>,
    /// Pairs per micro-batch (per_device_train_batch_size).
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, MAX_BATCH))]
    batch_size: usize,
    /// Micro-batches per optimizer step (gradient_accumulation_steps).
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, MAX_BATCH))]
    grad_accum: usize,
    /// Peak learning rate (AdamW, linear decay). Default: TRL's (DPO 1e-6, reward 1e-4).
    #[arg(long, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: Option<f64>,
    /// Weight decay (not on biases and layer norms).
    #[arg(long, default_value_t = 0.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    weight_decay: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    warmup_steps: u64,
    /// Gradient clipping norm (0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    max_grad_norm: f64,
    /// Share of the pairs held out for evaluation.
    #[arg(long, default_value_t = 0.1, value_parser = float_in::<f64>("in [0, 0.9)", |x| (0.0..0.9).contains(&x)))]
    eval_fraction: f64,
    /// Seed of the split, order, fresh head and dropout.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
}

impl TrainFlags {
    fn apply(&self, t: &mut kiln_rlhf::TrainingArgs, given: &Given) {
        if let Some(e) = self.epochs {
            t.epochs = e;
        }
        if let Some(lr) = self.lr {
            t.lr = lr;
        }
        macro_rules! take {
            ($($f:ident),*) => {$(
                if given.has(stringify!($f)) {
                    t.$f = self.$f;
                }
            )*};
        }
        take!(
            batch_size,
            grad_accum,
            weight_decay,
            warmup_steps,
            max_grad_norm,
            eval_fraction,
            seed
        );
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf reward",
    about = "Train a reward model on preference pairs (TRL's standard, conversational or \
             implicit-prompt JSONL, optional `margin`): Bradley-Terry on prompt+chosen vs \
             prompt+rejected, EOS appended to text. The run folder's model/ is a \
             GPT2ForSequenceClassification folder transformers loads."
)]
struct RewardArgs {
    /// Preference pairs (JSONL).
    #[arg(long)]
    prefs: Option<PathBuf>,
    /// A GPT-2 LM folder (fresh head) or reward-model folder, or a kiln run folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Chat template for conversational pairs: chatml, llama-3.1, or a path.
    #[arg(long)]
    chat_template: Option<String>,
    /// Longest sequence in tokens; longer pairs are dropped and counted.
    #[arg(long, default_value_t = 1024, value_parser = int_in(2usize, 1_000_000))]
    max_length: usize,
    /// Add center_rewards_coefficient * mean((r_c + r_r)^2) to the loss.
    #[arg(long, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    center_rewards_coefficient: Option<f64>,
    /// Keep the model's dropout on while training.
    #[arg(long)]
    dropout: bool,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    run: RunArgs,
}

fn reward_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (RewardArgs, Given) = parse_given("cargo xtask rlhf reward", args)?;
    let opts = a.run.options("reward");
    let device = opts.device()?;
    let (mut cfg, given) = match &opts.resume {
        Some(p) => (
            resume_config::<RewardConfig>(
                &RunDir::open(p)?,
                kiln_rlhf::reward_train::RUN_KIND,
                "a reward run",
            )?,
            typed,
        ),
        None => (RewardConfig::default(), Given::all()),
    };
    if let Some(p) = &a.prefs {
        cfg.prefs = p.clone();
    }
    if let Some(m) = &a.model {
        cfg.model = m.clone();
    }
    if given.has("chat_template") && a.chat_template.is_some() {
        cfg.chat_template = a.chat_template.clone();
    }
    if given.has("max_length") {
        cfg.max_length = a.max_length;
    }
    if given.has("center_rewards_coefficient") && a.center_rewards_coefficient.is_some() {
        cfg.center_rewards_coefficient = a.center_rewards_coefficient;
    }
    if given.has("dropout") {
        cfg.dropout = a.dropout;
    }
    a.train.apply(&mut cfg.train, &given);
    if opts.resume.is_none()
        && (cfg.prefs.as_os_str().is_empty() || cfg.model.as_os_str().is_empty())
    {
        bail!("give --prefs FILE and --model DIR (see --help)");
    }
    let rep = train_reward_with(&cfg, &device, &opts, &Control::default())?;
    eprintln!(
        "rlhf reward: {} train / {} held-out pairs ({}); {} steps, {:.1} pairs/s",
        rep.train_pairs,
        rep.eval_pairs,
        rep.data.describe(cfg.max_length),
        rep.steps,
        rep.pairs_per_s
    );
    if let Some(e) = &rep.eval {
        eprintln!("rlhf reward: held-out {}", fmt_metrics(e));
    }
    if let Some(d) = &rep.model_dir {
        eprintln!("rlhf reward: model in {}", d.display());
    }
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

fn fmt_metrics(m: &std::collections::BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf dpo",
    about = "Direct preference optimisation and its family (TRL's loss types sigmoid, hinge, ipo, \
             robust, sft, apo_zero, as a weighted list) against a frozen copy of the starting \
             model or precomputed reference log-probs. The run folder's model/ is the trained policy."
)]
struct DpoArgs {
    /// Preference pairs (JSONL).
    #[arg(long)]
    prefs: Option<PathBuf>,
    /// The starting GPT-2 (a Hugging Face folder or a kiln run folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Chat template for conversational pairs.
    #[arg(long)]
    chat_template: Option<String>,
    /// Longest prompt + completion in tokens; longer pairs are dropped and counted.
    #[arg(long, default_value_t = 1024, value_parser = int_in(2usize, 1_000_000))]
    max_length: usize,
    /// Loss types, comma-separated (sigmoid, hinge, ipo, robust, sft, apo_zero).
    #[arg(long, value_delimiter = ',', default_value = "sigmoid")]
    loss_type: Vec<String>,
    /// One weight per loss type (default: all 1).
    #[arg(long, value_delimiter = ',', value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    loss_weights: Vec<f64>,
    /// beta: the pull towards the reference (IPO's tau).
    #[arg(long, default_value_t = 0.1, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    beta: f64,
    /// Robust DPO's label-flip probability, in [0, 0.5).
    #[arg(long, default_value_t = 0.0, value_parser = float_in::<f64>("in [0, 0.5)", |x| (0.0..0.5).contains(&x)))]
    label_smoothing: f64,
    /// Compute the reference log-probs once before training (kept in the run folder).
    #[arg(long)]
    precompute_ref_log_probs: bool,
    /// Keep the model's dropout on while training.
    #[arg(long)]
    dropout: bool,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    run: RunArgs,
}

fn dpo_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (DpoArgs, Given) = parse_given("cargo xtask rlhf dpo", args)?;
    let opts = a.run.options("dpo");
    let device = opts.device()?;
    let (mut cfg, given) = match &opts.resume {
        Some(p) => (
            resume_config::<DpoConfig>(&RunDir::open(p)?, kiln_rlhf::dpo::RUN_KIND, "a DPO run")?,
            typed,
        ),
        None => (DpoConfig::default(), Given::all()),
    };
    if let Some(p) = &a.prefs {
        cfg.prefs = p.clone();
    }
    if let Some(m) = &a.model {
        cfg.model = m.clone();
    }
    if given.has("chat_template") && a.chat_template.is_some() {
        cfg.chat_template = a.chat_template.clone();
    }
    if given.has("max_length") {
        cfg.max_length = a.max_length;
    }
    if given.has("loss_type") {
        cfg.loss.loss_type = a
            .loss_type
            .iter()
            .map(|s| s.trim().parse::<DpoLossType>().map_err(anyhow::Error::from))
            .collect::<Result<_>>()?;
    }
    if given.has("loss_weights") && !a.loss_weights.is_empty() {
        cfg.loss.loss_weights = Some(a.loss_weights.clone());
    }
    if given.has("beta") {
        cfg.loss.beta = a.beta;
    }
    if given.has("label_smoothing") {
        cfg.loss.label_smoothing = a.label_smoothing;
    }
    if given.has("precompute_ref_log_probs") {
        cfg.precompute_ref_log_probs = a.precompute_ref_log_probs;
    }
    if given.has("dropout") {
        cfg.dropout = a.dropout;
    }
    a.train.apply(&mut cfg.train, &given);
    if opts.resume.is_none()
        && (cfg.prefs.as_os_str().is_empty() || cfg.model.as_os_str().is_empty())
    {
        bail!("give --prefs FILE and --model DIR (see --help)");
    }
    let rep = train_dpo_with(&cfg, &device, &opts, &Control::default())?;
    eprintln!(
        "rlhf dpo: {} train / {} held-out pairs ({}); {} steps, {:.1} pairs/s",
        rep.train_pairs,
        rep.eval_pairs,
        rep.data.describe(cfg.max_length),
        rep.steps,
        rep.pairs_per_s
    );
    if !rep.train.is_empty() {
        eprintln!("rlhf dpo: last epoch {}", fmt_metrics(&rep.train));
    }
    if let Some(e) = &rep.eval {
        eprintln!("rlhf dpo: held-out {}", fmt_metrics(e));
    }
    if let Some(d) = &rep.model_dir {
        eprintln!("rlhf dpo: policy in {}", d.display());
    }
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

/// Sampling flags shared by `sample` and `best-of-n`.
#[derive(Debug, Clone, clap::Args)]
struct GenFlags {
    /// Most new tokens per completion.
    #[arg(long, default_value_t = 64, value_parser = int_in(1usize, 1_000_000))]
    max_new_tokens: usize,
    /// Sampling temperature (transformers' sampling defaults: 1, top-k 50).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 50, value_parser = int_in(0usize, usize::MAX))]
    top_k: usize,
    /// Nucleus mass (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("in (0, 1]", |x| x > 0.0 && x <= 1.0))]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Prompts per batched generation call.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, MAX_BATCH))]
    batch: usize,
    /// Chat template for conversational prompts.
    #[arg(long)]
    chat_template: Option<String>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
}

impl GenFlags {
    fn config(&self) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            ..Default::default()
        }
    }
}

fn load_lm(path: &Path, device: &Device) -> Result<(Gpt2, kiln_lm::Gpt2Tokenizer, PathBuf)> {
    let dir = policy_dir(path)?;
    let files =
        ModelFiles::from_dir(&dir).with_context(|| format!("loading {}", path.display()))?;
    let tok = files.load_tokenizer()?;
    let (cfg, w) = load_weights(&files, device)?;
    Ok((frozen_from(&cfg, w, device)?, tok, dir))
}

/// Says up front when the longest prompt leaves less room in the model's
/// context than `--max-new-tokens` asks for (completions then stop at the
/// context's end, and the recorded setting is more than any of them got).
fn note_context(
    model: &Gpt2,
    tok: &kiln_lm::Gpt2Tokenizer,
    prompts: &[String],
    max_new_tokens: usize,
    cmd: &str,
) -> Result<()> {
    let ctx = model.config().n_positions;
    let mut longest = 0;
    for p in prompts {
        longest = longest.max(tok.encode(p)?.len());
    }
    let room = ctx.saturating_sub(longest.max(1));
    if max_new_tokens > room {
        eprintln!(
            "{cmd}: note: --max-new-tokens {max_new_tokens} does not fit: the model's context is \
             {ctx} tokens and the longest prompt takes {longest}, so its completions stop after \
             at most {room} tokens"
        );
    }
    Ok(())
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut s = String::new();
    for l in lines {
        s += &l.to_string();
        s.push('\n');
    }
    kiln_core::files::write_atomic(path, s.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf sample",
    about = "Sample n completions per prompt (one batched KV-cached call per --batch prompts) and \
             write them as JSONL ({\"prompt\", \"completions\"}), or with --pairs as pairs to label \
             ({\"prompt\", \"completion_a\", \"completion_b\"}). The generation config and the \
             model go beside it, in OUT with its extension replaced by .generation.json \
             (samples.generation.json)."
)]
struct SampleArgs {
    /// The policy (a GPT-2 folder or kiln run folder).
    #[arg(long)]
    model: PathBuf,
    /// Prompts: JSONL with \"prompt\" (text or messages), or one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Completions per prompt.
    #[arg(long, default_value_t = 2, value_parser = int_in(1usize, 4096))]
    n: usize,
    /// Write pairs to label (needs --n 2).
    #[arg(long)]
    pairs: bool,
    /// Output JSONL (default: samples.jsonl).
    #[arg(long, default_value = "samples.jsonl")]
    out: PathBuf,
    /// Replace --out if it exists (never a labelling folder's pairs.jsonl once it has answers).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    gen: GenFlags,
}

fn sample_cmd(args: &[String]) -> Result<()> {
    let a: SampleArgs = parse("cargo xtask rlhf sample", args)?;
    if a.pairs && a.n != 2 {
        bail!(
            "--pairs writes pairs to label and needs --n 2 (got --n {})",
            a.n
        );
    }
    super::check_results_file(&a.out, &[("--prompts", &a.prompts)], a.overwrite)?;
    let device = super::device(&a.gen.device, a.gen.threads)?;
    let (model, tok, dir) = load_lm(&a.model, &device)?;
    let chat = chat_template_for(&dir, a.gen.chat_template.as_deref())?;
    let prompts = read_prompts(&a.prompts, chat.as_ref())?;
    let cfg = a.gen.config();
    note_context(&model, &tok, &prompts, cfg.max_new_tokens, "rlhf sample")?;
    let t = Instant::now();
    let gens = sample_completions(&model, &tok, &prompts, a.n, &cfg, a.gen.batch)?;
    let lines: Vec<serde_json::Value> = prompts
        .iter()
        .zip(&gens)
        .map(|(p, g)| {
            if a.pairs {
                serde_json::json!({"prompt": p, "completion_a": g[0].text, "completion_b": g[1].text})
            } else {
                let c: Vec<&str> = g.iter().map(|x| x.text.as_str()).collect();
                serde_json::json!({"prompt": p, "completions": c})
            }
        })
        .collect();
    write_jsonl(&a.out, &lines)?;
    let meta = a.out.with_extension("generation.json");
    let m = serde_json::json!({
        "model": a.model, "prompts": a.prompts, "n": a.n, "pairs": a.pairs,
        "batch": a.gen.batch, "generation": cfg,
    });
    kiln_core::files::write_atomic(&meta, serde_json::to_string_pretty(&m)?.as_bytes())?;
    eprintln!(
        "rlhf sample: {} prompts x {} in {:.1}s -> {} (config in {})",
        prompts.len(),
        a.n,
        t.elapsed().as_secs_f64(),
        a.out.display(),
        meta.display()
    );
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf best-of-n",
    about = "Best-of-n: sample n completions per prompt in one batched KV-cached call, score each \
             with the reward model, keep the best. Writes JSONL with every candidate's reward."
)]
struct BonArgs {
    /// The policy (a GPT-2 folder or kiln run folder).
    #[arg(long)]
    model: PathBuf,
    /// The reward model (a GPT2ForSequenceClassification folder or `rlhf reward` run).
    #[arg(long)]
    reward_model: PathBuf,
    /// Prompts: JSONL with \"prompt\", or one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4, value_parser = int_in(1usize, 4096))]
    n: usize,
    /// Output JSONL.
    #[arg(long, default_value = "best-of-n.jsonl")]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    gen: GenFlags,
}

fn bon_cmd(args: &[String]) -> Result<()> {
    let a: BonArgs = parse("cargo xtask rlhf best-of-n", args)?;
    super::check_results_file(&a.out, &[("--prompts", &a.prompts)], a.overwrite)?;
    let device = super::device(&a.gen.device, a.gen.threads)?;
    let (model, tok, dir) = load_lm(&a.model, &device)?;
    let rdir = model_dir(&a.reward_model);
    let (rm, _) = RewardModel::load(&rdir, &device, 0)?;
    let rm_tok = ModelFiles::from_dir(&rdir)?
        .load_tokenizer()
        .unwrap_or_else(|_| tok.clone());
    let chat = chat_template_for(&dir, a.gen.chat_template.as_deref())?;
    let prompts = read_prompts(&a.prompts, chat.as_ref())?;
    note_context(
        &model,
        &tok,
        &prompts,
        a.gen.max_new_tokens,
        "rlhf best-of-n",
    )?;
    let t = Instant::now();
    let out = best_of_n(
        &model,
        &tok,
        &kiln_rlhf::sample::RewardScorer {
            model: &rm,
            tokenizer: &rm_tok,
        },
        &prompts,
        a.n,
        &a.gen.config(),
        a.gen.batch,
    )?;
    let lines: Vec<serde_json::Value> = out
        .iter()
        .map(|b| {
            serde_json::json!({
                "prompt": b.prompt,
                "best": b.best().map(|c| c.text.clone()),
                "best_reward": b.best().map(|c| c.reward),
                "candidates": b.candidates.iter().map(|c| serde_json::json!({"text": c.text, "reward": c.reward})).collect::<Vec<_>>(),
            })
        })
        .collect();
    write_jsonl(&a.out, &lines)?;
    let mean = |f: &dyn Fn(&kiln_rlhf::sample::BestOfN) -> f64| {
        out.iter().map(f).sum::<f64>() / out.len().max(1) as f64
    };
    eprintln!(
        "rlhf best-of-n: {} prompts x {} in {:.1}s; mean reward of the best {:.3}, of all samples {:.3}; KL <= {:.3} nats -> {}",
        out.len(),
        a.n,
        t.elapsed().as_secs_f64(),
        mean(&|b| b.best().map(|c| c.reward as f64).unwrap_or(0.0)),
        mean(&|b| b.candidates.iter().map(|c| c.reward as f64).sum::<f64>() / b.candidates.len().max(1) as f64),
        kiln_rlhf::sample::best_of_n_kl(a.n),
        a.out.display()
    );
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf rwft",
    about = "Reward-weighted fine-tuning: each iteration samples n completions per prompt from the \
             policy, scores them with the reward model and takes one step on their log-likelihood \
             weighted by softmax(reward / tau) over each prompt's samples."
)]
struct RwftArgs {
    /// The starting policy.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The reward model.
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// Training prompts.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4, value_parser = int_in(2usize, 4096))]
    n: usize,
    /// Softmax temperature of the weights.
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    tau: f64,
    /// Iterations (may be raised on --resume).
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    iterations: Option<u64>,
    /// Prompts per iteration.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, MAX_BATCH))]
    prompts_per_iteration: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-5, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Most new tokens per sample.
    #[arg(long, default_value_t = 48, value_parser = int_in(1usize, 1_000_000))]
    max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    temperature: f64,
    /// Chat template for conversational prompts.
    #[arg(long)]
    chat_template: Option<String>,
    /// Seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

fn rwft_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (RwftArgs, Given) = parse_given("cargo xtask rlhf rwft", args)?;
    let opts = a.run.options("rwft");
    let device = opts.device()?;
    let (mut cfg, given) = match &opts.resume {
        Some(p) => (
            resume_config::<RwftConfig>(
                &RunDir::open(p)?,
                kiln_rlhf::sample::RWFT_KIND,
                "an rwft run",
            )?,
            typed,
        ),
        None => (RwftConfig::default(), Given::all()),
    };
    for (flag, v, slot) in [
        ("model", &a.model, &mut cfg.model),
        ("reward_model", &a.reward_model, &mut cfg.reward_model),
        ("prompts", &a.prompts, &mut cfg.prompts),
    ] {
        if let Some(p) = v {
            *slot = p.clone();
        } else if opts.resume.is_none() {
            bail!("give --{} (see --help)", flag.replace('_', "-"));
        }
    }
    if let Some(i) = a.iterations {
        cfg.iterations = i;
    }
    if given.has("chat_template") && a.chat_template.is_some() {
        cfg.chat_template = a.chat_template.clone();
    }
    macro_rules! take {
        ($($f:ident),*) => {$(
            if given.has(stringify!($f)) {
                cfg.$f = a.$f;
            }
        )*};
    }
    take!(n, tau, prompts_per_iteration, lr, seed);
    if given.has("max_new_tokens") {
        cfg.generation.max_new_tokens = a.max_new_tokens;
    }
    if given.has("temperature") {
        cfg.generation.temperature = a.temperature;
    }
    let rep = train_rwft(&cfg, &device, &opts, &Control::default())?;
    eprintln!(
        "rlhf rwft: {} iterations; last 10: {}",
        rep.iterations,
        fmt_metrics(&rep.last)
    );
    if let Some(d) = &rep.model_dir {
        eprintln!("rlhf rwft: policy in {}", d.display());
    }
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf experiment",
    about = "The offline RLHF experiment: pretrain a tiny GPT-2 on synthetic reviews, label sampled \
             pairs with a lexicon labeller that prefers positive sentiment, fit a reward model, then \
             DPO at several beta, best-of-n and reward-weighted fine-tuning; writes results.md, \
             results.json and frontier.png (reward and positive rate against KL to the base model)."
)]
struct ExperimentArgs {
    /// Output folder (default: runs/rlhf-experiment-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace what an earlier experiment left in --out (only what it and its runs
    /// write: a folder holding anything else is refused, nothing deleted).
    #[arg(long)]
    overwrite: bool,
    /// The short version (the demo's).
    #[arg(long)]
    quick: bool,
    /// DPO beta values, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    betas: Vec<f64>,
    /// Label-flip probability of the simulated labeller.
    #[arg(long, value_parser = float_in::<f64>("in [0, 0.5)", |x| (0.0..0.5).contains(&x)))]
    label_noise: Option<f64>,
    /// Seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Less output.
    #[arg(long)]
    quiet: bool,
}

fn experiment_cmd(args: &[String]) -> Result<()> {
    let a: ExperimentArgs = parse("cargo xtask rlhf experiment", args)?;
    let device = super::device(&a.device, a.threads)?;
    let mut cfg = if a.quick {
        ExperimentConfig::quick()
    } else {
        ExperimentConfig::default()
    };
    cfg.seed = a.seed;
    if !a.betas.is_empty() {
        cfg.dpo_betas = a.betas.clone();
    }
    if let Some(n) = a.label_noise {
        cfg.label_noise = n;
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| kiln_core::run::new_run_folder("rlhf-experiment"));
    let t = Instant::now();
    let rep = run_experiment(&cfg, &device, &out, a.overwrite, a.quiet)?;
    println!("{}", rep.table());
    eprintln!(
        "rlhf experiment: reward model held-out accuracy {:.1}%; done in {:.0}s; results in {}",
        100.0 * rep.reward_accuracy,
        t.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let cfg = ExperimentConfig {
        seed: ctx.seed,
        ..ExperimentConfig::quick()
    };
    let out = ctx.out.join("rlhf");
    let rep = run_experiment(&cfg, &ctx.device, &out, false, ctx.quiet)?;
    crate::parts::stop_demo_if_interrupted(ctx, "rlhf");
    for line in rep.table().lines() {
        eprintln!("    rlhf: {line}");
    }
    eprintln!(
        "    rlhf: reward model held-out accuracy {:.1}%; frontier in {}",
        100.0 * rep.reward_accuracy,
        out.join("frontier.png").display()
    );
    let _ = std::io::stderr().flush();
    Ok(())
}

/// Random `(prompt, chosen, rejected)` pairs of `prompt + completion = len` tokens.
fn random_pairs(n: usize, prompt: usize, len: usize, vocab: usize, seed: u64) -> Vec<EncodedPair> {
    let mut rng = SeededRng::new(seed);
    let mut draw = |k: usize| -> Vec<u32> { (0..k).map(|_| rng.below(vocab) as u32).collect() };
    (0..n)
        .map(|_| EncodedPair {
            prompt: draw(prompt),
            chosen: draw(len - prompt),
            rejected: draw(len - prompt),
            margin: None,
            line: 0,
        })
        .collect()
}

/// GPT-2 small (random init), 2 pairs x 256 tokens (64 prompt + 192
/// completion): reference forward, policy forward + backward, AdamW.
/// `scripts/rlhf/dpo_bench.py` is the PyTorch equivalent.
fn bench_dpo(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let cfg = Gpt2Config {
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Gpt2Config::gpt2_small()
    };
    let vs = VarStore::new(0);
    let policy = Gpt2::new(&cfg, vs.builder(DType::F32, &dev), vs.rng().clone())?;
    let reference = kiln_rlhf::models::frozen_copy(&cfg, &vs, &dev)?;
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-6, 0.0)?;
    let pairs = random_pairs(2, 64, 256, cfg.vocab_size, 1);
    let refs: Vec<&EncodedPair> = pairs.iter().collect();
    let loss_cfg = kiln_rlhf::DpoLossConfig::default();
    let mut step = || -> Result<()> {
        let r = pair_logps(&reference, &refs, 0, false)?;
        let p = pair_logps(&policy, &refs, 0, false)?;
        let scale = LossScale::of_batch(&p.logps)?;
        let out = dpo_loss(
            &loss_cfg,
            &p.logps,
            &r.logps.chosen,
            &r.logps.rejected,
            &scale,
        )?;
        opt.backward_step(&out.loss)?;
        Ok(())
    };
    step()?;
    let steps = ctx.steps.clamp(1, 5);
    let t = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let dt = t.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "bench": "dpo_train_step",
        "threads": ctx.threads,
        "pairs": 2,
        "seq": 256,
        "steps": steps,
        "pairs_per_s": ((2 * steps) as f64 / dt * 1000.0).round() / 1000.0,
        "ms_per_step": (1000.0 * dt / steps as f64).round(),
    }))
}

/// Peak resident memory (VmHWM, bytes) since the last reset.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak memory of a GPT-2 small DPO step at 4 pairs x 512 tokens (policy
/// forward + backward, frozen reference forward), with kiln-core's
/// `token_logprobs` on the completion positions against a naive
/// `[B, T, V]` log-softmax + gather. Linux (VmHWM, reset through
/// /proc/self/clear_refs) only.
fn bench_memory(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let cfg = Gpt2Config {
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Gpt2Config::gpt2_small()
    };
    let vs = VarStore::new(0);
    let policy = Gpt2::new(&cfg, vs.builder(DType::F32, &dev), vs.rng().clone())?;
    let reference = kiln_rlhf::models::frozen_copy(&cfg, &vs, &dev)?;
    let pairs = random_pairs(4, 128, 512, cfg.vocab_size, 2);
    let refs: Vec<&EncodedPair> = pairs.iter().collect();
    let loss_cfg = kiln_rlhf::DpoLossConfig::default();
    let kiln_step = || -> Result<()> {
        let r = pair_logps(&reference, &refs, 0, false)?;
        let p = pair_logps(&policy, &refs, 0, false)?;
        let scale = LossScale::of_batch(&p.logps)?;
        let out = dpo_loss(
            &loss_cfg,
            &p.logps,
            &r.logps.chosen,
            &r.logps.rejected,
            &scale,
        )?;
        let _g = out.loss.backward()?;
        Ok(())
    };
    // The naive way: logits of every position, a [B, T, V] log-softmax, gather.
    let naive_logps = |m: &Gpt2| -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = pairs
            .iter()
            .map(|p| p.chosen_sequence())
            .chain(pairs.iter().map(|p| p.rejected_sequence()))
            .collect();
        let (b, t) = (rows.len(), rows[0].len());
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), &dev)?;
        let inputs = ids.narrow(1, 0, t - 1)?;
        let targets = ids.narrow(1, 1, t - 1)?;
        let logits = m.forward_t(&inputs, false)?;
        let lp = kiln_core::nn::log_softmax(&logits, kiln_core::D::Minus1)?;
        let tok = lp
            .gather(&targets.unsqueeze(2)?.contiguous()?, 2)?
            .squeeze(2)?;
        let mask = Tensor::cat(
            &[
                Tensor::zeros((b, 127), DType::F32, &dev)?,
                Tensor::ones((b, t - 128), DType::F32, &dev)?,
            ],
            1,
        )?;
        Ok((tok * mask)?.sum(1)?)
    };
    let naive_step = || -> Result<()> {
        let r = naive_logps(&reference)?.detach();
        let p = naive_logps(&policy)?;
        let d = ((p.narrow(0, 0, 4)? - r.narrow(0, 0, 4)?)?
            - (p.narrow(0, 4, 4)? - r.narrow(0, 4, 4)?)?)?;
        let loss = kiln_rlhf::loss::softplus(&(d * -0.1)?)?.mean_all()?;
        let _g = loss.backward()?;
        Ok(())
    };
    if !reset_peak() {
        bail!("cannot reset the peak-memory counter (/proc/self/clear_refs); Linux only");
    }
    let base = peak_rss().unwrap_or(0);
    let t = Instant::now();
    kiln_step()?;
    let kiln_s = t.elapsed().as_secs_f64();
    let kiln_peak = peak_rss().unwrap_or(0);
    reset_peak();
    let base2 = peak_rss().unwrap_or(0);
    let t = Instant::now();
    naive_step()?;
    let naive_s = t.elapsed().as_secs_f64();
    let naive_peak = peak_rss().unwrap_or(0);
    let mib = |x: u64| (x as f64 / (1 << 20) as f64).round();
    Ok(serde_json::json!({
        "bench": "dpo_step_memory",
        "threads": ctx.threads,
        "pairs": 4,
        "seq": 512,
        "baseline_mib": mib(base.max(base2)),
        "kiln_peak_mib": mib(kiln_peak),
        "naive_log_softmax_peak_mib": mib(naive_peak),
        "kiln_step_s": (kiln_s * 100.0).round() / 100.0,
        "naive_step_s": (naive_s * 100.0).round() / 100.0,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        let m = ["--model", "m", "--prompts", "p"];
        assert_numeric_flags_checked::<RewardArgs>("cargo xtask rlhf reward", None, &[]);
        assert_numeric_flags_checked::<DpoArgs>("cargo xtask rlhf dpo", None, &[]);
        assert_numeric_flags_checked::<SampleArgs>("cargo xtask rlhf sample", None, &m);
        let bon = ["--model", "m", "--reward-model", "r", "--prompts", "p"];
        assert_numeric_flags_checked::<BonArgs>("cargo xtask rlhf best-of-n", None, &bon);
        assert_numeric_flags_checked::<RwftArgs>("cargo xtask rlhf rwft", None, &[]);
        assert_numeric_flags_checked::<ExperimentArgs>("cargo xtask rlhf experiment", None, &[]);
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (flag, bad, range) in [
            ("--epochs", "-1", "expected an integer in 1..=1000000"),
            ("--lr", "0", "expected a number > 0"),
            ("--eval-fraction", "0.9", "expected a number in [0, 0.9)"),
            ("--label-smoothing", "0.5", "expected a number in [0, 0.5)"),
            ("--beta", "0", "expected a number > 0"),
            ("--loss-weights", "1,-1", "expected a number >= 0"),
        ] {
            let e = crate::parts::parse::<DpoArgs>("d", &args(&[flag, bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains(range), "{flag} {bad}: {e}");
        }
    }
}
