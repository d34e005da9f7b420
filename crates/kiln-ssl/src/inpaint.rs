//! The chapter's masked-inpainting conv autoencoder: a random 8x8 square is
//! zeroed, the network restores the full image (MSE), and held-out quality is
//! measured on the masked region against a border-mean fill.

use std::sync::Arc;

use kiln_core::image::{plot_metrics, save_image_rows, GridOptions};
use kiln_core::loss::{mse, Reduction};
use kiln_core::nn::{Conv2d, ConvConfig, ConvTranspose2d, MaxPool2d};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunDir;
use kiln_core::session::{Record, Session};
use kiln_core::vars::VarStore;
use kiln_core::{candle_nn, DType, Device, Module, Result, Tensor, VarBuilder};
use kiln_data::masks::SquareMask;
use kiln_data::{input_paths_of, DataLoader, Dataset, LoaderConfig};
use serde::{Deserialize, Serialize};

use crate::{RunOptions, SslError};

/// The chapter's autoencoder. Names follow the PyTorch reference (`c1`, `c2`,
/// `d1`, `d2`): Conv2d(3,8,k3,p1) ReLU MaxPool(2) -> Conv2d(8,32,k3,p1) ReLU
/// MaxPool(2) -> ConvTranspose2d(32,8,k2,s2) ReLU -> ConvTranspose2d(8,3,k2,s2) Sigmoid.
#[derive(Debug, Clone)]
pub struct InpaintAe {
    c1: Conv2d,
    c2: Conv2d,
    d1: ConvTranspose2d,
    d2: ConvTranspose2d,
    pool: MaxPool2d,
}

impl InpaintAe {
    /// Builds the model for `channels`-channel images.
    pub fn new(channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            c1: Conv2d::new(channels, 8, 3, ConvConfig::padding(1), vb.pp("c1"))?,
            c2: Conv2d::new(8, 32, 3, ConvConfig::padding(1), vb.pp("c2"))?,
            d1: ConvTranspose2d::new(32, 8, 2, ConvConfig::stride(2), vb.pp("d1"))?,
            d2: ConvTranspose2d::new(8, channels, 2, ConvConfig::stride(2), vb.pp("d2"))?,
            pool: MaxPool2d::new(2),
        })
    }
}

impl Module for InpaintAe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.pool.forward(&self.c1.forward_relu(x)?)?;
        let h = self.pool.forward(&self.c2.forward_relu(&h)?)?;
        let h = self.d1.forward_relu(&h)?;
        candle_nn::ops::sigmoid(&self.d2.forward(&h)?)
    }
}

/// Inpainting training settings (the chapter's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InpaintConfig {
    /// Epochs (the chapter: 200).
    pub epochs: u64,
    /// Batch size (32).
    pub batch_size: usize,
    /// Adam learning rate (1e-3).
    pub lr: f64,
    /// Side of the square mask (8).
    pub mask_size: usize,
    /// One mask position per image instead of one per batch (the chapter: per batch).
    pub mask_per_image: bool,
    /// Weight of the masked pixels' squared error relative to the visible
    /// pixels' in the training loss (see [`inpaint_loss`]). 1 is the chapter's
    /// plain MSE over the whole image, where the hole is only
    /// `mask_size² / image_size²` of the loss (1/16 at 32x32 with an 8x8 mask).
    #[serde(default = "one")]
    pub hole_weight: f64,
    /// Seed.
    pub seed: u64,
    /// Dataset as given on the command line.
    pub dataset: String,
    /// Image side.
    pub image_size: usize,
    /// Image channels.
    pub channels: usize,
}

impl InpaintConfig {
    /// Scalars [`InpaintAe`] holds for these images' channels.
    pub fn num_params(&self) -> u64 {
        let c = self.channels as u64;
        // c1 (3x3), c2 (3x3), d1 (2x2 transposed), d2 (2x2 transposed), with biases.
        (c * 9 + 1) * 8 + (8 * 9 + 1) * 32 + 32 * 4 * 8 + 8 + 8 * 4 * c + c
    }

    /// About how many bytes one training step holds at its peak per image
    /// of a batch, on top of the weights and Adam's state: each layer's
    /// saved output, the first convolution's unfolded input, the mask, and
    /// the gradients in flight. Floats per pixel (83 + 8 per channel, 6
    /// per channel more when the hole is weighted) were measured with a
    /// counting allocator on 1- and 3-channel images at 32x32 and 64x64;
    /// `tests/activation_memory.rs` checks the estimate against it.
    pub fn training_bytes_per_image(&self) -> u64 {
        let c = self.channels as u64;
        let weighted = if self.hole_weight == 1.0 { 0 } else { 6 * c };
        let pixels = (self.image_size as u64).saturating_mul(self.image_size as u64);
        pixels
            .saturating_mul(86 + 8 * c + weighted)
            .saturating_mul(4)
    }
}

impl Default for InpaintConfig {
    fn default() -> Self {
        Self {
            epochs: 200,
            batch_size: 32,
            lr: 1e-3,
            mask_size: 8,
            mask_per_image: false,
            hole_weight: 1.0,
            seed: 0,
            dataset: "synthetic-flowers".into(),
            image_size: 32,
            channels: 3,
        }
    }
}

fn one() -> f64 {
    1.0
}

impl InpaintConfig {
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
        if !(self.hole_weight.is_finite() && self.hole_weight > 0.0) {
            return bad(
                "hole_weight",
                format!("expected a positive number, found {}", self.hole_weight),
            );
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "lr",
                format!("expected a positive number, found {}", self.lr),
            );
        }
        // Two 2x2 max-pools, then two stride-2 transposed convs: only a
        // multiple of 4 comes back at its own size (30 would give 28).
        if self.image_size == 0 || !self.image_size.is_multiple_of(4) {
            return bad(
                "image_size",
                format!(
                    "expected a positive multiple of 4 (the autoencoder halves the side \
                     twice and doubles it twice), found {}",
                    self.image_size
                ),
            );
        }
        if self.mask_size == 0 || self.mask_size >= self.image_size {
            return bad(
                "mask_size",
                format!(
                    "expected 1..{} for {}x{} images, found {}",
                    self.image_size, self.image_size, self.image_size, self.mask_size
                ),
            );
        }
        Ok(())
    }
}

/// The training loss: squared error with the hole's pixels weighted
/// `hole_weight` times the visible ones, divided by the total weight, so
/// `hole_weight = 1` is exactly the chapter's `MSE(reconstruction, image)`.
/// `mask` is the keep-mask `[B,1,H,W]` (0 in the hole).
pub fn inpaint_loss(
    pred: &Tensor,
    target: &Tensor,
    mask: &Tensor,
    hole_weight: f64,
) -> Result<Tensor> {
    if hole_weight == 1.0 {
        return mse(pred, target, Reduction::Mean);
    }
    // w = 1 in view, hole_weight in the hole
    let w = mask
        .affine(1.0 - hole_weight, hole_weight)?
        .broadcast_as(target.shape())?;
    let total = w.sum_all()?;
    (pred - target)?
        .sqr()?
        .mul(&w)?
        .sum_all()?
        .broadcast_div(&total)
}

/// The model kind in a run's `config.toml`.
pub const INPAINT_KIND: &str = "inpaint";

/// The config fields a resumed inpainting run may change.
pub const INPAINT_MAY_CHANGE: &[&str] = &["epochs"];

/// Held-out inpainting quality on the masked region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InpaintReport {
    /// Images evaluated.
    pub images: usize,
    /// Model MSE over masked pixels.
    pub masked_mse: f64,
    /// Model PSNR (dB) over masked pixels, images in [0, 1].
    pub masked_psnr: f64,
    /// Border-mean baseline MSE over masked pixels.
    pub baseline_mse: f64,
    /// Border-mean baseline PSNR (dB).
    pub baseline_psnr: f64,
    /// Model MSE over the whole image.
    pub full_mse: f64,
}

/// Fills each masked square with the per-channel mean of the one-pixel ring
/// around it: the trivial baseline a model must beat. `mask` is `[B,1,H,W]`
/// with 0 in the hole.
pub fn border_mean_fill(images: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let x = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let m = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = x.clone();
    for i in 0..b {
        let hole = |y: usize, xx: usize| m[(i * h + y) * w + xx] == 0.0;
        let ring: Vec<(usize, usize)> = (0..h)
            .flat_map(|y| (0..w).map(move |xx| (y, xx)))
            .filter(|&(y, xx)| {
                !hole(y, xx) && {
                    let (y0, y1, x0, x1) = (
                        y.saturating_sub(1),
                        (y + 1).min(h - 1),
                        xx.saturating_sub(1),
                        (xx + 1).min(w - 1),
                    );
                    (y0..=y1).any(|yy| (x0..=x1).any(|xq| hole(yy, xq)))
                }
            })
            .collect();
        for ch in 0..c {
            let base = (i * c + ch) * h * w;
            let mean = if ring.is_empty() {
                0.5
            } else {
                ring.iter()
                    .map(|&(y, xx)| x[base + y * w + xx])
                    .sum::<f32>()
                    / ring.len() as f32
            };
            for y in 0..h {
                for xx in 0..w {
                    if hole(y, xx) {
                        out[base + y * w + xx] = mean;
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (b, c, h, w), images.device())
}

/// Sum of squared error over the hole, and the number of hole values.
fn masked_sse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
    let hole = mask.affine(-1.0, 1.0)?.broadcast_as(target.shape())?;
    let sse = (pred - target)?
        .sqr()?
        .mul(&hole)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((sse, hole.sum_all()?.to_scalar::<f32>()? as f64))
}

fn psnr(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// Evaluates inpainting on `ds` with masks drawn from `seed` (the same masks
/// for model and baseline).
pub fn evaluate_inpaint(
    model: &InpaintAe,
    ds: Arc<dyn Dataset>,
    mask: SquareMask,
    device: &Device,
    seed: u64,
) -> std::result::Result<InpaintReport, SslError> {
    let loader = DataLoader::new(
        ds,
        LoaderConfig {
            batch_size: 64,
            shuffle: false,
            seed,
            ..Default::default()
        },
        device,
    )?;
    let mut rng = SeededRng::derive(seed, &[0x1A_9A1]);
    let (mut sse, mut cnt, mut bsse, mut full, mut n, mut vals) = (0.0, 0.0, 0.0, 0.0, 0usize, 0.0);
    for batch in loader.epoch(0) {
        let x = batch?.images;
        let (masked, m) = mask.apply(&x, &mut rng)?;
        let y = model.forward(&masked)?;
        let (s, c) = masked_sse(&y, &x, &m)?;
        let (bs, _) = masked_sse(&border_mean_fill(&masked, &m)?, &x, &m)?;
        sse += s;
        bsse += bs;
        cnt += c;
        full += (&y - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        vals += x.elem_count() as f64;
        n += x.dim(0)?;
    }
    let (mse_m, mse_b) = (sse / cnt.max(1.0), bsse / cnt.max(1.0));
    Ok(InpaintReport {
        images: n,
        masked_mse: mse_m,
        masked_psnr: psnr(mse_m),
        baseline_mse: mse_b,
        baseline_psnr: psnr(mse_b),
        full_mse: full / vals.max(1.0),
    })
}

/// Outcome of [`train_inpaint`].
#[derive(Debug, Clone, Serialize)]
pub struct InpaintTrainReport {
    /// Mean training MSE in the last epoch.
    pub final_train_mse: f64,
    /// Held-out evaluation at the end.
    pub test: Option<InpaintReport>,
    /// Images per second.
    pub images_per_s: f64,
    /// Stopped early on Ctrl-C.
    pub interrupted: bool,
}

/// Refuses, before the run folder is made, batches of `batch` images whose
/// activations do not fit beside the training state (`available`, `None`:
/// unknown, never refused).
fn check_batch_memory(
    cfg: &InpaintConfig,
    batch: usize,
    available: Option<u64>,
) -> std::result::Result<(), SslError> {
    // The loader's batch, its masked copy and the mask, as f32.
    let pixels = (cfg.image_size as u64).saturating_mul(cfg.image_size as u64);
    let images = pixels.saturating_mul(cfg.channels as u64 * 12);
    kiln_core::memory::check_batch_fits(
        &format!("this inpainting autoencoder at {0}x{0}", cfg.image_size),
        "image",
        cfg.num_params()
            .saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM),
        cfg.training_bytes_per_image().saturating_add(images),
        batch as u64,
        available,
    )
    .map_err(|e| crate::batch_error(e, "use smaller images"))
}

/// Trains the chapter's autoencoder: masked input, full-image MSE target
/// (optionally weighting the hole, [`InpaintConfig::hole_weight`]), Adam.
/// Writes `figure_14_2.png` (images / masked / reconstructions / hole filled), `loss.png`,
/// metrics, checkpoints and `summary.json` into the run folder.
pub fn train_inpaint(
    cfg: &InpaintConfig,
    train_set: Arc<dyn Dataset>,
    test_set: Option<Arc<dyn Dataset>>,
    device: &Device,
    opts: &RunOptions,
) -> std::result::Result<InpaintTrainReport, SslError> {
    cfg.validate()?;
    if device.is_cpu() {
        // The loader keeps the last, smaller batch: a small set makes one.
        let batch = cfg.batch_size.min(train_set.len());
        check_batch_memory(cfg, batch, kiln_core::memory::available())?;
    }
    let run = opts.open("inpaint", INPAINT_KIND, cfg, INPAINT_MAY_CHANGE)?;
    // A resumed run must read the data it began on (the datasets' files,
    // fingerprinted in `inputs.json`); a refused resume leaves its config.
    let sets = [Some(train_set.as_ref()), test_set.as_deref()];
    if let Err(e) = run.check_inputs(&input_paths_of(sets.into_iter().flatten())) {
        run.restore_config()?;
        return Err(e.into());
    }
    let dir = run.dir().clone();
    let vs = VarStore::new(cfg.seed);
    let model = InpaintAe::new(cfg.channels, vs.builder(DType::F32, device))?;
    let opt = Optimizer::single(OptimKind::adam(), vs.vars(), cfg.lr, 0.0)?;
    let loader = DataLoader::new(
        train_set.clone(),
        LoaderConfig {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            ..Default::default()
        },
        device,
    )?;
    let mask = SquareMask::new(cfg.mask_size, cfg.mask_per_image);
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
            let (masked, keep) = mask.apply(&batch.images, &mut s.rng)?;
            let loss = inpaint_loss(
                &model.forward(&masked)?,
                &batch.images,
                &keep,
                cfg.hole_weight,
            )?;
            let v = s.train_step("model", &loss)?;
            Ok(Record::new(batch.len()).with("loss", v))
        },
        |_| Ok(()),
    )?;
    let interrupted = !end.completed();
    let last = s.last_epoch("loss").unwrap_or(f64::NAN);
    let images_per_s = s.observer.throughput();
    if interrupted {
        return Ok(InpaintTrainReport {
            final_train_mse: last,
            test: None,
            images_per_s,
            interrupted,
        });
    }
    let test = match &test_set {
        Some(ts) => {
            let r = evaluate_inpaint(&model, ts.clone(), mask, device, cfg.seed)?;
            s.record(
                "test",
                &[
                    ("masked_mse", r.masked_mse),
                    ("masked_psnr", r.masked_psnr),
                    ("baseline_psnr", r.baseline_psnr),
                ],
            )?;
            Some(r)
        }
        None => None,
    };
    let shown = test_set.as_deref().unwrap_or(train_set.as_ref());
    write_figure(&model, shown, mask, device, cfg.seed, &dir)?;
    plot_metrics(
        &dir.join("metrics.jsonl"),
        &dir.join("loss.png"),
        "inpainting: train MSE",
        &["loss"],
    )?;
    let rep = InpaintTrainReport {
        final_train_mse: last,
        test,
        images_per_s,
        interrupted,
    };
    s.finish(serde_json::to_value(&rep).unwrap_or_default())?;
    Ok(rep)
}

/// `masked` with its hidden pixels (`keep` 0, broadcast over channels)
/// taken from `reconstruction`.
pub fn fill_hole(masked: &Tensor, keep: &Tensor, reconstruction: &Tensor) -> Result<Tensor> {
    let hole = keep.to_dtype(reconstruction.dtype())?.affine(-1.0, 1.0)?;
    masked.broadcast_add(&reconstruction.broadcast_mul(&hole)?)
}

/// The chapter's figure 14.2: row 1 images, row 2 masked, row 3
/// reconstructions; and row 4, the masked image with only its hole filled
/// from the reconstruction (what inpainting hands back: the known pixels
/// stay as they were).
pub fn write_figure(
    model: &InpaintAe,
    ds: &dyn Dataset,
    mask: SquareMask,
    device: &Device,
    seed: u64,
    run: &RunDir,
) -> std::result::Result<(), SslError> {
    let n = ds.len().min(8);
    let mut imgs = Vec::with_capacity(n);
    for i in 0..n {
        let s = ds.get(i)?;
        imgs.push(Tensor::from_slice(
            &s.image.data,
            (s.image.channels, s.image.height, s.image.width),
            device,
        )?);
    }
    let x = Tensor::stack(&imgs, 0)?;
    let mut rng = SeededRng::derive(seed, &[0xF16]);
    let (masked, keep) = mask.apply(&x, &mut rng)?;
    let y = model.forward(&masked)?;
    let filled = fill_hole(&masked, &keep, &y)?;
    save_image_rows(
        &[&x, &masked, &y, &filled],
        &run.join("figure_14_2.png"),
        &GridOptions {
            scale: 3,
            ..Default::default()
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A side the pools and transposed convs do not bring back whole (30
    /// would give 28 and a shape error mid-training) is refused up front.
    #[test]
    fn image_size_must_be_a_multiple_of_four() {
        for side in [0, 2, 30, 33] {
            let c = InpaintConfig {
                image_size: side,
                mask_size: 1,
                ..InpaintConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("image_size") && e.contains("multiple of 4"),
                "{side}: {e}"
            );
        }
        for side in [4, 16, 32] {
            let c = InpaintConfig {
                image_size: side,
                mask_size: 2,
                ..InpaintConfig::default()
            };
            c.validate().unwrap();
        }
    }

    /// Known pixels come from the masked image, hidden ones from the
    /// reconstruction, in every channel.
    #[test]
    fn the_hole_alone_is_filled() {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(3);
        let x = rng.uniform(&[2, 3, 12, 12], 0.0, 1.0, &dev).unwrap();
        let y = rng.uniform(&[2, 3, 12, 12], 2.0, 3.0, &dev).unwrap();
        let mask = SquareMask::new(4, true);
        let (masked, keep) = mask.apply(&x, &mut rng).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = flat(&fill_hole(&masked, &keep, &y).unwrap());
        let (x, y) = (flat(&x), flat(&y));
        let keep = flat(
            &keep
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_as((2, 3, 12, 12))
                .unwrap(),
        );
        let hidden = keep.iter().filter(|&&k| k == 0.0).count();
        assert_eq!(hidden, 2 * 3 * 16, "a 4x4 hole in each image and channel");
        for i in 0..f.len() {
            let want = if keep[i] == 0.0 { y[i] } else { x[i] };
            assert_eq!(f[i], want, "element {i}");
        }
    }

    /// `num_params` counts what the model holds; a batch too large for
    /// memory is refused with the one that fits.
    #[test]
    fn params_are_counted_and_large_batches_refused() {
        for channels in [1, 3] {
            let vs = VarStore::new(0);
            let _m = InpaintAe::new(channels, vs.builder(DType::F32, &Device::Cpu)).unwrap();
            let held: usize = vs.vars().iter().map(|(_, v)| v.elem_count()).sum();
            let cfg = InpaintConfig {
                channels,
                ..InpaintConfig::default()
            };
            assert_eq!(cfg.num_params(), held as u64);
        }
        let cfg = InpaintConfig {
            image_size: 256,
            ..InpaintConfig::default()
        };
        // About 27 MiB per 256x256 image.
        let per = cfg.training_bytes_per_image();
        assert!((25 << 20..30 << 20).contains(&per), "{per}");
        let e = check_batch_memory(&cfg, 4096, Some(16 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "config field `batch_size`: not enough memory for training this inpainting \
                 autoencoder at 256x256 on batches of 4096 images: it needs about 1"
            ),
            "{e}"
        );
        assert!(e.contains("--batch-size 5"), "{e}");
        check_batch_memory(&cfg, 500, Some(16 << 30)).unwrap();
        check_batch_memory(&cfg, 4096, None).unwrap();
    }
}
