//! What GRPO, RLOO and PPO share: their common settings ([`OnlineArgs`]),
//! the prompt dataset with extra columns ([`PromptSet`]), building the
//! reward functions a config names ([`RewardSpec`]), and one rollout step
//! (sample, decode, score: [`generate_and_score`]) with TRL's completion
//! and reward metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use kiln_core::rng::SeededRng;
use kiln_core::session::Record;
use kiln_lm::{GenerationConfig, Gpt2, Gpt2Tokenizer, ModelFiles};
use kiln_prompt::ChatTemplate;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};
use crate::labeller::LexiconLabeller;
use crate::models::{model_dir, policy_dir};
use crate::reward::RewardModel;
use crate::rewards::{
    nan_mean_std, ExactAnswer, LexiconReward, RewardInput, RewardModelFn, RewardSet, Scores,
};
use crate::rollout::{rollout, Rollout};
use crate::sample::read_prompts;

/// One reward function a config names, with its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// `reward_model` (needs `reward_model`), `lexicon` (the experiment's
    /// sentiment lexicon) or `exact_answer` (the `answer` column).
    pub name: String,
    /// Its weight in the sum.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The settings every online trainer has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnlineArgs {
    /// Training prompts: `.jsonl` (`{"prompt": ..., other columns}` per
    /// line, the other columns handed to reward functions) or text, one
    /// prompt per line.
    pub prompts: PathBuf,
    /// The starting policy (a GPT-2 folder or a kiln run folder).
    pub model: PathBuf,
    /// A reward model (`GPT2ForSequenceClassification` folder or `rlhf
    /// reward` run), for the `reward_model` function and PPO's value model.
    pub reward_model: Option<PathBuf>,
    /// The reward functions (default: the reward model alone).
    pub reward_funcs: Vec<RewardSpec>,
    /// A chat template for conversational prompts.
    pub chat_template: Option<String>,
    /// Prompts per rollout.
    pub prompts_per_iteration: usize,
    /// Rollouts (iterations) in all.
    pub iterations: u64,
    /// Sampling settings (`max_new_tokens` is TRL's
    /// `max_completion_length`; the seed is derived per iteration).
    pub generation: GenerationConfig,
    /// Subtracted from the score of a completion that did not end with EOS
    /// (TRL's `missing_eos_penalty`; `None`: off).
    pub missing_eos_penalty: Option<f64>,
    /// Learning rate (AdamW, constant).
    pub lr: f64,
    /// Gradient clipping (0 = off).
    pub max_grad_norm: f64,
    /// Seed of the prompt order and the samples.
    pub seed: u64,
}

impl Default for OnlineArgs {
    fn default() -> Self {
        Self {
            prompts: PathBuf::new(),
            model: PathBuf::new(),
            reward_model: None,
            reward_funcs: Vec::new(),
            chat_template: None,
            prompts_per_iteration: 8,
            iterations: 50,
            generation: GenerationConfig {
                max_new_tokens: 32,
                temperature: 1.0,
                ..Default::default()
            },
            missing_eos_penalty: None,
            lr: 1e-6,
            max_grad_norm: 1.0,
            seed: 0,
        }
    }
}

impl OnlineArgs {
    /// Checks the values (`what` names the trainer).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |f: &str, m: String| Err(RlhfError::config(what, f, m));
        if self.prompts.as_os_str().is_empty() {
            return bad("prompts", "give a prompt file".into());
        }
        if self.model.as_os_str().is_empty() {
            return bad("model", "give a model folder".into());
        }
        if self.prompts_per_iteration == 0 || self.iterations == 0 {
            return bad(
                "prompts_per_iteration/iterations",
                "both must be at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("must be >= 0, got {}", self.max_grad_norm),
            );
        }
        if self.generation.max_new_tokens == 0 {
            return bad("generation.max_new_tokens", "must be at least 1".into());
        }
        if self.generation.temperature <= 0.0 {
            return bad(
                "generation.temperature",
                "online RL samples from the policy: use a temperature above 0".into(),
            );
        }
        if self.missing_eos_penalty.is_some_and(|p| !p.is_finite()) {
            return bad("missing_eos_penalty", "must be a finite number".into());
        }
        for (i, r) in self.reward_funcs.iter().enumerate() {
            if !r.weight.is_finite() {
                return bad(
                    &format!("reward_funcs[{i}].weight"),
                    "must be finite".into(),
                );
            }
            match r.name.as_str() {
                "lexicon" | "exact_answer" => {}
                "reward_model" if self.reward_model.is_some() => {}
                "reward_model" => {
                    return bad(
                        &format!("reward_funcs[{i}]"),
                        "`reward_model` needs the reward_model path".into(),
                    )
                }
                other => {
                    return bad(
                        &format!("reward_funcs[{i}].name"),
                        format!(
                            "unknown reward function `{other}`; expected reward_model, lexicon or exact_answer"
                        ),
                    )
                }
            }
        }
        if self.reward_funcs.is_empty() && self.reward_model.is_none() {
            return bad(
                "reward_model",
                "give a reward model or name reward functions (reward_funcs)".into(),
            );
        }
        self.generation
            .validate()
            .map_err(|e| RlhfError::config(what, "generation", e.to_string()))
    }

    /// The reward functions, as specs (the reward model alone by default).
    pub fn reward_specs(&self) -> Vec<RewardSpec> {
        if self.reward_funcs.is_empty() {
            vec![RewardSpec {
                name: "reward_model".into(),
                weight: 1.0,
            }]
        } else {
            self.reward_funcs.clone()
        }
    }
}

/// A loaded reward model and its tokenizer.
pub struct LoadedRewardModel {
    /// The model.
    pub model: RewardModel,
    /// Its tokenizer (the policy's when its folder has none).
    pub tokenizer: Gpt2Tokenizer,
    /// Its variables (trainable: PPO's value model starts from them).
    pub vars: kiln_core::vars::VarStore,
}

/// Loads the reward model at `path` (a folder or a run).
pub fn load_reward_model(
    path: &Path,
    fallback_tok: &Gpt2Tokenizer,
    device: &Device,
    seed: u64,
) -> Result<LoadedRewardModel> {
    let dir = model_dir(path);
    let (model, vars) = RewardModel::load(&dir, device, seed)?;
    let tokenizer = ModelFiles::from_dir(&dir)
        .and_then(|f| f.load_tokenizer())
        .unwrap_or_else(|_| fallback_tok.clone());
    Ok(LoadedRewardModel {
        model,
        tokenizer,
        vars,
    })
}

/// Builds the [`RewardSet`] that `specs` name.
pub fn reward_set<'a>(
    specs: &[RewardSpec],
    rm: Option<&'a LoadedRewardModel>,
) -> Result<RewardSet<'a>> {
    let mut set = RewardSet::new();
    for (i, s) in specs.iter().enumerate() {
        set = match s.name.as_str() {
            "reward_model" => {
                let rm = rm.ok_or_else(|| {
                    RlhfError::config("rewards", &format!("reward_funcs[{i}]"), "no reward model")
                })?;
                set.with(
                    RewardModelFn {
                        model: &rm.model,
                        tokenizer: &rm.tokenizer,
                        batch: 16,
                    },
                    s.weight,
                )
            }
            "lexicon" => set.with(LexiconReward(LexiconLabeller::default()), s.weight),
            "exact_answer" => set.with(ExactAnswer, s.weight),
            other => {
                return Err(RlhfError::config(
                    "rewards",
                    &format!("reward_funcs[{i}].name"),
                    format!("unknown reward function `{other}`"),
                ))
            }
        };
    }
    Ok(set)
}

/// Prompts with their token ids and extra columns.
#[derive(Debug, Clone, Default)]
pub struct PromptSet {
    /// Prompt texts.
    pub prompts: Vec<String>,
    /// Their token ids (never empty: an empty prompt becomes EOS).
    pub ids: Vec<Vec<u32>>,
    /// Extra columns (every key of a JSONL line but `prompt`), one value
    /// per prompt (`null` where a line lacks it).
    pub columns: BTreeMap<String, Vec<serde_json::Value>>,
}

impl PromptSet {
    /// Prompts from texts and columns.
    pub fn new(
        prompts: Vec<String>,
        columns: BTreeMap<String, Vec<serde_json::Value>>,
        tok: &Gpt2Tokenizer,
    ) -> Result<Self> {
        let eos = tok.eos_id().unwrap_or(0);
        let ids = prompts
            .iter()
            .map(|p| {
                let mut v = tok.encode(p)?;
                if v.is_empty() {
                    v.push(eos);
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            prompts,
            ids,
            columns,
        })
    }

    /// Reads a prompt file (see [`read_prompts`]); JSONL keeps its other
    /// keys as columns.
    pub fn read(path: &Path, chat: Option<&ChatTemplate>, tok: &Gpt2Tokenizer) -> Result<Self> {
        let prompts = read_prompts(path, chat)?;
        let mut columns: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        if path.extension().is_some_and(|e| e == "jsonl") {
            let text =
                std::fs::read_to_string(path).map_err(|e| RlhfError::file(path, e.to_string()))?;
            // read_prompts has checked every line; the non-empty ones are the prompts.
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            for (i, row) in rows.iter().enumerate() {
                for k in row.keys().filter(|k| *k != "prompt") {
                    columns
                        .entry(k.clone())
                        .or_insert_with(|| vec![serde_json::Value::Null; rows.len()])[i] =
                        row[k].clone();
                }
            }
        }
        Self::new(prompts, columns, tok)
    }

    /// Prompts in the set.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The `k` prompts of the rollout at `cursor`: a fresh seeded
    /// permutation of the set on each pass (an epoch over the prompts).
    pub fn pick(&self, seed: u64, cursor: u64, k: usize) -> Vec<usize> {
        let n = self.len();
        (0..k)
            .map(|j| {
                let pos = cursor as usize + j;
                let order = SeededRng::derive(seed, &[0x9A55, (pos / n) as u64]).permutation(n);
                order[pos % n]
            })
            .collect()
    }
}

/// One scored rollout.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The rollout (rows: each picked prompt `num_generations` times).
    pub rollout: Rollout,
    /// The prompt text of each row.
    pub prompts: Vec<String>,
    /// The completion text of each row (EOS not included).
    pub completions: Vec<String>,
    /// The reward functions' scores.
    pub scores: Scores,
    /// The combined reward per row, after the missing-EOS penalty.
    pub rewards: Vec<f64>,
}

/// Rolls out `num_generations` completions of each prompt `picked` from
/// `data` (one batch), decodes and scores them; the missing-EOS penalty is
/// subtracted from the rewards of completions that did not end with EOS.
#[allow(clippy::too_many_arguments)]
pub fn generate_and_score(
    policy: &Gpt2,
    tok: &Gpt2Tokenizer,
    data: &PromptSet,
    picked: &[usize],
    num_generations: usize,
    gen: &GenerationConfig,
    rewards: &RewardSet<'_>,
    missing_eos_penalty: Option<f64>,
) -> Result<Generated> {
    let rows: Vec<usize> = picked
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, num_generations))
        .collect();
    let ids: Vec<Vec<u32>> = rows.iter().map(|&i| data.ids[i].clone()).collect();
    let mut gen = gen.clone();
    if gen.eos_token_id.is_none() {
        gen.eos_token_id = tok.eos_id().or(policy.config().eos_token_id);
    }
    let ro = rollout(policy, &ids, &gen)?;
    let completions = ro
        .completions
        .iter()
        .zip(&ro.eos)
        .map(|(c, &e)| Ok(tok.decode(if e { &c[..c.len() - 1] } else { c })?))
        .collect::<Result<Vec<_>>>()?;
    let prompts: Vec<String> = rows.iter().map(|&i| data.prompts[i].clone()).collect();
    let columns: BTreeMap<String, Vec<serde_json::Value>> = data
        .columns
        .iter()
        .map(|(k, v)| (k.clone(), rows.iter().map(|&i| v[i].clone()).collect()))
        .collect();
    let scores = rewards.score(&RewardInput {
        prompts: &prompts,
        completions: &completions,
        completion_ids: &ro.completions,
        eos: &ro.eos,
        columns: &columns,
    })?;
    let mut total = scores.total.clone();
    if let Some(p) = missing_eos_penalty {
        for (t, &e) in total.iter_mut().zip(&ro.eos) {
            if !e {
                *t -= p;
            }
        }
    }
    Ok(Generated {
        rollout: ro,
        prompts,
        completions,
        scores,
        rewards: total,
    })
}

impl Generated {
    /// TRL's completion and reward metrics: `reward`, `reward_std`,
    /// `rewards/<fn>/mean|std`, `completions/mean_length`, `/min_length`,
    /// `/max_length`, `completions/clipped_ratio` (share without EOS) and
    /// `time/rollout` (seconds).
    pub fn metrics(&self, rec: &mut Record) {
        let (m, s) = nan_mean_std(&self.rewards);
        rec.push("reward", m);
        rec.push("reward_std", s);
        for (k, v) in self.scores.metrics() {
            rec.push(k, v);
        }
        let lens = self.rollout.lengths();
        let n = lens.len().max(1) as f64;
        rec.push(
            "completions/mean_length",
            lens.iter().sum::<usize>() as f64 / n,
        );
        rec.push(
            "completions/min_length",
            lens.iter().copied().min().unwrap_or(0) as f64,
        );
        rec.push(
            "completions/max_length",
            lens.iter().copied().max().unwrap_or(0) as f64,
        );
        rec.push(
            "completions/clipped_ratio",
            self.rollout.eos.iter().filter(|&&e| !e).count() as f64 / n,
        );
        rec.push("time/rollout", self.rollout.seconds);
    }
}

/// Seconds since `t0`, for `time/update`.
pub fn seconds_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// The generation settings of iteration `it` (a seed of its own).
pub fn generation_for(args: &OnlineArgs, it: u64) -> GenerationConfig {
    GenerationConfig {
        seed: SeededRng::derive(args.seed, &[0x6E, it]).below(usize::MAX) as u64,
        ..args.generation.clone()
    }
}

/// Means over the last `k` train records of a run's metrics.
pub fn last_means(dir: &Path, k: usize) -> Result<BTreeMap<String, f64>> {
    let recs = kiln_core::run::read_metrics(&dir.join("metrics.jsonl"))?;
    let tail: Vec<_> = recs
        .iter()
        .filter(|r| r.split == "train")
        .rev()
        .take(k)
        .collect();
    let mut last = BTreeMap::new();
    for r in &tail {
        for (key, v) in &r.values {
            *last.entry(key.clone()).or_insert(0.0) += v / tail.len() as f64;
        }
    }
    Ok(last)
}

/// The outcome of an online trainer.
#[derive(Debug, Clone, Serialize)]
pub struct OnlineReport {
    /// Means over the run's last 10 iterations, by TRL's names.
    pub last: BTreeMap<String, f64>,
    /// Iterations done.
    pub iterations: u64,
    /// Whether the run stopped early.
    pub interrupted: bool,
    /// The trained policy, when the run finished.
    pub model_dir: Option<PathBuf>,
}

/// What a trainer loads before its run starts.
pub(crate) struct Setup {
    pub args: OnlineArgs,
    pub tok: Gpt2Tokenizer,
    pub chat: Option<ChatTemplate>,
    pub data: PromptSet,
    pub rm: Option<LoadedRewardModel>,
    pub mcfg: kiln_lm::Gpt2Config,
    pub policy: Gpt2,
    pub vs: kiln_core::vars::VarStore,
    /// A frozen copy of the starting policy and its store, when asked for.
    pub reference: Option<(Gpt2, kiln_core::vars::VarStore)>,
    pub pad: u32,
}

/// Loads the policy, tokenizer, prompts, reward model and (with
/// `need_ref`) the reference.
pub(crate) fn setup(args: &OnlineArgs, device: &Device, need_ref: bool) -> Result<Setup> {
    let mdir = policy_dir(&args.model)?;
    let files = ModelFiles::from_dir(&mdir)?;
    let tok = files.load_tokenizer()?;
    let chat = crate::prefs::chat_template_for(&mdir, args.chat_template.as_deref())?;
    let data = PromptSet::read(&args.prompts, chat.as_ref(), &tok)?;
    let rm = args
        .reward_model
        .as_ref()
        .map(|p| load_reward_model(p, &tok, device, args.seed))
        .transpose()?;
    let (mcfg, tensors) = crate::models::load_weights(&files, device)?;
    let (policy, vs) =
        crate::models::trainable_from(&mcfg, &tensors, device, args.seed, &files.config)?;
    let reference = if need_ref {
        let rvs = crate::models::store_of(&tensors, args.seed)?;
        let m = crate::models::frozen_view(&mcfg, &rvs, device)?;
        Some((m, rvs))
    } else {
        None
    };
    let pad = tok.eos_id().or(mcfg.eos_token_id).unwrap_or(0);
    Ok(Setup {
        args: args.clone(),
        tok,
        chat,
        data,
        rm,
        mcfg,
        policy,
        vs,
        reference,
        pad,
    })
}

/// Refuses, before the run folder is made (CPU), an update whose batch of
/// `rows` rollouts does not fit in memory: the policy's training step on
/// rows of the longest prompt plus `max_new_tokens` (capped at its
/// context), and `value`'s (PPO's separate value model, hidden states
/// only) on the same rows. The models' weights are already loaded; their
/// gradients and optimizer state are counted.
pub(crate) fn check_update_memory(
    what: &str,
    st: &Setup,
    rows: usize,
    value: Option<&kiln_lm::Gpt2Config>,
) -> Result<()> {
    if !st.policy.device().is_cpu() {
        return Ok(());
    }
    let prompt = st.data.ids.iter().map(Vec::len).max().unwrap_or(0);
    let g = &st.args.generation;
    update_fits(
        what,
        &st.mcfg,
        Rows {
            prompt,
            completion: g.max_new_tokens,
            temperature_scaled: g.temperature != 1.0,
            count: rows,
        },
        value,
        kiln_core::memory::available(),
    )
}

/// The rows of an update: the longest prompt, the completion's tokens
/// (where log-probabilities are taken), whether the logits are divided by
/// a temperature, and how many rows one optimizer step trains on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows {
    pub prompt: usize,
    pub completion: usize,
    pub temperature_scaled: bool,
    pub count: usize,
}

/// [`check_update_memory`] on figures: `rows` (their length capped at the
/// policy's context), `available` bytes (`None`: unknown, never refused).
pub(crate) fn update_fits(
    what: &str,
    policy: &kiln_lm::Gpt2Config,
    rows: Rows,
    value: Option<&kiln_lm::Gpt2Config>,
    available: Option<u64>,
) -> Result<()> {
    let len = rows
        .prompt
        .saturating_add(rows.completion)
        .min(policy.n_positions);
    let per = kiln_core::memory::TRAIN_BYTES_PER_PARAM;
    let params = |c: &kiln_lm::Gpt2Config| (c.num_params() as u64).saturating_mul(per);
    let fixed = params(policy).saturating_add(value.map_or(0, params));
    let per_row = policy
        .training_bytes_per_rollout(len, rows.completion, rows.temperature_scaled)
        .saturating_add(value.map_or(0, |v| v.training_bytes_per_sequence(len, false)));
    kiln_core::memory::check_batch_fits(
        &format!(
            "this GPT-2 ({} layers of width {})",
            policy.n_layer, policy.n_embd
        ),
        &format!("rollout of {len} tokens"),
        fixed,
        per_row,
        rows.count as u64,
        available,
    )
    .map_err(|e| {
        let advice = match e.largest_batch() {
            0 => "not even one rollout fits: use a smaller --max-new-tokens, shorter prompts or a smaller model".to_string(),
            n => format!(
                "at most {n} rollouts per update fit: use a smaller --prompts-per-iteration{}, or a smaller --max-new-tokens",
                match what {
                    "PPO" => " or more --num-mini-batches",
                    "RWFT" => " or --n",
                    _ => " or --num-generations",
                }
            ),
        };
        RlhfError::Config {
            what: what.into(),
            field: "prompts_per_iteration".into(),
            msg: format!("{e}; {advice}; {}", kiln_core::memory::SKIP_HINT),
        }
    })
}

/// Ends a run: reads the last iterations' means and, when the run
/// finished, saves the policy to `model/` and the summary.
pub(crate) fn finish(
    s: &kiln_core::session::Session,
    end: kiln_core::session::LoopEnd,
    st: &Setup,
) -> Result<OnlineReport> {
    let dir = s.run().clone();
    let interrupted = !end.completed();
    let mut report = OnlineReport {
        last: last_means(dir.path(), 10)?,
        iterations: s.iteration(),
        interrupted,
        model_dir: None,
    };
    if !interrupted {
        let out = dir.join("model");
        st.policy.save_pretrained(&out, Some(&st.tok))?;
        crate::train::save_chat_template(&out, st.chat.as_ref())?;
        report.model_dir = Some(out);
        let v = serde_json::to_value(&report)
            .map_err(|e| RlhfError::file(dir.path(), e.to_string()))?;
        s.finish(v)?;
    }
    Ok(report)
}

/// AdamW at a constant learning rate over `vs` (no weight decay).
pub(crate) fn optimizer(
    vs: &kiln_core::vars::VarStore,
    lr: f64,
) -> Result<kiln_core::optim::Optimizer> {
    crate::train::TrainingArgs::with_lr(lr).optimizer(vs)
}

/// Settings a resumed online run may change.
pub const MAY_CHANGE: &[&str] = &["common.iterations"];

/// Opens the run (`task`, `kind`) and starts the session: the policy as a
/// trained part (AdamW, clipping), `value` as a second trained part when
/// given, the reference (if loaded) as a frozen one, `iterations` rollouts.
pub(crate) fn start_session<C: Serialize + serde::de::DeserializeOwned>(
    st: &Setup,
    c: &OnlineArgs,
    (task, kind, cfg): (&str, &str, &C),
    value: Option<&kiln_core::vars::VarStore>,
    opts: &kiln_core::run::RunOptions,
    control: &crate::dpo::Control,
) -> Result<kiln_core::session::Session> {
    opts.check_kind(kind)?;
    let run = opts.open(task, kind, cfg, MAY_CHANGE)?;
    run.check_inputs(&[&c.prompts])?;
    let mut b = kiln_core::session::Session::builder(run, c.seed);
    for (name, vs) in std::iter::once(("policy", &st.vs)).chain(value.map(|v| ("value", v))) {
        b = b.part(name, vs, optimizer(vs, c.lr)?);
        if c.max_grad_norm > 0.0 {
            b = b.clip_grad_norm(c.max_grad_norm);
        }
    }
    if let Some((_, rvs)) = &st.reference {
        b = b.frozen("ref", rvs);
    }
    let mut b = b.iterations(c.iterations).observer(opts.observer());
    if let Some(n) = control.stop_at {
        b = b.stop_at(n);
    }
    Ok(b.start()?)
}

/// Picks the next prompts, rolls them out `num_generations` times each and
/// scores them; returns the rollout and a record with its metrics.
pub(crate) fn rollout_step(
    s: &mut kiln_core::session::Session,
    st: &Setup,
    num_generations: usize,
    rewards: &RewardSet<'_>,
) -> Result<(Generated, Record)> {
    let c = &st.args;
    let picked = st.data.pick(c.seed, s.cursor, c.prompts_per_iteration);
    let g = generate_and_score(
        &st.policy,
        &st.tok,
        &st.data,
        &picked,
        num_generations,
        &generation_for(c, s.iteration()),
        rewards,
        c.missing_eos_penalty,
    )?;
    s.cursor += picked.len() as u64;
    let mut rec = Record::new(g.rollout.len());
    g.metrics(&mut rec);
    Ok((g, rec))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// GRPO on GPT-2 small with 8 prompts x 8 generations of 256 tokens
    /// after prompts of up to 16 (logits at a temperature) needs about
    /// 40 GiB of activations: refused on a 32 GiB machine with the number
    /// of rollouts that fits, which grows when the logits are not scaled. Rows are capped at
    /// the model's context, and PPO's separate value model adds its own
    /// share per row.
    #[test]
    fn updates_too_large_for_memory_are_refused_with_the_rollouts_that_fit() {
        let m = kiln_lm::Gpt2Config::gpt2_small();
        let avail = Some(32u64 << 30);
        let rows = |prompt, count| Rows {
            prompt,
            completion: 256,
            temperature_scaled: true,
            count,
        };
        let e = update_fits("GRPO", &m, rows(16, 64), None, avail)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "GRPO field `prompts_per_iteration`: not enough memory for training this GPT-2 \
                 (12 layers of width 768) on batches of 64 rollouts of 272 tokens"
            ),
            "{e}"
        );
        let fits = (1..64)
            .rev()
            .find(|&r| update_fits("GRPO", &m, rows(16, r), None, avail).is_ok())
            .unwrap();
        assert!((40..64).contains(&fits), "{fits}: {e}");
        assert!(
            e.contains(&format!("at most {fits} rollouts per update fit")),
            "{e}"
        );
        assert!(e.contains("or --num-generations"), "{e}");
        // Sampling at temperature 1 keeps no scaled copy of the logits.
        let plain = Rows {
            temperature_scaled: false,
            ..rows(16, fits + 1)
        };
        update_fits("GRPO", &m, plain, None, avail).unwrap();
        // Past the context, rows are as long as the context.
        let capped = update_fits("GRPO", &m, rows(5000, 64), None, avail)
            .unwrap_err()
            .to_string();
        assert!(capped.contains("rollouts of 1024 tokens"), "{capped}");
        // A value model makes each row dearer.
        update_fits("PPO", &m, rows(16, fits), None, avail).unwrap();
        let e = update_fits("PPO", &m, rows(16, fits), Some(&m), avail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("or more --num-mini-batches"), "{e}");
        let e = update_fits("RWFT", &m, rows(256, 64), None, avail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--prompts-per-iteration or --n,"), "{e}");
        update_fits("GRPO", &m, rows(256, 64), None, None).unwrap();
    }
}
