//! Training: the GAN's discriminator and generator steps on a kiln-core
//! [`Session`] with parts `g` and `d` (and `g_ema`), with checkpoints and
//! exact resume, fixed-noise sample grids each epoch, metrics, collapse
//! detection and figures in the run folder.
//!
//! One loader batch holds `batch_size * n_critic` real images: each of the
//! `n_critic` discriminator steps takes its own slice of them and fresh
//! noise, then one generator step reuses the last step's generated images
//! (as pytorch/examples' DCGAN does with `n_critic = 1`). Each step logs
//! both losses and D(x) / D(G(z)) before the discriminator's steps (from
//! the first step's forward) and after them (D(x) from one more forward of
//! the last real slice, D(G(z)) from the generator step's forward).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kiln_core::checkpoint::{load_part, read_tensors, save_parts, PartRef, TrainState};
use kiln_core::image::{plot_metrics, save_image_grid, GridOptions};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{read_metrics, MetricRecord, RunDir, RunOptions};
use kiln_core::session::{Record, Session, SessionError};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor, Var};
use kiln_data::{Batch, DataLoader, Dataset, LoaderConfig};
use rand::RngCore;
use serde::Serialize;

use crate::augment::diff_augment;
use crate::config::{
    LossKind, ModelConfig, PenaltyKind, RunConfig, TrainConfig, MAY_CHANGE_ON_RESUME,
};
use crate::ema::Ema;
use crate::error::{config_err, Failure, GanError, Result};
use crate::eval::generated_features;
use crate::fid_record::{check_or_record, ExtractorSource, FidRecord};
use crate::loss::{d_loss, g_loss, mean_prob};
use crate::metrics::{frechet_distance, FeatureExtractor, Features, GaussianStats};
use crate::model::{is_trainable, Discriminator, Generator};
use crate::monitor::{CollapseMonitor, Verdict};
use crate::penalty::gradient_penalty;

/// The model kind written to a run's `config.toml`.
pub const RUN_KIND: &str = "gan";

/// The checkpoint holding the generator (and its EMA) as of the last epoch
/// end that was not inside a collapse streak: the one to sample from when
/// training collapses or diverges.
pub const HEALTHY_CHECKPOINT: &str = "healthy.safetensors";

/// The checkpoint holding the generator (and its EMA) with the lowest FID
/// of `train --eval-every` so far (its FID in the metadata, `extra.fid`).
pub const BEST_FID_CHECKPOINT: &str = "best-fid.safetensors";

/// What training evaluates FID with every `train.eval_every` epochs.
pub struct FidEval<'a> {
    /// The feature extractor.
    pub extractor: &'a dyn FeatureExtractor,
    /// Features of the reference images.
    pub reference: &'a Features,
    /// Generated images per evaluation.
    pub n: usize,
    /// Images per extractor batch.
    pub batch: usize,
    /// Seed of the evaluation's latents (the same every time, so successive
    /// FIDs differ by the generator only).
    pub seed: u64,
    /// Training stops as collapsed when FID stays above `rise` times the
    /// best for `patience` evaluations in a row (0: never).
    pub patience: u32,
    /// See `patience`.
    pub rise: f64,
    /// Where the extractor came from (path and content fingerprint), kept
    /// in the run's [`FID_RECORD_FILE`](crate::fid_record::FID_RECORD_FILE)
    /// so that a resume can find and check it (`None`: only its name and
    /// hash are kept).
    pub source: Option<ExtractorSource>,
}

impl<'a> FidEval<'a> {
    /// `n` images in batches of 50, seed 0; stop after 3 evaluations in a
    /// row above twice the best FID; no source recorded.
    pub fn new(extractor: &'a dyn FeatureExtractor, reference: &'a Features, n: usize) -> Self {
        Self {
            extractor,
            reference,
            n,
            batch: 50,
            seed: 0,
            patience: 3,
            rise: 2.0,
            source: None,
        }
    }
}

/// Images in each fixed-noise grid.
pub const GRID_IMAGES: usize = 64;

/// The outcome of [`train`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Mean discriminator loss over the last epoch (without the penalty).
    pub d_loss: f64,
    /// Mean generator loss over the last epoch.
    pub g_loss: f64,
    /// Mean D(x) after the discriminator's step, last epoch.
    pub d_real: f64,
    /// Mean D(G(z)) after the discriminator's step, last epoch.
    pub d_fake: f64,
    /// Epochs completed.
    pub epochs: u64,
    /// Real images per second through the loop.
    pub images_per_s: f64,
    /// Whether training stopped early (Ctrl-C or `stop_at`; a checkpoint was written).
    pub interrupted: bool,
    /// The lowest FID of `train.eval_every`'s evaluations, if any ran.
    pub best_fid: Option<f64>,
}

/// The networks of a run: G, D and the optional EMA copy of G, each in its
/// own store.
#[derive(Debug)]
pub struct Gan {
    /// The generator.
    pub g: Generator,
    /// The generator's variables.
    pub g_vars: VarStore,
    /// The discriminator.
    pub d: Discriminator,
    /// The discriminator's variables.
    pub d_vars: VarStore,
    /// The EMA copy of G and its recurrence, if the run keeps one.
    pub ema: Option<(Generator, Ema)>,
}

impl Gan {
    /// Fresh networks for `rc`, seeded from `rc.train.seed`.
    pub fn new(rc: &RunConfig, device: &Device) -> Result<Self> {
        let mut seeds = SeededRng::derive(rc.train.seed, &[0x6A4E]);
        let g_vars = VarStore::new(seeds.next_u64());
        let d_vars = VarStore::new(seeds.next_u64());
        let g = Generator::new(&rc.model, g_vars.builder(DType::F32, device))?;
        let d = Discriminator::new(&rc.model, d_vars.builder(DType::F32, device))?;
        let ema = match &rc.train.ema {
            Some(e) => {
                let vs = VarStore::new(0);
                let model = Generator::new(&rc.model, vs.builder(DType::F32, device))?;
                Some((model, Ema::new(vs, &g_vars, e.decay, e.start)?))
            }
            None => None,
        };
        Ok(Self {
            g,
            g_vars,
            d,
            d_vars,
            ema,
        })
    }
}

/// Trains a GAN on `train_set` in the run folder `opts` names (a new run, or
/// with `opts.resume` the continuation of one: same kind and config but for
/// [`MAY_CHANGE_ON_RESUME`]). Writes `config.toml`, `metrics.jsonl`,
/// `checkpoints/{last,healthy}.safetensors`, `samples/epoch-NNN.png` (and
/// `-ema`) each epoch, and at the end `samples.png`, `interpolation.png`,
/// `loss.png`, `d_outputs.png` and `summary.json`.
///
/// Stops with [`GanError::Collapsed`] or [`GanError::Diverged`] (naming the
/// checkpoint to use) when training fails.
pub fn train(
    model: &ModelConfig,
    tc: &TrainConfig,
    train_set: Arc<dyn Dataset>,
    device: &Device,
    opts: &RunOptions,
) -> Result<TrainReport> {
    train_until(model, tc, train_set, device, opts, None)
}

/// [`train`], stopping as on Ctrl-C once `stop_at` batches are done in all
/// (a checkpoint is written; `--resume` continues exactly). For tests and
/// for training in slices.
pub fn train_until(
    model: &ModelConfig,
    tc: &TrainConfig,
    train_set: Arc<dyn Dataset>,
    device: &Device,
    opts: &RunOptions,
    stop_at: Option<u64>,
) -> Result<TrainReport> {
    train_with_eval(model, tc, train_set, device, opts, stop_at, None)
}

/// Refuses, before the run folder or a weight is made, networks whose
/// training state does not fit in the memory the machine has (`available`,
/// `None`: unknown, never refused): both networks with their gradients and
/// Adam's moments, and the EMA copy of the generator. Each optimizer alone
/// may fit where the two together do not.
fn check_training_memory(rc: &RunConfig, available: Option<u64>) -> Result<()> {
    let m = &rc.model;
    let (g, d) = (m.generator_params(), m.discriminator_params());
    let ema = if rc.train.ema.is_some() { g } else { 0 };
    let per = kiln_core::memory::TRAIN_BYTES_PER_PARAM;
    let needed = g
        .saturating_add(d)
        .saturating_mul(per)
        .saturating_add(ema.saturating_mul(4));
    let what = format!(
        "training this GAN at {0}x{0} (generator {1} and discriminator {2} parameters, {per} \
         bytes each with gradients and Adam's moments{3})",
        m.image_size,
        kiln_core::memory::format_count(g),
        kiln_core::memory::format_count(d),
        if ema > 0 { ", and the EMA copy" } else { "" }
    );
    let smaller = match m.image_size > 32 {
        true => " or smaller images (--preset dcgan32)",
        false => "",
    };
    kiln_core::memory::check_fits_in(&what, needed, available).map_err(|e| {
        config_err(
            "model",
            format!(
                "{e}; use narrower networks (--ngf, --ndf){smaller}; {}",
                kiln_core::memory::SKIP_HINT
            ),
        )
    })
}

/// Refuses, before the run folder is made, a batch whose activations do
/// not fit beside the training state (`available`, `None`: unknown, never
/// refused): `--batch-size` otherwise gets the process killed in its first
/// iteration.
fn check_batch_memory(rc: &RunConfig, available: Option<u64>) -> Result<()> {
    let (m, tc) = (&rc.model, &rc.train);
    let (g, d) = (m.generator_params(), m.discriminator_params());
    let ema = if tc.ema.is_some() { g } else { 0 };
    let fixed = g
        .saturating_add(d)
        .saturating_mul(kiln_core::memory::TRAIN_BYTES_PER_PARAM)
        .saturating_add(ema.saturating_mul(4));
    // The loader's batch holds n_critic slices of real images, as f32
    // twice over (read, then scaled to [-1, 1]).
    let images = (m.channels as u64)
        .saturating_mul((m.image_size as u64).pow(2))
        .saturating_mul(8 * tc.n_critic as u64);
    let per_image = m
        .training_bytes_per_image(tc.penalty != PenaltyKind::None)
        .saturating_add(images);
    let model = format!("this GAN at {0}x{0}", m.image_size);
    kiln_core::memory::check_batch_fits(
        &model,
        "image",
        fixed,
        per_image,
        tc.batch_size as u64,
        available,
    )
    .map_err(|e| {
        let advice = match e.largest_batch() {
            0 => "not even one image fits: use narrower networks (--ngf, --ndf)".to_string(),
            n => format!("--batch-size {n} or less fits"),
        };
        config_err(
            "train.batch_size",
            format!("{e}; {advice}; {}", kiln_core::memory::SKIP_HINT),
        )
    })
}

/// [`train_until`] evaluating FID every `tc.eval_every` epochs with `eval`
/// (on the EMA generator when the run keeps one): each FID is recorded in
/// `metrics.jsonl` (split `eval`), the best generator is kept in
/// `checkpoints/best-fid.safetensors` beside `last`, and a FID that stays far
/// above the best stops training as collapsed, naming that checkpoint.
///
/// The extractor and the evaluation's settings are recorded in the run's
/// [`FID_RECORD_FILE`](crate::fid_record::FID_RECORD_FILE); a resume whose
/// evaluation differs (another extractor, other image counts or seed) is
/// refused with [`GanError::Run`] before any training.
pub fn train_with_eval(
    model: &ModelConfig,
    tc: &TrainConfig,
    train_set: Arc<dyn Dataset>,
    device: &Device,
    opts: &RunOptions,
    stop_at: Option<u64>,
    eval: Option<&FidEval<'_>>,
) -> Result<TrainReport> {
    let rc = RunConfig {
        model: model.clone(),
        train: tc.clone(),
    };
    rc.validate()?;
    check_data(model, train_set.as_ref())?;
    let loader_cfg = LoaderConfig {
        batch_size: tc.batch_size * tc.n_critic,
        shuffle: true,
        drop_last: true,
        seed: tc.seed,
        ..Default::default()
    };
    let loader = DataLoader::new(train_set.clone(), loader_cfg, device)?;
    if loader.is_empty() {
        return Err(config_err(
            "train.batch_size",
            format!(
                "the training set's {} images do not fill one batch of batch_size * n_critic = {}",
                train_set.len(),
                tc.batch_size * tc.n_critic
            ),
        ));
    }
    // After the batch check: a batch larger than the data set is refused as
    // such, not with a memory figure for images it does not have.
    if device.is_cpu() {
        let available = kiln_core::memory::available();
        check_training_memory(&rc, available)?;
        check_batch_memory(&rc, available)?;
    }
    let run = opts.open("gan", RUN_KIND, &rc, MAY_CHANGE_ON_RESUME)?;
    // A resumed run must read the data it began on (the dataset's files,
    // fingerprinted in `inputs.json`); a refused resume leaves its config.
    if let Err(e) = run.check_inputs(&train_set.input_paths()) {
        run.restore_config()?;
        return Err(e.into());
    }
    // The FIDs of every evaluation are compared to pick the best-FID
    // checkpoint: a resume must evaluate as the run began to.
    if let Some(ev) = eval.filter(|_| tc.eval_every > 0) {
        if let Err(e) = check_or_record(run.path(), &FidRecord::of(ev), run.resumed()) {
            // A resume that trains nothing leaves the config as it was.
            run.restore_config()?;
            return Err(e);
        }
    }
    let dir = run.dir().clone();
    let gan = Gan::new(&rc, device)?;
    let adam = OptimKind::Adam {
        betas: (tc.beta1, tc.beta2),
        eps: 1e-8,
    };
    let og = Optimizer::single(adam, gan.g_vars.vars_where(is_trainable), tc.lr_g, 0.0)?;
    let d_train = gan.d_vars.vars_where(is_trainable);
    let od = Optimizer::single(adam, d_train.clone(), tc.lr_d, 0.0)?;
    let mut b = Session::builder(run, tc.seed)
        .part("g", &gan.g_vars, og)
        .part("d", &gan.d_vars, od);
    if let Some((_, e)) = &gan.ema {
        b = b.saved("g_ema", &e.vars);
    }
    if let Some(n) = stop_at {
        b = b.stop_at(n);
    }
    let mut s = b
        .epochs(tc.epochs, loader.len() as u64)
        .observer(opts.observer())
        .start()?;

    let window = if tc.loss.is_classifier() {
        tc.collapse_window
    } else {
        0
    };
    // A mutex, not a RefCell: the step closure runs on kiln's thread pool.
    let monitor = Mutex::new(CollapseMonitor::new(
        window,
        tc.collapse_real,
        tc.collapse_fake,
    ));
    let metrics = dir.join("metrics.jsonl");
    if s.resumed() && metrics.exists() {
        lock(&monitor).replay(&read_metrics(&metrics)?);
    }
    let fixed = FixedNoise::new(&gan.g, tc.seed, device)?;
    let ref_stats = match eval {
        Some(ev) if tc.eval_every > 0 => Some(GaussianStats::of(ev.reference)?),
        _ => None,
    };
    let best_path = dir.join("checkpoints").join(BEST_FID_CHECKPOINT);
    // The best FID and the streak above it survive a resume: both are
    // replayed from the `eval` lines of metrics.jsonl, which the session has
    // cut back to the checkpoint resumed from, so they are what they were
    // when it was written (an evaluation redone after a kill counts once).
    let mut stop = FidStop::default();
    if s.resumed() && metrics.exists() {
        if let Some(ev) = eval {
            stop.replay(&read_metrics(&metrics)?, ev.rise);
        }
        // A run folder from before the FIDs were replayed: the best from the
        // checkpoint's metadata.
        if stop.best.is_none() && best_path.is_file() {
            let (_, meta) = read_tensors(&best_path, &Device::Cpu)?;
            let num = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
            stop.best = num("extra.fid").zip(num("train.step").map(|v| v as u64));
        }
    }
    let step_ctx = StepCtx {
        tc,
        gan: &gan,
        d_train: &d_train,
        device,
        monitor: &monitor,
        dir: &dir,
    };
    let result = s.run_epochs(
        |epoch, start| {
            loader
                .epoch_from(epoch, start)
                .map(|b| b.map_err(GanError::from))
        },
        |s, batch| step_ctx.step(s, &batch),
        |s| {
            let e = s.epoch();
            fixed.save_grids(&gan, &dir, &format!("epoch-{e:03}"))?;
            if lock(&monitor).streak_start().is_none() {
                save_healthy(&gan, &dir, s.global_step(), e)?;
            }
            if let (Some(ev), Some(rs)) = (eval, &ref_stats) {
                if e % tc.eval_every == 0 {
                    let g = gan.ema.as_ref().map_or(&gan.g, |(g, _)| g);
                    let x = generated_features(
                        ev.extractor,
                        g,
                        model.num_classes,
                        ev.n,
                        ev.batch,
                        ev.seed,
                        device,
                    )?;
                    let fid = frechet_distance(rs, &GaussianStats::of(&x.features)?)?.value;
                    s.record("eval", &[("fid", fid)])?;
                    let step = s.global_step();
                    if stop.observe(fid, step, ev.rise) {
                        save_generator(&gan, &best_path, step, e, Some(fid))?;
                    } else if let Some((b, best_step)) = stop.best {
                        let above = stop.above;
                        if ev.patience > 0 && above >= ev.patience {
                            return Err(GanError::Collapsed(Box::new(Failure {
                                run: dir.path().to_path_buf(),
                                step,
                                reason: format!(
                                    "FID {fid:.3} stayed above {} x the best FID {b:.3} for \
                                     {above} evaluations in a row",
                                    ev.rise
                                ),
                                checkpoint: Some(best_path.clone()),
                                checkpoint_step: Some(best_step),
                            })));
                        }
                    }
                }
            }
            Ok(())
        },
    );
    let end = match result {
        Ok(end) => end,
        Err(e) => {
            s.observer.finish();
            return Err(match e {
                GanError::Session(SessionError::Train(t)) => GanError::Diverged(Box::new(failure(
                    &dir,
                    s.global_step() + 1,
                    t.to_string().trim_end_matches('.').to_string(),
                ))),
                other => other,
            });
        }
    };
    let interrupted = !end.completed();
    let report = TrainReport {
        d_loss: s.last_epoch("d_loss").unwrap_or(f64::NAN),
        g_loss: s.last_epoch("g_loss").unwrap_or(f64::NAN),
        d_real: s.last_epoch("d_real_after").unwrap_or(f64::NAN),
        d_fake: s.last_epoch("d_fake_after").unwrap_or(f64::NAN),
        epochs: s.epoch(),
        images_per_s: s.observer.throughput(),
        interrupted,
        best_fid: stop.best.map(|(b, _)| b),
    };
    if !interrupted {
        fixed.save_grids(&gan, &dir, "samples")?;
        fixed.save_interpolation(&gan, &dir)?;
        write_curves(&dir)?;
        let json = serde_json::to_value(&report).map_err(|e| GanError::Run {
            path: dir.path().to_path_buf(),
            msg: e.to_string(),
        })?;
        s.finish(json)?;
    }
    Ok(report)
}

/// The FID stop's state: the best FID with its step, and how many
/// evaluations in a row stayed above `rise` times it.
#[derive(Debug, Default, Clone, PartialEq)]
struct FidStop {
    best: Option<(f64, u64)>,
    above: u32,
}

impl FidStop {
    /// Counts one evaluation; true when it is a new best (to be saved).
    fn observe(&mut self, fid: f64, step: u64, rise: f64) -> bool {
        match self.best {
            Some((b, _)) if fid >= b => {
                self.above = if fid > rise * b { self.above + 1 } else { 0 };
                false
            }
            _ => {
                self.best = Some((fid, step));
                self.above = 0;
                true
            }
        }
    }

    /// Replays the `fid` values of the `eval` records, in order.
    fn replay(&mut self, records: &[MetricRecord], rise: f64) {
        for r in records.iter().filter(|r| r.split == "eval") {
            if let Some((_, fid)) = r.values.iter().find(|(k, _)| k == "fid") {
                self.observe(*fid, r.step, rise);
            }
        }
    }
}

/// Everything one batch's steps need.
/// The collapse monitor, also after a panic elsewhere (its state stays usable).
fn lock(m: &Mutex<CollapseMonitor>) -> MutexGuard<'_, CollapseMonitor> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct StepCtx<'a> {
    tc: &'a TrainConfig,
    gan: &'a Gan,
    d_train: &'a [(String, Var)],
    device: &'a Device,
    monitor: &'a Mutex<CollapseMonitor>,
    dir: &'a RunDir,
}

/// One discriminator step's inputs, kept for the generator step.
struct Slice {
    fake: Tensor,
    fake_labels: Option<Tensor>,
    real_in: Tensor,
    real_labels: Option<Tensor>,
}

impl StepCtx<'_> {
    fn augment(&self, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        Ok(diff_augment(x, &self.tc.augment, rng)?)
    }

    /// `n_critic` discriminator steps and one generator step.
    fn step(&self, s: &mut Session, batch: &Batch) -> Result<Record> {
        let (tc, g, d) = (self.tc, &self.gan.g, &self.gan.d);
        let step = s.global_step() + 1;
        let bsz = tc.batch_size;
        let nc = tc.n_critic as f64;
        let classes = g.config().num_classes;
        let real_all = batch.images.affine(2.0, -1.0)?;
        let mut rec = Record::new(batch.len());
        let (mut dl, mut pen, mut gnorm) = (0.0, 0.0, 0.0);
        let mut before = (0.0, 0.0);
        let mut last = None;
        for k in 0..tc.n_critic {
            let real = real_all.narrow(0, k * bsz, bsz)?;
            let real_labels = classes
                .map(|_| batch.labels.narrow(0, k * bsz, bsz))
                .transpose()?;
            let z = g.noise(bsz, &mut s.rng)?;
            let fake_labels = classes
                .map(|c| random_labels(bsz, c, &mut s.rng, self.device))
                .transpose()?;
            let fake = g.forward_t(&z, fake_labels.as_ref(), true)?;
            d.power_iteration()?;
            let real_in = self.augment(&real, &mut s.rng)?;
            let fake_in = self.augment(&fake.detach(), &mut s.rng)?;
            let lr = d.forward_t(&real_in, real_labels.as_ref(), true)?;
            let lf = d.forward_t(&fake_in, fake_labels.as_ref(), true)?;
            if k == 0 {
                before = (mean_prob(&lr)?, mean_prob(&lf)?);
            }
            let loss = d_loss(tc.loss, &lr, &lf)?;
            dl += s.backward("d", &loss)? / nc;
            if tc.penalty != PenaltyKind::None {
                let x = match tc.penalty {
                    PenaltyKind::WganGp => {
                        let a = s.rng.uniform(&[bsz, 1, 1, 1], 0.0, 1.0, self.device)?;
                        (real_in.broadcast_mul(&a)?
                            + fake_in.broadcast_mul(&a.affine(-1.0, 1.0)?)?)?
                    }
                    _ => real_in.clone(),
                };
                let labels = real_labels.clone();
                let critic = |x: &Tensor| -> kiln_core::Result<Tensor> {
                    let reps = x.dim(0)? / bsz;
                    let y = labels
                        .as_ref()
                        .map(|y| Tensor::cat(&vec![y; reps], 0))
                        .transpose()?;
                    d.forward_t(x, y.as_ref(), true)
                };
                let p = gradient_penalty(critic, &x, tc.penalty, tc.penalty_weight, tc.fd_step)?;
                s.backward("d", &p.surrogate)?;
                pen += p.value / nc;
                gnorm += p.grad_norm / nc;
            }
            s.step("d")?;
            if tc.loss == LossKind::Wasserstein && tc.clip > 0.0 {
                for (_, v) in self.d_train {
                    v.set(&v.as_tensor().clamp(-tc.clip, tc.clip)?)?;
                }
            }
            last = Some(Slice {
                fake,
                fake_labels,
                real_in,
                real_labels,
            });
        }
        let Some(sl) = last else {
            return Err(config_err("train.n_critic", "expected at least 1"));
        };
        let real_after = mean_prob(&d.forward_t(&sl.real_in, sl.real_labels.as_ref(), true)?)?;
        let fake_in = self.augment(&sl.fake, &mut s.rng)?;
        // The discriminator's weights are frozen for the generator step: its
        // loss needs gradients through D to G, not D's own (PyTorch's
        // `requires_grad_(False)`), which saves a weight-gradient pass per layer.
        let lf = kiln_core::nn::frozen(|| d.forward_t(&fake_in, sl.fake_labels.as_ref(), true))?;
        let fake_after = mean_prob(&lf)?;
        let gl = s.train_step("g", &g_loss(tc.loss, &lf)?)?;
        if let Some((_, ema)) = &self.gan.ema {
            ema.update(&self.gan.g_vars, step)?;
        }
        let verdict = lock(self.monitor).observe(step, real_after, fake_after);
        match verdict {
            Verdict::Healthy => {}
            Verdict::Collapsed { reason, .. } => {
                s.observer.finish();
                return Err(GanError::Collapsed(Box::new(failure(
                    self.dir, step, reason,
                ))));
            }
            Verdict::Diverged { reason } => {
                s.observer.finish();
                return Err(GanError::Diverged(Box::new(failure(
                    self.dir, step, reason,
                ))));
            }
        }
        rec.push("d_loss", dl);
        rec.push("g_loss", gl);
        rec.push("d_real_before", before.0);
        rec.push("d_fake_before", before.1);
        rec.push("d_real_after", real_after);
        rec.push("d_fake_after", fake_after);
        if tc.penalty != PenaltyKind::None {
            rec.push("penalty", pen);
            rec.push("grad_norm", gnorm);
        }
        Ok(rec)
    }
}

/// `n` labels uniform in `0..classes`.
fn random_labels(
    n: usize,
    classes: usize,
    rng: &mut SeededRng,
    dev: &Device,
) -> kiln_core::Result<Tensor> {
    let v: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
    Tensor::new(v, dev)
}

/// A failure record naming the healthy checkpoint, when there is one.
fn failure(dir: &RunDir, step: u64, reason: String) -> Failure {
    let path = dir.join("checkpoints").join(HEALTHY_CHECKPOINT);
    let at = read_tensors(&path, &Device::Cpu)
        .ok()
        .and_then(|(_, meta)| meta.get("train.step").and_then(|s| s.parse().ok()));
    Failure {
        run: dir.path().to_path_buf(),
        step,
        reason,
        checkpoint: at.map(|_| path),
        checkpoint_step: at,
    }
}

/// Writes the generator (and its EMA) to `checkpoints/healthy.safetensors`.
fn save_healthy(gan: &Gan, dir: &RunDir, step: u64, epoch: u64) -> Result<()> {
    save_generator(
        gan,
        &dir.join("checkpoints").join(HEALTHY_CHECKPOINT),
        step,
        epoch,
        None,
    )
}

/// Writes the generator (and its EMA) to `path`, with its FID if given.
fn save_generator(gan: &Gan, path: &Path, step: u64, epoch: u64, fid: Option<f64>) -> Result<()> {
    let mut parts = vec![PartRef {
        name: "g",
        vars: &gan.g_vars,
        opt: None,
    }];
    if let Some((_, e)) = &gan.ema {
        parts.push(PartRef {
            name: "g_ema",
            vars: &e.vars,
            opt: None,
        });
    }
    let st = TrainState {
        step,
        epoch,
        rng: None,
        model_rng: None,
        extra: fid
            .map(|f| HashMap::from([("fid".to_string(), format!("{f:?}"))]))
            .unwrap_or_default(),
    };
    save_parts(path, &parts, &st)?;
    Ok(())
}

fn check_data(cfg: &ModelConfig, ds: &dyn Dataset) -> Result<()> {
    if ds.is_empty() {
        return Err(config_err("dataset", "the training set is empty"));
    }
    let shape = ds.get(0)?.image.shape();
    let want = [cfg.channels, cfg.image_size, cfg.image_size];
    if shape != want {
        return Err(config_err(
            "model.channels/image_size",
            format!("the model makes images {want:?}, the dataset gives {shape:?}"),
        ));
    }
    if let Some(k) = cfg.num_classes {
        if ds.num_classes() != k {
            return Err(config_err(
                "model.num_classes",
                format!(
                    "the model has {k} classes, the dataset {}",
                    ds.num_classes()
                ),
            ));
        }
    }
    Ok(())
}

/// The fixed latents (and labels) of the sample grids, drawn from the run's
/// seed alone, so every epoch's grid shows the same points.
struct FixedNoise {
    z: Tensor,
    labels: Option<Tensor>,
    interp: Tensor,
    interp_labels: Option<Tensor>,
}

/// Grid images per row, interpolation pairs and steps.
const INTERP_ROWS: usize = 8;
const INTERP_STEPS: usize = 10;

impl FixedNoise {
    fn new(g: &Generator, seed: u64, dev: &Device) -> Result<Self> {
        let mut rng = SeededRng::derive(seed, &[0xF1_7ED]);
        let z = g.noise(GRID_IMAGES, &mut rng)?;
        let classes = g.config().num_classes;
        let cycle = |n: usize, per: usize, k: usize| -> kiln_core::Result<Tensor> {
            Tensor::new(
                (0..n).map(|i| ((i / per) % k) as u32).collect::<Vec<_>>(),
                dev,
            )
        };
        // Each grid row of 8 shows one class.
        let labels = classes.map(|k| cycle(GRID_IMAGES, 8, k)).transpose()?;
        let ends = g
            .noise(2 * INTERP_ROWS, &mut rng)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut path = Vec::with_capacity(INTERP_ROWS * INTERP_STEPS);
        for r in 0..INTERP_ROWS {
            for t in 0..INTERP_STEPS {
                let t = t as f32 / (INTERP_STEPS - 1) as f32;
                path.push(slerp(&ends[2 * r], &ends[2 * r + 1], t));
            }
        }
        let nz = g.config().nz;
        let interp = Tensor::from_vec(path.concat(), (INTERP_ROWS * INTERP_STEPS, nz), dev)?;
        let interp_labels = classes
            .map(|k| cycle(INTERP_ROWS * INTERP_STEPS, INTERP_STEPS, k))
            .transpose()?;
        Ok(Self {
            z,
            labels,
            interp,
            interp_labels,
        })
    }

    /// `samples/<stem>.png` from G, `samples/<stem>-ema.png` from the EMA
    /// copy; the final grids (`stem = "samples"`) go to the run folder.
    fn save_grids(&self, gan: &Gan, dir: &RunDir, stem: &str) -> Result<()> {
        let folder = if stem == "samples" {
            dir.path().to_path_buf()
        } else {
            dir.join("samples")
        };
        std::fs::create_dir_all(&folder).map_err(|e| GanError::Run {
            path: folder.clone(),
            msg: e.to_string(),
        })?;
        let opts = grid_options(8);
        let x = gan.g.forward_t(&self.z, self.labels.as_ref(), false)?;
        save_image_grid(&x, &folder.join(format!("{stem}.png")), &opts)?;
        if let Some((g, _)) = &gan.ema {
            let x = g.forward_t(&self.z, self.labels.as_ref(), false)?;
            save_image_grid(&x, &folder.join(format!("{stem}-ema.png")), &opts)?;
        }
        Ok(())
    }

    /// `interpolation.png`: 8 rows of 10 images along great circles between
    /// pairs of latents (from the EMA copy when there is one).
    fn save_interpolation(&self, gan: &Gan, dir: &RunDir) -> Result<()> {
        let g = gan.ema.as_ref().map_or(&gan.g, |(g, _)| g);
        let x = g.forward_t(&self.interp, self.interp_labels.as_ref(), false)?;
        save_image_grid(
            &x,
            &dir.join("interpolation.png"),
            &grid_options(INTERP_STEPS),
        )?;
        Ok(())
    }
}

/// Grid layout for `[-1, 1]` images.
pub fn grid_options(ncols: usize) -> GridOptions {
    GridOptions {
        ncols,
        range: (-1.0, 1.0),
        scale: 2,
        ..Default::default()
    }
}

/// Spherical interpolation between `a` and `b` at `t` (linear when they are
/// nearly parallel): the path stays at the typical norm of Gaussian latents.
pub fn slerp(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = (dot / (na * nb).max(1e-12)).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let t = t as f64;
    let (wa, wb) = if omega.sin().abs() < 1e-6 {
        (1.0 - t, t)
    } else {
        (
            ((1.0 - t) * omega).sin() / omega.sin(),
            (t * omega).sin() / omega.sin(),
        )
    };
    a.iter()
        .zip(b)
        .map(|(x, y)| (wa * *x as f64 + wb * *y as f64) as f32)
        .collect()
}

/// `loss.png` (both losses) and `d_outputs.png` (D(x), D(G(z)) before and
/// after the discriminator's steps), per epoch.
fn write_curves(dir: &RunDir) -> Result<()> {
    let metrics = dir.join("metrics.jsonl");
    if !metrics.exists() {
        return Ok(());
    }
    plot_metrics(
        &metrics,
        &dir.join("loss.png"),
        "GAN: discriminator and generator losses",
        &["d_loss", "g_loss"],
    )?;
    plot_metrics(
        &metrics,
        &dir.join("d_outputs.png"),
        "GAN: D(x) and D(G(z)) before / after the D step",
        &[
            "d_real_before",
            "d_fake_before",
            "d_real_after",
            "d_fake_after",
        ],
    )?;
    Ok(())
}

/// Which generator to load from a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Which {
    /// The trained generator (part `g`).
    #[default]
    Generator,
    /// The EMA copy (part `g_ema`).
    Ema,
}

/// Loads a run's generator (or its EMA copy) from `checkpoint` (default
/// `checkpoints/last.safetensors`; `healthy` names
/// `checkpoints/healthy.safetensors`, any other value a file), with the
/// run's config.
pub fn load_generator(
    run: &Path,
    which: Which,
    checkpoint: Option<&str>,
    device: &Device,
) -> Result<(Generator, RunConfig)> {
    let dir = RunDir::open(run)?;
    let rc: RunConfig = dir.read_config_of(RUN_KIND)?;
    let part = match which {
        Which::Generator => "g",
        Which::Ema if rc.train.ema.is_some() => "g_ema",
        Which::Ema => {
            return Err(GanError::Run {
                path: run.to_path_buf(),
                msg: "this run keeps no EMA copy of the generator (it was trained without \
                      --ema-decay); sample without --ema"
                    .into(),
            })
        }
    };
    let path: PathBuf = match checkpoint {
        None | Some("last") => dir.last_checkpoint(),
        Some("healthy") => dir.join("checkpoints").join(HEALTHY_CHECKPOINT),
        Some(p) if Path::new(p).is_file() => PathBuf::from(p),
        Some(name) => {
            let named = dir.join("checkpoints").join(format!("{name}.safetensors"));
            if !named.is_file() {
                // Say what was looked for: a path the user typed, or a name
                // among the run's checkpoints (listed).
                let msg =
                    if name.contains(std::path::MAIN_SEPARATOR)
                        || name.contains('/')
                        || name.ends_with(".safetensors")
                    {
                        format!("checkpoint {name}: no such file")
                    } else {
                        let mut have: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
                            .map(|d| {
                                d.filter_map(|e| e.ok())
                                    .filter_map(|e| {
                                        let n = e.file_name().to_string_lossy().to_string();
                                        n.strip_suffix(".safetensors").map(str::to_string)
                                    })
                                    .filter(|n| !n.starts_with('.'))
                                    .collect()
                            })
                            .unwrap_or_default();
                        have.sort();
                        format!(
                        "checkpoint {name:?}: no checkpoints/{name}.safetensors in the run (it \
                         has: {}), and no file of that name",
                        if have.is_empty() { "none".into() } else { have.join(", ") }
                    )
                    };
                return Err(GanError::Run {
                    path: run.to_path_buf(),
                    msg,
                });
            }
            named
        }
    };
    let vs = VarStore::new(0);
    let g = Generator::new(&rc.model, vs.builder(DType::F32, device))?;
    load_part(&path, part, &vs)?;
    Ok((g, rc))
}

#[cfg(test)]
mod memory_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::EmaConfig;

    /// Both networks' training state and the EMA copy are counted together
    /// (each optimizer alone could fit where the two do not), and a GAN that
    /// does not fit is refused with its figures and the flags to change.
    #[test]
    fn a_gan_too_large_to_train_is_refused_up_front() {
        let mut rc = RunConfig {
            model: ModelConfig {
                image_size: 128,
                ngf: 512,
                ndf: 512,
                ..ModelConfig::dcgan32()
            },
            train: TrainConfig::default(),
        };
        rc.train.ema = None;
        let (g, d) = (rc.model.generator_params(), rc.model.discriminator_params());
        let need = (g + d) * kiln_core::memory::TRAIN_BYTES_PER_PARAM;
        check_training_memory(&rc, Some(need)).unwrap();
        let e = check_training_memory(&rc, Some(need - 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training this GAN at 128x128 (generator "),
            "{e}"
        );
        assert!(e.contains("use narrower networks (--ngf, --ndf)"), "{e}");
        assert!(e.ends_with(kiln_core::memory::SKIP_HINT), "{e}");
        // The EMA copy adds the generator's weights once more.
        rc.train.ema = Some(EmaConfig::default());
        check_training_memory(&rc, Some(need + 4 * g - 1)).unwrap_err();
        check_training_memory(&rc, Some(need + 4 * g)).unwrap();
        check_training_memory(&rc, None).unwrap();
        // The reference DCGAN fits in 1 GiB.
        let small = RunConfig {
            model: ModelConfig::dcgan32(),
            train: TrainConfig::default(),
        };
        check_training_memory(&small, Some(1 << 30)).unwrap();
    }

    /// dcgan64 holds about 6 MiB per image in an iteration (the counting
    /// allocator's test checks the figure): 4096 images are refused on a
    /// 16 GiB machine with the batch size that fits; a penalty costs more
    /// per image.
    #[test]
    fn batches_too_large_for_memory_are_refused_with_one_that_fits() {
        let rc = RunConfig {
            model: ModelConfig::dcgan64(),
            train: TrainConfig {
                batch_size: 4096,
                ..TrainConfig::default()
            },
        };
        let per = rc.model.training_bytes_per_image(false);
        assert!((5 << 20..7 << 20).contains(&per), "{per}");
        let e = check_batch_memory(&rc, Some(16 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "GAN config field `train.batch_size`: not enough memory for training this GAN \
                 at 64x64 on batches of 4096 images: it needs about 2"
            ),
            "{e}"
        );
        // The suggestion is the largest batch the check accepts.
        let accepts = |b: usize| {
            let mut rc = rc.clone();
            rc.train.batch_size = b;
            check_batch_memory(&rc, Some(16 << 30)).is_ok()
        };
        let fits = (1..4096).rev().find(|&b| accepts(b)).unwrap();
        assert!((2000..2900).contains(&fits), "{e}");
        assert!(
            e.contains(&format!("; --batch-size {fits} or less fits;")),
            "{e}"
        );
        assert!(e.ends_with(kiln_core::memory::SKIP_HINT), "{e}");
        check_batch_memory(&rc, None).unwrap();
        assert!(rc.model.training_bytes_per_image(true) > per * 3 / 2);
    }
}
