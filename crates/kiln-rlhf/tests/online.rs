//! The rollout engine and the online trainers (GRPO, RLOO, PPO) on the tiny
//! random models of `tests/fixtures`: rollout log-probs against a
//! teacher-forced pass, the first-update invariants, every parameter
//! changing, and GRPO learning a rule-based reward.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_core::run::{read_metrics, MetricRecord, RunOptions};
use kiln_core::tolerance::transformer_abs_tol;
use kiln_core::{DType, Device};
use kiln_lm::{generate_batch, GenerationConfig, Gpt2Tokenizer, ModelFiles};
use kiln_rlhf::dpo::Control;
use kiln_rlhf::grpo::{train_grpo, train_grpo_with, GrpoConfig};
use kiln_rlhf::models::{frozen_from, load_weights, trainable_lm};
use kiln_rlhf::online::{OnlineArgs, RewardSpec};
use kiln_rlhf::pg::{GrpoLossType, KlEstimator, ScaleRewards};
use kiln_rlhf::ppo::{train_ppo, PpoConfig, ValueModelKind};
use kiln_rlhf::rewards::{FnReward, RewardInput, RewardSet};
use kiln_rlhf::rloo::{train_rloo, RlooConfig};
use kiln_rlhf::rollout::{rollout, token_logps, TokenBatch};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lm() -> Result<(kiln_lm::Gpt2, Gpt2Tokenizer)> {
    let files = ModelFiles::from_dir(&fixtures().join("tiny-lm"))?;
    let tok = files.load_tokenizer()?;
    let (cfg, w) = load_weights(&files, &Device::Cpu)?;
    Ok((frozen_from(&cfg, w, &Device::Cpu)?, tok))
}

/// Rollout log-probs are `log_softmax(logits / T)` at the sampled tokens:
/// a teacher-forced pass over the same rows (right-padded, no cache) gives
/// the same numbers within f32's bound for the model. Rows that end on EOS carry it as their last
/// token (and only there); the others run to `max_new_tokens`. Dropping
/// finished rows from the batch changes no row's tokens (same ids as
/// kiln-lm's `generate_batch`, which keeps them).
#[test]
fn rollout_logprobs_equal_a_teacher_forced_pass() -> Result<()> {
    let (model, tok) = lm()?;
    let dev = Device::Cpu;
    let prompts: Vec<Vec<u32>> = ["The quick fox", "A", "Hello there, world of"]
        .iter()
        .map(|p| tok.encode(p))
        .collect::<std::result::Result<_, _>>()?;
    let base = GenerationConfig {
        max_new_tokens: 10,
        temperature: 0.7,
        top_k: 50,
        seed: 11,
        eos_token_id: Some(0),
        ..Default::default()
    };
    // Make row 0's first draw the EOS, so some rows end early.
    let first = rollout(&model, &prompts, &base)?;
    let eos = first.completions[0][0];
    for temperature in [1.0, 0.7] {
        let cfg = GenerationConfig {
            temperature,
            eos_token_id: Some(eos),
            ..base.clone()
        };
        let ro = rollout(&model, &prompts, &cfg)?;
        if temperature == 0.7 {
            assert!(ro.eos[0] && ro.completions[0] == vec![eos]);
        }
        assert!(ro.eos.iter().any(|&e| !e), "{:?}", ro.completions);
        for (c, &e) in ro.completions.iter().zip(&ro.eos) {
            assert_eq!(e, c.last() == Some(&eos));
            assert!(!c[..c.len() - 1].contains(&eos));
            if !e {
                assert_eq!(c.len(), 10);
            }
        }
        let kept = generate_batch(&model, &prompts, &cfg, None, None)?;
        for (a, b) in kept.iter().zip(&ro.completions) {
            assert_eq!(&a.ids, b);
        }
        let tb = TokenBatch::new(&ro.rows(), 0, &dev)?;
        let tf: Vec<f32> = token_logps(&model, &tb, temperature, false, false)?
            .logps
            .to_vec1()?;
        let got = ro.flat_logprobs();
        assert_eq!(tf.len(), got.len());
        // The cached and the full pass compute the same logits z within
        // f32's bound for the model (2 blocks, width 32, 4 heads); a
        // log-prob of z / T errs by at most twice their error over T.
        let (ids, _) = ro.padded(0, &dev)?;
        let t = ids.dims2()?.1;
        let max_logit = model
            .forward_t(&ids, false)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let tol = 2.0 * transformer_abs_tol(2, 32, 4, t, max_logit.into()) / temperature;
        for (a, b) in tf.iter().zip(&got) {
            let d = f64::from((a - b).abs());
            assert!(d <= tol, "T={temperature}: {a} vs {b} ({d:e} > {tol:e})");
        }
        let (ids, mask) = ro.padded(0, &dev)?;
        assert_eq!(
            ids.dims2()?,
            (3, ro.lengths().into_iter().max().unwrap_or(0))
        );
        assert_eq!(mask.sum_all()?.to_scalar::<f32>()? as usize, ro.tokens());
    }
    let bad = GenerationConfig {
        temperature: 0.0,
        ..base
    };
    assert!(rollout(&model, &prompts, &bad)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
    Ok(())
}

fn write_prompts(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("prompts.jsonl");
    let lines: String = ["The fox", "A cat", "Dogs", "Birds sing", "The end"]
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"prompt\": \"{t}\", \"answer\": {i}}}\n"))
        .collect();
    std::fs::write(&p, lines)?;
    Ok(p)
}

fn common(prompts: &Path, lr: f64) -> OnlineArgs {
    OnlineArgs {
        prompts: prompts.to_path_buf(),
        model: fixtures().join("tiny-lm"),
        reward_model: Some(fixtures().join("tiny-reward")),
        prompts_per_iteration: 4,
        iterations: 1,
        generation: GenerationConfig {
            max_new_tokens: 8,
            temperature: 1.0,
            ..Default::default()
        },
        missing_eos_penalty: Some(1.0),
        lr,
        seed: 3,
        ..Default::default()
    }
}

fn opts(path: &Path) -> RunOptions {
    RunOptions::new_run(Some(path)).quiet(true)
}

fn train_lines(run: &Path) -> Result<Vec<MetricRecord>> {
    Ok(read_metrics(&run.join("metrics.jsonl"))?
        .into_iter()
        .filter(|r| r.split == "train")
        .collect())
}

fn metric(r: &MetricRecord, k: &str) -> f64 {
    r.values
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no metric {k}"))
}

fn checkpoint(run: &Path, part: &str) -> Result<HashMap<String, Vec<f32>>> {
    let (t, _) = kiln_core::checkpoint::read_tensors(
        &run.join("checkpoints/last.safetensors"),
        &Device::Cpu,
    )?;
    let prefix = format!("parts.{part}.vars.");
    let mut out = HashMap::new();
    for (k, v) in t {
        if let Some(name) = k.strip_prefix(&prefix) {
            out.insert(
                name.to_string(),
                v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
        }
    }
    Ok(out)
}

fn weights_of(dir: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let (_, vs) = trainable_lm(&ModelFiles::from_dir(dir)?, &Device::Cpu, 0)?;
    vs.tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

fn all_changed(before: &HashMap<String, Vec<f32>>, after: &HashMap<String, Vec<f32>>) {
    assert!(!before.is_empty());
    for (k, v) in before {
        let a = after
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing after training"));
        assert!(a != v, "{k} did not change");
    }
}

/// GRPO: the first update's ratio is exactly 1 (so nothing is clipped),
/// TRL's metrics are logged, and one iteration of two updates (β > 0, a
/// frozen reference) changes every parameter.
#[test]
fn grpo_first_update_invariants_and_every_parameter_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prompts = write_prompts(dir.path())?;
    for (loss_type, scale, beta, iters) in [
        (GrpoLossType::Grpo, ScaleRewards::Group, 0.04, 2),
        (GrpoLossType::Dapo, ScaleRewards::Batch, 0.0, 1),
        (GrpoLossType::DrGrpo, ScaleRewards::None, 0.0, 1),
    ] {
        let run = dir.path().join(format!("grpo-{loss_type:?}"));
        let cfg = GrpoConfig {
            common: common(&prompts, 1e-3),
            num_generations: 4,
            loss_type,
            scale_rewards: scale,
            beta,
            epsilon_high: Some(0.28),
            num_iterations: iters,
            ..Default::default()
        };
        let rep = train_grpo(&cfg, &Device::Cpu, &opts(&run), &Control::default())?;
        assert!(rep.model_dir.is_some() && !rep.interrupted);
        let lines = train_lines(&run)?;
        let r = &lines[0];
        assert_eq!(metric(r, "ratio/first_max_dev"), 0.0);
        assert_eq!(metric(r, "ratio/first_mean"), 1.0);
        for k in [
            "reward",
            "reward_std",
            "rewards/reward_model/mean",
            "rewards/reward_model/std",
            "frac_reward_zero_std",
            "entropy",
            "completions/mean_length",
            "completions/min_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
            "time/rollout",
            "time/update",
        ] {
            assert!(metric(r, k).is_finite(), "{k}");
        }
        if iters == 1 {
            assert_eq!(metric(r, "clip_ratio/region_mean"), 0.0);
        }
        if beta > 0.0 {
            assert!(metric(r, "kl") >= 0.0);
        }
        all_changed(
            &weights_of(&fixtures().join("tiny-lm"))?,
            &checkpoint(&run, "policy")?,
        );
    }
    Ok(())
}

/// RLOO: the KL folded into the reward is exactly 0 while the policy equals
/// its reference, the first update's ratio is exactly 1, and every
/// parameter changes.
#[test]
fn rloo_first_update_invariants_and_every_parameter_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prompts = write_prompts(dir.path())?;
    let run = dir.path().join("rloo");
    let cfg = RlooConfig {
        common: common(&prompts, 1e-3),
        num_generations: 4,
        ..Default::default()
    };
    train_rloo(&cfg, &Device::Cpu, &opts(&run), &Control::default())?;
    let r = &train_lines(&run)?[0];
    assert_eq!(metric(r, "kl"), 0.0);
    assert_eq!(metric(r, "ratio/first_max_dev"), 0.0);
    all_changed(
        &weights_of(&fixtures().join("tiny-lm"))?,
        &checkpoint(&run, "policy")?,
    );
    Ok(())
}

/// PPO with a separate value model and with a value head: on the first
/// minibatch the ratio is exactly 1, nothing is clipped and the KL to the
/// (equal) reference is 0; TRL's metrics are logged; every parameter of
/// the policy and of the value model changes.
#[test]
fn ppo_first_minibatch_invariants_and_every_parameter_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prompts = write_prompts(dir.path())?;
    for (kind, est) in [
        (ValueModelKind::Separate, KlEstimator::K1),
        (ValueModelKind::Head, KlEstimator::K3),
    ] {
        let run = dir.path().join(format!("ppo-{kind:?}"));
        let cfg = PpoConfig {
            common: common(&prompts, 1e-3),
            value_model: kind,
            kl_estimator: est,
            num_ppo_epochs: 2,
            num_mini_batches: 2,
            ..Default::default()
        };
        train_ppo(&cfg, &Device::Cpu, &opts(&run), &Control::default())?;
        let r = &train_lines(&run)?[0];
        assert_eq!(metric(r, "ratio/first_max_dev"), 0.0);
        assert_eq!(metric(r, "policy/first_clipfrac"), 0.0);
        assert_eq!(metric(r, "objective/kl"), 0.0);
        assert_eq!(metric(r, "objective/non_score_reward"), 0.0);
        for k in [
            "objective/entropy",
            "objective/rlhf_reward",
            "objective/scores",
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "policy/entropy_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "val/clipfrac_avg",
            "val/ratio",
            "val/ratio_var",
            "val/num_eos_tokens",
            "lr",
            "episode",
        ] {
            assert!(metric(r, k).is_finite(), "{k}");
        }
        assert_eq!(metric(r, "episode"), 4.0);
        let policy = checkpoint(&run, "policy")?;
        all_changed(&weights_of(&fixtures().join("tiny-lm"))?, &policy);
        match kind {
            ValueModelKind::Separate => {
                let (_, vs) =
                    kiln_rlhf::RewardModel::load(&fixtures().join("tiny-reward"), &Device::Cpu, 0)?;
                let before: HashMap<String, Vec<f32>> = vs
                    .tensors()
                    .into_iter()
                    .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
                    .collect::<Result<_>>()?;
                all_changed(&before, &checkpoint(&run, "value")?);
            }
            ValueModelKind::Head => {
                assert!(policy["v_head.weight"].iter().any(|&x| x != 0.0));
            }
        }
    }
    Ok(())
}

/// GRPO raises a rule-based reward (the share of a chosen token in the
/// completion) well above where the random policy starts.
#[test]
fn grpo_learns_a_rule_based_reward() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prompts = write_prompts(dir.path())?;
    let (_, tok) = lm()?;
    let target = tok.encode(" the")?[0];
    let share = FnReward::new("share", move |x: &RewardInput<'_>| {
        x.completion_ids
            .iter()
            .map(|c| c.iter().filter(|&&t| t == target).count() as f64 / c.len().max(1) as f64)
            .collect()
    });
    let set = RewardSet::new().with(share, 1.0);
    let run = dir.path().join("learn");
    let cfg = GrpoConfig {
        common: OnlineArgs {
            reward_model: None,
            reward_funcs: vec![RewardSpec {
                name: "lexicon".into(),
                weight: 1.0,
            }],
            iterations: 25,
            prompts_per_iteration: 2,
            missing_eos_penalty: None,
            ..common(&prompts, 2e-2)
        },
        num_generations: 8,
        ..Default::default()
    };
    train_grpo_with(
        &cfg,
        Some(&set),
        &Device::Cpu,
        &opts(&run),
        &Control::default(),
    )?;
    let lines = train_lines(&run)?;
    let mean =
        |r: &[MetricRecord]| r.iter().map(|x| metric(x, "reward")).sum::<f64>() / r.len() as f64;
    let (start, end) = (mean(&lines[..5]), mean(&lines[lines.len() - 5..]));
    assert!(
        end > start + 0.3,
        "reward {start:.3} -> {end:.3} (rewards/share/mean logged: {})",
        metric(&lines[0], "rewards/share/mean")
    );
    Ok(())
}

/// Bad settings are refused with the field named.
#[test]
fn bad_settings_name_the_field() {
    let mut cfg = GrpoConfig {
        num_generations: 1,
        ..Default::default()
    };
    cfg.common.prompts = "p.jsonl".into();
    cfg.common.model = "m".into();
    cfg.common.reward_model = Some("r".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("num_generations"), "{e}");
    cfg.num_generations = 4;
    cfg.common.reward_funcs = vec![RewardSpec {
        name: "nope".into(),
        weight: 1.0,
    }];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("reward_funcs[0].name") && e.contains("nope"),
        "{e}"
    );
    let mut p = PpoConfig {
        common: cfg.common.clone(),
        ..Default::default()
    };
    p.common.reward_funcs.clear();
    p.common.reward_model = None;
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("reward_model"), "{e}");
}

/// The arithmetic task end to end at toy size: pretraining, accuracy on the
/// whole table before and after GRPO, results.json; a second run into the
/// same folder is refused without `overwrite`.
#[test]
fn arithmetic_task_pipeline() -> Result<()> {
    use kiln_rlhf::arith::{run_arithmetic, ArithConfig};
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("arith");
    let mut cfg = ArithConfig {
        eval_samples: 3,
        ..common::toy_arith(1)
    };
    cfg.grpo.common.iterations = 2;
    cfg.grpo.common.prompts_per_iteration = 2;
    let rep = run_arithmetic(&cfg, &Device::Cpu, &out, false, true)?;
    assert_eq!(rep.iterations, 2);
    for a in [rep.before, rep.after] {
        // 16 problems in the 0..=3 table: greedy accuracy is a multiple of
        // 1/16, sampled (3 per problem) of 1/48.
        for (x, n) in [(a.sampled, 48.0), (a.greedy, 16.0)] {
            assert!((0.0..=1.0).contains(&x) && (x * n - (x * n).round()).abs() < 1e-9);
        }
    }
    assert!(rep.summary().contains("3 per problem"), "{}", rep.summary());
    assert!(
        out.join("results.json").is_file() && out.join("grpo/model/model.safetensors").is_file()
    );
    assert!(rep.summary().contains("exact-answer accuracy"));
    assert!(run_arithmetic(&cfg, &Device::Cpu, &out, false, true).is_err());
    let none = ArithConfig {
        eval_samples: 0,
        ..cfg
    };
    let err = run_arithmetic(&none, &Device::Cpu, &dir.path().join("none"), false, true)
        .expect_err("eval_samples 0 is refused");
    assert!(err.to_string().contains("eval_samples"), "{err}");
    Ok(())
}
