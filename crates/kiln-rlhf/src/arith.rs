//! A verifiable-reward task, GRPO's home ground, that runs offline: a tiny
//! GPT-2 pretrained (kiln-lm's `train lm`) on short additions written as
//! `a+b=c`, then GRPO with the exact-answer reward ([`ExactAnswer`]) on
//! prompts `a+b=` whose `answer` column holds `c`. Accuracy before and
//! after is measured sampled at temperature 1 (the policy GRPO optimises;
//! the mean over `eval_samples` completions per problem, so that the figure
//! is not one coin flip per problem) and greedily, on every problem of the
//! table (single-digit sums by default: a table a tiny LM memorises rather
//! than an algorithm it generalises, so problems held out from GRPO would
//! measure generalisation, not the RL) or, with `held_out`, on sampled
//! problems GRPO never sees (they stay in the pretraining corpus).
//!
//! The pretraining is kept short on purpose, so the base model knows the
//! format and often the answer but not reliably: the room GRPO turns into
//! accuracy by reinforcing its own correct samples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use kiln_lm::{generate_batch, GenerationConfig, Gpt2, Gpt2Tokenizer, ModelFiles};
use serde::{Deserialize, Serialize};

use crate::dpo::Control;
use crate::error::{Result, RlhfError};
use crate::grpo::{train_grpo_with, GrpoConfig};
use crate::models::{frozen_from, load_weights, model_dir};
use crate::online::{OnlineArgs, RewardSpec};
use crate::rewards::{ExactAnswer, RewardSet};

/// The task's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArithConfig {
    /// Operands are drawn from `0..=max_operand`.
    pub max_operand: u32,
    /// Problems in the pretraining corpus.
    pub train_problems: usize,
    /// The base LM (`corpus` is set by the task).
    pub lm: kiln_lm::train::TrainConfig,
    /// Evaluate on `eval_problems` sampled problems held out from GRPO's
    /// prompts instead of on the whole table.
    pub held_out: bool,
    /// Held-out problems for the accuracy (with `held_out`).
    pub eval_problems: usize,
    /// Completions per problem for the sampled accuracy (their mean). One
    /// sample per problem of the 100-problem table moves the figure by ~5
    /// points from seed to seed, as much as a short GRPO run changes it.
    pub eval_samples: usize,
    /// Prompts GRPO trains on.
    pub rl_prompts: usize,
    /// GRPO's settings (`common.prompts`, `common.model` are set by the task).
    pub grpo: GrpoConfig,
    /// Start from this `train lm` run (trained on this task's corpus, e.g.
    /// an earlier run's `lm/`) instead of pretraining.
    pub base_model: Option<PathBuf>,
    /// Seed.
    pub seed: u64,
}

impl Default for ArithConfig {
    fn default() -> Self {
        Self {
            max_operand: 9,
            train_problems: 3000,
            lm: kiln_lm::train::TrainConfig {
                vocab_size: 300,
                block_size: 32,
                n_layer: 2,
                n_embd: 64,
                n_head: 4,
                dropout: 0.0,
                batch_size: 16,
                epochs: 25,
                // 3e-3 (unclipped) left 2 of 6 seeds (4 and 5) on the
                // unigram plateau for all 25 epochs (loss 2.58, 0%
                // accuracy); 1e-3 got past it on all ten seeds tried (final
                // loss 0.98-1.16). With the gradient norm clipped at 1 (the
                // default) seeds 0-5 end at 0.92-0.99 and answer 75-86% of
                // the sums greedily, against 30-75% unclipped.
                lr: 1e-3,
                ..Default::default()
            },
            held_out: false,
            eval_problems: 30,
            eval_samples: 8,
            rl_prompts: 300,
            grpo: GrpoConfig {
                common: OnlineArgs {
                    prompts_per_iteration: 8,
                    iterations: 4000,
                    generation: GenerationConfig {
                        max_new_tokens: 6,
                        temperature: 1.0,
                        ..Default::default()
                    },
                    lr: 1e-4,
                    reward_funcs: vec![RewardSpec {
                        name: "exact_answer".into(),
                        weight: 1.0,
                    }],
                    ..Default::default()
                },
                num_generations: 16,
                ..Default::default()
            },
            base_model: None,
            seed: 0,
        }
    }
}

impl ArithConfig {
    /// The demo's short version: 600 GRPO iterations instead of 4000.
    pub fn quick() -> Self {
        let d = Self::default();
        let mut grpo = d.grpo.clone();
        grpo.common.iterations = 600;
        Self { grpo, ..d }
    }
}

/// Exact-answer accuracy on the evaluation problems.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Accuracy {
    /// Share of exact answers among the samples at temperature 1
    /// (`eval_samples` per problem).
    pub sampled: f64,
    /// Share of exact answers, greedy.
    pub greedy: f64,
}

/// The task's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ArithReport {
    /// Before GRPO.
    pub before: Accuracy,
    /// After GRPO.
    pub after: Accuracy,
    /// Samples per problem behind the sampled accuracies.
    pub eval_samples: usize,
    /// GRPO iterations.
    pub iterations: u64,
    /// Seconds GRPO took.
    pub grpo_seconds: f64,
    /// The output folder.
    pub out: PathBuf,
}

impl ArithReport {
    /// One line: accuracies before → after.
    pub fn summary(&self) -> String {
        format!(
            "exact-answer accuracy: sampled {:.1}% -> {:.1}% ({:+.1} points, {} per problem), greedy {:.1}% -> {:.1}%; {} GRPO iterations in {:.0}s",
            100.0 * self.before.sampled,
            100.0 * self.after.sampled,
            100.0 * (self.after.sampled - self.before.sampled),
            self.eval_samples,
            100.0 * self.before.greedy,
            100.0 * self.after.greedy,
            self.iterations,
            self.grpo_seconds
        )
    }
}

fn problems(n: usize, max: u32, rng: &mut SeededRng) -> Vec<(u32, u32)> {
    (0..n)
        .map(|_| {
            (
                rng.below(max as usize + 1) as u32,
                rng.below(max as usize + 1) as u32,
            )
        })
        .collect()
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> RlhfError + '_ {
    move |e| RlhfError::file(p, e.to_string())
}

/// Exact-answer accuracy of `model` on `probs`: greedy, and sampled at
/// temperature 1 with `samples` completions per problem (the share of all
/// of them that are exact; at least 1).
pub fn accuracy(
    model: &Gpt2,
    tok: &Gpt2Tokenizer,
    probs: &[(u32, u32)],
    max_new_tokens: usize,
    samples: usize,
    seed: u64,
) -> Result<Accuracy> {
    let encoded: Vec<Vec<u32>> = probs
        .iter()
        .map(|(a, b)| tok.encode(&format!("{a}+{b}=")))
        .collect::<std::result::Result<_, _>>()?;
    let mut out = [0.0; 2];
    for (k, (temperature, copies)) in [(1.0, samples.max(1)), (0.0, 1)].into_iter().enumerate() {
        // Each problem `copies` times in a row; every batch row draws from
        // its own stream (the seed moves on per batch, as rows restart at 0).
        let rows: Vec<(&Vec<u32>, u32)> = encoded
            .iter()
            .zip(probs)
            .flat_map(|(p, (a, b))| std::iter::repeat_n((p, a + b), copies))
            .collect();
        let mut right = 0usize;
        for (i, chunk) in rows.chunks(64).enumerate() {
            let cfg = GenerationConfig {
                max_new_tokens,
                temperature,
                eos_token_id: tok.eos_id(),
                seed: seed.wrapping_add(i as u64),
                ..Default::default()
            };
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(p, _)| p.to_vec()).collect();
            let gens = generate_batch(model, &prompts, &cfg, Some(tok), None)?;
            for (g, (_, sum)) in gens.iter().zip(chunk) {
                if g.text.split('\n').next().unwrap_or("").trim() == sum.to_string() {
                    right += 1;
                }
            }
        }
        out[k] = right as f64 / rows.len().max(1) as f64;
    }
    Ok(Accuracy {
        sampled: out[0],
        greedy: out[1],
    })
}

/// Runs the task into `out` (a new folder, or one left by an earlier run
/// with `overwrite`).
pub fn run_arithmetic(
    cfg: &ArithConfig,
    device: &Device,
    out: &Path,
    overwrite: bool,
    quiet: bool,
) -> Result<ArithReport> {
    if cfg.max_operand == 0
        || cfg.train_problems == 0
        || cfg.eval_problems == 0
        || cfg.eval_samples == 0
        || cfg.rl_prompts == 0
    {
        return Err(RlhfError::config(
            "arithmetic task",
            "max_operand/train_problems/eval_problems/eval_samples/rl_prompts",
            "all must be at least 1",
        ));
    }
    crate::experiment::prepare_out(out, overwrite, "rlhf arithmetic")?;
    let t0 = std::time::Instant::now();
    let say = |m: String| {
        if !quiet {
            eprintln!("rlhf arithmetic [{:.0}s]: {m}", t0.elapsed().as_secs_f64());
        }
    };
    let mut rng = SeededRng::derive(cfg.seed, &[0xA417]);
    let (eval, held) = if cfg.held_out {
        let e = problems(cfg.eval_problems, cfg.max_operand, &mut rng);
        let h: std::collections::HashSet<(u32, u32)> = e.iter().copied().collect();
        (e, h)
    } else {
        let all: Vec<(u32, u32)> = (0..=cfg.max_operand)
            .flat_map(|a| (0..=cfg.max_operand).map(move |b| (a, b)))
            .collect();
        (all, Default::default())
    };
    // The pretraining corpus draws from every problem (the base model has
    // seen the held-out ones, as a pretrained model has seen most facts);
    // GRPO's prompts never include them.
    let train = problems(cfg.train_problems, cfg.max_operand, &mut rng);
    let corpus = out.join("corpus.txt");
    let text: String = train
        .iter()
        .map(|(a, b)| format!("{a}+{b}={}\n", a + b))
        .collect();
    kiln_core::files::write_atomic(&corpus, text.as_bytes()).map_err(io(&corpus))?;
    let tc = kiln_lm::train::TrainConfig {
        corpus: format!("lines:{}", corpus.display()),
        seed: cfg.seed,
        ..cfg.lm.clone()
    };
    // The sub-runs print nothing; `say` reports on each.
    let sub_run = |dir: &Path| RunOptions::new_run(Some(dir)).quiet(true).silent(true);
    let lm_run = match &cfg.base_model {
        Some(p) => p.clone(),
        None => {
            let dir = out.join("lm");
            let lm = kiln_lm::train::train(&tc, device, &sub_run(&dir))?;
            crate::experiment::stop_if_interrupted("rlhf arithmetic", &dir)?;
            say(format!(
                "base LM: {} epochs, val loss {:.3} nats/token (unigram entropy {:.3})",
                lm.epochs,
                lm.val_loss.unwrap_or(f64::NAN),
                lm.unigram_entropy
            ));
            dir
        }
    };
    let load = |dir: &Path| -> Result<(Gpt2, Gpt2Tokenizer)> {
        let files = ModelFiles::from_dir(&model_dir(dir))?;
        let tok = files.load_tokenizer()?;
        let (mc, w) = load_weights(&files, device)?;
        Ok((frozen_from(&mc, w, device)?, tok))
    };
    let (base, tok) = load(&lm_run)?;
    let max_new = cfg.grpo.common.generation.max_new_tokens;
    // The same sampling streams before and after, so the two differ by the model only.
    let measure = |m: &Gpt2| accuracy(m, &tok, &eval, max_new, cfg.eval_samples, cfg.seed ^ 0xE7);
    let before = measure(&base)?;
    say(format!(
        "base LM: accuracy sampled {:.1}%, greedy {:.1}%",
        100.0 * before.sampled,
        100.0 * before.greedy
    ));
    let mut lines = String::new();
    for (a, b) in problems(cfg.rl_prompts, cfg.max_operand, &mut rng) {
        if held.contains(&(a, b)) {
            continue;
        }
        lines += &serde_json::json!({"prompt": format!("{a}+{b}="), "answer": (a + b).to_string()})
            .to_string();
        lines.push('\n');
    }
    let prompts = out.join("prompts.jsonl");
    kiln_core::files::write_atomic(&prompts, lines.as_bytes()).map_err(io(&prompts))?;
    let mut g = cfg.grpo.clone();
    g.common.prompts = prompts;
    g.common.model = lm_run.clone();
    g.common.seed = cfg.seed;
    let rewards = RewardSet::new().with(ExactAnswer, 1.0);
    let t = std::time::Instant::now();
    let grpo_run = out.join("grpo");
    let rep = train_grpo_with(
        &g,
        Some(&rewards),
        device,
        &sub_run(&grpo_run),
        &Control::default(),
    )?;
    crate::experiment::stop_if_interrupted("rlhf arithmetic", &grpo_run)?;
    let grpo_seconds = t.elapsed().as_secs_f64();
    let (tuned, _) = load(&grpo_run)?;
    let after = measure(&tuned)?;
    let report = ArithReport {
        before,
        after,
        eval_samples: cfg.eval_samples,
        iterations: rep.iterations,
        grpo_seconds,
        out: out.to_path_buf(),
    };
    say(report.summary());
    let mut j: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    j.insert(
        "report",
        serde_json::to_value(&report).map_err(|e| RlhfError::file(out, e.to_string()))?,
    );
    j.insert(
        "config",
        serde_json::to_value(cfg).map_err(|e| RlhfError::file(out, e.to_string()))?,
    );
    let p = out.join("results.json");
    let s = serde_json::to_string_pretty(&j).map_err(|e| RlhfError::file(&p, e.to_string()))?;
    kiln_core::files::write_atomic(&p, s.as_bytes()).map_err(io(&p))?;
    Ok(report)
}
