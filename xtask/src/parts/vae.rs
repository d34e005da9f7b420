//! kiln-vae in xtask: `train vae`, `eval vae`, `sample vae`, the `vae` demo
//! part and the `vae_mlp_train_step` benchmark.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Parser;
use kiln_core::image::{save_image_grid, GridOptions};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_data::{Dataset, Split};
use kiln_vae::{
    elbo_loss, evaluate, from_run, train, Likelihood, RunConfig, TrainConfig, Vae, VaeConfig,
};

use super::{
    exit_if_interrupted, finished_notice, open_split, parse, parse_given, resume_config, Bench,
    Component, DemoPart, Given, RunArgs,
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
    /// Dataset: synthetic-flowers, flowers102, cifar10, mnist or folder:PATH.
    #[arg(long, default_value = "synthetic-flowers")]
    dataset: String,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// Epochs (the chapter trains 400).
    #[arg(long)]
    epochs: Option<u64>,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed of weights, data order and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Architecture preset: mlp (the chapter's) or conv.
    #[arg(long, default_value = "mlp")]
    preset: String,
    /// Latent dimension.
    #[arg(long)]
    latent: Option<usize>,
    /// KL weight (β-VAE).
    #[arg(long, default_value_t = 1.0)]
    beta: f64,
    /// Likelihood: bernoulli, gaussian (fixed variance) or gaussian-learned.
    #[arg(long, default_value = "bernoulli")]
    likelihood: String,
    /// Condition on the class label (conditional VAE).
    #[arg(long)]
    conditional: bool,
    /// Image side the data is resized to.
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// Evaluate on the test split every N epochs (0 = at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// The model config: on a new run from the flags (defaults included), on a
/// resumed run from the run's config with only the typed flags applied.
fn model_config(
    a: &TrainArgs,
    given: &Given,
    base: Option<VaeConfig>,
    channels: usize,
    classes: usize,
) -> Result<VaeConfig> {
    let mut cfg = match base {
        Some(b) if !given.has("preset") => b,
        _ => match a.preset.as_str() {
            "mlp" | "chapter" => VaeConfig::mlp_chapter(),
            "conv" => VaeConfig::conv(),
            p => bail!("--preset {p:?}: expected mlp or conv"),
        },
    };
    cfg.channels = channels;
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
    if given.has("conditional") {
        cfg.num_classes = a.conditional.then_some(classes);
    }
    cfg.validate()?;
    Ok(cfg)
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
    let image_size = match &base {
        Some(b) if !given.has("image_size") => b.image_size,
        _ => a.image_size,
    };
    let train_set = open_split(&tc.dataset, &a.data_root, Split::Train, image_size)?;
    let first = train_set.get(0)?;
    let model_cfg = model_config(
        &a,
        &given,
        base,
        first.image.channels,
        train_set.num_classes(),
    )?;
    let test_set = open_split(&tc.dataset, &a.data_root, Split::Test, model_cfg.image_size).ok();
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
    let rep = match train(&model_cfg, &tc, train_set, test_set, &device, &opts) {
        Ok(r) => r,
        Err(kiln_vae::VaeError::Session(e)) if finished_notice(&e).is_some() => {
            eprintln!("{e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(t) = &rep.test {
        eprintln!(
            "test: negative ELBO {:.2} nats/image ({:.4} bits/dim)",
            t.neg_elbo_nats, t.neg_elbo_bpd
        );
    }
    eprintln!(
        "train loss per image (last epoch) {:.2}; {:.0} images/s",
        rep.final_train_loss, rep.images_per_s
    );
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
    /// Importance samples for the IWAE bound (0 skips it).
    #[arg(long, default_value_t = 64)]
    k: usize,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// Split to evaluate: test, val or train.
    #[arg(long, default_value = "test")]
    split: String,
    /// Seed of the evaluation noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads.
    #[arg(long)]
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
    let ds = open_split(&rc.train.dataset, &a.data_root, split, rc.model.image_size)?;
    let r = evaluate(&model, ds, &device, 128, a.k, a.seed)?;
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
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Output PNG (default: RUN/samples-<seed>.png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the latents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Class for a conditional VAE (default: cycle through classes).
    #[arg(long)]
    class: Option<u32>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn sample_cmd(args: &[String]) -> Result<()> {
    let a: SampleArgs = parse("cargo xtask sample vae", args)?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let device = super::device(&a.device, None)?;
    let (model, rc) = from_run(&a.run, &device)?;
    let labels = match rc.model.num_classes {
        Some(k) => {
            let ids: Vec<u32> = (0..a.n as u32)
                .map(|i| a.class.unwrap_or(i % k as u32))
                .collect();
            if let Some(&c) = ids.iter().find(|&&c| c as usize >= k) {
                bail!("--class {c}: the model has classes 0..{k}");
            }
            Some(Tensor::new(ids, &device)?)
        }
        None => None,
    };
    let mut rng = SeededRng::new(a.seed);
    let imgs = model.sample(a.n, labels.as_ref(), &mut rng, &device)?;
    let out = a
        .out
        .unwrap_or_else(|| a.run.join(format!("samples-{}.png", a.seed)));
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

fn demo(ctx: &crate::demo::DemoCtx) -> Result<()> {
    let train_set = open_split("synthetic-flowers", Path::new("data"), Split::Train, 32)?;
    let test_set = open_split("synthetic-flowers", Path::new("data"), Split::Test, 32)?;
    let cfg = VaeConfig::mlp_chapter();
    let tc = TrainConfig {
        epochs: 8,
        seed: ctx.seed,
        ..Default::default()
    };
    let out = ctx.out.join("vae");
    let opts = RunOptions::new_run(Some(&out)).quiet(ctx.quiet);
    let rep = train(&cfg, &tc, train_set, Some(test_set), &ctx.device, &opts)?;
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
fn bench_train_step(ctx: &crate::bench::BenchCtx) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let cfg = VaeConfig::mlp_chapter();
    let vs = VarStore::new(0);
    let model = Vae::new(&cfg, vs.builder(DType::F32, &dev))?;
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 2e-3, 0.0)?;
    let mut rng = SeededRng::new(0);
    let x = rng.uniform(&[32, 3, 32, 32], 0.0, 1.0, &dev)?;
    ctx.train_line("vae_mlp_train_step", 32, || {
        let out = model.forward(&x, None, &mut rng)?;
        let t = elbo_loss(&out, &x, cfg.likelihood, None, 1.0)?;
        opt.backward_step(&t.loss)?;
        Ok(())
    })
}
