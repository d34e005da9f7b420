//! GPT-2 against Hugging Face transformers on a tiny random model whose folder was
//! written by transformers + tokenizers (`tests/fixtures/make_gpt2_fixture.py`).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::PathBuf;

use kiln_core::tolerance::{f32_abs_tol, transformer_abs_tol};
use kiln_core::{Device, Tensor};
use kiln_lm::{generate_batch, GenerationConfig, Gpt2, ModelFiles};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model(dir: &str) -> Gpt2 {
    Gpt2::load(&fixtures().join(dir), &Device::Cpu).unwrap()
}

/// The fixture's model: 2 blocks of width 32, 4 heads, a vocabulary of 320,
/// at most 6 positions per row here.
const N_LAYER: usize = 2;
const D: usize = 32;
const VOCAB: usize = 320;

/// The tolerance for a logit of magnitude up to `max_logit` after `t`
/// positions ([`transformer_abs_tol`]).
fn logit_tol(t: usize, max_logit: f64) -> f64 {
    transformer_abs_tol(N_LAYER, D, 4, t, max_logit)
}

/// The largest |logit| of the reference.
fn max_logit(e: &Value) -> f64 {
    e["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().abs())
        .fold(0.0, f64::max)
}

fn check_logits(m: &Gpt2, e: &Value) {
    let rows: Vec<Vec<u32>> = e["input_ids"].as_array().unwrap().iter().map(ids).collect();
    let (b, t) = (rows.len(), rows[0].len());
    let x = Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap();
    let got = m
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want: Vec<f32> = e["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // 2 · 10 · √840 · 2⁻²⁴ · √32 · 3.97 ≈ 7.8e-4: a wrong sign, a
    // transposed weight or a missing bias moves logits by O(0.1) or more.
    let tol = logit_tol(t, max_logit(e));
    eprintln!("max |logit diff| {worst:e} (tolerance {tol:e})");
    assert!(
        f64::from(worst) <= tol,
        "max |logit diff| {worst} > {tol:e}"
    );
}

#[test]
fn logits_equal_transformers() {
    check_logits(&model("tiny-gpt2"), &expected());
}

#[test]
fn original_openai_layout_loads_to_the_same_logits() {
    check_logits(&model("legacy-gpt2"), &expected());
}

#[test]
fn tokenizer_json_from_tokenizers_encodes_like_python() {
    let e = expected();
    let files = ModelFiles::from_dir(&fixtures().join("tiny-gpt2")).unwrap();
    let tok = files.load_tokenizer().unwrap();
    for (i, text) in e["texts"].as_array().unwrap().iter().enumerate() {
        let got = tok.encode(text.as_str().unwrap()).unwrap();
        assert_eq!(got, ids(&e["encodings"][i]));
        assert_eq!(tok.decode(&got).unwrap(), e["decoded"][i].as_str().unwrap());
    }
}

#[test]
fn greedy_continuation_equals_transformers_token_for_token() {
    let e = expected();
    let m = model("tiny-gpt2");
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        ignore_eos: true,
        eos_token_id: Some(0),
        ..Default::default()
    };
    let out = generate_batch(&m, &[ids(&e["greedy_prompt"])], &cfg, None, None).unwrap();
    assert_eq!(out[0].ids, ids(&e["greedy_24"]));
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        repetition_penalty: 1.3,
        ..cfg
    };
    let out = generate_batch(&m, &[ids(&e["greedy_prompt"])], &cfg, None, None).unwrap();
    assert_eq!(out[0].ids, ids(&e["greedy_rep13_16"]));
}

#[test]
fn left_padded_batch_equals_transformers_and_single_prompts() {
    let e = expected();
    let m = model("tiny-gpt2");
    let prompts: Vec<Vec<u32>> = e["encodings"].as_array().unwrap().iter().map(ids).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ignore_eos: true,
        eos_token_id: Some(0),
        ..Default::default()
    };
    let batch = generate_batch(&m, &prompts, &cfg, None, None).unwrap();
    // A log-prob, z_y - logsumexp(z), errs by at most twice the logits' error
    // (the logsumexp's is a softmax-weighted mean of theirs), at most
    // prompt + 12 positions in; the logits' scale is the reference's.
    let longest = prompts.iter().map(Vec::len).max().unwrap() + 12;
    let tol = 2.0 * logit_tol(longest, max_logit(&e));
    for (r, want) in e["batched_12"].as_array().unwrap().iter().enumerate() {
        assert_eq!(batch[r].ids, ids(want), "row {r}");
        let single = generate_batch(&m, &prompts[r..=r], &cfg, None, None).unwrap();
        assert_eq!(single[0].ids, batch[r].ids, "row {r} alone");
        for (a, b) in single[0].logprobs.iter().zip(&batch[r].logprobs) {
            assert!(
                f64::from((a - b).abs()) <= tol,
                "row {r}: {a} vs {b} (tol {tol:e})"
            );
        }
    }
}

#[test]
fn training_loss_equals_transformers() {
    let e = expected();
    let m = model("tiny-gpt2");
    let rows: Vec<Vec<u32>> = e["input_ids"].as_array().unwrap().iter().map(ids).collect();
    let (b, t) = (rows.len(), rows[0].len());
    let x = Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap();
    let loss = kiln_lm::train::causal_lm_loss(&m, &x, None, false)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = e["loss"].as_f64().unwrap();
    // A mean of per-token -log-probs: each errs by at most twice the logits'
    // error, plus the rounding of the logsumexp over the vocabulary and of
    // the mean over the b (t - 1) tokens, whose magnitude is the loss.
    let tol = 2.0 * logit_tol(t, max_logit(&e)) + f32_abs_tol(VOCAB + b * (t - 1), want);
    let d = (f64::from(loss) - want).abs();
    eprintln!("loss {loss} vs {want}: difference {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "{loss} vs {want}: difference {d:e} > {tol:e}");
}
