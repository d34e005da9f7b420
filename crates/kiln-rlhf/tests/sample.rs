//! Sampling, best-of-n, reward-weighted fine-tuning and the experiment's
//! pipeline on the tiny random models of `tests/fixtures`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_core::run::{read_metrics, RunOptions};
use kiln_core::tolerance::{f32_abs_tol_tight, transformer_abs_tol};
use kiln_core::Device;
use kiln_lm::{GenerationConfig, Gpt2Tokenizer, ModelFiles};
use kiln_prompt::ChatTemplate;
use kiln_rlhf::dpo::Control;
use kiln_rlhf::experiment::{run_experiment, ExperimentConfig};
use kiln_rlhf::logps::{completion_logps, CompletionBatch};
use kiln_rlhf::models::{frozen_from, load_weights};
use kiln_rlhf::sample::{
    best_of_n, best_of_n_kl, read_prompts, sample_completions, softmax_weights, train_rwft,
    weighted_nll, RewardScorer, RwftConfig,
};
use kiln_rlhf::train::TrainingArgs;
use kiln_rlhf::RewardModel;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lm() -> Result<(kiln_lm::Gpt2, Gpt2Tokenizer)> {
    let files = ModelFiles::from_dir(&fixtures().join("tiny-lm"))?;
    let tok = files.load_tokenizer()?;
    let (cfg, w) = load_weights(&files, &Device::Cpu)?;
    Ok((frozen_from(&cfg, w, &Device::Cpu)?, tok))
}

#[test]
fn prompts_read_from_jsonl_text_and_chat() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let j = dir.path().join("p.jsonl");
    std::fs::write(
        &j,
        "{\"prompt\": \"The fox\"}\n\n{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    )?;
    let chat = ChatTemplate::chatml();
    let p = read_prompts(&j, Some(&chat))?;
    assert_eq!(p[0], "The fox");
    assert_eq!(
        p[1],
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let e = read_prompts(&j, None).unwrap_err().to_string();
    assert!(
        e.contains("p.jsonl:3:") && e.contains("chat template"),
        "{e}"
    );
    let t = dir.path().join("p.txt");
    std::fs::write(&t, "one\n\ntwo\n")?;
    assert_eq!(read_prompts(&t, None)?, vec!["one", "two"]);
    // A byte order mark is not part of the first prompt.
    std::fs::write(&t, "\u{feff}one\ntwo\n")?;
    assert_eq!(read_prompts(&t, None)?, vec!["one", "two"]);
    std::fs::write(&j, "{\"text\": 1}\n")?;
    assert!(read_prompts(&j, None)
        .unwrap_err()
        .to_string()
        .contains("p.jsonl:1:"));
    Ok(())
}

/// softmax(r / τ): positive, summing to 1, unchanged by shifting the rewards,
/// greedier as τ shrinks.
#[test]
fn reward_weights_are_a_tempered_softmax() {
    let w = softmax_weights(&[1.0, 2.0, 3.0], 1.0);
    let e = [1f64.exp(), 2f64.exp(), 3f64.exp()];
    let s: f64 = e.iter().sum();
    for (a, b) in w.iter().zip(e) {
        assert!((a - b / s).abs() < 1e-12);
    }
    let shifted = softmax_weights(&[101.0, 102.0, 103.0], 1.0);
    for (a, b) in w.iter().zip(&shifted) {
        assert!((a - b).abs() < 1e-6);
    }
    let greedy = softmax_weights(&[1.0, 2.0, 3.0], 0.01);
    assert!(greedy[2] > 0.999);
    assert!((best_of_n_kl(1)).abs() < 1e-12);
    assert!((best_of_n_kl(4) - (4f64.ln() - 0.75)).abs() < 1e-12);
}

/// n samples per prompt in one batched call: they differ, are reproducible
/// from the seed, and best-of-n keeps the one the reward model scores highest.
#[test]
fn best_of_n_keeps_the_highest_scored_sample() -> Result<()> {
    let dev = Device::Cpu;
    let (model, tok) = lm()?;
    let (rm, _) = RewardModel::load(&fixtures().join("tiny-reward"), &dev, 0)?;
    let prompts = vec!["The fox".to_string(), "What color is the sky?".to_string()];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 5,
        ..Default::default()
    };
    let g = sample_completions(&model, &tok, &prompts, 4, &cfg, 2)?;
    assert_eq!((g.len(), g[0].len()), (2, 4));
    let ids: Vec<&Vec<u32>> = g[0].iter().map(|x| &x.ids).collect();
    assert!(
        ids.iter().any(|x| *x != ids[0]),
        "4 samples of one prompt are all equal"
    );
    let again = sample_completions(&model, &tok, &prompts, 4, &cfg, 2)?;
    assert_eq!(g[1][3].ids, again[1][3].ids);
    let scorer = RewardScorer {
        model: &rm,
        tokenizer: &tok,
    };
    let b = best_of_n(&model, &tok, &scorer, &prompts, 4, &cfg, 2)?;
    for r in &b {
        assert_eq!(r.candidates.len(), 4);
        let max = r
            .candidates
            .iter()
            .map(|c| c.reward)
            .fold(f32::MIN, f32::max);
        assert_eq!(r.best().map(|c| c.reward), Some(max));
        // Scores are the reward model's on prompt + completion + EOS.
        let again = scorer.score(&r.prompt, &[r.candidates[0].text.clone()], 1)?;
        // Alone and in a batch of 2: f32's bound for the reward model (2
        // blocks, width 32, 4 heads, at most 64 positions) at its score.
        let (a, b) = (again[0], r.candidates[0].reward);
        let tol = transformer_abs_tol(2, 32, 4, 64, f64::from(a.abs().max(b.abs())));
        assert!(
            f64::from((a - b).abs()) <= tol,
            "{a} vs {b} (tolerance {tol:e})"
        );
    }
    Ok(())
}

/// The weighted loss is `-Σ w log π(y|x) / Σ w |y|`: with all the weight on
/// one row, that row's mean token NLL.
#[test]
fn weighted_nll_is_the_weighted_token_mean() -> Result<()> {
    let (model, _) = lm()?;
    let rows: Vec<(&[u32], &[u32])> = vec![(&[5, 6], &[7, 8, 9]), (&[10], &[11, 12])];
    let b = CompletionBatch::new(&rows, 0, &Device::Cpu)?;
    let lp = completion_logps(&model, &b, false)?
        .logps
        .to_vec1::<f32>()?;
    let one = weighted_nll(&model, &rows, &[0.0, 1.0], 0, false)?.to_scalar::<f32>()?;
    // The same log-probs on both paths, then weighted sums over the 2 rows
    // and a division: a few roundings of values up to |lp|.
    let mag = f64::from(lp[0].abs() + lp[1].abs());
    let tol = f32_abs_tol_tight(4, mag) as f32;
    assert!(
        (one - (-lp[1] / 2.0)).abs() <= tol,
        "{one} vs {}",
        -lp[1] / 2.0
    );
    let both = weighted_nll(&model, &rows, &[0.25, 0.75], 0, false)?.to_scalar::<f32>()?;
    let want = -(0.25 * lp[0] + 0.75 * lp[1]) / (0.25 * 3.0 + 0.75 * 2.0);
    assert!((both - want).abs() <= tol, "{both} vs {want}");
    Ok(())
}

/// Reward-weighted fine-tuning on the session's iteration loop: a run
/// stopped after 2 of 4 iterations and resumed equals an uninterrupted one
/// (the prompt cursor and the per-iteration sampling seeds are in the
/// checkpoint).
#[test]
fn rwft_resumes_exactly() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "The fox\nThe film was\nI think\n")?;
    let cfg = RwftConfig {
        prompts,
        model: fixtures().join("tiny-lm"),
        reward_model: fixtures().join("tiny-reward"),
        n: 3,
        prompts_per_iteration: 2,
        iterations: 4,
        generation: GenerationConfig {
            max_new_tokens: 6,
            temperature: 1.0,
            ..Default::default()
        },
        lr: 1e-3,
        ..Default::default()
    };
    let a = dir.path().join("a");
    let ra = train_rwft(
        &cfg,
        &dev,
        &RunOptions::new_run(Some(&a)).quiet(true),
        &Control::default(),
    )?;
    assert!(!ra.interrupted && ra.model_dir.is_some());
    let b = dir.path().join("b");
    let stop = Control { stop_at: Some(2) };
    assert!(
        train_rwft(
            &cfg,
            &dev,
            &RunOptions::new_run(Some(&b)).quiet(true),
            &stop
        )?
        .interrupted
    );
    train_rwft(
        &cfg,
        &dev,
        &RunOptions::resume(&b).quiet(true),
        &Control::default(),
    )?;
    assert_eq!(
        std::fs::read_to_string(a.join("metrics.jsonl"))?,
        std::fs::read_to_string(b.join("metrics.jsonl"))?
    );
    let recs = read_metrics(&a.join("metrics.jsonl"))?;
    assert_eq!(recs.len(), 4);
    for k in ["loss", "reward", "reward_std", "completions/mean_length"] {
        assert!(recs[0].values.iter().any(|(n, _)| n == k), "{k}");
    }
    let load = |p: &Path| -> Result<Vec<f32>> {
        let t = candle_core::safetensors::load(p.join("model/model.safetensors"), &dev)?;
        Ok(t["transformer.h.0.mlp.c_fc.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    assert_eq!(load(&a)?, load(&b)?);
    Ok(())
}

/// The experiment's whole pipeline at toy size (quality is the experiment's
/// own business): every stage runs and writes its table, JSON and frontier.
#[test]
fn experiment_pipeline_runs_end_to_end() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("exp");
    let d = ExperimentConfig::quick();
    let cfg = ExperimentConfig {
        reviews: 300,
        lm: kiln_lm::train::TrainConfig {
            vocab_size: 400,
            block_size: 32,
            n_layer: 1,
            n_embd: 48,
            n_head: 2,
            epochs: 3,
            ..d.lm.clone()
        },
        pairs: 48,
        eval_subjects: 2,
        eval_samples: 2,
        max_new_tokens: 8,
        reward: TrainingArgs {
            epochs: 1,
            ..d.reward.clone()
        },
        dpo: TrainingArgs {
            epochs: 1,
            ..d.dpo.clone()
        },
        dpo_betas: vec![0.1, 0.5],
        best_of: 2,
        rwft_n: 2,
        rwft_iterations: 2,
        rwft_prompts: 2,
        online_iterations: 2,
        online_prompts: 2,
        ..d
    };
    let rep = run_experiment(&cfg, &Device::Cpu, &out, false, true)?;
    let names: Vec<&str> = rep.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "base",
            "dpo β=0.1",
            "dpo β=0.5",
            "best-of-2",
            "rwft τ=0.5",
            "grpo",
            "rloo",
            "ppo"
        ]
    );
    // The base model against itself: generation's KV-cached log-probs and the
    // full forward agree.
    assert!(rep.methods[0].kl.abs() < 1e-4, "{}", rep.methods[0].kl);
    for f in [
        "results.md",
        "results.json",
        "frontier.png",
        "prefs.jsonl",
        "lm/model/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read_to_string(out.join("results.md"))?.contains("| best-of-2 |"));
    // A second run into the same folder is refused without --overwrite.
    assert!(run_experiment(&cfg, &Device::Cpu, &out, false, true).is_err());
    Ok(())
}
