//! kiln-vae in xtask: `train vae`, `eval vae`, `sample vae`, the `vae` demo
//! part and the `vae_mlp_train_step` benchmark.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use kiln_core::image::{save_image_grid, GridOptions};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::vars::VarStore;
use kiln_core::DType;
use kiln_data::{Dataset, Split};
use kiln_vae::{
    elbo_loss, evaluate, from_run, train, Likelihood, RunConfig, TrainConfig, Vae, VaeConfig,
};

use super::{
    exit_if_interrupted, float_in, int_in, open_optional_split, open_split, parse, parse_given,
    resume_config, threads_flag, Bench, Component, DemoPart, Given, RunArgs, MAX_BATCH, MAX_EPOCHS,
    MAX_IMAGE_SIZE,
};

/// Registers the VAE's tasks, demo part and benchmark.
pub fn component() -> Component {
    Component {
        demos: vec![DemoPart {
            name: "vae",
            about:
                "the chapter's MLP VAE on SyntheticFlowers (samples, reconstructions, loss curve)",
            run: demo,
        }],
        benches: vec![Bench {
            name: "vae_mlp_train_step",
            run: bench_train_step,
            gpu_batches: &[32, 512],
            cpu_batch: false,
        }],
        train: vec![("vae", train_cmd)],
        eval: vec![("vae", eval_cmd)],
        sample: vec![("vae", sample_cmd)],
        ..Default::default()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train vae",
    about = "Train a VAE (defaults: the chapter's MLP VAE, Adam 2e-3, batch 32)"
)]
struct TrainArgs {
    /// Dataset: synthetic-flowers, synthetic-shapes, flowers102, cifar10, mnist or folder:PATH.
    #[arg(long, default_value = "synthetic-flowers")]
    dataset: String,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// `folder:PATH` datasets: keep class folders without pictures (the
    /// class keeps its label, so every split numbers the classes alike)
    /// instead of refusing them, as torchvision's `ImageFolder(allow_empty=True)`.
    #[arg(long)]
    allow_empty_classes: bool,
    /// Epochs (the chapter trains 400).
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: Option<u64>,
    /// Batch size.
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, MAX_BATCH))]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 2e-3, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Seed of weights, data order and noise.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Architecture preset: mlp (the chapter's) or conv.
    #[arg(long, default_value = "mlp")]
    preset: String,
    /// Latent dimension.
    #[arg(long, value_parser = int_in(1usize, 65536))]
    latent: Option<usize>,
    /// KL weight (β-VAE).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    beta: f64,
    /// Likelihood: bernoulli, gaussian (fixed variance) or gaussian-learned.
    #[arg(long, default_value = "bernoulli")]
    likelihood: String,
    /// Condition on the class label (conditional VAE).
    #[arg(long)]
    conditional: bool,
    /// Image side the data is resized to (synthetic-flowers is drawn at 4 or
    /// more, synthetic-shapes at 8 or more; a conv model needs a multiple of
    /// 2^layers, 4 for the conv preset).
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, MAX_IMAGE_SIZE))]
    image_size: usize,
    /// Evaluate on the test split every N epochs (0 = at the end).
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    eval_every: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// The model config: on a new run from the flags (defaults included), on a
/// resumed run from the run's config with only the typed flags applied.
/// The data's channels and, with `--conditional`, its classes are set once
/// it is open ([`with_data`]).
fn model_config(a: &TrainArgs, given: &Given, base: Option<VaeConfig>) -> Result<VaeConfig> {
    let mut cfg = match base {
        Some(b) if !given.has("preset") => b,
        _ => match a.preset.as_str() {
            "mlp" | "chapter" => VaeConfig::mlp_chapter(),
            "conv" => VaeConfig::conv(),
            p => bail!("--preset {p:?}: expected mlp or conv"),
        },
    };
    if given.has("image_size") {
        cfg.image_size = a.image_size;
    }
    if let Some(l) = a.latent {
        cfg.latent = l;
    }
    if given.has("beta") {
        cfg.beta = a.beta;
    }
    if given.has("likelihood") {
        cfg.likelihood = match a.likelihood.as_str() {
            "bernoulli" | "bce" => Likelihood::Bernoulli,
            "gaussian" | "mse" => Likelihood::Gaussian {
                learned: false,
                logvar: 0.0,
            },
            "gaussian-learned" => Likelihood::Gaussian {
                learned: true,
                logvar: 0.0,
            },
            l => bail!("--likelihood {l:?}: expected bernoulli, gaussian or gaussian-learned"),
        };
    }
    Ok(cfg)
}

/// `cfg` with the opened data's `channels` and, when `--conditional` was
/// given, its `classes`; checked again.
fn with_data(
    mut cfg: VaeConfig,
    a: &TrainArgs,
    given: &Given,
    channels: usize,
    classes: usize,
) -> Result<VaeConfig> {
    cfg.channels = channels;
    if given.has("conditional") {
        cfg.num_classes = a.conditional.then_some(classes);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Checks a run's config before any data is opened or folder made
/// ([`RunConfig::validate`]: the model, the optimisation, and the side the
/// dataset can be drawn at); a bad `image_size` that came from
/// `--image-size` is reported by the flag.
fn check_run_config(rc: &RunConfig, given: &Given) -> Result<()> {
    match rc.validate() {
        Err(kiln_vae::VaeError::Config { field, msg })
            if field == "image_size" && given.has("image_size") =>
        {
            bail!("--image-size {}: {msg}", rc.model.image_size)
        }
        r => Ok(r?),
    }
}

fn train_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (TrainArgs, Given) = parse_given("cargo xtask train vae", args)?;
    let opts = a.run.options("vae");
    let device = opts.device()?;
    // A resumed run starts from its own config; a new one from the defaults.
    let (base, mut tc, given) = match &opts.resume {
        Some(path) => {
            let rc: RunConfig =
                resume_config(&RunDir::open(path)?, kiln_vae::RUN_KIND, "a VAE run")?;
            (Some(rc.model), rc.train, typed)
        }
        None => (None, TrainConfig::default(), Given::all()),
    };
    if let Some(e) = a.epochs {
        tc.epochs = e;
    }
    if given.has("batch_size") {
        tc.batch_size = a.batch_size;
    }
    if given.has("lr") {
        tc.lr = a.lr;
    }
    if given.has("seed") {
        tc.seed = a.seed;
    }
    if given.has("dataset") {
        tc.dataset = a.dataset.clone();
    }
    if given.has("eval_every") {
        tc.eval_every = a.eval_every;
    }
    // The model first: a side the model or the dataset cannot take is
    // refused by its flag before the data is opened or a folder made.
    let model_cfg = model_config(&a, &given, base)?;
    check_run_config(
        &RunConfig {
            model: model_cfg.clone(),
            train: tc.clone(),
        },
        &given,
    )?;
    let train_set = open_split(
        &tc.dataset,
        &a.data_root,
        Split::Train,
        model_cfg.image_size,
        a.allow_empty_classes,
    )?;
    let first = train_set.get(0)?;
    let model_cfg = with_data(
        model_cfg,
        &a,
        &given,
        first.image.channels,
        train_set.num_classes(),
    )?;
    let test_set = open_optional_split(
        &tc.dataset,
        &a.data_root,
        Split::Test,
        model_cfg.image_size,
        a.allow_empty_classes,
    )?;
    eprintln!(
        "train vae: {} on {} ({} train images{}), {} epochs, batch {}, Adam lr {}",
        describe(&model_cfg),
        tc.dataset,
        train_set.len(),
        test_set
            .as_ref()
            .map(|t| format!(", {} test", t.len()))
            .unwrap_or_default(),
        tc.epochs,
        tc.batch_size,
        tc.lr
    );
    let rep = train(&model_cfg, &tc, train_set, test_set, &device, &opts)?;
    if let Some(t) = &rep.test {
        eprintln!(
            "test: negative ELBO {:.2} nats/image ({:.4} bits/dim)",
            t.neg_elbo_nats, t.neg_elbo_bpd
        );
    }
    // A run stopped inside its first epoch has no epoch loss: say so rather
    // than print the NaN placeholder as a figure.
    if rep.final_train_loss.is_finite() {
        eprintln!(
            "train loss per image (last epoch) {:.2}; {:.0} images/s",
            rep.final_train_loss, rep.images_per_s
        );
    } else {
        eprintln!("no epoch finished yet; {:.0} images/s", rep.images_per_s);
    }
    if let Some(p) = opts.resume.as_ref().or(opts.out.as_ref()) {
        println!("{}", p.display());
    }
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

fn describe(c: &VaeConfig) -> String {
    format!(
        "{:?} VAE {}x{}x{} hidden {:?} latent {} beta {}{}",
        c.arch,
        c.channels,
        c.image_size,
        c.image_size,
        c.hidden,
        c.latent,
        c.beta,
        if c.num_classes.is_some() {
            " (conditional)"
        } else {
            ""
        }
    )
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask eval vae",
    about = "Negative ELBO (nats/image, bits/dim) and the IWAE bound of a VAE run"
)]
struct EvalArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Importance samples for the IWAE bound (0 skips it). Memory grows with
    /// k times the batch: the batch shrinks for a large k, and a k that does
    /// not fit in memory even one image at a time is refused.
    #[arg(long, default_value_t = 64, value_parser = int_in(0usize, usize::MAX))]
    k: usize,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// `folder:PATH` datasets: keep class folders without pictures (the
    /// class keeps its label, so every split numbers the classes alike)
    /// instead of refusing them, as torchvision's `ImageFolder(allow_empty=True)`.
    #[arg(long)]
    allow_empty_classes: bool,
    /// Split to evaluate: test, val or train.
    #[arg(long, default_value = "test")]
    split: String,
    /// Seed of the evaluation noise.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (at most 4 per core).
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
}

fn eval_cmd(args: &[String]) -> Result<()> {
    let a: EvalArgs = parse("cargo xtask eval vae", args)?;
    let device = super::device(&a.device, a.threads)?;
    let (model, rc) = from_run(&a.run, &device)?;
    let split = match a.split.as_str() {
        "test" => Split::Test,
        "val" => Split::Val,
        "train" => Split::Train,
        s => bail!("--split {s:?}: expected test, val or train"),
    };
    let batch = iwae_batch(&rc.model, a.k, memory_budget())?;
    if batch < EVAL_BATCH {
        eprintln!(
            "eval vae: --k {}: {batch} images per batch, to keep the IWAE bound's samples in memory",
            a.k
        );
    }
    let ds = open_split(
        &rc.train.dataset,
        &a.data_root,
        split,
        rc.model.image_size,
        a.allow_empty_classes,
    )?;
    let r = evaluate(&model, ds, &device, batch, a.k, a.seed)?;
    eprintln!(
        "{} on {} ({} images):",
        a.run.display(),
        rc.train.dataset,
        r.images
    );
    eprintln!(
        "  negative ELBO   {:>10.3} nats/image  {:.5} bits/dim",
        r.neg_elbo_nats, r.neg_elbo_bpd
    );
    if let (Some(n), Some(b)) = (r.iwae_nats, r.iwae_bpd) {
        eprintln!(
            "  IWAE (k = {:>3})  {:>10.3} nats/image  {:.5} bits/dim",
            r.iwae_k, n, b
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Images per batch of `eval vae` (fewer for a large `--k`).
const EVAL_BATCH: usize = 128;

/// Bytes the IWAE bound keeps per image and importance sample: each sample's
/// decoder pass stays in the autograd graph until the batch's bound is
/// summed. About 14 image-sized f32 tensors plus 4 of each decoder
/// activation; measured 161-181 KB for the chapter MLP and 310-384 KB for the
/// conv preset at 32x32, which this slightly over-estimates.
fn iwae_bytes_per_image_sample(cfg: &VaeConfig) -> u64 {
    let d = cfg.input_dim() as u64;
    let acts: u64 = match cfg.arch {
        kiln_vae::Arch::Mlp => cfg.hidden.iter().map(|&h| h as u64).sum(),
        kiln_vae::Arch::Conv => cfg
            .hidden
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let side = (cfg.image_size >> (i + 1)).max(1) as u64;
                c as u64 * side * side
            })
            .sum(),
    };
    4 * (14 * d + 4 * acts + 16 * cfg.latent as u64)
}

/// Memory `eval vae` may use for the IWAE bound: half of what the machine
/// has available ([`kiln_core::memory::available`]), or 4 GiB when unknown.
fn memory_budget() -> u64 {
    kiln_core::memory::available().map_or(4 << 30, |b| b / 2)
}

/// The batch size that keeps `k` importance samples per image within
/// `budget` bytes (at most [`EVAL_BATCH`]); a `k` that does not fit even one
/// image at a time is refused with the largest that does.
fn iwae_batch(cfg: &VaeConfig, k: usize, budget: u64) -> Result<usize> {
    if k == 0 {
        return Ok(EVAL_BATCH);
    }
    let per = iwae_bytes_per_image_sample(cfg);
    let per_image = per.saturating_mul(k as u64);
    let batch = (budget / per_image.max(1)).min(EVAL_BATCH as u64) as usize;
    if batch == 0 {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        bail!(
            "--k {k}: the IWAE bound keeps about {:.0} KB per image and importance sample, so \
             k = {k} needs {:.0} MB even one image at a time, more than the {:.0} MB this \
             machine can spare (half its available memory); use --k at most {} (64 is usual), \
             or --k 0 to skip the bound",
            per as f64 / 1024.0,
            mb(per_image),
            mb(budget),
            budget / per
        );
    }
    Ok(batch)
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask sample vae",
    about = "Write a grid of new samples from a VAE run"
)]
struct SampleArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 64, value_parser = int_in(1usize, 4096))]
    n: usize,
    /// Output PNG (default: RUN/samples-<seed>.png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the latents.
    #[arg(long, default_value_t = 1, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Class for a conditional VAE (default: cycle through classes).
    #[arg(long, value_parser = int_in(0u32, u32::MAX))]
    class: Option<u32>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn sample_cmd(args: &[String]) -> Result<()> {
    let a: SampleArgs = parse("cargo xtask sample vae", args)?;
    let device = super::device(&a.device, None)?;
    let (model, rc) = from_run(&a.run, &device)?;
    let labels = super::sample_labels(a.n, a.class, rc.model.num_classes, &device)?;
    let out = a
        .out
        .unwrap_or_else(|| a.run.join(format!("samples-{}.png", a.seed)));
    super::check_png_out(&out)?;
    let mut rng = SeededRng::new(a.seed);
    let imgs = model.sample(a.n, labels.as_ref(), &mut rng, &device)?;
    let ncols = (a.n as f64).sqrt().ceil() as usize;
    save_image_grid(
        &imgs,
        &out,
        &GridOptions {
            ncols,
            scale: 3,
            ..Default::default()
        },
    )?;
    println!("{}", out.display());
    Ok(())
}

fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let train_set = super::demo_flowers(Split::Train)?;
    let test_set = super::demo_flowers(Split::Test)?;
    let cfg = VaeConfig::mlp_chapter();
    let tc = TrainConfig {
        epochs: 8,
        seed: ctx.seed,
        ..Default::default()
    };
    let out = ctx.out.join("vae");
    let opts = RunOptions::new_run(Some(&out)).quiet(ctx.quiet);
    let rep = train(&cfg, &tc, train_set, Some(test_set), &ctx.device, &opts)?;
    crate::parts::stop_demo_if_interrupted(ctx, "vae");
    let t = rep
        .test
        .as_ref()
        .map(|t| {
            format!(
                "test negative ELBO {:.1} nats/image ({:.4} bits/dim)",
                t.neg_elbo_nats, t.neg_elbo_bpd
            )
        })
        .unwrap_or_default();
    eprintln!(
        "    vae: {t}; {:.0} images/s; figures in {}",
        rep.images_per_s,
        out.display()
    );
    Ok(())
}

/// The chapter VAE's train step at batch 32 on random images, as in
/// torch_reference.py's `vae` benchmark.
fn bench_train_step(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = ctx.device.clone();
    let cfg = VaeConfig::mlp_chapter();
    let vs = VarStore::new(0);
    let model = Vae::new(&cfg, vs.builder(DType::F32, &dev))?;
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 2e-3, 0.0)?;
    let mut rng = SeededRng::new(0);
    let b = ctx.batch_or(32);
    let x = rng.uniform(&[b, 3, 32, 32], 0.0, 1.0, &dev)?;
    ctx.train_line("vae_mlp_train_step", b, || {
        let out = model.forward(&x, None, &mut rng)?;
        let t = elbo_loss(&out, &x, cfg.likelihood, None, 1.0)?;
        opt.backward_step(&t.loss)?;
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::parts::assert_numeric_flags_checked;
    use std::path::Path;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<TrainArgs>("cargo xtask train vae", None, &[]);
        assert_numeric_flags_checked::<EvalArgs>("cargo xtask eval vae", None, &["--run", "r"]);
        assert_numeric_flags_checked::<SampleArgs>("cargo xtask sample vae", None, &["--run", "r"]);
        // `--epochs -1` used to read as an unknown flag; 0 used to train to NaN
        for bad in ["-1", "0"] {
            let e = parse::<TrainArgs>("t", &args(&["--epochs", bad]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--epochs") && e.contains("expected an integer in 1..=1000000"),
                "{e}"
            );
        }
        let max = kiln_core::device::max_threads();
        let e = parse::<TrainArgs>("t", &args(&["--threads", "100000"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--threads") && e.contains(&format!("1..={max}")),
            "{e}"
        );
        assert!(parse::<TrainArgs>("t", &args(&["--threads", &max.to_string()])).is_ok());
    }

    /// `--image-size 3` passed the parser and synthetic-flowers refused it
    /// later without naming the flag; a side the dataset cannot be drawn at,
    /// or a conv VAE cannot halve, is now refused by the flag before the data
    /// is opened or a run folder made, with the value and what is accepted.
    #[test]
    fn an_image_size_the_dataset_or_model_cannot_take_is_refused_by_its_flag() {
        let out = std::env::temp_dir().join(format!("kiln-xtask-vae-side-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let o = out.display().to_string();
        for (extra, side, expected) in [
            (
                &[][..],
                "3",
                "dataset synthetic-flowers cannot be drawn at this side: expected 4..=4096",
            ),
            (
                &["--dataset", "synthetic-shapes"][..],
                "4",
                "expected 8..=4096",
            ),
            (
                &["--preset", "conv"][..],
                "6",
                "expected a multiple of 4 (4, 8, 12, ...), found 6",
            ),
        ] {
            let mut v = args(&[
                "--image-size",
                side,
                "--out",
                &o,
                "--epochs",
                "1",
                "--quiet",
            ]);
            v.extend(args(extra));
            let e = format!("{:#}", train_cmd(&v).unwrap_err());
            assert!(
                e.starts_with(&format!("--image-size {side}: ")) && e.contains(expected),
                "{extra:?} {side}: {e}"
            );
            assert!(!out.exists(), "{extra:?} {side}: a run folder was made");
        }
        // The check reads the run's config: 4 suits the MLP and synthetic-flowers.
        let a: TrainArgs = parse("t", &args(&["--image-size", "4"])).unwrap();
        let cfg = model_config(&a, &Given::all(), None).unwrap();
        let tc = TrainConfig::default();
        check_run_config(
            &RunConfig {
                model: cfg,
                train: tc,
            },
            &Given::all(),
        )
        .unwrap();
    }

    #[test]
    fn iwae_samples_are_bounded_by_memory() {
        let cfg = VaeConfig::mlp_chapter();
        let per = iwae_bytes_per_image_sample(&cfg);
        // measured: 161-181 KB per image and sample for the chapter MLP
        assert!((160 << 10..220 << 10).contains(&per), "{per}");
        let gib = 1u64 << 30;
        assert_eq!(iwae_batch(&cfg, 64, 8 * gib).unwrap(), EVAL_BATCH);
        assert_eq!(iwae_batch(&cfg, 0, 1).unwrap(), EVAL_BATCH);
        let b = iwae_batch(&cfg, 4096, 8 * gib).unwrap();
        assert!((1..EVAL_BATCH).contains(&b), "{b}");
        assert!(b as u64 * 4096 * per <= 8 * gib);
        let e = iwae_batch(&cfg, 100_000_000, 8 * gib)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--k 100000000") && e.contains(&format!("at most {}", 8 * gib / per)),
            "{e}"
        );
    }

    #[test]
    fn a_broken_test_split_is_an_error_and_an_absent_one_a_note() {
        // (xtask has no tempfile dev-dependency: a folder of its own, removed at the end)
        let tmp = std::env::temp_dir().join(format!("kiln-xtask-vae-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        struct Dir(PathBuf);
        impl Dir {
            fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(tmp);
        let b = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir_all(&b).unwrap();
        let record = [vec![1u8], vec![100u8; 3072]].concat();
        for i in 1..=5 {
            std::fs::write(b.join(format!("data_batch_{i}.bin")), &record).unwrap();
        }
        std::fs::write(b.join("test_batch.bin"), b"").unwrap();
        let out = dir.path().join("run");
        let root = dir.path().display().to_string();
        let e = train_cmd(&args(&[
            "--dataset",
            "cifar10",
            "--data-root",
            &root,
            "--out",
            &out.display().to_string(),
            "--epochs",
            "1",
            "--quiet",
        ]))
        .unwrap_err();
        let e = format!("{e:#}");
        // A CIFAR-10 batch holds 10000 records: a one-record file is refused
        // by name before anything trains.
        assert!(
            e.contains("data_batch_1.bin") && e.contains("expected 30730000 bytes"),
            "{e}"
        );
        assert!(!out.join("config.toml").exists(), "nothing trained");

        // a folder dataset without split folders has no test split: None, said on stderr
        let imgs = dir.path().join("imgs").join("a");
        std::fs::create_dir_all(&imgs).unwrap();
        kiln_data::Image::zeros(3, 4, 4)
            .save_png(&imgs.join("0.png"))
            .unwrap();
        let spec = format!("folder:{}", dir.path().join("imgs").display());
        let te = open_optional_split(&spec, dir.path(), Split::Test, 8, false).unwrap();
        assert!(te.is_none());
        assert!(open_optional_split("cifar10", dir.path(), Split::Test, 32, false).is_err());
    }

    #[test]
    fn allow_empty_classes_keeps_an_empty_class_folder_and_its_label() {
        let tmp = std::env::temp_dir().join(format!("kiln-xtask-vae-empty-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(tmp);
        // train/{a,b,c} with two pictures each; test/b is empty
        for (split, class, n) in [
            ("train", "a", 2),
            ("train", "b", 2),
            ("train", "c", 2),
            ("test", "a", 1),
            ("test", "b", 0),
            ("test", "c", 1),
        ] {
            let d = dir.0.join("imgs").join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                kiln_data::Image::zeros(3, 4, 4)
                    .save_png(&d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let spec = format!("folder:{}", dir.0.join("imgs").display());
        // refused by default, naming the folder and the flag
        let e = open_split(&spec, &dir.0, Split::Test, 8, false)
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("--allow-empty-classes") && e.contains("b"),
            "{e}"
        );
        // allowed: train and test agree on the classes, and c keeps label 2
        let tr = open_split(&spec, &dir.0, Split::Train, 8, true).unwrap();
        let te = open_split(&spec, &dir.0, Split::Test, 8, true).unwrap();
        assert_eq!((tr.num_classes(), te.num_classes()), (3, 3));
        assert_eq!(te.labels().unwrap(), vec![0, 2]);
        let te = open_optional_split(&spec, &dir.0, Split::Test, 8, true).unwrap();
        assert_eq!(te.unwrap().labels().unwrap(), vec![0, 2]);
        // the flag is on every command that opens a dataset of the user's
        let a = args(&["--allow-empty-classes"]);
        assert!(parse::<TrainArgs>("t", &a).unwrap().allow_empty_classes);
        assert!(!parse::<TrainArgs>("t", &[]).unwrap().allow_empty_classes);
        let a = args(&["--run", "r", "--allow-empty-classes"]);
        assert!(parse::<EvalArgs>("e", &a).unwrap().allow_empty_classes);
    }
}
