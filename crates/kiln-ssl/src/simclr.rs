//! SimCLR (Chen et al. 2020): two augmented views per image, a conv encoder
//! with a projection head, NT-Xent with temperature.

use std::sync::Arc;

use kiln_core::image::plot_metrics;
use kiln_core::nn::{BatchNorm, Conv2d, ConvConfig, Linear, MaxPool2d};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::session::{Record, Session};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, ModuleT, Result, Tensor, VarBuilder};
use kiln_data::transforms::{
    ColorJitter, Compose, GaussianBlur, Grayscale, HorizontalFlip, RandomApply, RandomResizedCrop,
};
use kiln_data::{input_paths_of, DataLoader, Dataset, LoaderConfig};
use serde::{Deserialize, Serialize};

use crate::loss::{nt_xent, temperature_problem};
use crate::probe::{probe_all, LinearProbeConfig, ProbeReport};
use crate::{RunOptions, SslError};

/// SimCLR settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimclrConfig {
    /// Encoder channel widths of its conv blocks (conv3x3-BN-ReLU, 2x2 max-pool
    /// between blocks, global average pool at the end).
    pub widths: Vec<usize>,
    /// Projection head output dimension.
    pub proj_dim: usize,
    /// NT-Xent temperature, in [`MIN_TEMPERATURE`](crate::loss::MIN_TEMPERATURE)
    /// `..=` [`MAX_TEMPERATURE`](crate::loss::MAX_TEMPERATURE).
    pub temperature: f64,
    /// Epochs.
    pub epochs: u64,
    /// Images per batch (2x views).
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed.
    pub seed: u64,
    /// Dataset as given on the command line.
    pub dataset: String,
    /// Image side.
    pub image_size: usize,
    /// Image channels.
    pub channels: usize,
    /// Colour-distortion strength `s` (Chen et al. 2020, appendix A): colour
    /// jitter with brightness, contrast and saturation `0.8 s` and hue `0.2 s`
    /// (p 0.8). 0.5 (their CIFAR-10 setting) by default; at most 2.5.
    #[serde(default = "default_color_strength")]
    pub color_strength: f32,
    /// Probability of converting a view to grayscale (0.2).
    #[serde(default = "default_grayscale_p")]
    pub grayscale_p: f64,
    /// Smallest area fraction of the random resized crop (0.2).
    #[serde(default = "default_crop_min_scale")]
    pub crop_min_scale: f32,
}

fn default_color_strength() -> f32 {
    0.5
}

fn default_grayscale_p() -> f64 {
    0.2
}

fn default_crop_min_scale() -> f32 {
    0.2
}

impl SimclrConfig {
    /// Rejects settings that cannot train, naming the field.
    pub fn validate(&self) -> std::result::Result<(), SslError> {
        let bad = |field: &str, msg: String| {
            Err(SslError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.epochs == 0 {
            return bad("epochs", "expected at least 1, found 0".into());
        }
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                format!(
                    "expected at least 2 (NT-Xent needs negatives), found {}",
                    self.batch_size
                ),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "lr",
                format!("expected a positive number, found {}", self.lr),
            );
        }
        if self.widths.is_empty() || self.widths.contains(&0) {
            return bad(
                "widths",
                format!("expected positive channel widths, found {:?}", self.widths),
            );
        }
        if self.proj_dim == 0 {
            return bad("proj_dim", "must be at least 1".into());
        }
        // Each block after the first halves the side (2x2 max-pool), and the
        // last block still needs a pixel.
        let min_side = 1usize
            .checked_shl(self.widths.len() as u32 - 1)
            .unwrap_or(usize::MAX);
        if self.image_size < min_side {
            return bad(
                "image_size",
                format!(
                    "expected at least {min_side} for {} encoder blocks (each after the first \
                     halves the side), found {}",
                    self.widths.len(),
                    self.image_size
                ),
            );
        }
        if let Some(msg) = temperature_problem(self.temperature) {
            return bad("temperature", msg);
        }
        if !(0.0..=2.5).contains(&self.color_strength) {
            return bad(
                "color_strength",
                format!("expected 0..=2.5, found {}", self.color_strength),
            );
        }
        if !(0.0..=1.0).contains(&self.grayscale_p) {
            return bad(
                "grayscale_p",
                format!("expected a probability, found {}", self.grayscale_p),
            );
        }
        if !(self.crop_min_scale > 0.0 && self.crop_min_scale <= 1.0) {
            return bad(
                "crop_min_scale",
                format!("expected 0 < scale <= 1, found {}", self.crop_min_scale),
            );
        }
        Ok(())
    }

    /// The two-view augmentation these settings describe (see [`simclr_augment`]).
    pub fn augment(&self) -> Compose {
        augment(
            self.image_size,
            self.channels,
            self.color_strength,
            self.grayscale_p,
            self.crop_min_scale,
        )
    }
}

impl SimclrConfig {
    /// Scalars [`Simclr`] holds: the encoder's 3x3 convolutions (with
    /// biases) and batch norms (with running statistics), and the
    /// two-layer projection head. Saturating.
    pub fn num_params(&self) -> u64 {
        let mut prev = self.channels as u64;
        let mut n = 0u64;
        for &w in &self.widths {
            let w = w as u64;
            let conv = prev.saturating_mul(9).saturating_add(1).saturating_mul(w);
            n = n.saturating_add(conv).saturating_add(w.saturating_mul(4));
            prev = w;
        }
        let p = self.proj_dim as u64;
        let head = prev
            .saturating_add(1)
            .saturating_mul(prev)
            .saturating_add(prev.saturating_add(1).saturating_mul(p));
        n.saturating_add(head)
    }

    /// About how many bytes one training step on `batch` images (twice as
    /// many views) holds at its peak, on top of the weights and AdamW's
    /// state: the encoder's saved outputs for both views (12.5 floats per
    /// conv output element of an image), and NT-Xent's similarities over
    /// all `2 batch` views (9.5 floats per pair, quadratic in the batch).
    /// The weights were measured with a counting allocator;
    /// `tests/activation_memory.rs` checks the estimate against it.
    /// Saturating.
    pub fn training_activation_bytes(&self, batch: u64) -> u64 {
        let elements = self.widths.iter().enumerate().fold(0u64, |a, (i, &w)| {
            let side = self.image_size.checked_shr(i as u32).unwrap_or(0) as u64;
            a.saturating_add((w as u64).saturating_mul(side.saturating_mul(side)))
        });
        // The loader's two views and their concatenation, as f32.
        let views = (self.channels as u64)
            .saturating_mul((self.image_size as u64).saturating_mul(self.image_size as u64))
            .saturating_mul(4);
        let per_image_halves = elements
            .saturating_mul(25)
            .saturating_add(views.saturating_mul(2));
        let views_in_batch = batch.saturating_mul(2);
        let pair_halves = views_in_batch
            .saturating_mul(views_in_batch)
            .saturating_mul(19);
        per_image_halves
            .saturating_mul(batch)
            .saturating_add(pair_halves)
            .saturating_mul(2)
    }
}

impl Default for SimclrConfig {
    fn default() -> Self {
        Self {
            widths: vec![32, 64, 128],
            proj_dim: 64,
            temperature: 0.2,
            epochs: 20,
            batch_size: 128,
            lr: 1e-3,
            weight_decay: 1e-4,
            seed: 0,
            dataset: "synthetic-shapes".into(),
            image_size: 32,
            channels: 3,
            color_strength: default_color_strength(),
            grayscale_p: default_grayscale_p(),
            crop_min_scale: default_crop_min_scale(),
        }
    }
}

/// The model kind in a run's `config.toml`.
pub const SIMCLR_KIND: &str = "simclr";

/// The config fields a resumed SimCLR run may change.
pub const SIMCLR_MAY_CHANGE: &[&str] = &["epochs"];

/// A small conv encoder: `[B,C,H,W]` -> `[B, widths.last()]` features.
#[derive(Debug, Clone)]
pub struct ConvEncoder {
    blocks: Vec<(Conv2d, BatchNorm)>,
    pool: MaxPool2d,
}

impl ConvEncoder {
    /// Builds the encoder (variables under `vb`, `blocks.{i}.conv/bn`).
    pub fn new(channels: usize, widths: &[usize], vb: VarBuilder<'_>) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut prev = channels;
        for (i, &w) in widths.iter().enumerate() {
            let conv = Conv2d::new(
                prev,
                w,
                3,
                ConvConfig::padding(1),
                vb.pp(format!("blocks.{i}.conv")),
            )?;
            let bn = BatchNorm::new(w, vb.pp(format!("blocks.{i}.bn")))?;
            blocks.push((conv, bn));
            prev = w;
        }
        Ok(Self {
            blocks,
            pool: MaxPool2d::new(2),
        })
    }

    /// Output feature dimension.
    pub fn dim(&self) -> usize {
        self.blocks
            .last()
            .map(|(c, _)| c.weight().dims()[0])
            .unwrap_or(0)
    }
}

impl ModuleT for ConvEncoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        let n = self.blocks.len();
        for (i, (conv, bn)) in self.blocks.iter().enumerate() {
            h = bn.forward_act_t(&conv.forward(&h)?, train, 0.0)?;
            if i + 1 < n {
                h = self.pool.forward(&h)?;
            }
        }
        h.mean((2, 3))
    }
}

/// Encoder plus projection head (Linear-ReLU-Linear).
#[derive(Debug, Clone)]
pub struct Simclr {
    /// The encoder whose features are evaluated.
    pub encoder: ConvEncoder,
    head1: Linear,
    head2: Linear,
}

impl Simclr {
    /// Builds the model.
    pub fn new(cfg: &SimclrConfig, vb: VarBuilder<'_>) -> Result<Self> {
        if cfg.widths.is_empty() || cfg.proj_dim == 0 {
            kiln_core::candle::bail!(
                "SimCLR config: widths must be non-empty and proj_dim positive"
            );
        }
        let encoder = ConvEncoder::new(cfg.channels, &cfg.widths, vb.pp("encoder"))?;
        let d = encoder.dim();
        Ok(Self {
            encoder,
            head1: Linear::new(d, d, vb.pp("head.0"))?,
            head2: Linear::new(d, cfg.proj_dim, vb.pp("head.2"))?,
        })
    }

    /// Projections `[B, proj_dim]` of images.
    pub fn project(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.encoder.forward_t(x, train)?;
        self.head2
            .forward(&kiln_core::ops::relu(&self.head1.forward(&f)?)?)
    }
}

/// SimCLR's augmentations for small images with [`SimclrConfig`]'s defaults:
/// random resized crop (0.2-1), flip, colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8),
/// grayscale (p 0.2), blur (p 0.5).
pub fn simclr_augment(size: usize, channels: usize) -> Compose {
    augment(
        size,
        channels,
        default_color_strength(),
        default_grayscale_p(),
        default_crop_min_scale(),
    )
}

fn augment(
    size: usize,
    channels: usize,
    color_strength: f32,
    grayscale_p: f64,
    crop_min_scale: f32,
) -> Compose {
    let s = color_strength;
    Compose::new()
        .then(RandomResizedCrop::new(size, size).with_scale(crop_min_scale, 1.0))
        .then(HorizontalFlip::new(0.5))
        .then(RandomApply::new(
            ColorJitter::new(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            0.8,
        ))
        .then(RandomApply::new(Grayscale::new(channels), grayscale_p))
        .then(RandomApply::new(GaussianBlur::new(3, 0.1, 2.0), 0.5))
}

/// Outcome of [`train_simclr`].
#[derive(Debug, Clone, Serialize)]
pub struct SimclrReport {
    /// Mean NT-Xent in the last epoch.
    pub final_loss: f64,
    /// Probes of the trained encoder (when a labelled train/test pair was given).
    pub probes: Option<ProbeReport>,
    /// The same probes on a randomly initialised encoder, for comparison.
    pub random_probes: Option<ProbeReport>,
    /// Images per second.
    pub images_per_s: f64,
    /// Stopped early on Ctrl-C.
    pub interrupted: bool,
}

/// Features `[N, d]` of a whole dataset through an encoder in eval mode, and labels.
pub fn extract_features(
    encoder: &ConvEncoder,
    ds: Arc<dyn Dataset>,
    device: &Device,
) -> std::result::Result<(Tensor, Vec<u32>), SslError> {
    let loader = DataLoader::new(
        ds,
        LoaderConfig {
            batch_size: 256,
            shuffle: false,
            ..Default::default()
        },
        device,
    )?;
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for b in loader.epoch(0) {
        let b = b?;
        feats.push(encoder.forward_t(&b.images, false)?);
        labels.extend(b.label_ids.iter().map(|&l| l as u32));
    }
    Ok((Tensor::cat(&feats, 0)?, labels))
}

/// Probes an encoder: features of `train`/`test` sets, linear probe and kNN.
pub fn probe_encoder(
    encoder: &ConvEncoder,
    train: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
    device: &Device,
    seed: u64,
) -> std::result::Result<ProbeReport, SslError> {
    let (ftr, ltr) = extract_features(encoder, train, device)?;
    let (fte, lte) = extract_features(encoder, test, device)?;
    Ok(probe_all(
        &ftr,
        &ltr,
        &fte,
        &lte,
        &LinearProbeConfig {
            seed,
            ..Default::default()
        },
    )?)
}

/// Refuses, before the run folder is made, batches whose activations do
/// not fit beside the training state (`available`, `None`: unknown, never
/// refused); NT-Xent's share grows with the square of the batch.
fn check_batch_memory(
    cfg: &SimclrConfig,
    available: Option<u64>,
) -> std::result::Result<(), SslError> {
    kiln_core::memory::check_batch_fits_by(
        &format!(
            "this SimCLR encoder (widths {:?}) at {1}x{1}",
            cfg.widths, cfg.image_size
        ),
        "image",
        cfg.num_params()
            .saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM),
        |b| cfg.training_activation_bytes(b),
        cfg.batch_size as u64,
        available,
    )
    .map_err(|e| crate::batch_error(e, "use narrower --widths or smaller images"))
}

/// Trains SimCLR on `train_set`; with `probe_sets` (labelled train, test),
/// evaluates the encoder and a random one with the linear probe and kNN.
pub fn train_simclr(
    cfg: &SimclrConfig,
    train_set: Arc<dyn Dataset>,
    probe_sets: Option<(Arc<dyn Dataset>, Arc<dyn Dataset>)>,
    device: &Device,
    opts: &RunOptions,
) -> std::result::Result<SimclrReport, SslError> {
    cfg.validate()?;
    let lc = LoaderConfig {
        batch_size: cfg.batch_size,
        drop_last: true,
        seed: cfg.seed,
        ..Default::default()
    };
    let loader = DataLoader::new(train_set.clone(), lc, device)?.with_views(cfg.augment(), 2)?;
    if loader.is_empty() {
        return Err(SslError::Config {
            field: "batch_size".into(),
            msg: format!("{} is larger than the training set", cfg.batch_size),
        });
    }
    if device.is_cpu() {
        check_batch_memory(cfg, kiln_core::memory::available())?;
    }
    let run = opts.open("simclr", SIMCLR_KIND, cfg, SIMCLR_MAY_CHANGE)?;
    // A resumed run must read the data it began on (the datasets' files,
    // the probe's too, fingerprinted in `inputs.json`); a refused resume
    // leaves its config.
    let mut sets = vec![train_set.as_ref()];
    if let Some((a, b)) = &probe_sets {
        sets.extend([a.as_ref(), b.as_ref()]);
    }
    if let Err(e) = run.check_inputs(&input_paths_of(sets)) {
        run.restore_config()?;
        return Err(e.into());
    }
    let dir = run.dir().clone();
    let vs = VarStore::new(cfg.seed);
    let model = Simclr::new(cfg, vs.builder(DType::F32, device))?;
    let trainable = vs.vars_where(|n| !n.contains("running_"));
    let opt = Optimizer::single(OptimKind::adamw(), trainable, cfg.lr, cfg.weight_decay)?;
    let mut s = Session::builder(run, cfg.seed)
        .part("model", &vs, opt)
        .epochs(cfg.epochs, loader.len() as u64)
        .observer(opts.observer())
        .start()?;
    let end = s.run_epochs(
        |epoch, start| {
            loader
                .epoch_from(epoch, start)
                .map(|b| b.map_err(SslError::from))
        },
        |s, batch| {
            // One forward over both views so BatchNorm sees the whole 2N batch.
            let both = Tensor::cat(&[&batch.views[0], &batch.views[1]], 0)?;
            let z = model.project(&both, true)?;
            let n = batch.len();
            let loss = nt_xent(&z.narrow(0, 0, n)?, &z.narrow(0, n, n)?, cfg.temperature)?;
            let v = s.train_step("model", &loss)?;
            Ok(Record::new(n).with("loss", v))
        },
        |_| Ok(()),
    )?;
    let interrupted = !end.completed();
    let last = s.last_epoch("loss").unwrap_or(f64::NAN);
    let images_per_s = s.observer.throughput();
    let (mut probes, mut random_probes) = (None, None);
    if !interrupted {
        if let Some((tr, te)) = probe_sets {
            let p = probe_encoder(&model.encoder, tr.clone(), te.clone(), device, cfg.seed)?;
            let rvs = VarStore::new(cfg.seed.wrapping_add(1));
            let random = Simclr::new(cfg, rvs.builder(DType::F32, device))?;
            let r = probe_encoder(&random.encoder, tr, te, device, cfg.seed)?;
            s.record(
                "probe",
                &[
                    ("linear", p.linear),
                    ("knn20", p.knn20),
                    ("knn200", p.knn200),
                ],
            )?;
            s.record(
                "probe_random_init",
                &[
                    ("linear", r.linear),
                    ("knn20", r.knn20),
                    ("knn200", r.knn200),
                ],
            )?;
            probes = Some(p);
            random_probes = Some(r);
        }
        plot_metrics(
            &dir.join("metrics.jsonl"),
            &dir.join("loss.png"),
            "SimCLR: NT-Xent",
            &["loss"],
        )?;
    }
    let rep = SimclrReport {
        final_loss: last,
        probes,
        random_probes,
        images_per_s,
        interrupted,
    };
    if !interrupted {
        s.finish(serde_json::to_value(&rep).unwrap_or_default())?;
    }
    Ok(rep)
}

/// Loads a SimCLR run's encoder.
pub fn simclr_from_run(
    path: &std::path::Path,
    device: &Device,
) -> std::result::Result<(Simclr, SimclrConfig), SslError> {
    let run = kiln_core::run::RunDir::open(path)?;
    // The kind first, so a run of another model says so instead of failing
    // on the first field a SimCLR config does not have.
    let (kind, raw): (String, serde_json::Value) = run.read_config()?;
    if kind != SIMCLR_KIND {
        return Err(SslError::Run {
            path: path.to_path_buf(),
            msg: format!(
                "this is a {kind:?} run, not a SimCLR run ({SIMCLR_KIND:?}); pass the folder of \
                 a `train simclr` run"
            ),
        });
    }
    let cfg: SimclrConfig = serde_json::from_value(raw).map_err(|e| SslError::Run {
        path: path.to_path_buf(),
        msg: format!("config.toml: {e}"),
    })?;
    let vs = VarStore::new(cfg.seed);
    let m = Simclr::new(&cfg, vs.builder(DType::F32, device))?;
    kiln_core::checkpoint::load_part(&run.last_checkpoint(), "model", &vs)?;
    Ok((m, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--image-size 1` with three blocks failed inside max_pool2d after the
    /// run folder was made; the config now refuses a side the pools cannot halve.
    #[test]
    fn image_size_must_survive_the_encoders_pools() {
        let cfg = |image_size, widths: Vec<usize>| SimclrConfig {
            image_size,
            widths,
            ..SimclrConfig::default()
        };
        for (side, widths) in [(1, vec![8, 8, 8]), (3, vec![8, 8, 8]), (0, vec![8])] {
            let e = cfg(side, widths).validate().unwrap_err().to_string();
            assert!(
                e.contains("image_size") && e.contains("expected at least"),
                "{e}"
            );
        }
        for (side, widths) in [(4, vec![8, 8, 8]), (1, vec![8]), (2, vec![8, 8])] {
            cfg(side, widths).validate().unwrap();
        }
    }

    /// `--temperature 1e-30` trained nothing and said nothing: the logits
    /// (similarities / tau) reached 1e30 in f32, swamped the self-similarity
    /// mask, and the loss sat at ~1e28. The config now refuses temperatures
    /// outside the range NT-Xent can use, naming the field, value and range.
    #[test]
    fn temperature_must_keep_the_logits_usable() {
        let cfg = |temperature| SimclrConfig {
            temperature,
            ..SimclrConfig::default()
        };
        for t in [
            1e-30,
            1e-4,
            9.9e-4,
            100.5,
            1e6,
            0.0,
            -0.2,
            f64::NAN,
            f64::INFINITY,
        ] {
            let e = cfg(t).validate().unwrap_err().to_string();
            assert!(
                e.contains("`temperature`")
                    && e.contains(&format!("found {t:?}"))
                    && e.contains("[0.001, 100]"),
                "{t}: {e}"
            );
        }
        for t in [1e-3, 0.07, 0.2, 0.5, 1.0, 100.0] {
            cfg(t).validate().unwrap();
        }
    }

    /// `num_params` counts what the model holds; a batch too large for
    /// memory is refused with the one that fits, which the quadratic
    /// NT-Xent share keeps below the linear share's answer.
    #[test]
    fn params_are_counted_and_large_batches_refused() {
        #![allow(clippy::unwrap_used)]
        let cfg = SimclrConfig {
            widths: vec![8, 16],
            proj_dim: 12,
            channels: 1,
            ..SimclrConfig::default()
        };
        let vs = kiln_core::vars::VarStore::new(0);
        let _m = Simclr::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
        let held: usize = vs.vars().iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(cfg.num_params(), held as u64);

        let big = SimclrConfig {
            batch_size: 65536,
            ..SimclrConfig::default()
        };
        let avail = 8u64 << 30;
        let e = check_batch_memory(&big, Some(avail))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "config field `batch_size`: not enough memory for training this SimCLR encoder \
                 (widths [32, 64, 128]) at 32x32 on batches of 65536 images"
            ),
            "{e}"
        );
        let fits = (1..65536u64)
            .rev()
            .find(|&b| {
                let c = SimclrConfig {
                    batch_size: b as usize,
                    ..big.clone()
                };
                check_batch_memory(&c, Some(avail)).is_ok()
            })
            .unwrap();
        assert!(
            e.contains(&format!("; --batch-size {fits} or less fits;")),
            "{e}"
        );
        // The largest batch that fits, by the estimate.
        let fixed = big.num_params() * kiln_core::memory::TRAIN_BYTES_PER_PARAM;
        assert!(fixed + big.training_activation_bytes(fits) <= avail);
        assert!(fixed + big.training_activation_bytes(fits + 1) > avail);
        let linear_only = (avail - fixed) / (big.training_activation_bytes(1) - 4 * 38);
        assert!(fits < linear_only, "{fits} {linear_only}");
        check_batch_memory(
            &SimclrConfig {
                batch_size: fits as usize,
                ..big.clone()
            },
            Some(avail),
        )
        .unwrap();
        check_batch_memory(&big, None).unwrap();
    }
}
