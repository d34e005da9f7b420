//! kiln-ssl in xtask: `train inpaint`, `train simclr`, `eval ssl`, and their demo parts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Parser;
use kiln_core::run::{RunDir, RunOptions};
use kiln_data::{Dataset, Split};
use kiln_ssl::simclr::{probe_encoder, simclr_from_run};
use kiln_ssl::{train_inpaint, train_simclr, InpaintConfig, ProbeReport, Simclr, SimclrConfig};

use super::{
    exit_if_interrupted, float_in, int_in, open_optional_split, open_split, parse, parse_given,
    resume_config, Component, DemoPart, Given, RunArgs, MAX_BATCH, MAX_EPOCHS, MAX_IMAGE_SIZE,
};

/// Registers the SSL tasks and demo parts.
pub fn component() -> Component {
    Component {
        demos: vec![
            DemoPart {
                name: "inpaint",
                about: "the chapter's masked-inpainting autoencoder with a hole-weighted loss \
                        (figure 14.2, PSNR vs border-mean)",
                run: demo_inpaint,
            },
            DemoPart {
                name: "simclr",
                about: "SimCLR on SyntheticShapes, linear probe and kNN vs a random encoder",
                run: demo_simclr,
            },
        ],
        train: vec![("inpaint", train_inpaint_cmd), ("simclr", train_simclr_cmd)],
        eval: vec![("ssl", eval_cmd)],
        ..Default::default()
    }
}

/// Flags every SSL command shares.
#[derive(Debug, clap::Args)]
struct Common {
    /// Dataset: synthetic-flowers, synthetic-shapes, flowers102, cifar10, mnist or
    /// folder:PATH (default: synthetic-flowers for inpainting, synthetic-shapes
    /// for SimCLR, whose classes differ only in shape, so colour cannot carry
    /// the probes).
    #[arg(long)]
    dataset: Option<String>,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// `folder:PATH` datasets: keep class folders without pictures (the
    /// class keeps its label, so every split numbers the classes alike)
    /// instead of refusing them, as torchvision's `ImageFolder(allow_empty=True)`.
    #[arg(long)]
    allow_empty_classes: bool,
    /// Seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

impl Common {
    /// The dataset: the flag when given (a new run's when set), else `saved`
    /// (the resumed run's, or a new run's default).
    fn dataset(&self, given: &Given, saved: &str) -> String {
        match &self.dataset {
            Some(d) if given.has("dataset") => d.clone(),
            _ => saved.to_string(),
        }
    }
}

/// The run's saved config on `--resume` (refusing another kind) with the
/// typed flags, or `default` with every flag on a new run.
fn base_config<C: serde::de::DeserializeOwned>(
    opts: &RunOptions,
    typed: Given,
    kind: &str,
    what: &str,
    default: C,
) -> Result<(C, Given)> {
    Ok(match &opts.resume {
        Some(p) => (resume_config(&RunDir::open(p)?, kind, what)?, typed),
        None => (default, Given::all()),
    })
}

/// Sets `field` from the flag when it was given (always on a new run).
macro_rules! take {
    ($given:expr, $cfg:ident.$field:ident = $value:expr) => {
        if $given.has(stringify!($field)) {
            $cfg.$field = $value;
        }
    };
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train inpaint",
    about = "The chapter's masked-inpainting conv autoencoder (random 8x8 square, MSE, Adam 1e-3)"
)]
struct InpaintArgs {
    #[command(flatten)]
    common: Common,
    /// Epochs (the chapter trains 200).
    #[arg(long, default_value_t = 200, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: u64,
    /// Batch size.
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, MAX_BATCH))]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// Mask side (smaller than the image side).
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, MAX_IMAGE_SIZE))]
    mask_size: usize,
    /// One mask per image (the chapter draws one per batch).
    #[arg(long)]
    mask_per_image: bool,
    /// Weight of the hole's squared error relative to the visible pixels'
    /// (1: the chapter's plain full-image MSE).
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    hole_weight: f64,
}

fn train_inpaint_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (InpaintArgs, Given) = parse_given("cargo xtask train inpaint", args)?;
    let opts = a.common.run.options("inpaint");
    let device = opts.device()?;
    let default = InpaintConfig {
        dataset: "synthetic-flowers".into(),
        ..Default::default()
    };
    let (mut cfg, given) = base_config(
        &opts,
        typed,
        kiln_ssl::inpaint::INPAINT_KIND,
        "an inpainting run",
        default,
    )?;
    take!(given, cfg.epochs = a.epochs);
    take!(given, cfg.batch_size = a.batch_size);
    take!(given, cfg.lr = a.lr);
    take!(given, cfg.mask_size = a.mask_size);
    take!(given, cfg.mask_per_image = a.mask_per_image);
    take!(given, cfg.hole_weight = a.hole_weight);
    if given.has("seed") {
        cfg.seed = a.common.seed;
    }
    cfg.dataset = a.common.dataset(&given, &cfg.dataset);
    check_side(&cfg.dataset, cfg.image_size)?;
    let tr = open_split(
        &cfg.dataset,
        &a.common.data_root,
        Split::Train,
        cfg.image_size,
        a.common.allow_empty_classes,
    )?;
    let te = open_optional_split(
        &cfg.dataset,
        &a.common.data_root,
        Split::Test,
        cfg.image_size,
        a.common.allow_empty_classes,
    )?;
    let cfg = InpaintConfig {
        channels: tr.get(0)?.image.channels,
        ..cfg
    };
    let rep = train_inpaint(&cfg, tr, te, &device, &opts)?;
    if let Some(t) = &rep.test {
        eprintln!(
            "held-out masked region: model MSE {:.5} ({:.2} dB PSNR) vs border-mean fill {:.5} ({:.2} dB)",
            t.masked_mse, t.masked_psnr, t.baseline_mse, t.baseline_psnr
        );
    }
    print_folder(&opts);
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

/// Prints the run folder (stdout), for scripts.
fn print_folder(opts: &RunOptions) {
    if let Some(p) = opts.resume.as_ref().or(opts.out.as_ref()) {
        println!("{}", p.display());
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask train simclr",
    about = "SimCLR: two augmented views, conv encoder + projection head, NT-Xent"
)]
struct SimclrArgs {
    #[command(flatten)]
    common: Common,
    /// Epochs.
    #[arg(long, default_value_t = 20, value_parser = int_in(1u64, MAX_EPOCHS))]
    epochs: u64,
    /// Images per batch (at least 2: each image's other view is its positive).
    #[arg(long, default_value_t = 128, value_parser = int_in(2usize, MAX_BATCH))]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = float_in::<f64>("> 0", |x| x > 0.0))]
    lr: f64,
    /// NT-Xent temperature, in [0.001, 100]: the logits are cosine similarities
    /// divided by it, in f32; below 0.001 they swamp the self-similarity mask
    /// or overflow, above 100 they are all about 0 and nothing is learnt.
    #[arg(long, default_value_t = 0.2, value_parser = float_in::<f64>(
        "in [0.001, 100] (similarities in [-1, 1] are divided by it in f32: below 0.001 \
         the logits swamp the self-similarity mask or overflow, above 100 nothing is learnt)",
        |x| kiln_ssl::loss::temperature_problem(x).is_none(),
    ))]
    temperature: f64,
    /// Encoder widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128", value_parser = int_in(1usize, 4096))]
    widths: Vec<usize>,
    /// Image side.
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, MAX_IMAGE_SIZE))]
    image_size: usize,
    /// Colour-distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s), at most 2.5.
    /// The default 1 (ImageNet's; 0.5 is SimCLR's CIFAR setting) keeps random
    /// colours from being a shortcut for telling images apart.
    #[arg(long, default_value_t = 1.0, value_parser = float_in::<f32>("in [0, 2.5]", |x| (0.0..=2.5).contains(&x)))]
    color_strength: f32,
    /// Probability of a grayscale view.
    #[arg(long, default_value_t = 0.5, value_parser = float_in::<f64>("in [0, 1]", |x| (0.0..=1.0).contains(&x)))]
    grayscale_p: f64,
    /// Smallest area fraction of the random resized crop (0.4 keeps most of
    /// a synthetic-shapes silhouette in view).
    #[arg(long, default_value_t = 0.4, value_parser = float_in::<f32>("in (0, 1]", |x| x > 0.0 && x <= 1.0))]
    crop_min_scale: f32,
}

/// Refuses, by its flag, an `--image-size` the dataset cannot be drawn at
/// (kiln-data's generators' own ranges), before a run folder is made.
fn check_side(dataset: &str, size: usize) -> Result<()> {
    let Ok(spec) = dataset.parse::<kiln_data::DatasetSpec>() else {
        return Ok(()); // opening it says which names are known
    };
    if let Err(e) = spec.check_side(size) {
        let msg = match e {
            kiln_data::DataError::Config { msg, .. } => msg,
            e => e.to_string(),
        };
        bail!("--image-size {size}: dataset {spec} cannot be drawn at this side: {msg}");
    }
    Ok(())
}

fn train_simclr_cmd(args: &[String]) -> Result<()> {
    let (a, typed): (SimclrArgs, Given) = parse_given("cargo xtask train simclr", args)?;
    let opts = a.common.run.options("simclr");
    let device = opts.device()?;
    let default = SimclrConfig {
        dataset: "synthetic-shapes".into(),
        ..Default::default()
    };
    let (mut cfg, given) = base_config(
        &opts,
        typed,
        kiln_ssl::simclr::SIMCLR_KIND,
        "a SimCLR run",
        default,
    )?;
    take!(given, cfg.widths = a.widths.clone());
    take!(given, cfg.temperature = a.temperature);
    take!(given, cfg.epochs = a.epochs);
    take!(given, cfg.batch_size = a.batch_size);
    take!(given, cfg.lr = a.lr);
    take!(given, cfg.image_size = a.image_size);
    take!(given, cfg.color_strength = a.color_strength);
    take!(given, cfg.grayscale_p = a.grayscale_p);
    take!(given, cfg.crop_min_scale = a.crop_min_scale);
    if given.has("seed") {
        cfg.seed = a.common.seed;
    }
    cfg.dataset = a.common.dataset(&given, &cfg.dataset);
    check_side(&cfg.dataset, cfg.image_size)?;
    let tr = open_split(
        &cfg.dataset,
        &a.common.data_root,
        Split::Train,
        cfg.image_size,
        a.common.allow_empty_classes,
    )?;
    let te = open_optional_split(
        &cfg.dataset,
        &a.common.data_root,
        Split::Test,
        cfg.image_size,
        a.common.allow_empty_classes,
    )?;
    let cfg = SimclrConfig {
        channels: tr.get(0)?.image.channels,
        ..cfg
    };
    let rep = train_simclr(&cfg, tr.clone(), te.map(|t| (tr, t)), &device, &opts)?;
    if let (Some(p), Some(r)) = (&rep.probes, &rep.random_probes) {
        print_probes(p, r);
    }
    print_folder(&opts);
    exit_if_interrupted(rep.interrupted);
    Ok(())
}

fn print_probes(p: &ProbeReport, r: &ProbeReport) {
    // With fewer training images than k, kNN votes over all of them: the
    // header says which k each column really used.
    let col = |k: usize| match p.knn_k(k) {
        used if used < k => format!("kNN k={k} (k={used}: all training images)"),
        _ => format!("kNN k={k}"),
    };
    eprintln!("| encoder | linear probe | {} | {} |", col(20), col(200));
    eprintln!("|---|---|---|---|");
    eprintln!(
        "| trained | {:.1}% | {:.1}% | {:.1}% |",
        100.0 * p.linear,
        100.0 * p.knn20,
        100.0 * p.knn200
    );
    eprintln!(
        "| random init | {:.1}% | {:.1}% | {:.1}% |",
        100.0 * r.linear,
        100.0 * r.knn20,
        100.0 * r.knn200
    );
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask eval ssl",
    about = "Linear probe and kNN (k=20, 200) of a SimCLR run's encoder, beside a random-init encoder"
)]
struct EvalArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Folder holding downloaded datasets.
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// `folder:PATH` datasets: keep class folders without pictures (the
    /// class keeps its label, so every split numbers the classes alike)
    /// instead of refusing them, as torchvision's `ImageFolder(allow_empty=True)`.
    #[arg(long)]
    allow_empty_classes: bool,
    /// Labelled dataset to probe on (default: the run's).
    #[arg(long)]
    dataset: Option<String>,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn eval_cmd(args: &[String]) -> Result<()> {
    let a: EvalArgs = parse("cargo xtask eval ssl", args)?;
    let device = kiln_core::device::device(&a.device)?;
    let (model, cfg) = simclr_from_run(&a.run, &device)?;
    let ds = a.dataset.clone().unwrap_or(cfg.dataset.clone());
    let tr = open_split(
        &ds,
        &a.data_root,
        Split::Train,
        cfg.image_size,
        a.allow_empty_classes,
    )?;
    let te = open_split(
        &ds,
        &a.data_root,
        Split::Test,
        cfg.image_size,
        a.allow_empty_classes,
    )?;
    let found = tr.get(0)?.image.channels;
    if found != cfg.channels {
        bail!(
            "--dataset {ds}: its images have {found} channel(s), but the run's encoder was \
             trained on {} ({}); probe it on data with as many channels",
            cfg.channels,
            cfg.dataset
        );
    }
    let p = probe_encoder(&model.encoder, tr.clone(), te.clone(), &device, cfg.seed)?;
    let vs = kiln_core::vars::VarStore::new(cfg.seed.wrapping_add(1));
    let random = Simclr::new(&cfg, vs.builder(kiln_core::DType::F32, &device))?;
    let r = probe_encoder(&random.encoder, tr, te, &device, cfg.seed)?;
    print_probes(&p, &r);
    println!("{}", serde_json::json!({"trained": p, "random_init": r}));
    Ok(())
}

fn demo_inpaint(ctx: &super::DemoCtx) -> Result<()> {
    let tr = super::demo_flowers(Split::Train)?;
    let te = super::demo_flowers(Split::Test)?;
    // The chapter's model, mask and optimiser, trained with the hole's error
    // weighted 16x (about half the loss at 32x32 with an 8x8 hole, instead of
    // 1/16), one mask per image and Adam 3e-3, so 6 epochs beat the border-mean
    // fill. `cargo xtask train inpaint` keeps the chapter's plain MSE by default.
    let cfg = InpaintConfig {
        epochs: 6,
        hole_weight: 16.0,
        mask_per_image: true,
        lr: 3e-3,
        seed: ctx.seed,
        ..Default::default()
    };
    let out = ctx.out.join("inpaint");
    let opts = RunOptions::new_run(Some(&out)).quiet(ctx.quiet);
    let rep = train_inpaint(&cfg, tr, Some(te), &ctx.device, &opts)?;
    crate::parts::stop_demo_if_interrupted(ctx, "inpaint");
    if let Some(t) = rep.test {
        eprintln!(
            "    inpaint: masked-region PSNR {:.2} dB vs border-mean {:.2} dB; {:.0} images/s; {}",
            t.masked_psnr,
            t.baseline_psnr,
            rep.images_per_s,
            out.display()
        );
    }
    Ok(())
}

/// Epochs of the SimCLR demo part.
const DEMO_SIMCLR_EPOCHS: u64 = 8;

fn demo_simclr(ctx: &super::DemoCtx) -> Result<()> {
    // Shapes whose colours are random: random-init features cannot lean on colour.
    let tr = open_split(
        "synthetic-shapes",
        Path::new("data"),
        Split::Train,
        16,
        false,
    )?;
    let te = open_split(
        "synthetic-shapes",
        Path::new("data"),
        Split::Test,
        16,
        false,
    )?;
    let cfg = SimclrConfig {
        widths: vec![16, 32, 64],
        epochs: DEMO_SIMCLR_EPOCHS,
        batch_size: 128,
        image_size: 16,
        lr: 3e-3,
        color_strength: 1.0,
        grayscale_p: 0.5,
        crop_min_scale: 0.4,
        dataset: "synthetic-shapes".into(),
        seed: ctx.seed,
        ..Default::default()
    };
    let out = ctx.out.join("simclr");
    let opts = RunOptions::new_run(Some(&out)).quiet(ctx.quiet);
    let rep = train_simclr(&cfg, tr.clone(), Some((tr, te)), &ctx.device, &opts)?;
    crate::parts::stop_demo_if_interrupted(ctx, "simclr");
    if let (Some(p), Some(r)) = (&rep.probes, &rep.random_probes) {
        print_probes(p, r);
    }
    eprintln!(
        "    simclr: {:.0} images/s; {}",
        rep.images_per_s,
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_the_dataset_cannot_be_drawn_at_is_named_by_its_flag() {
        let e = check_side("synthetic-shapes", 3).unwrap_err().to_string();
        assert!(
            e.starts_with("--image-size 3: dataset synthetic-shapes"),
            "{e}"
        );
        assert!(e.contains("8..=4096"), "{e}");
        check_side("synthetic-shapes", 8).unwrap();
        check_side("synthetic-flowers", 4).unwrap();
        // an unknown name is left to the code that opens it
        check_side("nosuch", 1).unwrap();
    }
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<InpaintArgs>("cargo xtask train inpaint", None, &[]);
        assert_numeric_flags_checked::<SimclrArgs>("cargo xtask train simclr", None, &[]);
    }

    /// `--temperature 1e-30` trained a run whose loss sat at ~1e28 and said
    /// nothing; the flag now takes kiln-ssl's range and refuses the rest at
    /// parse time, before a run folder is made, naming flag, value and range.
    #[test]
    fn temperature_is_refused_outside_what_nt_xent_can_use() {
        for bad in ["1e-30", "0.0009", "100.5", "1e6", "0"] {
            let args = ["--temperature", bad].map(String::from);
            let e = parse::<SimclrArgs>("s", &args).unwrap_err().to_string();
            assert!(
                e.contains("--temperature") && e.contains(bad) && e.contains("[0.001, 100]"),
                "{bad}: {e}"
            );
        }
        for good in ["0.001", "0.2", "100"] {
            let args = ["--temperature", good].map(String::from);
            let a: SimclrArgs = parse("s", &args).unwrap();
            assert_eq!(a.temperature, good.parse::<f64>().unwrap());
        }
        // The help's range is the library's.
        assert_eq!(
            (
                kiln_ssl::loss::MIN_TEMPERATURE,
                kiln_ssl::loss::MAX_TEMPERATURE
            ),
            (0.001, 100.0)
        );
    }

    #[test]
    fn allow_empty_classes_is_on_every_command_that_opens_a_dataset() {
        let on = vec!["--allow-empty-classes".to_string()];
        let (a, _): (InpaintArgs, _) = parse_given("i", &on).unwrap();
        assert!(a.common.allow_empty_classes);
        let (a, _): (SimclrArgs, _) = parse_given("s", &on).unwrap();
        assert!(a.common.allow_empty_classes);
        let with_run = ["--run", "r", "--allow-empty-classes"].map(String::from);
        assert!(
            parse::<EvalArgs>("e", &with_run)
                .unwrap()
                .allow_empty_classes
        );
    }
}
