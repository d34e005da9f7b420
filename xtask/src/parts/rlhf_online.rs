//! kiln-rlhf's online RL commands: `rlhf grpo`, `rlhf rloo`, `rlhf ppo`,
//! the `rlhf-online` demo part (the arithmetic task's short version) and
//! the `grpo_iter` / `rollout_decode` benchmarks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_core::run::RunDir;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use kiln_lm::{GenerationConfig, Gpt2, Gpt2Config};
use kiln_rlhf::dpo::Control;
use kiln_rlhf::grpo::{train_grpo, GrpoConfig};
use kiln_rlhf::online::{OnlineArgs, OnlineReport, RewardSpec};
use kiln_rlhf::pg::{GrpoLossType, KlEstimator, ScaleRewards};
use kiln_rlhf::ppo::{train_ppo, PpoConfig, ValueModelKind};
use kiln_rlhf::rloo::{train_rloo, RlooConfig};

use crate::parts::{
    exit_if_interrupted, float_in, int_in, parse_given, resume_config, threads_flag, Bench,
    DemoPart, Given, RunArgs, MAX_BATCH, MAX_EPOCHS,
};

/// The online commands' usage lines (for `rlhf --help`).
pub const USAGE: &str = "  grpo --model DIR --prompts FILE --reward-model DIR   GRPO (TRL's loss types grpo, dapo, dr_grpo)
  rloo --model DIR --prompts FILE --reward-model DIR   RLOO (leave-one-out baseline, KL in the reward)
  ppo --model DIR --prompts FILE --reward-model DIR    PPO (value model, GAE, clipped losses)
  arithmetic [--quick]                   GRPO on a verifiable arithmetic task: accuracy before/after";

/// Runs an online command, or returns `None` when `sub` is not one.
pub fn dispatch(sub: &str, rest: &[String]) -> Option<Result<()>> {
    Some(match sub {
        "grpo" => grpo_cmd(rest),
        "rloo" => rloo_cmd(rest),
        "ppo" => ppo_cmd(rest),
        "arithmetic" => arith_cmd(rest),
        _ => return None,
    })
}

/// The demo part.
pub fn demos() -> Vec<DemoPart> {
    vec![DemoPart {
        name: "rlhf-online",
        about: "GRPO on a verifiable arithmetic task: a tiny LM's exact-answer accuracy before and after",
        run: demo,
    }]
}

/// The benchmarks.
pub fn benches() -> Vec<Bench> {
    vec![
        Bench {
            name: "grpo_iter",
            run: bench_grpo_iter,
            gpu_batches: &[],
            cpu_batch: false,
        },
        Bench {
            name: "rollout_decode",
            run: bench_rollout_decode,
            gpu_batches: &[],
            cpu_batch: true,
        },
    ]
}

/// Flags every online trainer has.
#[derive(Debug, Clone, clap::Args)]
struct OnlineFlags {
    /// The starting policy (a GPT-2 folder or kiln run folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompts: JSONL (`prompt` and extra columns for reward functions) or one per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// The reward model (a GPT2ForSequenceClassification folder or `rlhf reward` run).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// Reward functions NAME[:WEIGHT], comma-separated: reward_model, lexicon, exact_answer
    /// (default: the reward model).
    #[arg(long, value_delimiter = ',')]
    reward_funcs: Vec<String>,
    /// Chat template for conversational prompts.
    #[arg(long)]
    chat_template: Option<String>,
    /// Rollouts in all (may be raised on --resume).
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    iterations: Option<u64>,
    /// Prompts per rollout.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, MAX_BATCH))]
    prompts_per_iteration: usize,
    /// Most new tokens per completion (max_completion_length).
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, 1_000_000))]
    max_new_tokens: usize,
    /// Sampling temperature (log-probs use logits / temperature).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    temperature: f64,
    /// Top-k truncation of the draw (0 = off).
    #[arg(long, default_value_t = 0, value_parser = int_in(0usize, usize::MAX))]
    top_k: usize,
    /// Subtract this from the score of completions without EOS.
    #[arg(long, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    missing_eos_penalty: Option<f64>,
    /// Learning rate (AdamW, constant).
    #[arg(long, default_value_t = 1e-6, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Gradient clipping norm (0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    max_grad_norm: f64,
    /// Seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
}

impl OnlineFlags {
    fn apply(&self, c: &mut OnlineArgs, given: &Given, resume: bool) -> Result<()> {
        for (flag, v, slot) in [
            ("model", &self.model, &mut c.model),
            ("prompts", &self.prompts, &mut c.prompts),
        ] {
            if let Some(p) = v {
                *slot = p.clone();
            } else if !resume {
                bail!("give --{flag} (see --help)");
            }
        }
        if self.reward_model.is_some() {
            c.reward_model = self.reward_model.clone();
        }
        if given.has("reward_funcs") && !self.reward_funcs.is_empty() {
            c.reward_funcs = self
                .reward_funcs
                .iter()
                .map(|s| {
                    let (name, w) = match s.split_once(':') {
                        Some((n, w)) => (
                            n,
                            w.trim().parse::<f64>().with_context(|| {
                                format!("--reward-funcs {s:?}: the weight is not a number")
                            })?,
                        ),
                        None => (s.as_str(), 1.0),
                    };
                    Ok(RewardSpec {
                        name: name.trim().to_string(),
                        weight: w,
                    })
                })
                .collect::<Result<_>>()?;
        }
        if given.has("chat_template") && self.chat_template.is_some() {
            c.chat_template = self.chat_template.clone();
        }
        if let Some(i) = self.iterations {
            c.iterations = i;
        }
        macro_rules! take {
            ($($f:ident),*) => {$(
                if given.has(stringify!($f)) {
                    c.$f = self.$f.clone();
                }
            )*};
        }
        take!(
            prompts_per_iteration,
            missing_eos_penalty,
            lr,
            max_grad_norm,
            seed
        );
        if given.has("max_new_tokens") {
            c.generation.max_new_tokens = self.max_new_tokens;
        }
        if given.has("temperature") {
            c.generation.temperature = self.temperature;
        }
        if given.has("top_k") {
            c.generation.top_k = self.top_k;
        }
        Ok(())
    }
}

/// The config to start from: the run's own on --resume (then only the
/// flags typed change it), else the defaults (every flag applies).
fn config_for<C: Default + serde::de::DeserializeOwned>(
    opts: &kiln_core::run::RunOptions,
    kind: &str,
    what: &str,
    typed: Given,
) -> Result<(C, Given)> {
    Ok(match &opts.resume {
        Some(p) => (resume_config::<C>(&RunDir::open(p)?, kind, what)?, typed),
        None => (C::default(), Given::all()),
    })
}

fn report(what: &str, rep: &OnlineReport) {
    let m = rep
        .last
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("rlhf {what}: {} iterations; last 10: {m}", rep.iterations);
    if let Some(d) = &rep.model_dir {
        eprintln!("rlhf {what}: policy in {}", d.display());
    }
    exit_if_interrupted(rep.interrupted);
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf grpo",
    about = "GRPO as TRL runs it: num_generations completions per prompt, group-relative \
             advantages, the clipped surrogate (loss types grpo, dapo, dr_grpo), beta 0 by default \
             (no reference model; k3 KL when beta > 0). Logs TRL's metric names."
)]
struct GrpoArgs {
    #[command(flatten)]
    online: OnlineFlags,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8, value_parser = int_in(2usize, 4096))]
    num_generations: usize,
    /// grpo, dapo or dr_grpo.
    #[arg(long, default_value = "dapo")]
    loss_type: String,
    /// Clipping epsilon.
    #[arg(long, default_value_t = 0.2, value_parser = float_in::<f64>("in (0, 1)", |x| x > 0.0 && x < 1.0))]
    epsilon: f64,
    /// Separate upper clipping bound (DAPO: 0.28).
    #[arg(long, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    epsilon_high: Option<f64>,
    /// KL coefficient (0: no reference model).
    #[arg(long, default_value_t = 0.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    beta: f64,
    /// group, batch or none.
    #[arg(long, default_value = "group")]
    scale_rewards: String,
    /// Updates per rollout.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, 1024))]
    num_iterations: usize,
    #[command(flatten)]
    run: RunArgs,
}

fn enum_of<T: serde::de::DeserializeOwned>(flag: &str, v: &str, choices: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .with_context(|| format!("--{flag} {v:?}: expected one of {choices}"))
}

fn grpo_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (GrpoArgs, Given) = parse_given("cargo xtask rlhf grpo", args)?;
    let opts = a.run.options("grpo");
    let device = opts.device()?;
    let (mut cfg, given) =
        config_for::<GrpoConfig>(&opts, kiln_rlhf::grpo::GRPO_KIND, "a GRPO run", typed)?;
    a.online
        .apply(&mut cfg.common, &given, opts.resume.is_some())?;
    if given.has("loss_type") {
        cfg.loss_type = enum_of::<GrpoLossType>("loss-type", &a.loss_type, "grpo, dapo, dr_grpo")?;
    }
    if given.has("scale_rewards") {
        cfg.scale_rewards =
            enum_of::<ScaleRewards>("scale-rewards", &a.scale_rewards, "group, batch, none")?;
    }
    if given.has("epsilon_high") && a.epsilon_high.is_some() {
        cfg.epsilon_high = a.epsilon_high;
    }
    macro_rules! take {
        ($($f:ident),*) => {$(
            if given.has(stringify!($f)) {
                cfg.$f = a.$f;
            }
        )*};
    }
    take!(num_generations, epsilon, beta, num_iterations);
    let rep = train_grpo(&cfg, &device, &opts, &Control::default())?;
    report("grpo", &rep);
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf rloo",
    about = "RLOO as TRL runs it: a leave-one-out baseline over num_generations completions per \
             prompt, the KL to the starting policy folded into the reward (beta, no gradient), a \
             sequence-level clipped surrogate."
)]
struct RlooArgs {
    #[command(flatten)]
    online: OnlineFlags,
    /// Completions per prompt.
    #[arg(long, default_value_t = 2, value_parser = int_in(2usize, 4096))]
    num_generations: usize,
    /// KL coefficient of the reward penalty.
    #[arg(long, default_value_t = 0.05, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    beta: f64,
    /// Clipping epsilon.
    #[arg(long, default_value_t = 0.2, value_parser = float_in::<f64>("in (0, 1)", |x| x > 0.0 && x < 1.0))]
    epsilon: f64,
    /// Updates per rollout.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, 1024))]
    num_iterations: usize,
    /// Whiten the advantages over the batch.
    #[arg(long)]
    normalize_advantages: bool,
    #[command(flatten)]
    run: RunArgs,
}

fn rloo_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (RlooArgs, Given) = parse_given("cargo xtask rlhf rloo", args)?;
    let opts = a.run.options("rloo");
    let device = opts.device()?;
    let (mut cfg, given) =
        config_for::<RlooConfig>(&opts, kiln_rlhf::rloo::RLOO_KIND, "an RLOO run", typed)?;
    a.online
        .apply(&mut cfg.common, &given, opts.resume.is_some())?;
    macro_rules! take {
        ($($f:ident),*) => {$(
            if given.has(stringify!($f)) {
                cfg.$f = a.$f;
            }
        )*};
    }
    take!(
        num_generations,
        beta,
        epsilon,
        num_iterations,
        normalize_advantages
    );
    let rep = train_rloo(&cfg, &device, &opts, &Control::default())?;
    report("rloo", &rep);
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf ppo",
    about = "PPO as TRL's PPOTrainer runs it: a value model (separate, from the reward model, or a \
             head on the policy), per-token KL penalty (k1 or k3), GAE, whitened advantages, \
             clipped policy and value losses over several epochs and minibatches per rollout."
)]
struct PpoArgs {
    #[command(flatten)]
    online: OnlineFlags,
    /// separate or head.
    #[arg(long, default_value = "separate")]
    value_model: String,
    /// Discount.
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("in [0, 1]", |x| (0.0..=1.0).contains(&x)))]
    gamma: f64,
    /// GAE lambda.
    #[arg(long, default_value_t = 0.95, value_parser = float_in::<f64>("in [0, 1]", |x| (0.0..=1.0).contains(&x)))]
    lam: f64,
    /// Policy ratio clipping.
    #[arg(long, default_value_t = 0.2, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    cliprange: f64,
    /// Value clipping.
    #[arg(long, default_value_t = 0.2, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    cliprange_value: f64,
    /// Value loss weight.
    #[arg(long, default_value_t = 0.1, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    vf_coef: f64,
    /// KL penalty coefficient.
    #[arg(long, default_value_t = 0.05, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    kl_coef: f64,
    /// k1 or k3.
    #[arg(long, default_value = "k1")]
    kl_estimator: String,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4, value_parser = int_in(1usize, 1024))]
    num_ppo_epochs: usize,
    /// Minibatches per pass.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, MAX_BATCH))]
    num_mini_batches: usize,
    #[command(flatten)]
    run: RunArgs,
}

fn ppo_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (PpoArgs, Given) = parse_given("cargo xtask rlhf ppo", args)?;
    let opts = a.run.options("ppo");
    let device = opts.device()?;
    let (mut cfg, given) =
        config_for::<PpoConfig>(&opts, kiln_rlhf::ppo::PPO_KIND, "a PPO run", typed)?;
    a.online
        .apply(&mut cfg.common, &given, opts.resume.is_some())?;
    if given.has("value_model") {
        cfg.value_model =
            enum_of::<ValueModelKind>("value-model", &a.value_model, "separate, head")?;
    }
    if given.has("kl_estimator") {
        cfg.kl_estimator = enum_of::<KlEstimator>("kl-estimator", &a.kl_estimator, "k1, k3")?;
    }
    macro_rules! take {
        ($($f:ident),*) => {$(
            if given.has(stringify!($f)) {
                cfg.$f = a.$f;
            }
        )*};
    }
    take!(
        gamma,
        lam,
        cliprange,
        cliprange_value,
        vf_coef,
        kl_coef,
        num_ppo_epochs,
        num_mini_batches
    );
    let rep = train_ppo(&cfg, &device, &opts, &Control::default())?;
    report("ppo", &rep);
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf arithmetic",
    about = "GRPO's home ground, offline: pretrain a tiny GPT-2 on short additions (`a+b=c`), then \
             GRPO with an exact-answer reward; prints exact-answer accuracy on all 100 single-digit sums before and after."
)]
struct ArithArgs {
    /// Output folder (default: runs/rlhf-arithmetic-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace what an earlier run left in --out (only what it and its runs write:
    /// a folder holding anything else is refused, nothing deleted).
    #[arg(long)]
    overwrite: bool,
    /// The short version (the demo's).
    #[arg(long)]
    quick: bool,
    /// Pretraining epochs of the base LM.
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    lm_epochs: Option<u64>,
    /// GRPO iterations.
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    iterations: Option<u64>,
    /// GRPO learning rate.
    #[arg(long, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: Option<f64>,
    /// GRPO completions per prompt.
    #[arg(long, value_parser = int_in(2usize, 4096))]
    num_generations: Option<usize>,
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

fn arith_cmd(args: &[String]) -> Result<()> {
    let (a, _): (ArithArgs, Given) = parse_given("cargo xtask rlhf arithmetic", args)?;
    let device = crate::parts::device(&a.device, a.threads)?;
    let mut cfg = if a.quick {
        kiln_rlhf::arith::ArithConfig::quick()
    } else {
        kiln_rlhf::arith::ArithConfig::default()
    };
    cfg.seed = a.seed;
    if let Some(e) = a.lm_epochs {
        cfg.lm.epochs = e;
    }
    if let Some(i) = a.iterations {
        cfg.grpo.common.iterations = i;
    }
    if let Some(lr) = a.lr {
        cfg.grpo.common.lr = lr;
    }
    if let Some(g) = a.num_generations {
        cfg.grpo.num_generations = g;
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| kiln_core::run::new_run_folder("rlhf-arithmetic"));
    let t = Instant::now();
    let rep = kiln_rlhf::arith::run_arithmetic(&cfg, &device, &out, a.overwrite, a.quiet)?;
    println!("{}", rep.summary());
    eprintln!(
        "rlhf arithmetic: done in {:.0}s; results in {}",
        t.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

fn demo(ctx: &crate::parts::DemoCtx) -> Result<()> {
    let cfg = kiln_rlhf::arith::ArithConfig {
        seed: ctx.seed,
        ..kiln_rlhf::arith::ArithConfig::quick()
    };
    let out = ctx.out.join("rlhf-online");
    let rep = kiln_rlhf::arith::run_arithmetic(&cfg, &ctx.device, &out, false, ctx.quiet)?;
    crate::parts::stop_demo_if_interrupted(ctx, "rlhf-online");
    eprintln!("    rlhf-online: {}", rep.summary());
    Ok(())
}

/// A random-init GPT-2 of `cfg` (dropout off) on the CPU.
fn random_gpt2(cfg: &Gpt2Config) -> Result<Gpt2> {
    let cfg = Gpt2Config {
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..cfg.clone()
    };
    let vs = VarStore::new(0);
    Ok(Gpt2::new(
        &cfg,
        vs.builder(DType::F32, &Device::Cpu),
        vs.rng().clone(),
    )?)
}

/// FLOPs of decoding `new` tokens after `prompt` for `rows` rows: 2 × the
/// weights per token (blocks and LM head) plus attention over the cache.
fn decode_flops(cfg: &Gpt2Config, rows: usize, prompt: usize, new: usize) -> f64 {
    let c = cfg.n_embd as f64;
    let per_tok_weights = cfg.n_layer as f64 * (4.0 * c * c + 2.0 * c * cfg.inner() as f64)
        + c * cfg.vocab_size as f64;
    let mut f = 0.0;
    for t in 0..new {
        let ctx = (prompt + t) as f64;
        f += 2.0 * per_tok_weights + cfg.n_layer as f64 * 4.0 * c * ctx;
    }
    // The prompt pass: every position through the blocks, the head once.
    let p = prompt as f64;
    f += 2.0 * p * (per_tok_weights - c * cfg.vocab_size as f64) + 2.0 * c * cfg.vocab_size as f64;
    f * rows as f64
}

/// GPT-2 small (random init), 16 sequences (`bench --batch N`: N) × 64 new
/// tokens after an 8-token prompt, sampled with temperature 1 and EOS off:
/// tokens/s of the rollout engine. `scripts/rlhf/rollout_bench.py` is
/// transformers' batched `generate` on the default shapes.
fn bench_rollout_decode(ctx: &crate::parts::BenchCtx) -> Result<serde_json::Value> {
    let cfg = Gpt2Config::gpt2_small();
    let model = random_gpt2(&cfg)?;
    let rows = ctx.batch_or(16);
    let prompts: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..8)
                .map(|t| ((r * 131 + t * 17) % 50000) as u32)
                .collect()
        })
        .collect();
    let gen = GenerationConfig {
        max_new_tokens: 64,
        temperature: 1.0,
        ignore_eos: true,
        eos_token_id: Some(50256),
        seed: 1,
        ..Default::default()
    };
    kiln_rlhf::rollout::rollout(
        &model,
        &prompts,
        &GenerationConfig {
            max_new_tokens: 4,
            ..gen.clone()
        },
    )?;
    let reps = ctx.steps.clamp(1, 3);
    let t = Instant::now();
    let mut tokens = 0;
    for _ in 0..reps {
        tokens += kiln_rlhf::rollout::rollout(&model, &prompts, &gen)?.tokens();
    }
    let dt = t.elapsed().as_secs_f64();
    let flops = decode_flops(&cfg, rows, 8, 64) * reps as f64;
    Ok(serde_json::json!({
        "bench": "rollout_decode",
        "threads": ctx.threads,
        "rows": rows,
        "new_tokens": 64,
        "reps": reps,
        "tokens_per_s": (tokens as f64 / dt * 10.0).round() / 10.0,
        "gflops": (flops / dt / 1e8).round() / 10.0,
    }))
}

/// One GRPO iteration on a tiny GPT-2 (4 layers, 128 wide, random init):
/// 8 prompts × 8 generations × 32 new tokens (EOS off), rollout + reward +
/// one update; samples/s and the rollout's share of the iteration.
fn bench_grpo_iter(ctx: &crate::parts::BenchCtx) -> Result<serde_json::Value> {
    let dir = tempfile_dir()?;
    let res = (|| -> Result<serde_json::Value> {
        let cfg = Gpt2Config {
            n_layer: 4,
            n_embd: 128,
            n_head: 4,
            n_positions: 128,
            vocab_size: 512,
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            ..Gpt2Config::gpt2_small()
        };
        let texts: Vec<String> = (0..300).map(|i| format!("{i}+{i}={}", 2 * i)).collect();
        let tok = kiln_lm::Gpt2Tokenizer::train(&texts, 512)?;
        let cfg = Gpt2Config {
            vocab_size: tok.vocab_size(),
            eos_token_id: tok.eos_id(),
            ..cfg
        };
        let model = random_gpt2(&cfg)?;
        let mdir = dir.join("model");
        model.save_pretrained(&mdir, Some(&tok))?;
        let prompts = dir.join("prompts.txt");
        let text: String = (0..8).map(|i| format!("{i}+{i}=\n")).collect();
        std::fs::write(&prompts, text)?;
        let iters = ctx.steps.clamp(2, 4) as u64;
        let gcfg = GrpoConfig {
            common: OnlineArgs {
                prompts: prompts.clone(),
                model: mdir.clone(),
                reward_funcs: vec![RewardSpec {
                    name: "lexicon".into(),
                    weight: 1.0,
                }],
                prompts_per_iteration: 8,
                iterations: iters,
                generation: GenerationConfig {
                    max_new_tokens: 32,
                    temperature: 1.0,
                    ignore_eos: true,
                    ..Default::default()
                },
                lr: 1e-5,
                ..Default::default()
            },
            num_generations: 8,
            ..Default::default()
        };
        let run = dir.join("run");
        let t = Instant::now();
        let rep = train_grpo(
            &gcfg,
            &Device::Cpu,
            &kiln_core::run::RunOptions::new_run(Some(&run)).quiet(true),
            &Control::default(),
        )?;
        let dt = t.elapsed().as_secs_f64();
        let roll = rep.last.get("time/rollout").copied().unwrap_or(f64::NAN);
        let upd = rep.last.get("time/update").copied().unwrap_or(f64::NAN);
        Ok(serde_json::json!({
            "bench": "grpo_iter",
            "threads": ctx.threads,
            "prompts": 8,
            "generations": 8,
            "new_tokens": 32,
            "iterations": iters,
            "samples_per_s": ((64 * iters as usize) as f64 / dt * 10.0).round() / 10.0,
            "rollout_s": (roll * 1000.0).round() / 1000.0,
            "update_s": (upd * 1000.0).round() / 1000.0,
            "rollout_share": (roll / (roll + upd) * 1000.0).round() / 1000.0,
        }))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "kiln-grpo-bench-{}-{}",
        std::process::id(),
        kiln_core::run::timestamp()
    ));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<GrpoArgs>("cargo xtask rlhf grpo", None, &[]);
        assert_numeric_flags_checked::<RlooArgs>("cargo xtask rlhf rloo", None, &[]);
        assert_numeric_flags_checked::<PpoArgs>("cargo xtask rlhf ppo", None, &[]);
        assert_numeric_flags_checked::<ArithArgs>("cargo xtask rlhf arithmetic", None, &[]);
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (flag, bad, range) in [
            ("--iterations", "0", "expected an integer in 1..=1000000"),
            ("--temperature", "0", "expected a number > 0"),
            ("--num-generations", "1", "expected an integer in 2..=4096"),
            ("--epsilon", "1", "expected a number in (0, 1)"),
            ("--missing-eos-penalty", "inf", "expected a number >= 0"),
        ] {
            let e = crate::parts::parse::<GrpoArgs>("g", &args(&[flag, bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains(range), "{flag} {bad}: {e}");
        }
        let e = crate::parts::parse::<PpoArgs>("p", &args(&["--gamma", "1.5"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gamma") && e.contains("in [0, 1]"), "{e}");
    }
}
