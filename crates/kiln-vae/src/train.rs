//! Training: the chapter's loop (Adam, summed β-ELBO, average loss per image
//! each epoch) on a kiln-core [`Session`], with checkpoints, exact resume,
//! metrics and figures in the run folder.

use std::path::Path;
use std::sync::Arc;

use kiln_core::image::{plot_metrics, save_image_grid, save_image_rows, GridOptions};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunDir, RunOptions};
use kiln_core::session::{Record, Session};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_data::{input_paths_of, DataError, DataLoader, Dataset, DatasetSpec, LoaderConfig};
use serde::{Deserialize, Serialize};

use crate::config::VaeConfig;
use crate::error::{Result, VaeError};
use crate::eval::{evaluate, EvalReport};
use crate::loss::elbo_loss;
use crate::model::Vae;

/// The model kind written to a run's `config.toml`.
pub const RUN_KIND: &str = "vae";

/// Optimisation settings (the chapter's by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set (the chapter: 400).
    pub epochs: u64,
    /// Images per batch (32).
    pub batch_size: usize,
    /// Adam learning rate (2e-3).
    pub lr: f64,
    /// Seed of weights, data order and noise.
    pub seed: u64,
    /// The dataset, as given on the command line (recorded for `eval`/`sample`).
    pub dataset: String,
    /// Evaluate on the test split every this many epochs (0 = at the end only).
    pub eval_every: u64,
}

impl TrainConfig {
    /// Rejects settings that cannot train, naming the field and its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(VaeError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.epochs == 0 {
            return bad("epochs", "expected at least 1, found 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "expected at least 1, found 0".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "lr",
                format!("expected a positive number, found {}", self.lr),
            );
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 400,
            batch_size: 32,
            lr: 2e-3,
            seed: 0,
            dataset: "synthetic-flowers".into(),
            eval_every: 0,
        }
    }
}

/// What a run's `config.toml` holds besides its `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The model.
    pub model: VaeConfig,
    /// The optimisation.
    pub train: TrainConfig,
}

impl RunConfig {
    /// Checks the model and the optimisation ([`VaeConfig::validate`],
    /// [`TrainConfig::validate`]) and that `train.dataset` can be opened at
    /// `model.image_size` (`eval` and `sample` reopen it there): the drawn
    /// datasets have a smallest side (synthetic-flowers 4, synthetic-shapes
    /// 8, as kiln-data's configs check), the others are resized to any side.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        check_dataset_side(&self.train.dataset, self.model.image_size)
    }
}

/// Refuses an image side the dataset named `dataset` cannot be drawn at,
/// with kiln-data's own range. A name that does not parse is left to the
/// code that opens it, which says what names are known.
fn check_dataset_side(dataset: &str, size: usize) -> Result<()> {
    let Ok(spec) = dataset.parse::<DatasetSpec>() else {
        return Ok(());
    };
    spec.check_side(size).map_err(|e| VaeError::Config {
        field: "image_size".into(),
        msg: match e {
            DataError::Config { msg, .. } => {
                format!("dataset {spec} cannot be drawn at this side: {msg}")
            }
            e => format!("dataset {spec}: {e}"),
        },
    })
}

/// The config fields a resumed run may change (`--epochs` extends a run).
pub const MAY_CHANGE_ON_RESUME: &[&str] = &["train.epochs", "train.eval_every"];

/// The outcome of [`train`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Average training loss per image in the last epoch.
    pub final_train_loss: f64,
    /// Test-set evaluation at the end, when a test set was given.
    pub test: Option<EvalReport>,
    /// Epochs completed.
    pub epochs: u64,
    /// Training throughput, images per second.
    pub images_per_s: f64,
    /// Whether training stopped early on Ctrl-C (a checkpoint was written).
    pub interrupted: bool,
}

/// Refuses, before a run folder or a weight is made, a model whose training
/// state does not fit in the memory the machine has (`available`, `None`:
/// unknown, never refused): the MLP's first and last layers grow with the
/// image's pixels, and at `--image-size 1024` they alone take 12 GiB.
fn check_training_memory(cfg: &VaeConfig, available: Option<u64>) -> Result<()> {
    let model = format!("this VAE at {0}x{0}", cfg.image_size);
    kiln_core::memory::check_training_fits(&model, cfg.num_params(), available).map_err(|e| {
        VaeError::Config {
            field: "image_size".into(),
            msg: format!(
                "{e}; use a smaller --image-size, or --preset conv (whose parameters do not grow \
                 with the image); {}",
                kiln_core::memory::SKIP_HINT
            ),
        }
    })
}

/// Refuses, before a run folder is made, batches of `batch` images whose
/// activations do not fit beside the training state (`available`, `None`:
/// unknown, never refused): `--batch-size` otherwise gets the process
/// killed in its first step.
fn check_batch_memory(cfg: &VaeConfig, batch: usize, available: Option<u64>) -> Result<()> {
    let fixed = cfg
        .num_params()
        .saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM);
    // The loader's batch: the images as f32, read and stacked.
    let images = (cfg.input_dim() as u64).saturating_mul(8);
    let model = format!("this VAE at {0}x{0}", cfg.image_size);
    kiln_core::memory::check_batch_fits(
        &model,
        "image",
        fixed,
        cfg.training_bytes_per_image().saturating_add(images),
        batch as u64,
        available,
    )
    .map_err(|e| {
        let advice = match e.largest_batch() {
            0 => "not even one image fits: use a smaller --image-size or narrower --hidden layers"
                .to_string(),
            n => format!("--batch-size {n} or less fits"),
        };
        VaeError::Config {
            field: "batch_size".into(),
            msg: format!("{e}; {advice}; {}", kiln_core::memory::SKIP_HINT),
        }
    })
}

/// Trains `model_cfg` on `train_set` in the run folder `opts` names (a new
/// run, or with `opts.resume` the continuation of one: same kind and config
/// but for [`MAY_CHANGE_ON_RESUME`]). Writes `config.toml`, `metrics.jsonl`,
/// `checkpoints/last.safetensors`, `loss.png`, `samples.png`,
/// `reconstructions.png`, `interpolation.png` and `summary.json`.
pub fn train(
    model_cfg: &VaeConfig,
    tc: &TrainConfig,
    train_set: Arc<dyn Dataset>,
    test_set: Option<Arc<dyn Dataset>>,
    device: &Device,
    opts: &RunOptions,
) -> Result<TrainReport> {
    let run_cfg = RunConfig {
        model: model_cfg.clone(),
        train: tc.clone(),
    };
    run_cfg.validate()?;
    check_shape(model_cfg, train_set.as_ref())?;
    if device.is_cpu() {
        let available = kiln_core::memory::available();
        check_training_memory(model_cfg, available)?;
        // Without drop_last a small set makes one smaller batch.
        check_batch_memory(model_cfg, tc.batch_size.min(train_set.len()), available)?;
    }
    let run = opts.open("vae", RUN_KIND, &run_cfg, MAY_CHANGE_ON_RESUME)?;
    // A resumed run must read the data it began on (the datasets' files,
    // fingerprinted in `inputs.json`); a refused resume leaves its config.
    let sets = [Some(train_set.as_ref()), test_set.as_deref()];
    if let Err(e) = run.check_inputs(&input_paths_of(sets.into_iter().flatten())) {
        run.restore_config()?;
        return Err(e.into());
    }
    let dir = run.dir().clone();

    let vs = VarStore::new(tc.seed);
    let model = Vae::new(model_cfg, vs.builder(DType::F32, device))?;
    let opt = Optimizer::single(OptimKind::adam(), vs.vars(), tc.lr, 0.0)?;
    let loader_cfg = LoaderConfig {
        batch_size: tc.batch_size,
        shuffle: true,
        drop_last: false,
        seed: tc.seed,
        ..Default::default()
    };
    let loader = DataLoader::new(train_set.clone(), loader_cfg, device)?;
    let mut s = Session::builder(run, tc.seed)
        .part("model", &vs, opt)
        .epochs(tc.epochs, loader.len() as u64)
        .observer(opts.observer())
        .start()?;
    let cond = model_cfg.num_classes.is_some();
    let eval = |s: &mut Session| -> Result<EvalReport> {
        let r = evaluate(&model, s_test(&test_set)?, device, 256, 0, tc.seed)?;
        s.record(
            "test",
            &[
                ("neg_elbo", r.neg_elbo_nats),
                ("bits_per_dim", r.neg_elbo_bpd),
            ],
        )?;
        Ok(r)
    };
    let end = s.run_epochs(
        |epoch, start| {
            loader
                .epoch_from(epoch, start)
                .map(|b| b.map_err(VaeError::from))
        },
        |s, batch| {
            let b = batch.len() as f64;
            let labels = cond.then_some(&batch.labels);
            let out = model.forward(&batch.images, labels, &mut s.rng)?;
            let t = elbo_loss(
                &out,
                &batch.images,
                model_cfg.likelihood,
                model.logvar_x(),
                model_cfg.beta,
            )?;
            let rec = t.rec.to_scalar::<f32>()? as f64;
            let kl = t.kl.to_scalar::<f32>()? as f64;
            let v = s.train_step("model", &t.loss)?;
            // Per image, as the chapter prints it; the epoch's line is their
            // image-weighted mean.
            Ok(Record::new(batch.len())
                .with("loss", v / b)
                .with("rec", rec / b)
                .with("kl", kl / b))
        },
        |s| {
            if test_set.is_some()
                && tc.eval_every > 0
                && s.epoch() % tc.eval_every == 0
                && s.epoch() < tc.epochs
            {
                eval(s)?;
            }
            Ok(())
        },
    )?;
    let interrupted = !end.completed();
    let images_per_s = s.observer.throughput();
    let test = match (&test_set, interrupted) {
        (Some(_), false) => Some(eval(&mut s)?),
        _ => None,
    };
    let report = TrainReport {
        final_train_loss: s.last_epoch("loss").unwrap_or(f64::NAN),
        test,
        epochs: s.epoch(),
        images_per_s,
        interrupted,
    };
    if !interrupted {
        write_figures(
            &model,
            &dir,
            test_set.as_deref().unwrap_or(train_set.as_ref()),
            device,
            tc.seed,
        )?;
        s.finish(serde_json::to_value(&report).map_err(|e| VaeError::Run {
            path: dir.path().to_path_buf(),
            msg: e.to_string(),
        })?)?;
    }
    Ok(report)
}

/// The test set, for the evaluation closure (only called when there is one).
fn s_test(test_set: &Option<Arc<dyn Dataset>>) -> Result<Arc<dyn Dataset>> {
    test_set.clone().ok_or_else(|| VaeError::Config {
        field: "test_set".into(),
        msg: "no test set to evaluate on".into(),
    })
}

fn check_shape(cfg: &VaeConfig, ds: &dyn Dataset) -> Result<()> {
    if ds.is_empty() {
        return Err(VaeError::Config {
            field: "dataset".into(),
            msg: "the training set is empty".into(),
        });
    }
    let s = ds.get(0)?.image.shape();
    if s != [cfg.channels, cfg.image_size, cfg.image_size] {
        return Err(VaeError::Config {
            field: "channels/image_size".into(),
            msg: format!(
                "the model expects images [{}, {}, {}], the dataset gives {s:?}",
                cfg.channels, cfg.image_size, cfg.image_size
            ),
        });
    }
    Ok(())
}

/// The first `n` images (and labels) of a dataset as tensors.
pub fn first_images(ds: &dyn Dataset, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let n = n.min(ds.len());
    let mut imgs = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let s = ds.get(i)?;
        let [c, h, w] = s.image.shape();
        imgs.push(Tensor::from_slice(&s.image.data, (c, h, w), device)?);
        labels.push(s.label as u32);
    }
    Ok((Tensor::stack(&imgs, 0)?, Tensor::new(labels, device)?))
}

/// Writes `samples.png` (64 samples), `reconstructions.png` (8 images over
/// their reconstructions), `interpolation.png` and `loss.png`.
pub fn write_figures(
    model: &Vae,
    run: &RunDir,
    ds: &dyn Dataset,
    device: &Device,
    seed: u64,
) -> Result<()> {
    let grid = GridOptions {
        ncols: 8,
        scale: 3,
        ..Default::default()
    };
    let cond = model.config().num_classes;
    let mut rng = SeededRng::derive(seed, &[0x5A_4D_50_4C]);
    let sample_labels = cond
        .map(|k| Tensor::new((0..64u32).map(|i| i % k as u32).collect::<Vec<_>>(), device))
        .transpose()?;
    let samples = model.sample(64, sample_labels.as_ref(), &mut rng, device)?;
    save_image_grid(&samples, &run.join("samples.png"), &grid)?;
    let (x, y) = first_images(ds, 8, device)?;
    let labels = cond.map(|_| &y);
    let recon = model.reconstruct(&x, labels)?;
    save_image_rows(&[&x, &recon], &run.join("reconstructions.png"), &grid)?;
    if x.dim(0)? >= 2 {
        let (a, b) = (x.narrow(0, 0, 1)?, x.narrow(0, 1, 1)?);
        let l = cond.map(|_| y.narrow(0, 0, 1)).transpose()?;
        let path = model.interpolate(&a, &b, 10, l.as_ref())?;
        save_image_grid(
            &path,
            &run.join("interpolation.png"),
            &GridOptions { ncols: 10, ..grid },
        )?;
    }
    let metrics = run.join("metrics.jsonl");
    if metrics.exists() {
        plot_train_curve(&metrics, &run.join("loss.png"))?;
    }
    Ok(())
}

fn plot_train_curve(metrics: &Path, out: &Path) -> Result<()> {
    plot_metrics(
        metrics,
        out,
        "VAE: loss per image (negative ELBO)",
        &["loss", "neg_elbo"],
    )?;
    Ok(())
}

/// Loads a finished (or interrupted) run as a model: its config and last checkpoint.
pub fn from_run(path: &Path, device: &Device) -> Result<(Vae, RunConfig)> {
    let run = RunDir::open(path)?;
    // The kind first, so a run of another model says so instead of failing
    // on the first field a VAE config does not have.
    let (kind, raw): (String, serde_json::Value) = run.read_config()?;
    if kind != RUN_KIND {
        return Err(VaeError::Run {
            path: path.to_path_buf(),
            msg: format!(
                "this is a {kind:?} run, not a VAE run ({RUN_KIND:?}); pass the folder of a \
                 `train vae` run"
            ),
        });
    }
    let cfg: RunConfig = serde_json::from_value(raw).map_err(|e| VaeError::Run {
        path: path.to_path_buf(),
        msg: format!("config.toml: {e}"),
    })?;
    let vs = VarStore::new(cfg.train.seed);
    let model = Vae::new(&cfg.model, vs.builder(DType::F32, device))?;
    kiln_core::checkpoint::load_part(&run.last_checkpoint(), "model", &vs)?;
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Training state that does not fit is refused with its figures, before
    /// anything is made; what fits, or unknown availability, passes.
    #[test]
    fn a_vae_too_large_to_train_is_refused_up_front() {
        let mut c = VaeConfig::mlp_chapter();
        c.image_size = 1024;
        let need = c.num_params() * kiln_core::memory::TRAIN_BYTES_PER_PARAM;
        let e = check_training_memory(&c, Some(24 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_size"), "{e}");
        assert!(
            e.contains("training this VAE at 1024x1024 (3,224,515,904 parameters"),
            "{e}"
        );
        assert!(e.contains("and this machine has 24.0 GiB available"), "{e}");
        assert!(
            e.contains("use a smaller --image-size, or --preset conv"),
            "{e}"
        );
        assert!(e.ends_with(kiln_core::memory::SKIP_HINT), "{e}");
        assert!(need > 24 << 30);
        check_training_memory(&c, Some(need)).unwrap();
        check_training_memory(&c, Some(need - 1)).unwrap_err();
        check_training_memory(&c, None).unwrap();
        check_training_memory(&VaeConfig::mlp_chapter(), Some(1 << 30)).unwrap();
    }

    /// The chapter's MLP VAE holds about 240 KiB per image in a step (the
    /// counting allocator's test checks the figure): 65,536 images are
    /// refused on a 4 GiB machine with the batch size that fits.
    #[test]
    fn batches_too_large_for_memory_are_refused_with_one_that_fits() {
        let c = VaeConfig::mlp_chapter();
        let per = c.training_bytes_per_image();
        assert!((200 << 10..300 << 10).contains(&per), "{per}");
        let e = check_batch_memory(&c, 65536, Some(4 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "VAE config field `batch_size`: not enough memory for training this VAE at 32x32 \
                 on batches of 65536 images: it needs about 1"
            ),
            "{e}"
        );
        // The suggestion is the largest batch the check accepts.
        let fits = (1..65536)
            .rev()
            .find(|&b| check_batch_memory(&c, b, Some(4 << 30)).is_ok())
            .unwrap();
        assert!((12_000..17_000).contains(&fits), "{e}");
        assert!(
            e.contains(&format!("; --batch-size {fits} or less fits;")),
            "{e}"
        );
        assert!(e.ends_with(kiln_core::memory::SKIP_HINT), "{e}");
        check_batch_memory(&c, 65536, None).unwrap();
    }
}
