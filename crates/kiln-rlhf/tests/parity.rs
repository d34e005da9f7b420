//! kiln-rlhf against TRL 1.16 and transformers 5.24 on the tiny random models of
//! `tests/fixtures` (made by `make_rlhf_fixture.py`, which prints the values in
//! `expected.json`): TRL's tokenization of preference pairs in every form, the
//! reward model's scores with right and left padding, per-pair completion
//! log-probabilities and DPO losses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln_core::tolerance::{f32_abs_tol, transformer_abs_tol};
use kiln_core::{DType, Device, Tensor};
use kiln_lm::{Gpt2Tokenizer, ModelFiles};
use kiln_prompt::ChatTemplate;
use kiln_rlhf::logps::pair_logps;
use kiln_rlhf::loss::{dpo_loss, DpoLossConfig, DpoLossType, LossScale};
use kiln_rlhf::models::{frozen_from, load_weights, trainable_lm};
use kiln_rlhf::prefs::{read_pairs, PairEncoder};
use kiln_rlhf::RewardModel;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("expected.json"),
    )?)?)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// The fixture models: 2 blocks of width 32 with 4 heads, a vocabulary of 360.
const N_LAYER: usize = 2;
const D: usize = 32;
const N_HEAD: usize = 4;
const VOCAB: usize = 360;

/// The tolerance for an output of the fixture models (a logit, a score) of
/// magnitude up to `max_abs` after `t` positions ([`transformer_abs_tol`]).
fn out_tol(t: usize, max_abs: f64) -> f64 {
    transformer_abs_tol(N_LAYER, D, N_HEAD, t, max_abs)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn tokenizer() -> Result<Gpt2Tokenizer> {
    Ok(Gpt2Tokenizer::from_file(
        &fixtures().join("tiny-lm/tokenizer.json"),
    )?)
}

/// DPOTrainer's `prompt_ids`/`chosen_ids`/`rejected_ids` (EOS appended to text
/// completions, implicit prompts extracted, conversations through the ChatML
/// template) and RewardTrainer's `chosen_ids`/`rejected_ids` (prompt +
/// completion) for every line of `prefs.jsonl`.
#[test]
fn preference_pairs_tokenize_as_trl() -> Result<()> {
    let e = expected()?;
    let tok = tokenizer()?;
    let chat = ChatTemplate::chatml();
    let path = fixtures().join("prefs.jsonl");
    let data = PairEncoder::new(&tok, Some(&chat), 1024).read(&path)?;
    assert_eq!((data.total, data.pairs.len()), (5, 5));
    let d = &e["dpo_tokens"];
    let want: Vec<&Value> = d["standard"]
        .as_array()
        .into_iter()
        .chain(d["implicit"].as_array())
        .chain(d["conversational"].as_array())
        .flatten()
        .collect();
    assert_eq!(want.len(), 5);
    for (i, (got, w)) in data.pairs.iter().zip(&want).enumerate() {
        assert_eq!(got.prompt, ids(&w["prompt_ids"]), "pair {i} prompt");
        assert_eq!(got.chosen, ids(&w["chosen_ids"]), "pair {i} chosen");
        assert_eq!(got.rejected, ids(&w["rejected_ids"]), "pair {i} rejected");
        assert_eq!(got.line, i + 1);
    }
    assert_eq!(data.pairs[1].margin, Some(1.5));
    assert_eq!(data.pairs[0].margin, None);
    let r = &e["reward_tokens"];
    let rw: Vec<&Value> = r["standard"]
        .as_array()
        .into_iter()
        .chain(r["conversational"].as_array())
        .flatten()
        .collect();
    for (i, k) in [0usize, 1, 3].into_iter().enumerate() {
        assert_eq!(data.pairs[k].chosen_sequence(), ids(&rw[i]["chosen_ids"]));
        assert_eq!(
            data.pairs[k].rejected_sequence(),
            ids(&rw[i]["rejected_ids"])
        );
    }
    Ok(())
}

/// Pairs over `max_length` are dropped and counted, never cut; a
/// conversational pair without a chat template is an error naming the line.
#[test]
fn long_pairs_are_dropped_and_counted() -> Result<()> {
    let tok = tokenizer()?;
    let chat = ChatTemplate::chatml();
    let path = fixtures().join("prefs.jsonl");
    // Pair lengths (prompt + longer completion): 17, 16, 9, 34, 42.
    let data = PairEncoder::new(&tok, Some(&chat), 16).read(&path)?;
    assert_eq!(data.total, 5);
    assert_eq!(data.dropped_too_long, 3);
    assert_eq!(
        data.pairs.iter().map(|p| p.line).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(data.pairs.iter().all(|p| p.max_len() <= 16));
    assert!(data
        .describe(16)
        .contains("3 dropped as longer than max_length 16"));
    assert!(data.describe(16).starts_with("2 of 5 pairs"));
    let mut emptied = data.clone();
    emptied.pairs.clear();
    assert_eq!(emptied.kept(), 2);
    let e = PairEncoder::new(&tok, None, 1024).read(&path).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("prefs.jsonl:4:") && msg.contains("chat template"),
        "{msg}"
    );
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"chosen\": 1}\n",
    )?;
    let msg = read_pairs(&bad).unwrap_err().to_string();
    assert!(msg.contains("bad.jsonl:3:"), "{msg}");
    // A byte order mark is skipped and the lines keep their numbers;
    // invalid UTF-8 names its line.
    std::fs::write(
        &bad,
        "\u{feff}{\"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"chosen\": \"c\", \"rejected\": \"d\"}\n",
    )?;
    let lines: Vec<usize> = read_pairs(&bad)?.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [1, 3]);
    std::fs::write(
        &bad,
        b"{\"chosen\": \"a\", \"rejected\": \"b\"}\n{\"chosen\": \"\xff\"}\n",
    )?;
    let msg = read_pairs(&bad).unwrap_err().to_string();
    assert!(msg.contains("bad.jsonl:2:"), "{msg}");
    Ok(())
}

/// transformers' `GPT2ForSequenceClassification` scores (to 1e-4): right
/// padding, left padding (position ids from the mask), and sequences ending
/// with the appended EOS with pad == eos, read at the mask's last token.
#[test]
fn reward_scores_match_transformers_with_right_and_left_padding() -> Result<()> {
    let e = expected()?;
    let dev = Device::Cpu;
    let (rm, _vs) = RewardModel::load(&fixtures().join("tiny-reward"), &dev, 0)?;
    let eos = e["eos"].as_u64().unwrap_or(0) as u32;
    assert_eq!(rm.pad_token_id(), eos);
    let seqs: Vec<Vec<u32>> = e["score_sequences"]
        .as_array()
        .map(|a| a.iter().map(ids).collect())
        .unwrap_or_default();
    let s = &e["scores"];
    let (b, t) = (seqs.len(), seqs.iter().map(Vec::len).max().unwrap_or(0));
    let check = |got: Vec<f32>, want: &Value, what: &str| {
        let want = floats(want);
        assert_eq!(got.len(), want.len(), "{what}");
        // A score is the head's output after t + 1 positions at most.
        let tol = out_tol(t + 1, want.iter().fold(0.0, |m, w| w.abs().max(m)));
        for (g, w) in got.iter().zip(&want) {
            let d = (*g as f64 - w).abs();
            assert!(d <= tol, "{what}: {got:?} vs {want:?} ({d:e} > {tol:e})");
        }
    };
    for left in [false, true] {
        let mut flat = vec![eos; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            let off = if left { t - s.len() } else { 0 };
            for (j, &x) in s.iter().enumerate() {
                flat[i * t + off + j] = x;
                mask[i * t + off + j] = 1;
            }
        }
        let ids_t = Tensor::from_vec(flat, (b, t), &dev)?;
        let mask_t = Tensor::from_vec(mask, (b, t), &dev)?;
        let got = rm.scores(&ids_t, &mask_t, false)?.to_vec1::<f32>()?;
        check(got, &s[if left { "left" } else { "right" }], "padded batch");
    }
    let with_eos: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| s.iter().copied().chain([eos]).collect())
        .collect();
    check(
        rm.score_all(&with_eos, 2)?,
        &s["eos_at_mask_end"],
        "EOS appended",
    );
    // A mask with a hole is refused.
    let ids_t = Tensor::new(&[[1u32, 2, 3]], &dev)?;
    let hole = Tensor::new(&[[1u32, 0, 1]], &dev)?;
    assert!(rm.scores(&ids_t, &hole, false).is_err());
    Ok(())
}

/// A folder kiln writes has transformers' layout: the same tensor names and
/// shapes as the one transformers wrote, `num_labels = 1`, the architecture
/// and pad token; and it loads back to the same scores.
///
/// Loading in transformers 5.24 was checked with `make_rlhf_fixture.py
/// --check-kiln-folder DIR` on the folders this test writes, for the fixture
/// model and for a fresh one (`RewardModel::from_lm(tiny-lm, seed 7)`, kiln's
/// scores of the fixture's three sequences `[-1.5128168, -0.078690976,
/// 0.6346837]`):
///
/// ```text
/// $ python3 make_rlhf_fixture.py --check-kiln-folder /tmp/kiln-saved-rm
/// num_labels 1 pad_token_id 0
/// {"right": [7.015594482421875, 6.502582550048828, -2.646488904953003], ...}   (= expected.json)
/// $ python3 make_rlhf_fixture.py --check-kiln-folder /tmp/kiln-fresh-rm
/// {"right": [-1.5128166675567627, -0.07869154214859009, 0.6346837878227234], ...}
/// ```
#[test]
fn saved_reward_folder_has_transformers_layout() -> Result<()> {
    let dev = Device::Cpu;
    let src = fixtures().join("tiny-reward");
    let (rm, _) = RewardModel::load(&src, &dev, 0)?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("rm");
    rm.save_pretrained(&out, Some(&tokenizer()?))?;
    let names = |p: &Path| -> Result<BTreeSet<(String, Vec<usize>)>> {
        let bytes = std::fs::read(p.join("model.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        Ok(st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect())
    };
    assert_eq!(names(&out)?, names(&src)?);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(cfg["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(cfg["id2label"].as_object().map(|o| o.len()), Some(1));
    assert_eq!(cfg["pad_token_id"], 0);
    let (back, _) = RewardModel::load(&out, &dev, 0)?;
    let seqs = vec![vec![5u32, 9, 40, 2], vec![7u32, 3]];
    assert_eq!(rm.score_all(&seqs, 2)?, back.score_all(&seqs, 2)?);
    // An LM folder is not a reward model, but starts one.
    let lm = fixtures().join("tiny-lm");
    let e = RewardModel::load(&lm, &dev, 0).unwrap_err().to_string();
    assert!(e.contains("is a language model, not a reward model"), "{e}");
    let (fresh, vs) = RewardModel::from_lm(&lm, &dev, 3)?;
    assert!(vs.names().contains(&"score.weight".to_string()));
    assert!(!vs.names().iter().any(|n| n.starts_with("lm_head")));
    assert_eq!(fresh.score_all(&seqs, 2)?.len(), 2);
    Ok(())
}

/// DPOTrainer's per-pair completion log-probabilities (its collator: chosen
/// rows then rejected rows, right padding, labels masked outside the
/// completion) of two random models, and the sigmoid and IPO losses of one
/// against the other as reference.
#[test]
fn pair_logps_and_dpo_loss_match_trl() -> Result<()> {
    let e = expected()?;
    let lp = &e["logps"];
    let dev = Device::Cpu;
    let tok = tokenizer()?;
    let path = fixtures().join("prefs.jsonl");
    let data = PairEncoder::new(&tok, None, 1024).encode_all(&read_pairs(&path)?[..3])?;
    let pairs: Vec<_> = data.pairs.iter().collect();
    let (policy, _vs) = trainable_lm(&ModelFiles::from_dir(&fixtures().join("tiny-lm"))?, &dev, 0)?;
    let (cfg, w) = load_weights(&ModelFiles::from_dir(&fixtures().join("tiny-ref"))?, &dev)?;
    let reference = frozen_from(&cfg, w, &dev)?;
    let p = pair_logps(&policy, &pairs, 0, false)?;
    let r = pair_logps(&reference, &pairs, 0, false)?;
    // The logits' scale and the longest sequence, for the tolerances.
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .flat_map(|q| {
            [
                [&q.prompt[..], &q.chosen[..]].concat(),
                [&q.prompt[..], &q.rejected[..]].concat(),
            ]
        })
        .collect();
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut max_logit = 0f64;
    for s in &seqs {
        let x = Tensor::from_vec(s.clone(), (1, s.len()), &dev)?;
        for m in [&policy, &reference] {
            let l = m
                .forward_t(&x, false)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            max_logit = max_logit.max(f64::from(l));
        }
    }
    let logit_tol = out_tol(t, max_logit);
    // A token's log-prob, z_y - logsumexp(z), errs by at most twice the
    // logits' error; a completion's sum of n of them adds n such errors and
    // the rounding of the sum, whose magnitude is |sum|.
    let seq_tol = |n: f64, sum: f64| 2.0 * n * logit_tol + f32_abs_tol(n as usize, sum);
    let close = |got: &Tensor, want: &Value, tokens: &Value, what: &str| -> Result<()> {
        let got = got.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let want = floats(want);
        assert_eq!(got.len(), want.len());
        for ((g, w), n) in got.iter().zip(&want).zip(floats(tokens)) {
            let tol = seq_tol(n, *w);
            assert!(
                (g - w).abs() <= tol,
                "{what}: {got:?} vs {want:?} (tolerance {tol:e})"
            );
        }
        Ok(())
    };
    let (tc, tr) = (&lp["tokens_chosen"], &lp["tokens_rejected"]);
    close(&p.logps.chosen, &lp["policy_chosen"], tc, "policy chosen")?;
    close(
        &p.logps.rejected,
        &lp["policy_rejected"],
        tr,
        "policy rejected",
    )?;
    close(&r.logps.chosen, &lp["ref_chosen"], tc, "ref chosen")?;
    close(&r.logps.rejected, &lp["ref_rejected"], tr, "ref rejected")?;
    let counts = |x: &Tensor| -> Result<Vec<f64>> { Ok(x.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    assert_eq!(counts(&p.logps.chosen_tokens)?, floats(tc), "tokens");
    assert_eq!(counts(&p.logps.rejected_tokens)?, floats(tr), "tokens");
    // Σ over the pairs of the mean logit over a completion's n positions
    // (n · VOCAB logits, each within the logits' tolerance).
    let sums = |k: &str| floats(&lp[k]).iter().sum::<f64>();
    let sums_tol = |tokens: &Value| -> f64 {
        floats(tokens)
            .iter()
            .map(|&n| logit_tol + f32_abs_tol(n as usize * VOCAB, max_logit))
            .sum()
    };
    for (got, k, tokens) in [
        (p.chosen_logit_sum, "logit_sums_chosen", tc),
        (p.rejected_logit_sum, "logit_sums_rejected", tr),
    ] {
        let tol = sums_tol(tokens);
        assert!(
            (got - sums(k)).abs() <= tol,
            "{k}: {got} vs {} (tolerance {tol:e})",
            sums(k)
        );
    }
    // The losses' inputs: 4 log-prob sums per pair, each within seq_tol.
    let pair_tol: Vec<f64> = (0..pairs.len())
        .map(|i| {
            let at = |k: &str, tk: &Value| seq_tol(floats(tk)[i], floats(&lp[k])[i]);
            at("policy_chosen", tc)
                + at("policy_rejected", tr)
                + at("ref_chosen", tc)
                + at("ref_rejected", tr)
        })
        .collect();
    let max_pair_tol = pair_tol.iter().fold(0.0, |m: f64, &x| m.max(x));
    for (ty, key) in [
        (DpoLossType::Sigmoid, "sigmoid_loss"),
        (DpoLossType::Ipo, "ipo_loss"),
    ] {
        let cfg = DpoLossConfig {
            loss_type: vec![ty],
            ..Default::default()
        };
        let scale = LossScale::of_batch(&p.logps)?;
        let out = dpo_loss(&cfg, &p.logps, &r.logps.chosen, &r.logps.rejected, &scale)?;
        let got = out.loss.to_scalar::<f32>()? as f64;
        let want = lp[key].as_f64().unwrap_or(f64::NAN);
        let beta = lp["beta"].as_f64().unwrap_or(0.1);
        // A mean over the pairs of a function of h = Δ(policy) - Δ(reference)
        // (h errs by at most the pair's 4 log-prob errors): -log σ(β h) has
        // slope at most β; IPO's (h - 1/(2β))² has slope 2 |h - 1/(2β)|, at
        // most 2 √(pairs · loss). Plus f32's rounding of the loss itself.
        let slope = match ty {
            DpoLossType::Ipo => 2.0 * (pairs.len() as f64 * want).sqrt(),
            _ => beta,
        };
        let tol = slope * max_pair_tol + f32_abs_tol(pairs.len() + 4, want);
        assert!(
            (got - want).abs() <= tol,
            "{ty}: {got} vs {want} (tolerance {tol:e})"
        );
    }
    Ok(())
}
