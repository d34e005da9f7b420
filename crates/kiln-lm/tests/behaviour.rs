//! Generation, training, saving and error behaviour of kiln-lm.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::PathBuf;

use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::run::RunOptions;
use kiln_core::tolerance::{f32_abs_tol, f32_abs_tol_tight, max_abs_diff, transformer_abs_tol};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_lm::train::{causal_lm_loss, train, TrainConfig};
use kiln_lm::{
    generate_batch, generate_text, FinishReason, GenerationConfig, Gpt2, Gpt2Config, HubOptions,
    KvCache, ModelFiles,
};

fn tiny_cfg() -> Gpt2Config {
    Gpt2Config {
        n_layer: 2,
        n_embd: 32,
        n_head: 4,
        initializer_range: 0.3,
        ..Gpt2Config::tiny(97, 48)
    }
}

fn tiny(seed: u64, cfg: &Gpt2Config) -> (Gpt2, VarStore) {
    let vs = VarStore::new(seed);
    let m = Gpt2::new(cfg, vs.builder(DType::F32, &Device::Cpu), vs.rng().clone()).unwrap();
    (m, vs)
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

#[test]
fn cached_decoding_gives_the_same_tokens_as_full_recomputation() {
    let cfg = tiny_cfg();
    let (m, _) = tiny(3, &cfg);
    let prompt = vec![5u32, 17, 42, 8, 8, 1];
    let gen = GenerationConfig {
        max_new_tokens: 20,
        ..Default::default()
    };
    let cached = generate_batch(&m, std::slice::from_ref(&prompt), &gen, None, None).unwrap();
    let mut seq = prompt.clone();
    for _ in 0..20 {
        let x = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let logits = m.forward_t(&x, false).unwrap();
        let last = logits
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(last);
    }
    assert_eq!(cached[0].ids, seq[prompt.len()..]);
    // And the cached logits of all positions equal the uncached ones.
    let x = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
    let full = m.forward_t(&x, false).unwrap();
    let mut cache = KvCache::new(cfg.n_layer);
    let a = m
        .forward_cached(&x.narrow(1, 0, 10).unwrap(), &mut cache, true)
        .unwrap();
    let b = m
        .forward_cached(&x.narrow(1, 10, seq.len() - 10).unwrap(), &mut cache, true)
        .unwrap();
    let both = Tensor::cat(&[a, b], 1).unwrap();
    let max_logit = full
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = (full - both).unwrap().abs().unwrap().max_all().unwrap();
    let d = f64::from(d.to_scalar::<f32>().unwrap());
    // Two computations of the same logits, each within f32's bound.
    let tol = transformer_abs_tol(
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        seq.len(),
        max_logit.into(),
    );
    eprintln!("cached vs full: max |diff| {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "cached vs full: max |diff| {d:e} > {tol:e}");
}

#[test]
fn seeded_sampling_is_reproducible_and_batched_rows_match_single_rows() {
    let cfg = tiny_cfg();
    let (m, _) = tiny(4, &cfg);
    let gen = GenerationConfig {
        max_new_tokens: 12,
        temperature: 0.9,
        top_k: 20,
        top_p: 0.9,
        repetition_penalty: 1.2,
        seed: 11,
        ..Default::default()
    };
    let prompts = vec![vec![1u32, 2, 3], vec![9u32, 8, 7, 6, 5, 4, 3]];
    let a = generate_batch(&m, &prompts, &gen, None, None).unwrap();
    let b = generate_batch(&m, &prompts, &gen, None, None).unwrap();
    assert_eq!(a, b);
    let other = generate_batch(
        &m,
        &prompts,
        &GenerationConfig {
            seed: 12,
            ..gen.clone()
        },
        None,
        None,
    )
    .unwrap();
    assert_ne!(a[0].ids, other[0].ids);
    // Row 0 alone draws from the same per-row stream and sees the same logits.
    let alone = generate_batch(&m, &prompts[..1], &gen, None, None).unwrap();
    assert_eq!(alone[0].ids, a[0].ids);
    for g in &a {
        assert_eq!(g.ids.len(), 12);
        assert!(g.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

#[test]
fn one_training_step_gives_every_parameter_a_gradient_and_changes_it() {
    let cfg = Gpt2Config {
        tie_word_embeddings: false,
        ..tiny_cfg()
    };
    let (m, vs) = tiny(5, &cfg);
    let before: Vec<(String, Tensor)> = vs
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let ids = Tensor::from_vec(
        (0..2 * 16).map(|i| (i * 7 % 97) as u32).collect::<Vec<_>>(),
        (2, 16),
        &Device::Cpu,
    )
    .unwrap();
    let loss = causal_lm_loss(&m, &ids, None, true).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in vs.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name} gradient is zero");
    }
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-3, 0.0).unwrap();
    opt.step(&grads).unwrap();
    for ((name, a), (_, b)) in before.iter().zip(vs.tensors()) {
        let d = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() > 0.0, "{name} did not change");
    }
}

#[test]
fn label_mask_restricts_the_loss_to_selected_tokens() {
    let cfg = tiny_cfg();
    let (m, _) = tiny(6, &cfg);
    let ids = Tensor::new(&[[3u32, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0f32, 0., 0., 1., 1., 1.]], &Device::Cpu).unwrap();
    let masked = causal_lm_loss(&m, &ids, Some(&mask), false)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // The same loss from per-token log-probs computed independently.
    let logits = m.forward_t(&ids, false).unwrap();
    let lp = kiln_core::nn::log_softmax(&logits, 2).unwrap();
    let lp: Vec<Vec<f32>> = lp.squeeze(0).unwrap().to_vec2().unwrap();
    let want = -(lp[2][6] + lp[3][7] + lp[4][8]) / 3.0;
    // The same logits on both paths; their log-softmaxes differ by the
    // relative rounding of a sum of 97 exponentials (an absolute error in the
    // log), then z - logsumexp and the mean of 3 by a few roundings of values
    // up to 2 |want|.
    let tol = f32_abs_tol(97, 1.0) + f32_abs_tol_tight(4, 2.0 * f64::from(want.abs()));
    let d = f64::from((masked - want).abs());
    assert!(d <= tol, "{masked} vs {want}: difference {d:e} > {tol:e}");
    let none = Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap();
    assert!(causal_lm_loss(&m, &ids, Some(&none), false).is_err());
}

#[test]
fn save_pretrained_round_trips_tied_and_untied_models() {
    for tie in [true, false] {
        let cfg = Gpt2Config {
            tie_word_embeddings: tie,
            ..tiny_cfg()
        };
        let (m, _) = tiny(7, &cfg);
        let dir = tempfile::tempdir().unwrap();
        m.save_pretrained(dir.path(), None).unwrap();
        let back = Gpt2::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.config(), m.config());
        let x = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let d = (m.forward_t(&x, false).unwrap() - back.forward_t(&x, false).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let names = safetensors_names(&dir.path().join("model.safetensors"));
        assert_eq!(names.contains(&"lm_head.weight".to_string()), !tie);
        assert!(names.contains(&"transformer.h.1.mlp.c_fc.weight".to_string()));
    }
}

fn safetensors_names(p: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(str::to_string).collect()
}

#[test]
fn stop_strings_cut_the_text_and_streaming_matches_the_result() {
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let m = Gpt2::from_files(&files, &Device::Cpu).unwrap();
    let tok = files.load_tokenizer().unwrap();
    let gen = GenerationConfig {
        max_new_tokens: 24,
        ignore_eos: true,
        ..Default::default()
    };
    let full = generate_text(&m, &tok, "the quick brown fox", &gen, None).unwrap();
    assert_eq!(full.finish, FinishReason::Length);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 8, "{:?}", full.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let mut sink = |s: &str| streamed.push_str(s);
    let out = generate_text(
        &m,
        &tok,
        "the quick brown fox",
        &GenerationConfig {
            stop: vec![stop.clone()],
            ..gen.clone()
        },
        Some(&mut sink),
    )
    .unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(out.text, full.text[..cut]);
    assert_eq!(streamed, out.text);
    // Streaming without stops prints exactly the text.
    let mut streamed = String::new();
    let mut sink = |s: &str| streamed.push_str(s);
    let again = generate_text(&m, &tok, "the quick brown fox", &gen, Some(&mut sink)).unwrap();
    assert_eq!(streamed, again.text);
    assert_eq!(again.text, full.text);
}

#[test]
fn missing_and_broken_files_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}garbage",
    )
    .unwrap();
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    let e = Gpt2::from_files(&files, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(files
        .load_tokenizer()
        .unwrap_err()
        .to_string()
        .contains("tokenizer.json"));
    // A config of another architecture.
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = Gpt2Config::from_file(&dir.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama") && e.contains("config.json"), "{e}");
}

#[test]
fn offline_hub_without_cache_says_which_files_are_missing() {
    let cache = tempfile::tempdir().unwrap();
    let mut o = HubOptions::new(cache.path());
    o.offline = true;
    let e = ModelFiles::resolve("gpt2", &o).unwrap_err().to_string();
    for want in [
        "gpt2",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "offline",
    ] {
        assert!(e.contains(want), "{want} not in {e}");
    }
    assert!(e.contains(&cache.path().display().to_string()), "{e}");
}

#[test]
fn cached_hub_snapshot_loads_offline() {
    // The layout huggingface_hub writes: refs/main -> snapshots/<commit>/files.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-gpt2");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(f), snap.join(f)).unwrap();
    }
    let mut o = HubOptions::new(cache.path());
    o.offline = true;
    let files = ModelFiles::resolve("someone/tiny-gpt2", &o).unwrap();
    assert!(files.tokenizer.is_some());
    Gpt2::from_files(&files, &Device::Cpu).unwrap();
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cfg = tiny_cfg();
    let (m, _) = tiny(8, &cfg);
    let gen = GenerationConfig::default();
    let e = generate_batch(&m, &[vec![]], &gen, None, None).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = generate_batch(&m, &[vec![500]], &gen, None, None).unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    let long = vec![1u32; 60];
    let e = generate_batch(&m, &[long], &gen, None, None).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    let x = Tensor::from_vec(vec![1u32; 60], (1, 60), &Device::Cpu).unwrap();
    assert!(m
        .forward_t(&x, false)
        .unwrap_err()
        .to_string()
        .contains("n_positions"));
    // Generation stops at the context length instead of failing.
    let g = GenerationConfig {
        max_new_tokens: 100,
        ..Default::default()
    };
    let out = generate_batch(&m, &[vec![1u32; 40]], &g, None, None).unwrap();
    assert_eq!(out[0].finish, FinishReason::Length);
    assert!(out[0].ids.len() <= 8);
}

#[test]
fn training_on_synthetic_reviews_falls_well_below_the_unigram_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let tc = TrainConfig {
        corpus: "synthetic-reviews:400".into(),
        vocab_size: 300,
        block_size: 32,
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        batch_size: 16,
        epochs: 3,
        lr: 3e-3,
        warmup: 10,
        ..Default::default()
    };
    let rep = train(
        &tc,
        &Device::Cpu,
        &RunOptions::new_run(Some(&dir.path().join("run"))).quiet(true),
    )
    .unwrap();
    let val = rep.val_loss.unwrap();
    eprintln!(
        "train loss {:.3}, val {:.3}, unigram entropy {:.3}",
        rep.final_train_loss, val, rep.unigram_entropy
    );
    assert!(
        val < 0.6 * rep.unigram_entropy,
        "{val} vs {}",
        rep.unigram_entropy
    );
    // The run's Hugging Face folder loads and generates.
    let (m, tok) = kiln_lm::train::from_run(&dir.path().join("run"), &Device::Cpu).unwrap();
    let out = generate_text(&m, &tok, "This", &GenerationConfig::default(), None).unwrap();
    assert!(!out.ids.is_empty());
    let run = dir.path().join("run");
    assert!(run.join("loss.png").is_file() && run.join("samples.txt").is_file());
}

/// `max_grad_norm` reaches the optimiser: clipped to 1e-9, every gradient
/// entry falls far below AdamW's epsilon (1e-8), so the steps shrink to
/// nothing and the loss stays at its start, where the same run unclipped
/// learns. A negative norm is refused by name.
#[test]
fn gradient_clipping_is_applied_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let tc = TrainConfig {
        corpus: "synthetic-reviews:200".into(),
        vocab_size: 280,
        block_size: 16,
        n_layer: 1,
        n_embd: 32,
        n_head: 2,
        batch_size: 16,
        epochs: 2,
        lr: 3e-3,
        warmup: 2,
        ..Default::default()
    };
    let run = |name: &str, max_grad_norm: f64| {
        let cfg = TrainConfig {
            max_grad_norm,
            ..tc.clone()
        };
        let opts = RunOptions::new_run(Some(&dir.path().join(name))).quiet(true);
        train(&cfg, &Device::Cpu, &opts)
    };
    let learned = run("at-1", 1.0).unwrap();
    let held = run("held", 1e-9).unwrap();
    let (learned, held) = (learned.val_loss.unwrap(), held.val_loss.unwrap());
    // A uniform guess over 280 tokens costs ln 280 = 5.63 nats.
    assert!(held > 5.0, "clipped to 1e-9 and still learned: {held}");
    assert!(
        learned < held - 1.0,
        "clipped at 1: {learned}, at 1e-9: {held}"
    );
    let e = run("bad", -1.0).unwrap_err().to_string();
    assert!(e.contains("max_grad_norm") && e.contains("-1"), "{e}");
}

#[test]
fn lm_generator_serves_kiln_prompt_with_its_parameters() {
    use kiln_prompt::TextGenerator;
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let model = Gpt2::from_files(&files, &Device::Cpu).unwrap();
    let tokenizer = files.load_tokenizer().unwrap();
    let direct = generate_text(
        &model,
        &tokenizer,
        "I loved it!",
        &GenerationConfig {
            max_new_tokens: 10,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let mut g = kiln_lm::LmGenerator::new(model, tokenizer, "tiny");
    let params = kiln_prompt::GenParams {
        max_new_tokens: 10,
        ..Default::default()
    };
    assert_eq!(g.generate("I loved it!", &params).unwrap(), direct.text);
    assert_eq!(g.name(), "tiny");
    assert_eq!(g.context_cuts().answers, 0);
    assert_eq!(g.context_cuts().warning(), None);
}

#[test]
fn answers_cut_by_the_context_are_counted_and_named() {
    use kiln_prompt::TextGenerator;
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let model = Gpt2::from_files(&files, &Device::Cpu).unwrap();
    let tokenizer = files.load_tokenizer().unwrap();
    let context = model.config().n_positions;
    let prompt = "I loved it! ".repeat(4);
    let prompt_len = tokenizer.encode(&prompt).unwrap().len();
    assert!(prompt_len < context);
    let mut g = kiln_lm::LmGenerator::new(model, tokenizer, "tiny");
    g.base.ignore_eos = true;
    let params = kiln_prompt::GenParams {
        max_new_tokens: 2 * context,
        ..Default::default()
    };
    // The answer stops at the context's end, and is counted: never silent.
    g.generate(&prompt, &params).unwrap();
    // A short answer is not.
    let short = kiln_prompt::GenParams {
        max_new_tokens: 3,
        ..Default::default()
    };
    g.generate(&prompt, &short).unwrap();
    let c = g.context_cuts().clone();
    assert_eq!((c.generations, c.answers, c.context), (2, 1, context));
    assert_eq!(c.longest_prompt, prompt_len);
    assert!(c.tokens > context, "{c:?}");
    let w = c.warning().unwrap();
    assert!(
        w.contains("1 of 2 answers")
            && w.contains(&format!("context of {context} tokens"))
            && w.contains(&format!("{} tokens short", c.tokens)),
        "{w}"
    );
    // A prompt that fills the context is an error naming both lengths.
    let long = "I loved it! ".repeat(context);
    let e = g.generate(&long, &short).unwrap_err().to_string();
    assert!(e.contains(&format!("context of {context} tokens")), "{e}");
}

#[test]
fn bf16_decoding_stays_close_to_f32_and_can_be_switched_off() {
    let mut m = Gpt2::load(&fixture_dir(), &Device::Cpu).unwrap();
    let prompt = Tensor::new(&[[282u32, 221, 319, 304, 259]], &Device::Cpu).unwrap();
    let step = Tensor::new(&[[275u32]], &Device::Cpu).unwrap();
    let decode = |m: &Gpt2| {
        let mut cache = KvCache::new(2);
        m.forward_cached(&prompt, &mut cache, false).unwrap();
        m.forward_cached(&step, &mut cache, false).unwrap()
    };
    let f32_logits = decode(&m);
    m.set_bf16_decode(true).unwrap();
    assert!(m.bf16_decode());
    let bf = decode(&m);
    let dev = (&f32_logits - &bf)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = f32_logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        dev > 0.0 && dev < 0.02 * scale,
        "deviation {dev} at logit scale {scale}"
    );
    m.set_bf16_decode(false).unwrap();
    let back = decode(&m);
    let d = (&f32_logits - &back)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
}

/// A run written before sessions had named parts (checkpoint format 1,
/// interrupted after one batch; fixtures/old_runs/README.md) resumes with
/// today's code: other settings are refused with the list of what differs,
/// more epochs are allowed, and the run finishes with every batch logged once.
#[test]
fn an_lm_run_of_the_first_checkpoint_format_resumes_and_extends() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("lm");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old_runs/lm");
    kiln_core::files::copy_dir(&fixture, &run).unwrap();
    let (_, rc): (String, kiln_lm::train::RunConfig) = kiln_core::run::RunDir::open(&run)
        .unwrap()
        .read_config()
        .unwrap();
    // Written before gradient clipping existed: it resumes unclipped.
    assert_eq!(rc.train.max_grad_norm, 0.0);
    let opts = RunOptions::resume(&run).quiet(true);
    let changed = TrainConfig {
        lr: 0.5,
        ..rc.train.clone()
    };
    let e = train(&changed, &Device::Cpu, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot resume") && e.contains("train.lr is 0.002 in the run, 0.5 now"),
        "{e}"
    );
    let longer = TrainConfig {
        epochs: 3,
        ..rc.train
    };
    let rep = train(&longer, &Device::Cpu, &opts).unwrap();
    assert!(!rep.interrupted && rep.epochs == 3 && rep.val_loss.is_some());
    let recs = kiln_core::run::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = recs
        .iter()
        .filter(|r| r.split == "train")
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
    assert_eq!(steps.len() % 3, 0, "three equal epochs: {}", steps.len());
    assert_eq!(recs.iter().filter(|r| r.split == "val").count(), 3);
    kiln_lm::train::from_run(&run, &Device::Cpu).unwrap();
}

/// `generate --model <a VAE run>` and other loaders of LM runs: the kind is
/// checked before the config's fields, so the message names the run's kind
/// instead of serde's "unknown field".
#[test]
fn loading_a_run_of_another_kind_names_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vae-run");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(
        run.join("config.toml"),
        "kind = \"vae\"\n[model]\narch = \"mlp\"\nlatent = 2\n[train]\nepochs = 1\n",
    )
    .unwrap();
    let e = kiln_lm::train::from_run(&run, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("is a \"vae\" run, not an LM run") && !e.contains("unknown field"),
        "{e}"
    );
}

/// `generate --model path/to/model.safetensors`: a file path is refused with
/// a message naming its folder, never looked up on the hub as a repository id.
#[test]
fn a_file_path_given_as_model_is_not_taken_for_a_hub_id() {
    let cache = tempfile::tempdir().unwrap();
    let mut o = HubOptions::new(cache.path());
    o.offline = true;
    let weights = fixture_dir().join("model.safetensors");
    let e = ModelFiles::resolve(&weights.display().to_string(), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a file")
            && e.contains(&fixture_dir().display().to_string())
            && !e.contains("offline"),
        "{e}"
    );
    for missing in [
        "runs/lm-1/model/model.safetensors",
        "models/tiny/config.json",
        "nothing/here/at/all",
        "./tiny",
    ] {
        let e = ModelFiles::resolve(missing, &o).unwrap_err().to_string();
        assert!(
            e.contains("looks like a path") && !e.contains("offline"),
            "{missing}: {e}"
        );
    }
    // a folder still resolves, and so does a plain hub id (offline: not cached)
    assert!(ModelFiles::resolve(&fixture_dir().display().to_string(), &o).is_ok());
    let e = ModelFiles::resolve("someone/tiny", &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("offline"), "{e}");
}

/// Gradient accumulation trains as one batch would: 12 blocks per step as
/// one batch, as 2 x 6 and as 3 x 4 end at the same weights, up to float
/// rounding, with dropout off. Each epoch's last step is smaller (its
/// micro-batches uneven, each weighted by its share). The steps per epoch
/// count whole steps, and a zero accumulation is refused by name.
#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let dir = tempfile::tempdir().unwrap();
    let tc = TrainConfig {
        corpus: "synthetic-reviews:120".into(),
        vocab_size: 280,
        block_size: 16,
        n_layer: 1,
        n_embd: 32,
        n_head: 2,
        dropout: 0.0,
        batch_size: 12,
        epochs: 2,
        lr: 3e-3,
        warmup: 2,
        ..Default::default()
    };
    let run = |name: &str, batch_size: usize, grad_accum: usize| {
        let cfg = TrainConfig {
            batch_size,
            grad_accum,
            ..tc.clone()
        };
        let path = dir.path().join(name);
        let rep = train(
            &cfg,
            &Device::Cpu,
            &RunOptions::new_run(Some(&path)).quiet(true),
        )
        .unwrap();
        let metrics = std::fs::read_to_string(path.join("metrics.jsonl")).unwrap();
        let steps = metrics.lines().filter(|l| l.contains("\"train\"")).count();
        let (m, _) = kiln_lm::train::from_run(&path, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1u32, 40, 7, 99, 3]], &Device::Cpu).unwrap();
        let logits = m.forward_t(&x, false).unwrap();
        (rep.final_train_loss, steps, logits, rep.train_tokens)
    };
    let (loss, steps, logits, tokens) = run("whole", 12, 1);
    let blocks = tokens / 16;
    assert!(blocks % 12 != 0 && blocks % 12 % 4 != 0, "{blocks} blocks");
    for (name, b, k) in [("two", 6, 2), ("three", 4, 3)] {
        let (l, s, lg, _) = run(name, b, k);
        assert_eq!(s, steps, "{name}: steps");
        let d = max_abs_diff(&lg, &logits).unwrap();
        assert!(d < 1e-3, "{name}: logits differ by {d}");
        assert!((l - loss).abs() < 1e-4, "{name}: loss {l} vs {loss}");
    }
    // Against a batch of 6 without accumulation: other steps, other weights.
    let (_, s6, lg6, _) = run("six", 6, 1);
    assert!(s6 > steps);
    let d6 = max_abs_diff(&lg6, &logits).unwrap();
    assert!(d6 > 1e-2, "a batch of 6 should train differently ({d6})");
    let e = train(
        &TrainConfig {
            grad_accum: 0,
            ..tc.clone()
        },
        &Device::Cpu,
        &RunOptions::new_run(Some(&dir.path().join("zero"))).quiet(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("grad_accum"), "{e}");
}
