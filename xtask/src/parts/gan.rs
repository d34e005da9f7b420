//! kiln-gan in xtask: `train gan`, `eval gan`, `sample gan`, the `gan` demo
//! part and the `fid_inception_features` benchmark (the `dcgan32_train_iter`
//! benchmark lives in `kernels.rs`, built from kiln-gan's models). The
//! fallback feature extractor, a kiln-ssl SimCLR encoder, is wired in here so
//! that kiln-gan does not depend on kiln-ssl.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_core::image::save_image_grid;
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::Tensor;
use kiln_data::{Cached, Dataset, Split};
use kiln_gan::eval::{
    collapsed_features, dataset_features, evaluate, generated_features, EvalOptions, Fnv,
};
use kiln_gan::inception::{InceptionV3, RandomWeights, Resize};
use kiln_gan::metrics::{Extracted, FeatureExtractor, Features, KidOptions};
use kiln_gan::train::grid_options;
use kiln_gan::{
    load_generator, train, train_with_eval, Augment, EmaConfig, ExtractorSource, FidEval,
    FidRecord, Init, LossKind, ModelConfig, Norm, PenaltyKind, RunConfig, TrainConfig, Which,
    BEST_FID_CHECKPOINT, FID_RECORD_FILE,
};

use super::{
    exit_if_interrupted, float_in, int_in, open_split, parse, parse_given, resume_config,
    threads_flag, Component, DemoPart, Given, RunArgs, MAX_BATCH, MAX_EPOCHS,
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
        eval: vec![("gan", eval_cmd)],
        sample: vec![("gan", sample_cmd)],
        benches: vec![super::Bench {
            name: "fid_inception_features",
            run: bench_fid,
            gpu_batches: &[],
            cpu_batch: false,
        }],
        ..Default::default()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train gan",
    about = "Train a GAN (defaults: dcgan32, non-saturating loss, Adam 2e-4 betas (0.5, 0.999), batch 64)"
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
    /// Architecture preset: dcgan32 (torch_reference.py's DCGAN) or dcgan64.
    #[arg(long, default_value = "dcgan32")]
    preset: String,
    /// Epochs.
    #[arg(long, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: Option<u64>,
    /// Images per discriminator step.
    #[arg(long, default_value_t = 64, value_parser = int_in(2usize, MAX_BATCH))]
    batch_size: usize,
    /// Adam learning rate of both networks (--lr-g / --lr-d override it).
    #[arg(long, default_value_t = 2e-4, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Generator learning rate.
    #[arg(long, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr_g: Option<f64>,
    /// Discriminator learning rate.
    #[arg(long, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr_d: Option<f64>,
    /// Adam beta1.
    #[arg(long, default_value_t = 0.5, value_parser = float_in::<f64>("in [0, 1)", |x| (0.0..1.0).contains(&x)))]
    beta1: f64,
    /// Adam beta2.
    #[arg(long, default_value_t = 0.999, value_parser = float_in::<f64>("in [0, 1)", |x| (0.0..1.0).contains(&x)))]
    beta2: f64,
    /// Loss: minimax, non-saturating, least-squares, hinge or wasserstein.
    #[arg(long, default_value = "non-saturating")]
    loss: String,
    /// Weight clipping bound of the Wasserstein critic (0: none; default 0.01, or 0 with a penalty).
    #[arg(long, value_parser = float_in::<f64>(">= 0", |x| x >= 0.0))]
    clip: Option<f64>,
    /// Discriminator steps per generator step.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, 100))]
    n_critic: usize,
    /// Gradient penalty: none, r1 or wgan-gp.
    #[arg(long, default_value = "none")]
    penalty: String,
    /// Penalty weight (R1's gamma, WGAN-GP's lambda).
    #[arg(long, default_value_t = 10.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    penalty_weight: f64,
    /// Finite-difference step of the penalty's Hessian-vector product (input-space length).
    #[arg(long, default_value_t = 1e-2, value_parser = float_in::<f64>("in (0, 1]", |x| x > 0.0 && x <= 1.0))]
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
    #[arg(long, value_parser = float_in::<f64>("in (0, 1)", |x| x > 0.0 && x < 1.0))]
    ema_decay: Option<f64>,
    /// Generator steps before the EMA starts averaging (default 1000).
    #[arg(long, value_parser = int_in(0u64, u64::MAX))]
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
    #[arg(long, value_parser = int_in(1usize, 4096))]
    nz: Option<usize>,
    /// Generator width.
    #[arg(long, value_parser = int_in(1usize, 4096))]
    ngf: Option<usize>,
    /// Discriminator width.
    #[arg(long, value_parser = int_in(1usize, 4096))]
    ndf: Option<usize>,
    /// Steps in a row of D(x) > 0.99 and D(G(z)) < 0.01 that stop training (0: never).
    #[arg(long, default_value_t = 200, value_parser = int_in(0u64, u64::MAX))]
    collapse_window: u64,
    /// Seed of weights, data order, noise and augmentation.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Evaluate FID every N epochs and keep checkpoints/best-fid.safetensors
    /// (needs --inception or --ssl-run, recorded in the run's
    /// fid-extractor.json: a resume without them reuses it; 0: never).
    #[arg(long, value_parser = int_in(0u64, u64::MAX))]
    eval_every: Option<u64>,
    /// pytorch-fid InceptionV3 weights for --eval-every.
    #[arg(long)]
    inception: Option<PathBuf>,
    /// A SimCLR run whose encoder --eval-every uses when no Inception weights are at hand.
    #[arg(long)]
    ssl_run: Option<PathBuf>,
    /// How images reach the extractor's input size: `pytorch-fid` (bilinear,
    /// align_corners=False) or `clean` (clean-fid's PIL bicubic on float channels).
    #[arg(long, default_value = "pytorch-fid", value_parser = resize_flag)]
    resize: Resize,
    /// Generated images per evaluation (and test images compared with; a
    /// resume keeps the run's own unless given).
    #[arg(long, default_value_t = 1000, value_parser = int_in(2usize, 1_000_000))]
    eval_n: usize,
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
    if let Some(v) = a.eval_every {
        tc.eval_every = v;
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
    let train_set = open_split(
        &tc.dataset,
        &a.data_root,
        Split::Train,
        preset_size,
        a.allow_empty_classes,
    )?;
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
    let (ex, reference, source, eval_n) = match tc.eval_every {
        0 => (None, None, None, a.eval_n),
        _ => {
            let recorded = match &opts.resume {
                Some(run) => FidRecord::read(run)?,
                None => None,
            };
            let (inception, ssl_run, resize) =
                train_extractor(&a, &given, &tc, opts.resume.as_deref(), recorded.as_ref())?;
            let ex = extractor(inception.as_deref(), ssl_run.as_deref(), resize, &device)?;
            let source = extractor_source(inception.as_deref(), ssl_run.as_deref(), resize)?;
            let eval_n = match &recorded {
                Some(r) if !given.has("eval_n") => r.n,
                _ => a.eval_n,
            };
            // Checked before the reference features, which can take long
            // with another extractor (kiln-gan checks again, reference
            // count included, when the run opens).
            if let (Some(run), Some(was)) = (&opts.resume, &recorded) {
                let now = FidRecord {
                    extractor: ex.name(),
                    hash: ex.hash(),
                    source: Some(source.clone()),
                    n: eval_n,
                    n_reference: was.n_reference,
                    seed: FidEval::new(ex.as_ref(), &Features::empty(1), eval_n).seed,
                };
                refuse_other_evaluation(run, was, &now)?;
            }
            let test = open_split(
                &tc.dataset,
                &a.data_root,
                Split::Test,
                model.image_size,
                a.allow_empty_classes,
            )?;
            let f = dataset_features(
                ex.as_ref(),
                test.as_ref(),
                Some(eval_n),
                50,
                &device,
                Some(&a.data_root.join("feature-cache")),
            )?;
            eprintln!(
                "FID every {} epoch(s): {} images against {} test images, extractor {} (hash {})",
                tc.eval_every,
                eval_n,
                f.len(),
                ex.name(),
                ex.hash()
            );
            (Some(ex), Some(f), Some(source), eval_n)
        }
    };
    let fid_eval = match (&ex, &reference) {
        (Some(ex), Some(f)) => Some(FidEval {
            source,
            ..FidEval::new(ex.as_ref(), f, eval_n)
        }),
        _ => None,
    };
    let rep = train_with_eval(
        &model,
        &tc,
        train_set,
        &device,
        &opts,
        None,
        fid_eval.as_ref(),
    )?;
    if let Some(b) = rep.best_fid {
        eprintln!("best FID {b:.4} (checkpoints/{BEST_FID_CHECKPOINT})");
    }
    // Interrupted inside the first epoch there is no epoch summary yet: say
    // so rather than print its NaN placeholders.
    if rep.d_loss.is_nan() && rep.interrupted {
        eprintln!("no epoch finished yet: its losses are in metrics.jsonl once one does");
    } else {
        eprintln!(
            "last epoch: D loss {:.4}, G loss {:.4}, D(x) {:.3}, D(G(z)) {:.3}; {:.0} images/s",
            rep.d_loss, rep.g_loss, rep.d_real, rep.d_fake, rep.images_per_s
        );
    }
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
    #[arg(long, default_value_t = 64, value_parser = int_in(1usize, 4096))]
    n: usize,
    /// Sample from the EMA copy of the generator.
    #[arg(long)]
    ema: bool,
    /// Checkpoint: last (default), healthy (the one a collapse message names) or a file.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Output PNG (default: RUN/samples-<seed>[-<checkpoint>][-class<k>][-ema].png;
    /// `last` is not named).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the latents.
    #[arg(long, default_value_t = 1, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Class for a conditional GAN (default: cycle through the classes).
    #[arg(long, value_parser = int_in(0u32, u32::MAX))]
    class: Option<u32>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The default grid's name, `samples-<seed>[-<checkpoint>][-class<k>][-ema].png`,
/// so grids from another checkpoint or class do not replace each other (a
/// checkpoint file is named by its stem, other characters than letters,
/// digits, `-` and `_` as `_`; `last` is left out).
fn sample_name(seed: u64, checkpoint: Option<&str>, class: Option<u32>, ema: bool) -> String {
    let mut name = format!("samples-{seed}");
    let stem = checkpoint
        .and_then(|c| Path::new(c).file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !stem.is_empty() && stem != "last" {
        let clean: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        name += &format!("-{clean}");
    }
    if let Some(k) = class {
        name += &format!("-class{k}");
    }
    if ema {
        name += "-ema";
    }
    name + ".png"
}

fn sample_cmd(args: &[String]) -> Result<()> {
    let a: SampleArgs = parse("cargo xtask sample gan", args)?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let device = super::device(&a.device, None)?;
    let which = if a.ema { Which::Ema } else { Which::Generator };
    let (g, rc) = load_generator(&a.run, which, a.checkpoint.as_deref(), &device)?;
    check_class(a.class, rc.model.num_classes)?;
    let labels = super::sample_labels(a.n, a.class, rc.model.num_classes, &device)?;
    let out = a.out.unwrap_or_else(|| {
        a.run
            .join(sample_name(a.seed, a.checkpoint.as_deref(), a.class, a.ema))
    });
    super::check_png_out(&out)?;
    let imgs = g.sample(a.n, labels.as_ref(), &mut SeededRng::new(a.seed))?;
    let ncols = (a.n as f64).sqrt().ceil() as usize;
    save_image_grid(&imgs, &out, &grid_options(ncols))?;
    println!("{}", out.display());
    Ok(())
}

/// Refuses a `--class` the conditional model does not have, naming its
/// classes as "0 to K-1" (the shared check says `0..K`, a range that reads
/// as including K).
fn check_class(class: Option<u32>, num_classes: Option<usize>) -> Result<()> {
    if let (Some(c), Some(k)) = (class, num_classes) {
        if c as usize >= k {
            bail!(
                "--class {c}: the model has classes 0 to {} ({k} classes)",
                k.saturating_sub(1)
            );
        }
    }
    Ok(())
}

/// The demo: a DCGAN of a quarter of dcgan32's widths (ngf = ndf = 16) on
/// SyntheticFlowers at 32x32, batch 32, 768 iterations, with an EMA copy:
/// flower-like images of several colours in about half a minute on 2 cores.
fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let flowers = super::demo_flowers(Split::Train)?;
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
    crate::parts::stop_demo_if_interrupted(ctx, "gan");
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

/// The fallback extractor: a kiln-ssl SimCLR run's encoder (global-pooled
/// conv features). Its FID is not Inception-FID; its name says so.
struct SslExtractor {
    encoder: kiln_ssl::simclr::ConvEncoder,
    name: String,
    hash: String,
    dim: usize,
    size: usize,
    resize: Resize,
}

impl SslExtractor {
    fn open(run: &Path, resize: Resize, device: &kiln_core::Device) -> Result<Self> {
        let (m, cfg) = kiln_ssl::simclr::simclr_from_run(run, device)?;
        let ckpt = RunDir::open(run)?.last_checkpoint();
        let bytes =
            std::fs::read(&ckpt).map_err(|e| anyhow::anyhow!("reading {}: {e}", ckpt.display()))?;
        let mut h = Fnv::default();
        h.bytes(&bytes);
        h.bytes(format!("{:?}", cfg.widths).as_bytes());
        if resize != Resize::Bilinear {
            // (the pytorch-fid resize keeps the hash it had before the option)
            h.bytes(format!("resize={resize}").as_bytes());
        }
        let dim = m.encoder.dim();
        Ok(Self {
            name: format!(
                "kiln-ssl SimCLR encoder of run {} (widths {:?}, {dim}-d, trained on {}; {} \
                 to {}; not Inception: these FIDs compare only with each other)",
                run.display(),
                cfg.widths,
                cfg.dataset,
                resize.describe(),
                cfg.image_size
            ),
            hash: h.hex(),
            dim,
            size: cfg.image_size,
            resize,
            encoder: m.encoder,
        })
    }
}

impl FeatureExtractor for SslExtractor {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn hash(&self) -> String {
        self.hash.clone()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn extract(&self, images: &Tensor) -> kiln_gan::Result<Extracted> {
        use kiln_core::ModuleT;
        // The encoder saw images of its own size in [0, 1].
        let x = self.resize.apply(images, self.size, self.size)?;
        let f = self.encoder.forward_t(&x, false)?;
        Ok(Extracted {
            features: Features::from_tensor(&f)?,
            logits: None,
        })
    }
}

/// The `--resize` flag's parser.
fn resize_flag(s: &str) -> std::result::Result<Resize, String> {
    s.parse().map_err(|e: kiln_gan::GanError| e.to_string())
}

/// [`ExtractorSource::kind`] of `--inception FILE`.
const KIND_INCEPTION: &str = "inception";
/// [`ExtractorSource::kind`] of `--ssl-run RUN`.
const KIND_SSL_RUN: &str = "ssl-run";

/// The flag that gives an extractor of `kind`.
fn kind_flag(kind: &str) -> Option<&'static str> {
    match kind {
        KIND_INCEPTION => Some("--inception"),
        KIND_SSL_RUN => Some("--ssl-run"),
        _ => None,
    }
}

/// The content an extractor is read from, fingerprinted: the weights file
/// of `--inception`, or the config and last checkpoint of an `--ssl-run`
/// (not the whole folder, whose other files may change without the encoder
/// changing).
fn source_fingerprint(kind: &str, path: &Path) -> Result<String> {
    use kiln_core::run::fingerprint;
    Ok(match kind {
        KIND_SSL_RUN => {
            let dir = RunDir::open(path)?;
            let ckpt = dir.last_checkpoint();
            format!(
                "config.toml {}, checkpoints/{} {}",
                fingerprint(&dir.join("config.toml"))?,
                ckpt.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                fingerprint(&ckpt)?
            )
        }
        _ => fingerprint(path)?,
    })
}

/// Where the extractor of `--inception` / `--ssl-run` comes from, for the
/// run's record.
fn extractor_source(
    inception: Option<&Path>,
    ssl_run: Option<&Path>,
    resize: Resize,
) -> Result<ExtractorSource> {
    let (kind, path) = match (inception, ssl_run) {
        (Some(f), None) => (KIND_INCEPTION, f),
        (None, Some(r)) => (KIND_SSL_RUN, r),
        _ => bail!("give one of --inception and --ssl-run"),
    };
    Ok(ExtractorSource {
        kind: kind.into(),
        path: path.to_path_buf(),
        fingerprint: source_fingerprint(kind, path)?,
        resize: resize.name().into(),
    })
}

/// The flags that give the extractor and evaluation a run recorded, e.g.
/// `--ssl-run runs/ssl --resize pytorch-fid --eval-n 1000`.
fn record_flags(r: &FidRecord) -> Option<String> {
    let src = r.source.as_ref()?;
    Some(format!(
        "{} {} --resize {} --eval-n {}",
        kind_flag(&src.kind)?,
        src.path.display(),
        src.resize,
        r.n
    ))
}

/// Refuses a resume whose evaluation (`now`) would give FIDs that do not
/// compare with those the run recorded (`was`), naming the flags that give
/// the recorded one.
fn refuse_other_evaluation(run: &Path, was: &FidRecord, now: &FidRecord) -> Result<()> {
    let diff = was.differences(now);
    if diff.is_empty() {
        return Ok(());
    }
    bail!(
        "--resume {}: this run evaluates FID with {} (recorded in {FID_RECORD_FILE}); these \
         flags ask for {}: {}. checkpoints/{BEST_FID_CHECKPOINT} would then be picked by \
         comparing FIDs that do not compare. Leave out --inception, --ssl-run, --resize and \
         --eval-n to reuse the recorded ones{}, or start a new run",
        run.display(),
        was.describe(),
        now.describe(),
        diff.join("; "),
        record_flags(was)
            .map(|f| format!(" (or pass them again: {f})"))
            .unwrap_or_default()
    )
}

/// The extractor `train gan` evaluates with (`--inception`, `--ssl-run`,
/// resize): the flags', or, on a resume without them, the one the run
/// recorded, once checked to be still there and unchanged. `--resize` not
/// given on a resume is the recorded one.
fn train_extractor(
    a: &TrainArgs,
    given: &Given,
    tc: &TrainConfig,
    resume: Option<&Path>,
    recorded: Option<&FidRecord>,
) -> Result<(Option<PathBuf>, Option<PathBuf>, Resize)> {
    let src = recorded.and_then(|r| r.source.as_ref());
    let resize = match src {
        Some(s) if !given.has("resize") => s
            .resize
            .parse()
            .with_context(|| format!("{FID_RECORD_FILE}: resize {:?}", s.resize))?,
        _ => a.resize,
    };
    if a.inception.is_some() || a.ssl_run.is_some() {
        return Ok((a.inception.clone(), a.ssl_run.clone(), resize));
    }
    let (Some(run), Some(src)) = (resume, src) else {
        if let Some(run) = resume {
            bail!(
                "no feature extractor: --resume {} evaluates FID every {} epoch(s), and the \
                 run has no {FID_RECORD_FILE} naming the extractor it began with (it predates \
                 that file): pass the same --inception FILE or --ssl-run RUN as when it began, \
                 or --eval-every 0 to continue without FID",
                run.display(),
                tc.eval_every
            );
        }
        // The usual message: neither flag.
        return Ok((None, None, resize));
    };
    let Some(flag) = kind_flag(&src.kind) else {
        bail!(
            "--resume {}: {FID_RECORD_FILE} names an extractor of kind {:?}, which this command \
             cannot load: pass --inception FILE or --ssl-run RUN",
            run.display(),
            src.kind
        );
    };
    if !src.path.exists() {
        bail!(
            "--resume {}: the run evaluates FID with {flag} {} (recorded in {FID_RECORD_FILE}), \
             which is no longer there: pass {flag} with the place it is now, or --eval-every 0 \
             to continue without FID",
            run.display(),
            src.path.display()
        );
    }
    let now = source_fingerprint(&src.kind, &src.path)?;
    if now != src.fingerprint {
        bail!(
            "--resume {}: the run evaluates FID with {flag} {} (recorded in {FID_RECORD_FILE}), \
             which has changed since (then {}, now {now}): its FIDs would not compare with the \
             run's earlier ones. Put the original back, pass --eval-every 0 to continue \
             without FID, or start a new run",
            run.display(),
            src.path.display(),
            src.fingerprint
        );
    }
    eprintln!(
        "train gan: FID with {flag} {} --resize {resize}, as recorded in the run",
        src.path.display()
    );
    Ok(match src.kind.as_str() {
        KIND_INCEPTION => (Some(src.path.clone()), None, resize),
        _ => (None, Some(src.path.clone()), resize),
    })
}

/// The extractor a command asked for: pytorch-fid's InceptionV3 from
/// `--inception FILE`, else the SimCLR encoder of `--ssl-run RUN`, each
/// resizing its inputs with `resize` (named in its name and hash).
fn extractor(
    inception: Option<&Path>,
    ssl_run: Option<&Path>,
    resize: Resize,
    device: &kiln_core::Device,
) -> Result<Box<dyn FeatureExtractor>> {
    match (inception, ssl_run) {
        (Some(f), None) => Ok(Box::new(InceptionV3::load(f, device)?.with_resize(resize))),
        (None, Some(r)) => Ok(Box::new(SslExtractor::open(r, resize, device)?)),
        (Some(_), Some(_)) => bail!("give one of --inception and --ssl-run, not both"),
        (None, None) => bail!(
            "no feature extractor: pass --inception FILE (pytorch-fid's InceptionV3 weights \
             converted by scripts/gan/convert_inception.py) or, without them, --ssl-run RUN \
             (a `cargo xtask train simclr` run on the same data; its FID is not Inception-FID)"
        ),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask eval gan",
    about = "FID, KID, precision/recall/density/coverage, Inception Score and a memorisation check of a GAN run",
    after_help = "Results: printed, and written to \
                  RUN/eval-<checkpoint>[-ema]-<split>-n<N>-ntrain<N_TRAIN>-seed<SEED>[-collapse]-<extractor hash>.json \
                  (N_TRAIN: --n-train, 0 with --split train), one file per checkpoint, split, \
                  --n, --n-train, --seed, --collapse-baseline and extractor (the same settings \
                  replace their own file only); the file's `settings` repeat them."
)]
struct EvalArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Reference split: test, val or train.
    #[arg(long, default_value = "test")]
    split: String,
    /// Generated images (reference images: up to as many from the split;
    /// below 6, precision/recall/density/coverage are skipped with a note).
    #[arg(long, default_value_t = 10_000, value_parser = int_in(2usize, 1_000_000))]
    n: usize,
    /// Evaluate the EMA copy of the generator.
    #[arg(long)]
    ema: bool,
    /// Checkpoint: last (default), best-fid, healthy or a file.
    #[arg(long)]
    checkpoint: Option<String>,
    /// pytorch-fid InceptionV3 weights (safetensors from scripts/gan/convert_inception.py).
    #[arg(long)]
    inception: Option<PathBuf>,
    /// A SimCLR run whose encoder is the extractor when no Inception weights are at hand.
    #[arg(long)]
    ssl_run: Option<PathBuf>,
    /// How images reach the extractor's input size: `pytorch-fid` (bilinear,
    /// align_corners=False) or `clean` (clean-fid's PIL bicubic on float channels).
    #[arg(long, default_value = "pytorch-fid", value_parser = resize_flag)]
    resize: Resize,
    /// Training images searched by the memorisation check (0: skip it).
    #[arg(long, default_value_t = 10_000, value_parser = int_in(0usize, 1_000_000))]
    n_train: usize,
    /// Images per extractor batch.
    #[arg(long, default_value_t = 50, value_parser = int_in(1usize, 4096))]
    batch: usize,
    /// Seed of the latents and of KID's subsets.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// `folder:PATH` datasets: keep class folders without pictures (the
    /// class keeps its label, so every split numbers the classes alike)
    /// instead of refusing them, as torchvision's `ImageFolder(allow_empty=True)`.
    #[arg(long)]
    allow_empty_classes: bool,
    /// Folder of the reference-feature cache, one checksummed file per
    /// extractor and image set (default DATA_ROOT/feature-cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Also report the same generator collapsed to one image (one latent
    /// repeated), the baseline recall and coverage should stand well above.
    #[arg(long)]
    collapse_baseline: bool,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads.
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
}

fn eval_cmd(args: &[String]) -> Result<()> {
    let a: EvalArgs = parse("cargo xtask eval gan", args)?;
    if let Some(c) = a.cache.as_ref().filter(|c| c.exists() && !c.is_dir()) {
        bail!(
            "--cache {}: this is a file, but --cache names a folder (the reference features are \
             kept in it, one file per extractor and image set): give a folder (made if \
             missing), or leave --cache out for DATA_ROOT/feature-cache",
            c.display()
        );
    }
    let device = super::device(&a.device, a.threads)?;
    let split: Split = a.split.parse().context("--split")?;
    let which = if a.ema { Which::Ema } else { Which::Generator };
    let (g, rc) = load_generator(&a.run, which, a.checkpoint.as_deref(), &device)?;
    let ex = extractor(
        a.inception.as_deref(),
        a.ssl_run.as_deref(),
        a.resize,
        &device,
    )?;
    let data_root = a.data_root.clone();
    let cache = a
        .cache
        .clone()
        .unwrap_or_else(|| data_root.join("feature-cache"));
    let n = a.n;
    let opts = EvalOptions {
        n,
        batch: a.batch,
        seed: a.seed,
        kid: KidOptions {
            seed: a.seed,
            ..KidOptions::default()
        },
        ..EvalOptions::default()
    };
    eprintln!("eval gan: extractor {} (hash {})", ex.name(), ex.hash());
    let size = rc.model.image_size;
    let reference = open_split(
        &rc.train.dataset,
        &data_root,
        split,
        size,
        a.allow_empty_classes,
    )?;
    let rf = dataset_features(
        ex.as_ref(),
        reference.as_ref(),
        Some(n),
        opts.batch,
        &device,
        Some(&cache),
    )?;
    // The memorisation check sets the distance to the nearest training image
    // against the nearest held-out one: with the training split as the
    // reference there is no held-out image, and the ratio would be 0/0.
    let n_train = memorisation_images(&a, split);
    if n_train != a.n_train {
        eprintln!(
            "eval gan: memorisation check skipped: it needs held-out reference images, and \
             --split train has none"
        );
    }
    let tf = match n_train {
        0 => None,
        k => {
            let train_set = open_split(
                &rc.train.dataset,
                &data_root,
                Split::Train,
                size,
                a.allow_empty_classes,
            )?;
            Some(dataset_features(
                ex.as_ref(),
                train_set.as_ref(),
                Some(k),
                opts.batch,
                &device,
                Some(&cache),
            )?)
        }
    };
    let gen = generated_features(
        ex.as_ref(),
        &g,
        rc.model.num_classes,
        n,
        opts.batch,
        a.seed,
        &device,
    )?;
    let name = format!("{} {split} split", rc.train.dataset);
    let rep = evaluate(ex.as_ref(), &gen, &rf, &name, tf.as_ref(), &opts)?;
    print!("{rep}");
    if rep.precision.is_none() {
        eprintln!(
            "eval gan: PRDC skipped: pass --n {} or more (with a reference split at least that \
             large) for precision, recall, density and coverage",
            rep.prdc_k + 1
        );
    }
    let baseline = match a.collapse_baseline {
        true => {
            let one =
                collapsed_features(ex.as_ref(), &g, rc.model.num_classes, n, a.seed, &device)?;
            let b = evaluate(ex.as_ref(), &one, &rf, &name, None, &opts)?;
            println!(
                "collapsed to one image: FID {:.4}, KID {:.6}, precision {}, recall {}, \
                 density {}, coverage {}",
                b.fid,
                b.kid_mean,
                four(b.precision),
                four(b.recall),
                four(b.density),
                four(b.coverage)
            );
            Some(b)
        }
        false => None,
    };
    let out = a.run.join(result_name(&a, split, &rep.extractor_hash));
    let settings = serde_json::json!({
        "checkpoint": a.checkpoint.as_deref().unwrap_or("last"),
        "ema": a.ema,
        "split": split.to_string(),
        "n": a.n,
        "n_train": n_train,
        "seed": a.seed,
        "resize": a.resize.name(),
        "collapse_baseline": a.collapse_baseline,
    });
    let json = serde_json::json!({
        "settings": settings,
        "report": rep,
        "collapsed_baseline": baseline,
    });
    kiln_core::files::write_atomic(&out, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("{}", out.display());
    Ok(())
}

/// A PRDC value to four decimals, or `n/a` when PRDC was skipped.
fn four(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |v| format!("{v:.4}"))
}

/// Training images the memorisation check searches: `--n-train`, or 0 with
/// `--split train` (no held-out reference images to set them against).
fn memorisation_images(a: &EvalArgs, split: Split) -> usize {
    if matches!(split, Split::Train) {
        0
    } else {
        a.n_train
    }
}

/// The name of `eval gan`'s result file in the run folder: every setting
/// the file's numbers depend on (checkpoint, EMA, split, --n, the training
/// images the memorisation check searched, --seed, --collapse-baseline;
/// the extractor and --resize through its hash), so results of other
/// settings neither replace each other nor pass for each other.
fn result_name(a: &EvalArgs, split: Split, extractor_hash: &str) -> String {
    format!(
        "eval-{}{}-{split}-n{}-ntrain{}-seed{}{}-{extractor_hash}.json",
        a.checkpoint
            .as_deref()
            .unwrap_or("last")
            .replace(['/', '\\', '.'], "_"),
        if a.ema { "-ema" } else { "" },
        a.n,
        memorisation_images(a, split),
        a.seed,
        if a.collapse_baseline { "-collapse" } else { "" },
    )
}

/// `fid_inception_features`: pytorch-fid's network (random weights: the
/// speed does not depend on them) on batches of 50 32x32 images resized to
/// 299x299, as `scripts/gan/fid_bench.py` times PyTorch.
fn bench_fid(ctx: &super::BenchCtx) -> Result<serde_json::Value> {
    let dev = kiln_core::Device::Cpu;
    let net = InceptionV3::from_source(&mut RandomWeights::new(0, &dev), &dev)?;
    let x = SeededRng::new(1).uniform(&[50, 3, 32, 32], 0.0, 1.0, &dev)?;
    let ctx = ctx.with_steps(3, 1);
    ctx.train_line("fid_inception_features", 50, || {
        net.features(&x)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_numeric_flag_is_range_checked() {
        use crate::parts::assert_numeric_flags_checked;
        assert_numeric_flags_checked::<TrainArgs>("cargo xtask train gan", None, &[]);
        assert_numeric_flags_checked::<SampleArgs>("cargo xtask sample gan", None, &["--run", "r"]);
        assert_numeric_flags_checked::<EvalArgs>("cargo xtask eval gan", None, &["--run", "r"]);
        for (flag, bad, range) in [
            ("--epochs", "-1", "expected an integer in 1..=1000000"),
            ("--batch-size", "1", "expected an integer in 2..=65536"),
            ("--lr", "0", "expected a number > 0"),
            ("--lr-d", "inf", "expected a number > 0"),
            ("--beta1", "1", "expected a number in [0, 1)"),
            ("--beta2", "-0.5", "expected a number in [0, 1)"),
            ("--n-critic", "101", "expected an integer in 1..=100"),
            ("--ema-decay", "1", "expected a number in (0, 1)"),
            ("--fd-step", "NaN", "expected a number in (0, 1]"),
        ] {
            let e = crate::parts::parse::<TrainArgs>("t", &args(&[flag, bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains(range), "{flag} {bad}: {e}");
        }
        assert!(parse_given::<TrainArgs>("t", &args(&["--beta1", "0", "--beta2", "0.99"])).is_ok());
    }

    #[test]
    fn resize_and_allow_empty_classes_flags() {
        let a: EvalArgs = parse("e", &args(&["--run", "r"])).unwrap();
        assert_eq!(a.resize, Resize::Bilinear);
        assert!(!a.allow_empty_classes);
        let a: EvalArgs = parse(
            "e",
            &args(&["--run", "r", "--resize", "clean", "--allow-empty-classes"]),
        )
        .unwrap();
        assert_eq!(a.resize, Resize::Clean);
        assert!(a.allow_empty_classes);
        let (a, _): (TrainArgs, Given) =
            parse_given("t", &args(&["--resize", "clean", "--allow-empty-classes"])).unwrap();
        assert_eq!(a.resize, Resize::Clean);
        assert!(a.allow_empty_classes);
        let e = parse::<EvalArgs>("e", &args(&["--run", "r", "--resize", "bicubic"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resize") && e.contains("pytorch-fid") && e.contains("clean"),
            "{e}"
        );
    }

    /// `eval gan`'s result file names every setting its numbers depend on,
    /// so a run evaluated on another split, --n, --n-train, --seed or with
    /// --collapse-baseline keeps both files, and `--overwrite` knows them
    /// for kiln's.
    #[test]
    fn eval_results_are_named_by_their_settings() {
        let name = |extra: &[&str]| {
            let mut v = vec!["--run", "r"];
            v.extend_from_slice(extra);
            let a: EvalArgs = parse("e", &args(&v)).unwrap();
            let split: Split = a.split.parse().unwrap();
            result_name(&a, split, "abc")
        };
        assert_eq!(
            name(&[]),
            "eval-last-test-n10000-ntrain10000-seed0-abc.json"
        );
        assert_eq!(
            name(&[
                "--checkpoint",
                "best-fid",
                "--ema",
                "--split",
                "val",
                "--n",
                "50",
                "--n-train",
                "20",
                "--seed",
                "3",
                "--collapse-baseline",
            ]),
            "eval-best-fid-ema-val-n50-ntrain20-seed3-collapse-abc.json"
        );
        // With the training split as the reference the memorisation check
        // is skipped whatever --n-train says: one file, named for what ran.
        assert_eq!(
            name(&["--split", "train", "--n-train", "20"]),
            name(&["--split", "train"])
        );
        assert_eq!(
            name(&["--split", "train"]),
            "eval-last-train-n10000-ntrain0-seed0-abc.json"
        );
        let variants: [&[&str]; 7] = [
            &[],
            &["--split", "val"],
            &["--n", "50"],
            &["--seed", "1"],
            &["--n-train", "0"],
            &["--n-train", "500"],
            &["--collapse-baseline"],
        ];
        let all: std::collections::BTreeSet<String> = variants.iter().map(|v| name(v)).collect();
        assert_eq!(all.len(), variants.len(), "{all:?}");
        for n in &all {
            assert!(kiln_core::run::is_run_file(Path::new(n)), "{n}");
        }
    }

    /// The files `train gan`, `sample gan` and `eval gan` write in a run
    /// folder are in kiln-core's list, so `--overwrite` clears them.
    #[test]
    fn gan_run_files_are_known_to_overwrite() {
        for f in [
            kiln_gan::fid_record::FID_RECORD_FILE.to_string(),
            format!("checkpoints/{}", kiln_gan::train::BEST_FID_CHECKPOINT),
            format!("checkpoints/{}", kiln_gan::train::HEALTHY_CHECKPOINT),
            "samples/epoch-001.png".into(),
            "samples/epoch-001-ema.png".into(),
            "samples-ema.png".into(),
            "d_outputs.png".into(),
            "samples-7.png".into(),
            "samples-7-ema.png".into(),
        ] {
            assert!(kiln_core::run::is_run_file(Path::new(&f)), "{f}");
        }
    }

    /// `sample gan` grids from other checkpoints or classes get other
    /// default names (they replaced each other), each one kiln's to delete.
    #[test]
    fn sample_names_follow_the_checkpoint_and_class() {
        let cases = [
            (None, None, false, "samples-1.png"),
            (Some("last"), None, true, "samples-1-ema.png"),
            (Some("healthy"), None, false, "samples-1-healthy.png"),
            (
                Some("runs/a b/ep 3.safetensors"),
                Some(2),
                true,
                "samples-1-ep_3-class2-ema.png",
            ),
            (
                Some("checkpoints/last.safetensors"),
                Some(0),
                false,
                "samples-1-class0.png",
            ),
        ];
        for (ckpt, class, ema, want) in cases {
            let got = sample_name(1, ckpt, class, ema);
            assert_eq!(got, want);
            assert!(kiln_core::run::is_run_file(Path::new(&got)), "{got}");
        }
    }

    /// `eval gan --help` shows --data-root's default, as the other commands
    /// do, and says where results go.
    #[test]
    fn eval_help_shows_the_data_root_default_and_the_result_file() {
        let help = crate::parts::command::<EvalArgs>()
            .render_long_help()
            .to_string();
        let line = help
            .split("--data-root")
            .nth(1)
            .and_then(|s| s.split("--").next())
            .unwrap_or_default();
        assert!(line.contains("[default: data]"), "{help}");
        assert!(
            help.contains(
                "RUN/eval-<checkpoint>[-ema]-<split>-n<N>-ntrain<N_TRAIN>-seed<SEED>[-collapse]"
            ) && help.contains("--n-train, --seed, --collapse-baseline"),
            "{help}"
        );
        let a: EvalArgs = parse("e", &args(&["--run", "r"])).unwrap();
        assert_eq!(a.data_root, PathBuf::from("data"));
    }

    /// `--cache` naming a file is refused before any work, naming the flag
    /// and what to give instead (it was a raw "File exists (os error 17)").
    #[test]
    fn a_cache_that_is_a_file_is_refused_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("features.safetensors");
        std::fs::write(&file, "x").unwrap();
        let e = eval_cmd(&args(&[
            "--run",
            &dir.path().join("no-run").display().to_string(),
            "--cache",
            &file.display().to_string(),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--cache ")
                && e.contains("names a folder")
                && e.contains("give a folder"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn a_class_out_of_range_names_the_classes_from_0_to_k_minus_1() {
        let e = check_class(Some(8), Some(8)).unwrap_err().to_string();
        assert_eq!(e, "--class 8: the model has classes 0 to 7 (8 classes)");
        check_class(Some(7), Some(8)).unwrap();
        check_class(None, Some(8)).unwrap();
        // Unconditional models: the shared check says so.
        check_class(Some(3), None).unwrap();
    }

    /// A record as `train gan --inception FILE` writes it.
    fn inception_record(file: &Path, resize: Resize, n: usize) -> FidRecord {
        FidRecord {
            extractor: "pytorch-fid InceptionV3".into(),
            hash: "1111222233334444".into(),
            source: Some(extractor_source(Some(file), None, resize).unwrap()),
            n,
            n_reference: n,
            seed: 0,
        }
    }

    /// `train gan --resume RUN` without extractor flags reuses the one the
    /// run recorded, with its resize, once it is found unchanged; a moved,
    /// changed or unrecorded extractor is refused with what to pass.
    #[test]
    fn a_resume_reuses_the_recorded_extractor_or_says_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let file = dir.path().join("inception.safetensors");
        std::fs::write(&file, "weights").unwrap();
        let rec = inception_record(&file, Resize::Clean, 200);
        let tc = TrainConfig {
            eval_every: 2,
            ..TrainConfig::default()
        };
        let pick = |extra: &[&str], rec: Option<&FidRecord>| {
            let mut v = vec!["--resume".to_string(), run.display().to_string()];
            v.extend(extra.iter().map(|s| s.to_string()));
            let (a, given): (TrainArgs, Given) = parse_given("t", &v).unwrap();
            train_extractor(&a, &given, &tc, Some(&run), rec)
        };
        assert_eq!(
            pick(&[], Some(&rec)).unwrap(),
            (Some(file.clone()), None, Resize::Clean)
        );
        assert_eq!(
            pick(&["--resize", "pytorch-fid"], Some(&rec)).unwrap().2,
            Resize::Bilinear
        );
        let other = dir.path().join("ssl");
        assert_eq!(
            pick(&["--ssl-run", &other.display().to_string()], Some(&rec)).unwrap(),
            (None, Some(other), Resize::Clean)
        );
        let e = pick(&[], None).unwrap_err().to_string();
        assert!(
            e.contains(FID_RECORD_FILE) && e.contains("--eval-every 0") && e.contains("every 2"),
            "{e}"
        );
        std::fs::write(&file, "other weights").unwrap();
        let e = pick(&[], Some(&rec)).unwrap_err().to_string();
        assert!(
            e.contains("--inception") && e.contains("has changed since") && e.contains("7 bytes"),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();
        let e = pick(&[], Some(&rec)).unwrap_err().to_string();
        assert!(e.contains("no longer there"), "{e}");
    }

    /// A resume whose flags name another extractor (or other settings) is
    /// refused before the reference features, with the flags that give the
    /// recorded one (the review's `--resume gx1 --ssl-run ssl3`).
    #[test]
    fn a_resume_with_another_extractor_is_refused_with_the_recorded_flags() {
        let dir = tempfile::tempdir().unwrap();
        let (f1, f3) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        std::fs::write(&f1, "weights one").unwrap();
        std::fs::write(&f3, "weights three").unwrap();
        let was = inception_record(&f1, Resize::Bilinear, 200);
        let run = dir.path().join("run");
        refuse_other_evaluation(&run, &was, &was.clone()).unwrap();
        let now = FidRecord {
            hash: "5555666677778888".into(),
            ..inception_record(&f3, Resize::Bilinear, 200)
        };
        let e = refuse_other_evaluation(&run, &was, &now)
            .unwrap_err()
            .to_string();
        let again = format!(
            "--inception {} --resize pytorch-fid --eval-n 200",
            f1.display()
        );
        assert!(
            e.contains("inception content 11 bytes")
                && e.contains("extractor hash 1111222233334444 then, 5555666677778888 now")
                && e.contains(&again),
            "{e}"
        );
        let fewer = inception_record(&f1, Resize::Bilinear, 100);
        let e = refuse_other_evaluation(&run, &was, &fewer)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("200 generated images per evaluation then, 100 now"),
            "{e}"
        );
    }
}
