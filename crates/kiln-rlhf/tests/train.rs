//! The DPO and reward trainers on the tiny random GPT-2 of `tests/fixtures`:
//! step-0 invariants (dropout off), every parameter reached, accumulation
//! equal to one big batch (per-token terms included), exact resume, and that
//! training moves the metrics the right way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_core::run::{read_metrics, MetricRecord, RunOptions};
use kiln_core::tolerance::transformer_abs_tol;
use kiln_core::{DType, Device};
use kiln_lm::ModelFiles;
use kiln_rlhf::dpo::{train_dpo_with, Control, DpoConfig};
use kiln_rlhf::logps::pair_logps;
use kiln_rlhf::loss::{dpo_loss, DpoLossConfig, DpoLossType, LossScale};
use kiln_rlhf::models::{frozen_copy, trainable_lm};
use kiln_rlhf::prefs::PairEncoder;
use kiln_rlhf::reward_train::{train_reward_with, RewardConfig};
use kiln_rlhf::train::{Optim, TrainingArgs};
use kiln_rlhf::RewardModel;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lm() -> PathBuf {
    fixtures().join("tiny-lm")
}

/// 16 short pairs (4 prompts x 4 completions) in TRL's standard form, with
/// margins on every other pair.
fn write_prefs(dir: &Path) -> Result<PathBuf> {
    let prompts = [
        "The film was",
        "I think",
        "The fox",
        "What color is the sky?",
    ];
    let good = [" great", " a great film", " I loved it!", " It is blue."];
    let bad = [
        " terrible plot",
        " boring acting",
        " I want my money back.",
        " It is green.",
    ];
    let mut s = String::new();
    for (i, p) in prompts.iter().enumerate() {
        for j in 0..4 {
            let mut v = serde_json::json!({
                "prompt": p, "chosen": good[j], "rejected": bad[(i + j) % 4]
            });
            if (i + j) % 2 == 0 {
                v["margin"] = serde_json::json!(0.25 * j as f64);
            }
            s.push_str(&v.to_string());
            s.push('\n');
        }
    }
    let path = dir.join("prefs.jsonl");
    std::fs::write(&path, s)?;
    Ok(path)
}

fn dpo_cfg(prefs: &Path, loss: DpoLossConfig, train: TrainingArgs) -> DpoConfig {
    DpoConfig {
        prefs: prefs.to_path_buf(),
        model: lm(),
        loss,
        train,
        ..Default::default()
    }
}

fn args(batch_size: usize, grad_accum: usize, lr: f64) -> TrainingArgs {
    TrainingArgs {
        batch_size,
        grad_accum,
        lr,
        eval_fraction: 0.25,
        seed: 3,
        ..TrainingArgs::with_lr(lr)
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
        .unwrap_or(f64::NAN)
}

/// The checkpoint's tensors of part `part` (variables, and optimizer state
/// with `all`).
fn checkpoint(run: &Path, part: &str, all: bool) -> Result<HashMap<String, Vec<f32>>> {
    let (t, _) = kiln_core::checkpoint::read_tensors(
        &run.join("checkpoints/last.safetensors"),
        &Device::Cpu,
    )?;
    let prefix = format!("parts.{part}.vars.");
    let mut out = HashMap::new();
    for (k, v) in t {
        let keep = if all {
            k.starts_with(&format!("parts.{part}."))
        } else {
            k.starts_with(&prefix)
        };
        if keep {
            let name = k.strip_prefix(&prefix).unwrap_or(&k).to_string();
            out.insert(
                name,
                v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
        }
    }
    Ok(out)
}

fn start_weights() -> Result<HashMap<String, Vec<f32>>> {
    let (_, vs) = trainable_lm(&ModelFiles::from_dir(&lm())?, &Device::Cpu, 0)?;
    vs.tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// At step 0 the policy is its reference: sigmoid and robust DPO give ln 2,
/// hinge and apo_zero 1, IPO 1/(4β²); the rewards and margins are 0 and no
/// pair is counted as correct. With a frozen reference the log-ratios are
/// exactly 0; precomputed ones come from other batch shapes (f32 rounding).
#[test]
fn step_zero_invariants() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let prefs = write_prefs(dir.path())?;
    let cases = [
        (DpoLossType::Sigmoid, 0.1, 0.0),
        (DpoLossType::Robust, 0.1, 0.2),
        (DpoLossType::Hinge, 0.1, 0.0),
        (DpoLossType::Ipo, 0.1, 0.0),
        (DpoLossType::Ipo, 0.5, 0.0),
        (DpoLossType::ApoZero, 0.1, 0.0),
    ];
    for (i, (ty, beta, eps)) in cases.into_iter().enumerate() {
        for pre in [false, true] {
            let loss = DpoLossConfig {
                loss_type: vec![ty],
                beta,
                label_smoothing: eps,
                ..Default::default()
            };
            let mut cfg = dpo_cfg(&prefs, loss, args(4, 1, 1e-3));
            cfg.precompute_ref_log_probs = pre;
            let run = dir.path().join(format!("run{i}-{pre}"));
            let rep = train_dpo_with(
                &cfg,
                &Device::Cpu,
                &opts(&run),
                &Control { stop_at: Some(1) },
            )?;
            assert!(rep.interrupted);
            let first = &train_lines(&run)?[0];
            let want = ty.value_at_reference(beta, 0.0);
            let got = metric(first, "loss");
            assert!(
                (got - want).abs() < 1e-5 * want,
                "{ty} beta {beta}: {got} vs {want}"
            );
            let tol = if pre { 1e-5 } else { 0.0 };
            for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
                assert!(
                    metric(first, k).abs() <= tol,
                    "{ty} {k} = {}",
                    metric(first, k)
                );
            }
            if !pre {
                assert_eq!(metric(first, "rewards/accuracies"), 0.0);
            }
            assert_eq!(pre, run.join("ref_logps.safetensors").is_file());
        }
    }
    Ok(())
}

/// Every trainable tensor gets a non-zero gradient from the DPO loss at the
/// reference, and changes in the first optimizer step.
#[test]
fn every_parameter_gets_a_gradient_and_changes() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let prefs = write_prefs(dir.path())?;
    let (policy, vs) = trainable_lm(&ModelFiles::from_dir(&lm())?, &dev, 0)?;
    let reference = frozen_copy(policy.config(), &vs, &dev)?;
    let tok = kiln_lm::Gpt2Tokenizer::from_file(&lm().join("tokenizer.json"))?;
    let data = PairEncoder::new(&tok, None, 64).read(&prefs)?;
    let pairs: Vec<_> = data.pairs.iter().take(6).collect();
    let p = pair_logps(&policy, &pairs, 0, false)?;
    let r = pair_logps(&reference, &pairs, 0, false)?;
    let out = dpo_loss(
        &DpoLossConfig::default(),
        &p.logps,
        &r.logps.chosen,
        &r.logps.rejected,
        &LossScale::of_batch(&p.logps)?,
    )?;
    let grads = out.loss.backward()?;
    for (name, v) in vs.vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n > 0.0, "{name}: zero gradient");
    }
    let run = dir.path().join("run");
    let cfg = dpo_cfg(&prefs, DpoLossConfig::default(), args(4, 1, 1e-3));
    train_dpo_with(&cfg, &dev, &opts(&run), &Control { stop_at: Some(1) })?;
    let before = start_weights()?;
    let after = checkpoint(&run, "policy", false)?;
    assert_eq!(before.len(), after.len());
    for (k, v) in &before {
        assert!(after[k] != *v, "{k} did not change");
    }
    Ok(())
}

/// One optimizer step over 4 pairs as 1 x 4, 2 x 2 and 4 x 1 micro-batches
/// gives the same update (SGD, so the update is the gradient), with the
/// per-token terms (IPO's per-completion normalisation, sft's mean over the
/// step's chosen tokens) and the reward model's centring term.
#[test]
fn accumulation_equals_one_big_batch() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let prefs = write_prefs(dir.path())?;
    let loss = DpoLossConfig {
        loss_type: vec![DpoLossType::Sigmoid, DpoLossType::Ipo, DpoLossType::Sft],
        loss_weights: Some(vec![1.0, 0.5, 0.3]),
        ..Default::default()
    };
    let start = start_weights()?;
    let mut deltas = Vec::new();
    let mut losses = Vec::new();
    for (b, k) in [(4, 1), (2, 2), (1, 4)] {
        let mut a = args(b, k, 0.5);
        a.optim = Optim::Sgd;
        a.max_grad_norm = 0.0;
        let run = dir.path().join(format!("dpo-{b}x{k}"));
        train_dpo_with(
            &dpo_cfg(&prefs, loss.clone(), a),
            &dev,
            &opts(&run),
            &Control { stop_at: Some(1) },
        )?;
        let after = checkpoint(&run, "policy", false)?;
        let d: Vec<f32> = start
            .iter()
            .flat_map(|(n, v)| {
                v.iter()
                    .zip(&after[n])
                    .map(|(x, y)| y - x)
                    .collect::<Vec<_>>()
            })
            .collect();
        deltas.push(d);
        losses.push(metric(&train_lines(&run)?[0], "loss"));
    }
    let scale = deltas[0].iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1e-4, "the step barely moved the model ({scale})");
    // One batch of 4 against micro-batches: the same gradients summed in
    // another order, within f32's bound for the model (2 blocks, width 32,
    // 4 heads, at most 64 positions) on the scale of the step and the loss.
    let dtol = transformer_abs_tol(2, 32, 4, 64, scale.into()) as f32;
    let ltol = transformer_abs_tol(2, 32, 4, 64, losses[0].abs());
    for (i, d) in deltas.iter().enumerate().skip(1) {
        let err = d
            .iter()
            .zip(&deltas[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= dtol,
            "micro-batching {i}: max difference {err} (scale {scale}, tolerance {dtol:e})"
        );
        assert!(
            (losses[i] - losses[0]).abs() <= ltol,
            "{losses:?} (tolerance {ltol:e})"
        );
    }
    // The reward model: margins and centring, 1 x 4 against 2 x 2.
    let mut rdeltas: Vec<HashMap<String, Vec<f32>>> = Vec::new();
    for (b, k) in [(4, 1), (2, 2)] {
        let mut a = args(b, k, 0.5);
        a.optim = Optim::Sgd;
        a.max_grad_norm = 0.0;
        let cfg = RewardConfig {
            prefs: prefs.clone(),
            model: lm(),
            center_rewards_coefficient: Some(0.1),
            train: a,
            ..Default::default()
        };
        let run = dir.path().join(format!("rm-{b}x{k}"));
        train_reward_with(&cfg, &dev, &opts(&run), &Control { stop_at: Some(1) })?;
        rdeltas.push(checkpoint(&run, "reward", false)?);
    }
    let (fresh, _) = RewardModel::from_lm(&lm(), &dev, 3)?;
    let w0 = fresh.score_weight().flatten_all()?.to_vec1::<f32>()?;
    let d0: Vec<f32> = rdeltas[0]["score.weight"]
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    let d1: Vec<f32> = rdeltas[1]["score.weight"]
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    let s = d0.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(s > 1e-4);
    let tol = transformer_abs_tol(2, 32, 4, 64, s.into()) as f32;
    for (a, b) in d0.iter().zip(&d1) {
        assert!(
            (a - b).abs() <= tol,
            "reward head: {a} vs {b} (tolerance {tol:e})"
        );
    }
    Ok(())
}

/// A run stopped after 4 of its 6 steps (mid-epoch) and resumed ends with
/// the same parameters, optimizer state, metrics and model as an
/// uninterrupted one: DPO with precomputed reference log-probs (read back
/// from the run folder) and the reward trainer (whose token count rides in
/// the session's cursor).
#[test]
fn resumed_runs_equal_uninterrupted_ones() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let prefs = write_prefs(dir.path())?;
    let mut a = args(2, 2, 1e-3);
    a.epochs = 2;
    let mut dpo = dpo_cfg(&prefs, DpoLossConfig::default(), a.clone());
    dpo.precompute_ref_log_probs = true;
    let rm = RewardConfig {
        prefs: prefs.clone(),
        model: lm(),
        train: a,
        ..Default::default()
    };
    for (name, part) in [("dpo", "policy"), ("reward", "reward")] {
        let go = |run: &Path, o: &RunOptions, stop: Option<u64>| -> Result<bool> {
            let c = Control { stop_at: stop };
            Ok(if name == "dpo" {
                train_dpo_with(&dpo, &dev, o, &c)?.interrupted
            } else {
                train_reward_with(&rm, &dev, o, &c)?.interrupted
            } && run.exists())
        };
        let straight = dir.path().join(format!("{name}-straight"));
        assert!(!go(&straight, &opts(&straight), None)?);
        let cut = dir.path().join(format!("{name}-cut"));
        assert!(go(&cut, &opts(&cut), Some(4))?);
        assert_eq!(train_lines(&cut)?.len(), 4);
        let resume = RunOptions::resume(&cut).quiet(true);
        assert!(!go(&cut, &resume, None)?);
        assert_eq!(
            checkpoint(&straight, part, true)?,
            checkpoint(&cut, part, true)?
        );
        assert_eq!(
            std::fs::read_to_string(straight.join("metrics.jsonl"))?,
            std::fs::read_to_string(cut.join("metrics.jsonl"))?
        );
        let saved = |run: &Path| -> Result<Vec<(String, Vec<f32>)>> {
            let t = candle_core::safetensors::load(run.join("model/model.safetensors"), &dev)?;
            let mut v: Vec<(String, Vec<f32>)> = t
                .into_iter()
                .map(|(k, x)| Ok((k, x.flatten_all()?.to_vec1::<f32>()?)))
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(v)
        };
        let (a, b) = (saved(&straight)?, saved(&cut)?);
        for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb);
            assert!(va == vb, "{name}: saved {ka} differs");
        }
        let lines = read_metrics(&cut.join("metrics.jsonl"))?;
        assert_eq!(lines.iter().filter(|r| r.split == "eval").count(), 2);
    }
    Ok(())
}

/// Training moves the metrics the right way on separable pairs: DPO's
/// reward margin and accuracy rise above 0, the reward model separates the
/// training pairs; TRL's metric names are logged; the reward folder loads.
#[test]
fn training_learns_the_preferences() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let prefs = write_prefs(dir.path())?;
    let mut a = args(4, 1, 5e-3);
    a.epochs = 3;
    let run = dir.path().join("dpo");
    let rep = train_dpo_with(
        &dpo_cfg(&prefs, DpoLossConfig::default(), a.clone()),
        &dev,
        &opts(&run),
        &Control::default(),
    )?;
    assert!(rep.train["rewards/margins"] > 0.0, "{:?}", rep.train);
    assert!(rep.train["rewards/accuracies"] > 0.5, "{:?}", rep.train);
    assert!(
        rep.train["loss"] < std::f64::consts::LN_2,
        "{:?}",
        rep.train
    );
    let lines = train_lines(&run)?;
    let names: Vec<&str> = lines[0].values.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_norm",
        "learning_rate",
    ] {
        assert!(names.contains(&k), "{k} missing from {names:?}");
    }
    assert!(run.join("model/model.safetensors").is_file() && run.join("loss.png").is_file());
    let run = dir.path().join("rm");
    let cfg = RewardConfig {
        prefs: prefs.clone(),
        model: lm(),
        center_rewards_coefficient: Some(0.01),
        train: a,
        ..Default::default()
    };
    let rep = train_reward_with(&cfg, &dev, &opts(&run), &Control::default())?;
    assert!(rep.train["accuracy"] > 0.8, "{:?}", rep.train);
    let eval = rep.eval.clone().unwrap_or_default();
    for k in [
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
        "num_tokens",
    ] {
        assert!(eval.contains_key(k), "{k} missing from {eval:?}");
    }
    let (back, _) = RewardModel::load(&run.join("model"), &dev, 0)?;
    let s = back.score_all(&[vec![5, 6, 7]], 1)?;
    assert!(s[0].is_finite());
    // Bad settings are refused before any folder is made.
    let bad = RewardConfig {
        center_rewards_coefficient: Some(-1.0),
        ..cfg
    };
    let nowhere = dir.path().join("never");
    let e = train_reward_with(&bad, &dev, &opts(&nowhere), &Control::default()).unwrap_err();
    assert!(e.to_string().contains("center_rewards_coefficient"), "{e}");
    assert!(!nowhere.exists());
    Ok(())
}
