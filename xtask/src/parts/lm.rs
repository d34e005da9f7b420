//! kiln-lm's commands: `generate` (any GPT-2 repository, local folder or `train
//! lm` run), `train lm`, the `lm` demo part, and the `gpt2_small_greedy_decode` /
//! `gpt2_small_train_step` benchmarks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Tensor};
use kiln_lm::train::{causal_lm_loss, train, RunConfig, TrainConfig, RUN_KIND};
use kiln_lm::{
    generate_batch, generate_text, GenerationConfig, Gpt2, Gpt2Config, HubOptions, ModelFiles,
};

use super::{
    exit_if_interrupted, float_in, int_in, parse, parse_given, resume_config, threads_flag, Bench,
    Component, DemoPart, Given, RunArgs, MAX_EPOCHS,
};

/// Registers kiln-lm's command, task, demo part and benchmarks.
pub fn component() -> Component {
    Component {
        demos: vec![DemoPart {
            name: "lm",
            about: "train a BPE tokenizer and a tiny GPT-2 on synthetic reviews, then generate from it",
            run: demo,
        }],
        benches: vec![
            Bench {
                name: "gpt2_small_greedy_decode",
                run: bench_decode,
                gpu_batches: &[1, 16],
                cpu_batch: false,
            },
            Bench {
                name: "gpt2_small_greedy_decode_bf16",
                run: bench_decode_bf16,
                gpu_batches: &[],
                cpu_batch: false,
            },
            Bench {
                name: "gpt2_small_train_step",
                run: bench_train,
                gpu_batches: &[8],
                cpu_batch: false,
            },
        ],
        train: vec![("lm", train_cmd)],
        commands: vec![(
            "generate",
            "--model gpt2|DIR|RUN --prompt TEXT [--max-new-tokens N --temperature T ...]  stream text from a GPT-2",
            generate_cmd,
        )],
        ..Default::default()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask generate",
    about = "Generate text with a GPT-2: a Hugging Face repository (downloaded once, then cached), \
             a local folder with config.json + model.safetensors + tokenizer.json, or a `train lm` run. \
             The continuation goes to stdout; everything else to stderr.\n\n\
             Environment: HF_HOME / HF_HUB_CACHE (cache folder), HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE=1."
)]
struct GenArgs {
    /// Repository id (gpt2, gpt2-medium, distilgpt2, openai-community/gpt2-large, ...), a
    /// folder, or a `train lm` run folder.
    #[arg(long)]
    model: String,
    /// The prompt (may be empty: generation then starts from <|endoftext|>).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate at most (fewer when the model's context fills up
    /// first, which is said on stderr).
    #[arg(long, default_value_t = 64, value_parser = int_in(1usize, 1_000_000))]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy. The sampling defaults are transformers'
    /// (temperature 1, top-k 50, no top-p, no repetition penalty).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 50, value_parser = int_in(0usize, usize::MAX))]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("in (0, 1]", |x| x > 0.0 && x <= 1.0))]
    top_p: f64,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    repetition_penalty: f64,
    /// Stop at this string (repeatable; not printed).
    #[arg(long)]
    stop: Vec<String>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Print the generated token ids (space-separated) instead of text.
    #[arg(long)]
    ids: bool,
    /// Never produce <|endoftext|>: generate exactly --max-new-tokens (transformers'
    /// min_new_tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Decode with bf16 copies of the weights: ~2x less memory traffic per token,
    /// logits within ~1e-2 of f32 (prompts still run in f32).
    #[arg(long)]
    bf16: bool,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    revision: String,
    /// Hub cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Never use the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// CPU threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Hub options from the flags and the usual Hugging Face environment variables.
fn hub_options(cache_dir: Option<PathBuf>, revision: String, offline: bool) -> HubOptions {
    let cache = cache_dir
        .or_else(|| env("HF_HUB_CACHE").map(PathBuf::from))
        .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .unwrap_or_else(|| {
            PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".cache/huggingface/hub")
        });
    let mut o = HubOptions::new(cache);
    o.endpoint = env("HF_ENDPOINT");
    o.token = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN"));
    o.revision = revision;
    o.offline = offline || env("HF_HUB_OFFLINE").is_some_and(|v| v != "0");
    o.progress = true;
    o
}

/// A `train lm` run folder holds its Hugging Face folder in `model/`.
fn model_files(model: &str, opts: &HubOptions) -> Result<ModelFiles> {
    let p = Path::new(model);
    if p.join("config.toml").is_file() {
        // A kiln run folder: it must be a `train lm` run.
        let (kind, _): (String, serde_json::Value) = RunDir::open(p)?.read_config()?;
        if kind != RUN_KIND {
            anyhow::bail!(
                "--model {model}: this is a {kind:?} run, not a `train lm` run; pass an LM run \
                 folder, a folder with config.json + model.safetensors + tokenizer.json, or a \
                 hub repository id"
            );
        }
    }
    let in_run = p.join(kiln_lm::train::MODEL_DIR);
    if p.join("config.toml").is_file() && in_run.join("config.json").is_file() {
        return Ok(ModelFiles::from_dir(&in_run)?);
    }
    Ok(ModelFiles::resolve(model, opts)?)
}

fn generate_cmd(args: &[String]) -> Result<()> {
    let a: GenArgs = parse("cargo xtask generate", args)?;
    if let Some(t) = a.threads {
        kiln_core::device::set_threads(t)?;
    }
    let device = kiln_core::device::device(&a.device)?;
    let hub = hub_options(a.cache_dir.clone(), a.revision.clone(), a.offline);
    let t0 = Instant::now();
    let files = model_files(&a.model, &hub)?;
    let model =
        Gpt2::from_files(&files, &device).with_context(|| format!("loading {}", a.model))?;
    let tok = files.load_tokenizer()?;
    let c = model.config();
    eprintln!(
        "generate: {} ({} layers, width {}, {:.0}M parameters) loaded in {:.1}s",
        a.model,
        c.n_layer,
        c.n_embd,
        c.num_params() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        stop: a.stop.clone(),
        eos_token_id: None,
        ignore_eos: a.ignore_eos,
        seed: a.seed,
    };
    // The model cannot see past its context: say so now, not by a silent cut.
    let prompt_len = tok.encode(&a.prompt)?.len().max(1);
    let room = c.n_positions.saturating_sub(prompt_len);
    if a.max_new_tokens > room {
        eprintln!(
            "generate: note: --max-new-tokens {} does not fit: the model's context is {} tokens \
             and the prompt takes {prompt_len}, so at most {room} new tokens can follow",
            a.max_new_tokens, c.n_positions
        );
    }
    let t = Instant::now();
    let out = if a.ids {
        generate_text(&model, &tok, &a.prompt, &cfg, None)?
    } else {
        let mut stdout = std::io::stdout();
        let mut print = |s: &str| {
            let _ = stdout.write_all(s.as_bytes());
            let _ = stdout.flush();
        };
        generate_text(&model, &tok, &a.prompt, &cfg, Some(&mut print))?
    };
    let dt = t.elapsed().as_secs_f64();
    if a.ids {
        let ids: Vec<String> = out.ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(" "));
    } else {
        println!();
    }
    let why = match out.finish {
        kiln_lm::FinishReason::Length if out.ids.len() < a.max_new_tokens => format!(
            "the model's context ({} tokens) being full, before --max-new-tokens {}",
            c.n_positions, a.max_new_tokens
        ),
        f => format!("{f:?}"),
    };
    eprintln!(
        "generate: {} tokens in {:.2}s ({:.1} tokens/s, prompt included), finished by {why}",
        out.ids.len(),
        dt,
        out.ids.len() as f64 / dt,
    );
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train lm",
    about = "Train a byte-level BPE tokenizer and a small GPT-2 from scratch; the run folder gets \
             a Hugging Face folder (model/) that `generate --model RUN` and transformers load"
)]
struct TrainArgs {
    /// Corpus: synthetic-reviews[:N] (embedded), lines:PATH, files:PATH, or a bare PATH
    /// (a .txt file, one document per non-empty line, or a folder of .txt files).
    #[arg(long, default_value = "synthetic-reviews")]
    corpus: String,
    /// Epochs (overrides the run's on --resume).
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: Option<u64>,
    /// Blocks per micro-batch (one forward and backward pass).
    #[arg(long, default_value_t = 16, value_parser = int_in(1usize, super::MAX_BATCH))]
    batch_size: usize,
    /// Micro-batches per optimizer step (gradient_accumulation_steps): each step sees
    /// batch-size x grad-accum blocks, memory holds batch-size.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, super::MAX_BATCH))]
    grad_accum: usize,
    /// Tokens per block (the model's context).
    #[arg(long, default_value_t = 64, value_parser = int_in(2usize, 65536))]
    block_size: usize,
    /// BPE vocabulary size (256 bytes + <|endoftext|> at least).
    #[arg(long, default_value_t = 512, value_parser = int_in(257usize, 1_000_000))]
    vocab_size: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4, value_parser = int_in(1usize, 1024))]
    n_layer: usize,
    /// Width (a multiple of --n-head).
    #[arg(long, default_value_t = 128, value_parser = int_in(1usize, 65536))]
    n_embd: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4, value_parser = int_in(1usize, 1024))]
    n_head: usize,
    /// Dropout.
    #[arg(long, default_value_t = 0.1, value_parser = float_in::<f64>("in [0, 1)", |x| (0.0..1.0).contains(&x)))]
    dropout: f64,
    /// Peak AdamW learning rate.
    #[arg(long, default_value_t = 2e-3, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Clip the global gradient norm to this before each step, as
    /// transformers' Trainer (0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    max_grad_norm: f64,
    /// Seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

fn corpus_spec(s: &str) -> String {
    // A bare path is the common case; name the kind for kiln-data.
    let p = Path::new(s);
    if s.starts_with("synthetic-reviews") || s.starts_with("lines:") || s.starts_with("files:") {
        s.to_string()
    } else if p.is_dir() {
        format!("files:{s}")
    } else {
        format!("lines:{s}")
    }
}

fn train_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (TrainArgs, Given) = parse_given("cargo xtask train lm", args)?;
    let opts = a.run.options("lm");
    let device = opts.device()?;
    let (mut tc, given) = match &opts.resume {
        Some(p) => {
            let rc: RunConfig = resume_config(&RunDir::open(p)?, RUN_KIND, "an LM run")?;
            (rc.train, typed)
        }
        None => (TrainConfig::default(), Given::all()),
    };
    if given.has("corpus") {
        tc.corpus = corpus_spec(&a.corpus);
    }
    if let Some(e) = a.epochs {
        tc.epochs = e;
    }
    macro_rules! take {
        ($($f:ident),*) => {$(
            if given.has(stringify!($f)) {
                tc.$f = a.$f;
            }
        )*};
    }
    take!(
        vocab_size,
        block_size,
        n_layer,
        n_embd,
        n_head,
        dropout,
        batch_size,
        grad_accum,
        lr,
        max_grad_norm,
        seed
    );
    let clip = if tc.max_grad_norm > 0.0 {
        format!("gradient norm clipped at {}", tc.max_grad_norm)
    } else {
        "no gradient clipping".into()
    };
    let batch = match tc.grad_accum {
        1 => format!("batch {}", tc.batch_size),
        k => format!("batch {} x {k} accumulated", tc.batch_size),
    };
    eprintln!(
        "train lm: {} layers x {} wide, {} heads, context {}, BPE {} on {}, {} epochs, {batch}, AdamW lr {}, {clip}",
        tc.n_layer, tc.n_embd, tc.n_head, tc.block_size, tc.vocab_size, tc.corpus, tc.epochs, tc.lr
    );
    let rep = train(&tc, &device, &opts)?;
    let folder = opts.resume.clone().or(opts.out.clone()).unwrap_or_default();
    if rep.interrupted {
        // Nothing to report: no finished epoch, model or sample yet, and the
        // session has said how to resume.
        exit_if_interrupted(true);
    }
    report(&rep, &folder);
    Ok(())
}

fn report(rep: &kiln_lm::train::TrainReport, run: &Path) {
    eprintln!(
        "train lm: train loss {:.3}, val loss {} nats/token (unigram entropy {:.3}); {:.0} tokens/s",
        rep.final_train_loss,
        rep.val_loss
            .map(|v| format!("{v:.3} (perplexity {:.1})", v.exp()))
            .unwrap_or_else(|| "-".into()),
        rep.unigram_entropy,
        rep.tokens_per_s
    );
    eprintln!("train lm: sample: {}", rep.sample.trim());
    eprintln!(
        "train lm: model in {}; try `cargo xtask generate --model {} --prompt \"The\"`",
        run.join(kiln_lm::train::MODEL_DIR).display(),
        run.display()
    );
}

fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let tc = TrainConfig {
        corpus: "synthetic-reviews:1500".into(),
        epochs: 3,
        seed: ctx.seed,
        ..Default::default()
    };
    let run = ctx.out.join("lm");
    let rep = train(
        &tc,
        &ctx.device,
        &RunOptions::new_run(Some(&run)).quiet(ctx.quiet),
    )?;
    super::stop_demo_if_interrupted(ctx, "lm");
    report(&rep, &run);
    // Load the written Hugging Face folder back, as `generate --model RUN` does.
    let files = ModelFiles::from_dir(&run.join(kiln_lm::train::MODEL_DIR))?;
    let model = Gpt2::from_files(&files, &ctx.device)?;
    let tok = files.load_tokenizer()?;
    let cfg = GenerationConfig {
        max_new_tokens: 30,
        temperature: 0.8,
        top_k: 40,
        seed: ctx.seed,
        ..Default::default()
    };
    for prompt in ["This film", "The acting"] {
        let out = generate_text(&model, &tok, prompt, &cfg, None)?;
        eprintln!("    lm: {prompt}{}", out.text);
    }
    Ok(())
}

/// GPT-2 small (random weights), 32-token prompt, 64 new tokens, tokens/s
/// including the prefill: torch_reference.py's `gpt2` benchmark.
fn bench_decode(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    decode_line(ctx, false)
}

/// The same with bf16 decode weights; also reports the logits' deviation from
/// f32 on a decode step.
fn bench_decode_bf16(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    decode_line(ctx, true)
}

fn decode_line(ctx: &super::BenchCtx, bf16: bool) -> Result<serde_json::Value> {
    let dev = ctx.device.clone();
    if bf16 && !dev.is_cpu() {
        anyhow::bail!("gpt2_small_greedy_decode_bf16 runs on the CPU only (its bf16 weight copies feed the CPU's gemv kernel)");
    }
    let cfg = Gpt2Config::gpt2_small();
    let vs = VarStore::new(0);
    let mut model = Gpt2::new(&cfg, vs.builder(DType::F32, &dev), vs.rng().clone())?;
    let mut rng = SeededRng::new(1);
    // One 32-token prompt per sequence (`--batch`; 1 by default).
    let prompts: Vec<Vec<u32>> = (0..ctx.batch_or(1))
        .map(|_| (0..32).map(|_| rng.below(cfg.vocab_size) as u32).collect())
        .collect();
    let prompt = &prompts[0];
    let mut deviation = None;
    if bf16 {
        let step = |m: &Gpt2| -> Result<Tensor> {
            let mut cache = kiln_lm::KvCache::new(cfg.n_layer);
            let p = Tensor::new(&prompt[..31], &dev)?.unsqueeze(0)?;
            m.forward_cached(&p, &mut cache, false)?;
            let last = Tensor::new(&prompt[31..], &dev)?.unsqueeze(0)?;
            Ok(m.forward_cached(&last, &mut cache, false)?)
        };
        let a = step(&model)?;
        model.set_bf16_decode(true)?;
        let b = step(&model)?;
        deviation = Some((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?);
    }
    let mut gen = GenerationConfig {
        max_new_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    generate_batch(&model, &prompts, &gen, None, None)?;
    gen.max_new_tokens = 64;
    dev.synchronize()?;
    let watch = super::GpuMemoryWatch::start(&dev, ctx.gpu_base);
    let t = Instant::now();
    let out = generate_batch(&model, &prompts, &gen, None, None)?;
    dev.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    let n: usize = out.iter().map(|g| g.ids.len()).sum();
    let tok_s = n as f64 / dt;
    let mut line = serde_json::json!({
        "bench": if bf16 { "gpt2_small_greedy_decode_bf16" } else { "gpt2_small_greedy_decode" },
        "threads": ctx.threads,
        "batch": prompts.len(),
        "prompt": 32,
        "new_tokens": n / prompts.len(),
        "tokens_per_s": (tok_s * 100.0).round() / 100.0,
    });
    if dev.is_cpu() {
        // Decode is bound by reading the weights once per step: set the weight
        // traffic against what this machine can stream with the same threads.
        let gb_per_token =
            decode_weight_bytes(&cfg, if bf16 { 2 } else { 4 }) as f64 / 1e9 / prompts.len() as f64;
        let t = decode_steps(&model, &prompts, gen.max_new_tokens, ctx.threads)?;
        let round = |x: f64, k: f64| (x * k).round() / k;
        // Decode steps and passes of the bandwidth probe alternate, and both
        // figures are medians: the machine's bandwidth moves with its
        // neighbours' load, and a best pass set against a median step would
        // compare two different moments.
        let machine = t.machine_median;
        line["weight_gb_per_token"] = round(gb_per_token, 1000.0).into();
        line["weight_read_gb_per_s"] = round(gb_per_token * tok_s, 100.0).into();
        line["machine_read_gb_per_s"] = round(machine, 100.0).into();
        line["machine_read_gb_per_s_best"] = round(t.machine_best, 100.0).into();
        // With the prefill, as tokens_per_s (and transformers' figure) counts it.
        line["share_of_read_bandwidth"] = round(gb_per_token * tok_s / machine, 1000.0).into();
        // The decode steps alone: the part that streams the weights once per
        // token (the prefill is a compute-bound matmul over the prompt).
        line["prefill_ms"] = round(t.prefill_s * 1e3, 10.0).into();
        line["decode_step_ms"] = round(t.step_s * 1e3, 100.0).into();
        line["decode_step_share_of_read_bandwidth"] = round(
            gb_per_token * prompts.len() as f64 / t.step_s / machine,
            1000.0,
        )
        .into();
    }
    if let Some(d) = deviation {
        line["max_abs_logit_deviation"] = serde_json::json!(d);
    }
    ctx.annotate(&mut line, watch);
    Ok(line)
}

/// Timings of decoding without sampling or logits processing (the model
/// alone), with this machine's read bandwidth measured between the steps.
struct DecodeTimes {
    /// The prompt's forward pass, seconds.
    prefill_s: f64,
    /// The median greedy decode step, seconds.
    step_s: f64,
    /// The median and the best pass of the bandwidth probe, GB/s.
    machine_median: f64,
    machine_best: f64,
}

/// Runs the prompts' prefill, then `new_tokens - 1` greedy steps, each timed;
/// a pass of the bandwidth probe runs before every eighth step.
fn decode_steps(
    model: &Gpt2,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    threads: usize,
) -> Result<DecodeTimes> {
    let cfg = model.config();
    let dev = model.device();
    let b = prompts.len();
    let len = prompts.first().map_or(0, Vec::len);
    let input = Tensor::from_vec(prompts.concat(), (b, len), dev)?;
    let probe = ReadProbe::new();
    let mut cache = kiln_lm::KvCache::new(cfg.n_layer);
    let t = Instant::now();
    let mut logits = model.forward_cached(&input, &mut cache, false)?;
    dev.synchronize()?;
    let prefill_s = t.elapsed().as_secs_f64();
    let (mut steps, mut passes) = (Vec::new(), Vec::new());
    for i in 0..new_tokens.max(2) - 1 {
        if i % 8 == 0 {
            passes.push(probe.pass(threads));
        }
        let next = logits.argmax(1)?.to_dtype(DType::U32)?.reshape((b, 1))?;
        let t = Instant::now();
        logits = model.forward_cached(&next, &mut cache, false)?;
        dev.synchronize()?;
        steps.push(t.elapsed().as_secs_f64());
    }
    passes.push(probe.pass(threads));
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(DecodeTimes {
        prefill_s,
        step_s: median(&mut steps),
        machine_median: median(&mut passes),
        machine_best: passes.iter().copied().fold(0.0, f64::max),
    })
}

/// A 512 MiB buffer (far past any cache) to measure this machine's read
/// bandwidth on.
struct ReadProbe {
    buf: Vec<u64>,
}

impl ReadProbe {
    fn new() -> Self {
        Self {
            buf: (0..(512usize << 20) / 8).map(|i| i as u64).collect(),
        }
    }

    /// One pass summing the buffer with `threads` threads, each reading its
    /// own contiguous share as eight streams side by side: GB/s. Of the read
    /// patterns tried on a 2-core Zen 3, this one (in its AVX2 build) was the
    /// fastest, 1.44x a single sequential stream per thread, so the decode
    /// kernels are set against the best read this machine gives, not an easy
    /// one.
    fn pass(&self, threads: usize) -> f64 {
        let share = self.buf.len().div_ceil(threads.max(1));
        let fast = avx2();
        // The decode kernels' helpers spin for a while after each step; the
        // probe's threads get the cores to themselves.
        kiln_core::ops::team::rest();
        let t = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .buf
                .chunks(share)
                .map(|c| s.spawn(move || sum_streams(c, fast)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        let dt = t.elapsed().as_secs_f64();
        // The sums must be used, or the reads could be optimised away.
        std::hint::black_box(sums);
        (self.buf.len() * 8) as f64 / dt / 1e9
    }
}

/// Whether this CPU runs the AVX2 build of [`streams_body`].
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The wrapping sum of `c`, read as eight equal streams side by side (the
/// last `len % 8` values on their own).
#[inline(always)]
fn streams_body(c: &[u64]) -> u64 {
    let p = c.len() / 8;
    let mut acc = [0u64; 8];
    for i in 0..p {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(c[j * p + i]);
        }
    }
    c[8 * p..]
        .iter()
        .chain(&acc)
        .fold(0u64, |a, &x| a.wrapping_add(x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn streams_avx2(c: &[u64]) -> u64 {
    streams_body(c)
}

fn sum_streams(c: &[u64], fast: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is `avx2()`: the CPU has AVX2.
        return unsafe { streams_avx2(c) };
    }
    let _ = fast;
    streams_body(c)
}

/// Bytes of the matmul weights one decode step reads: per block the fused
/// q/k/v, the attention output and the two MLP matrices, then the tied
/// embedding as the LM head (`bytes` per weight: 4 for f32, 2 for bf16).
fn decode_weight_bytes(cfg: &Gpt2Config, bytes: usize) -> usize {
    let d = cfg.n_embd;
    let block = d * 3 * d + d * d + 2 * d * cfg.inner();
    (cfg.n_layer * block + cfg.vocab_size * d) * bytes
}

/// GPT-2 small train step, batch 8 x 128, dropout on, AdamW: torch_reference.py's
/// `gpt2train` benchmark (1 warm-up step, 5 timed; on a GPU 5 and 30, as
/// torch_gpu.py).
fn bench_train(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = ctx.device.clone();
    let cfg = Gpt2Config::gpt2_small();
    let vs = VarStore::new(0);
    let model = Gpt2::new(&cfg, vs.builder(DType::F32, &dev), vs.rng().clone())?;
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-5, 0.01)?;
    let (b, t) = (ctx.batch_or(8), 128);
    let mut rng = SeededRng::new(1);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    // On the kernels' pool, as the trainers' loop runs its steps.
    let mut step = || -> Result<()> {
        kiln_core::ops::on_pool(|| {
            let loss = causal_lm_loss(&model, &ids, None, true)?;
            opt.backward_step(&loss)?;
            Ok(())
        })
    };
    let (warm, steps) = if dev.is_cpu() { (1, 5) } else { (5, 30) };
    for _ in 0..warm {
        step()?;
    }
    dev.synchronize()?;
    let watch = super::GpuMemoryWatch::start(&dev, ctx.gpu_base);
    let t0 = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    dev.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    let mut line = serde_json::json!({
        "bench": "gpt2_small_train_step",
        "threads": ctx.threads,
        "batch": b,
        "seq": t,
        "steps": steps,
        "tokens_per_s": ((b * t * steps) as f64 / dt * 10.0).round() / 10.0,
    });
    ctx.annotate(&mut line, watch);
    if !dev.is_cpu() {
        line["phases_ms"] = train_phases(
            &dev,
            5,
            || Ok(causal_lm_loss(&model, &ids, None, true)?),
            &mut opt,
        )?;
    }
    Ok(line)
}

/// Where a GPU train step's time goes: `steps` more steps, each phase
/// (forward, backward, optimizer) timed twice, once when its calls return
/// (`issue`: the host's work, launches and allocations) and once when the
/// device is idle again (`done`). A phase whose issue time is close to its
/// done time is bound by the host, not the GPU. Medians, in ms.
fn train_phases(
    dev: &kiln_core::Device,
    steps: usize,
    mut forward: impl FnMut() -> Result<Tensor> + Send,
    opt: &mut Optimizer,
) -> Result<serde_json::Value> {
    let mut t: Vec<Vec<f64>> = (0..6).map(|_| Vec::with_capacity(steps)).collect();
    for _ in 0..steps {
        kiln_core::ops::on_pool(|| -> Result<()> {
            let s = Instant::now();
            let loss = forward()?;
            t[0].push(s.elapsed().as_secs_f64());
            dev.synchronize()?;
            t[1].push(s.elapsed().as_secs_f64());
            let s = Instant::now();
            let grads = loss.backward()?;
            t[2].push(s.elapsed().as_secs_f64());
            dev.synchronize()?;
            t[3].push(s.elapsed().as_secs_f64());
            let s = Instant::now();
            opt.step(&grads)?;
            t[4].push(s.elapsed().as_secs_f64());
            dev.synchronize()?;
            t[5].push(s.elapsed().as_secs_f64());
            Ok(())
        })?;
    }
    let ms = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2] * 1e4).round() / 10.0
    };
    let mut out = serde_json::Map::new();
    for (i, name) in ["forward", "backward", "optimizer"].iter().enumerate() {
        let (issue, done) = (ms(&mut t[2 * i]), ms(&mut t[2 * i + 1]));
        out.insert(
            name.to_string(),
            serde_json::json!({"issue": issue, "done": done}),
        );
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<GenArgs>("cargo xtask generate", None, &["--model", "m"]);
        assert_numeric_flags_checked::<TrainArgs>("cargo xtask train lm", None, &[]);
    }

    #[test]
    fn train_phases_time_each_phase_and_step_the_optimizer() {
        let dev = kiln_core::Device::Cpu;
        let w = kiln_core::Var::from_slice(&[1.0f32, 2.0], 2, &dev).unwrap();
        let mut opt =
            Optimizer::single(OptimKind::adamw(), vec![("w".into(), w.clone())], 0.1, 0.0).unwrap();
        let phases =
            train_phases(&dev, 3, || Ok(w.as_tensor().sqr()?.sum_all()?), &mut opt).unwrap();
        for name in ["forward", "backward", "optimizer"] {
            let p = &phases[name];
            let (issue, done) = (p["issue"].as_f64().unwrap(), p["done"].as_f64().unwrap());
            assert!(issue >= 0.0 && done >= issue, "{name}: {p}");
        }
        assert_eq!(opt.step_count(), 3);
        // three AdamW steps of lr 0.1 move each weight down by about 0.3
        let v = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.7).abs() < 0.01 && (v[1] - 1.7).abs() < 0.01,
            "{v:?}"
        );
    }

    #[test]
    fn the_bandwidth_probe_reads_every_value_once() {
        // Lengths below, at and off multiples of the eight streams.
        for len in [0usize, 1, 7, 8, 9, 64, 1001] {
            let c: Vec<u64> = (0..len as u64).map(|i| i * i + u64::MAX / 3).collect();
            let want = c.iter().fold(0u64, |a, &x| a.wrapping_add(x));
            assert_eq!(sum_streams(&c, false), want, "plain {len}");
            if avx2() {
                assert_eq!(sum_streams(&c, true), want, "avx2 {len}");
            }
        }
    }
}
