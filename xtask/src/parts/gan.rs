//! kiln-gan in xtask: `train gan`, `sample gan` and the `gan` demo part
//! (the `dcgan32_train_iter` benchmark lives in `kernels.rs`, built from
//! kiln-gan's models).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Parser;
use kiln_core::image::save_image_grid;
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::Tensor;
use kiln_data::{Cached, Dataset, Split};
use kiln_gan::train::grid_options;
use kiln_gan::{
    load_generator, train, Augment, EmaConfig, Init, LossKind, ModelConfig, Norm, PenaltyKind,
    RunConfig, TrainConfig, Which,
};

use super::{
    exit_if_interrupted, open_split, parse, parse_given, resume_config, Component, DemoPart, Given,
    RunArgs,
};

/// Registers the GAN's tasks and demo part.
pub fn component() -> Component {
    Component {
        demos: vec![DemoPart {
            name: "gan",
            about: "a DCGAN on SyntheticFlowers (fixed-noise grids each epoch, interpolation, loss curve)",
            run: demo,
        }],
        train: vec![("gan", train_cmd)],
        sample: vec![("gan", sample_cmd)],
        ..Default::default()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train gan",
    about = "Train a GAN (defaults: dcgan32, non-saturating loss, Adam 2e-4 betas (0.5, 0.999), batch 64)"
)]
struct TrainArgs {
    /// Dataset: synthetic-flowers, flowers102, cifar10, mnist or folder:PATH.
    #[arg(long, default_value = "synthetic-flowers")]
    dataset: String,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// Architecture preset: dcgan32 (torch_reference.py's DCGAN) or dcgan64.
    #[arg(long, default_value = "dcgan32")]
    preset: String,
    /// Epochs.
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per discriminator step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Adam learning rate of both networks (--lr-g / --lr-d override it).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Generator learning rate.
    #[arg(long)]
    lr_g: Option<f64>,
    /// Discriminator learning rate.
    #[arg(long)]
    lr_d: Option<f64>,
    /// Adam beta1.
    #[arg(long, default_value_t = 0.5)]
    beta1: f64,
    /// Adam beta2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// Loss: minimax, non-saturating, least-squares, hinge or wasserstein.
    #[arg(long, default_value = "non-saturating")]
    loss: String,
    /// Weight clipping bound of the Wasserstein critic (0: none; default 0.01, or 0 with a penalty).
    #[arg(long)]
    clip: Option<f64>,
    /// Discriminator steps per generator step.
    #[arg(long, default_value_t = 1)]
    n_critic: usize,
    /// Gradient penalty: none, r1 or wgan-gp.
    #[arg(long, default_value = "none")]
    penalty: String,
    /// Penalty weight (R1's gamma, WGAN-GP's lambda).
    #[arg(long, default_value_t = 10.0)]
    penalty_weight: f64,
    /// Finite-difference step of the penalty's Hessian-vector product (input-space length).
    #[arg(long, default_value_t = 1e-2)]
    fd_step: f64,
    /// Spectral normalisation of the discriminator's convolutions.
    #[arg(long)]
    spectral_norm: bool,
    /// Discriminator normalisation: batch, layer or none (default batch; layer with a penalty).
    #[arg(long)]
    d_norm: Option<String>,
    /// Generator normalisation: batch or none.
    #[arg(long, default_value = "batch")]
    g_norm: String,
    /// Keep an EMA copy of the generator with this decay (e.g. 0.999).
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Generator steps before the EMA starts averaging (default 1000).
    #[arg(long)]
    ema_start: Option<u64>,
    /// DiffAugment policy, e.g. color,translation,cutout (none: off).
    #[arg(long, default_value = "none")]
    augment: String,
    /// Class-conditional GAN (labels to G, projection discriminator).
    #[arg(long)]
    conditional: bool,
    /// Weight init: radford (N(0, 0.02), batch norm N(1, 0.02)) or pytorch (PyTorch's defaults).
    #[arg(long, default_value = "radford")]
    init: String,
    /// Latent dimension.
    #[arg(long)]
    nz: Option<usize>,
    /// Generator width.
    #[arg(long)]
    ngf: Option<usize>,
    /// Discriminator width.
    #[arg(long)]
    ndf: Option<usize>,
    /// Steps in a row of D(x) > 0.99 and D(G(z)) < 0.01 that stop training (0: never).
    #[arg(long, default_value_t = 200)]
    collapse_window: u64,
    /// Seed of weights, data order, noise and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

fn norm(flag: &str, s: &str) -> Result<Norm> {
    Ok(match s {
        "batch" => Norm::Batch,
        "layer" => Norm::Layer,
        "none" => Norm::None,
        _ => bail!("{flag} {s:?}: expected batch, layer or none"),
    })
}

/// The model config: on a new run from the preset and flags, on a resumed
/// run from the run's config with only the typed flags applied.
fn model_config(
    a: &TrainArgs,
    given: &Given,
    base: Option<ModelConfig>,
    penalty: PenaltyKind,
    classes: usize,
    channels: usize,
) -> Result<ModelConfig> {
    let mut m = match base {
        Some(b) if !given.has("preset") => b,
        _ => ModelConfig::preset(&a.preset)?,
    };
    m.channels = channels;
    if let Some(v) = a.nz {
        m.nz = v;
    }
    if let Some(v) = a.ngf {
        m.ngf = v;
    }
    if let Some(v) = a.ndf {
        m.ndf = v;
    }
    if given.has("g_norm") {
        m.g_norm = norm("--g-norm", &a.g_norm)?;
    }
    match &a.d_norm {
        Some(s) => m.d_norm = norm("--d-norm", s)?,
        // A penalty is per sample: no batch norm in D unless asked for.
        None if given.has("penalty") && penalty != PenaltyKind::None => m.d_norm = Norm::Layer,
        None => {}
    }
    if given.has("spectral_norm") {
        m.spectral_norm = a.spectral_norm;
    }
    if given.has("init") {
        m.init = match a.init.as_str() {
            "radford" | "dcgan" => Init::Radford,
            "pytorch" | "torch" => Init::Pytorch,
            s => bail!("--init {s:?}: expected radford or pytorch"),
        };
    }
    if given.has("conditional") {
        m.num_classes = a.conditional.then_some(classes);
    }
    Ok(m)
}

fn train_config(a: &TrainArgs, given: &Given, base: Option<TrainConfig>) -> Result<TrainConfig> {
    let mut tc = base.unwrap_or_default();
    if let Some(e) = a.epochs {
        tc.epochs = e;
    }
    if given.has("dataset") {
        tc.dataset = a.dataset.clone();
    }
    if given.has("batch_size") {
        tc.batch_size = a.batch_size;
    }
    if given.has("lr") {
        tc.lr_g = a.lr;
        tc.lr_d = a.lr;
    }
    if let Some(v) = a.lr_g {
        tc.lr_g = v;
    }
    if let Some(v) = a.lr_d {
        tc.lr_d = v;
    }
    if given.has("beta1") {
        tc.beta1 = a.beta1;
    }
    if given.has("beta2") {
        tc.beta2 = a.beta2;
    }
    if given.has("loss") {
        tc.loss = LossKind::parse(&a.loss)?;
    }
    if given.has("n_critic") {
        tc.n_critic = a.n_critic;
    }
    if given.has("penalty") {
        tc.penalty = PenaltyKind::parse(&a.penalty)?;
    }
    match a.clip {
        Some(c) => tc.clip = c,
        // WGAN-GP replaces clipping with its penalty.
        None if given.has("penalty") && tc.penalty != PenaltyKind::None => tc.clip = 0.0,
        None => {}
    }
    if given.has("penalty_weight") {
        tc.penalty_weight = a.penalty_weight;
    }
    if given.has("fd_step") {
        tc.fd_step = a.fd_step;
    }
    match (a.ema_decay, a.ema_start, &mut tc.ema) {
        (Some(decay), start, ema) => {
            let start = start
                .or(ema.as_ref().map(|e| e.start))
                .unwrap_or(EmaConfig::default().start);
            *ema = Some(EmaConfig { decay, start });
        }
        (None, Some(start), Some(e)) => e.start = start,
        (None, Some(_), None) => bail!("--ema-start needs --ema-decay"),
        (None, None, _) => {}
    }
    if given.has("augment") {
        tc.augment = Augment::parse_policy(&a.augment)?;
    }
    if given.has("collapse_window") {
        tc.collapse_window = a.collapse_window;
    }
    if given.has("seed") {
        tc.seed = a.seed;
    }
    Ok(tc)
}

fn train_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (TrainArgs, Given) = parse_given("cargo xtask train gan", args)?;
    let opts = a.run.options("gan");
    let device = opts.device()?;
    let (base, given) = match &opts.resume {
        Some(path) => {
            let rc: RunConfig =
                resume_config(&RunDir::open(path)?, kiln_gan::RUN_KIND, "a GAN run")?;
            (Some(rc), typed)
        }
        None => (None, Given::all()),
    };
    let tc = train_config(&a, &given, base.as_ref().map(|b| b.train.clone()))?;
    let preset_size = match &base {
        Some(b) if !given.has("preset") => b.model.image_size,
        _ => ModelConfig::preset(&a.preset)?.image_size,
    };
    let train_set = open_split(&tc.dataset, &a.data_root, Split::Train, preset_size)?;
    let model = model_config(
        &a,
        &given,
        base.map(|b| b.model),
        tc.penalty,
        train_set.num_classes(),
        train_set.channels(),
    )?;
    eprintln!(
        "train gan: {} on {} ({} images), {} epochs, batch {} x {} critic step(s), {:?} loss, Adam lr {}/{}",
        describe(&model),
        tc.dataset,
        train_set.len(),
        tc.epochs,
        tc.batch_size,
        tc.n_critic,
        tc.loss,
        tc.lr_g,
        tc.lr_d
    );
    let rep = train(&model, &tc, train_set, &device, &opts)?;
    eprintln!(
        "last epoch: D loss {:.4}, G loss {:.4}, D(x) {:.3}, D(G(z)) {:.3}; {:.0} images/s",
        rep.d_loss, rep.g_loss, rep.d_real, rep.d_fake, rep.images_per_s
    );
    if let Some(p) = opts.resume.as_ref().or(opts.out.as_ref()) {
        println!("{}", p.display());
    }
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

fn describe(m: &ModelConfig) -> String {
    let mut s = format!(
        "DCGAN {}x{}x{} nz {} ngf {} ndf {} (G norm {:?}, D norm {:?}, {:?} init",
        m.channels, m.image_size, m.image_size, m.nz, m.ngf, m.ndf, m.g_norm, m.d_norm, m.init
    );
    if m.spectral_norm {
        s.push_str(", spectral norm");
    }
    if let Some(k) = m.num_classes {
        s.push_str(&format!(", conditional on {k} classes"));
    }
    s.push(')');
    s
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask sample gan",
    about = "Write a grid of new images from a GAN run"
)]
struct SampleArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Sample from the EMA copy of the generator.
    #[arg(long)]
    ema: bool,
    /// Checkpoint: last (default), healthy (the one a collapse message names) or a file.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Output PNG (default: RUN/samples-<seed>[-ema].png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the latents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Class for a conditional GAN (default: cycle through the classes).
    #[arg(long)]
    class: Option<u32>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn sample_cmd(args: &[String]) -> Result<()> {
    let a: SampleArgs = parse("cargo xtask sample gan", args)?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let device = super::device(&a.device, None)?;
    let which = if a.ema { Which::Ema } else { Which::Generator };
    let (g, rc) = load_generator(&a.run, which, a.checkpoint.as_deref(), &device)?;
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
    let imgs = g.sample(a.n, labels.as_ref(), &mut SeededRng::new(a.seed))?;
    let suffix = if a.ema { "-ema" } else { "" };
    let out = a
        .out
        .unwrap_or_else(|| a.run.join(format!("samples-{}{suffix}.png", a.seed)));
    let ncols = (a.n as f64).sqrt().ceil() as usize;
    save_image_grid(&imgs, &out, &grid_options(ncols))?;
    println!("{}", out.display());
    Ok(())
}

/// The demo: a DCGAN of a quarter of dcgan32's widths (ngf = ndf = 16) on
/// SyntheticFlowers at 32x32, batch 32, 768 iterations, with an EMA copy:
/// flower-like images of several colours in about half a minute on 2 cores.
fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let flowers = open_split("synthetic-flowers", Path::new("data"), Split::Train, 32)?;
    // Drawn once, not every epoch.
    let train_set: Arc<dyn Dataset> = Arc::new(Cached::new(flowers.as_ref())?);
    let model = ModelConfig {
        ngf: 16,
        ndf: 16,
        ..ModelConfig::dcgan32()
    };
    let tc = TrainConfig {
        epochs: 6,
        batch_size: 32,
        seed: ctx.seed,
        ema: Some(EmaConfig {
            decay: 0.99,
            start: 100,
        }),
        ..TrainConfig::default()
    };
    let out = ctx.out.join("gan");
    let opts = RunOptions::new_run(Some(&out)).quiet(ctx.quiet);
    let rep = train(&model, &tc, train_set, &ctx.device, &opts)?;
    eprintln!(
        "    gan: D loss {:.3}, G loss {:.3}, D(x) {:.3}, D(G(z)) {:.3} (last epoch, after the D step); \
         {:.0} images/s; grids in {}",
        rep.d_loss,
        rep.g_loss,
        rep.d_real,
        rep.d_fake,
        rep.images_per_s,
        out.display()
    );
    Ok(())
}
