//! [`Session`]: the parts of a training loop every model crate needs — run
//! folder, checkpoints with resume, seeded RNG, observer, NaN guard and
//! Ctrl-C — so a model's `train` is only its own step.
//!
//! Resume is exact: a checkpoint stores the variables, the optimizer state,
//! the RNG state, the epoch and the number of batches already done in it. Data
//! order must be a function of `(seed, epoch)` (e.g. a shuffle from
//! `SeededRng::derive(seed, &[epoch])`), so a resumed loop skips the batches it
//! already did and continues bit-identically.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::checkpoint::{self, TrainState};
use crate::observer::{self, Observer, ObserverConfig};
use crate::optim::Optimizer;
use crate::rng::SeededRng;
use crate::run::{MetricsLog, RunDir};
use crate::vars::VarStore;

/// A training session over a run folder.
#[derive(Debug)]
pub struct Session {
    /// The run folder.
    pub run: RunDir,
    /// The model's variables.
    pub vars: VarStore,
    /// The optimizer.
    pub opt: Optimizer,
    /// The training RNG (noise, masks, augmentation); saved in checkpoints.
    pub rng: SeededRng,
    /// The observer (progress, metrics).
    pub observer: Observer,
    /// Steps taken.
    pub step: u64,
    /// Completed epochs.
    pub epoch: u64,
    /// Batches done in the current epoch (non-zero only after a mid-epoch resume
    /// until the loop catches up).
    pub batch_in_epoch: u64,
    seed: u64,
}

fn wrap<E: std::fmt::Display>(e: E) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Session {
    /// Starts a session. With `resume`, loads `checkpoints/last.safetensors`
    /// from the run folder (variables, optimizer, RNG, position) and drops
    /// metric lines logged after it.
    pub fn start(
        run: RunDir,
        vars: VarStore,
        opt: Optimizer,
        seed: u64,
        resume: bool,
        total_steps: u64,
        obs: ObserverConfig,
    ) -> Result<Self> {
        let mut opt = opt;
        let mut rng = SeededRng::new(seed ^ 0x5EED_0FC0_FFEE);
        let (mut step, mut epoch, mut batch_in_epoch) = (0, 0, 0);
        if resume {
            let path = run.last_checkpoint();
            let st = checkpoint::load(&path, &vars, Some(&mut opt)).map_err(wrap)?;
            rng = checkpoint::restore_rng(&st, seed);
            step = st.step;
            epoch = st.epoch;
            batch_in_epoch = st
                .extra
                .get("batch_in_epoch")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            MetricsLog::truncate_after(&run.join("metrics.jsonl"), step).map_err(wrap)?;
        }
        let metrics = run.metrics().map_err(wrap)?;
        let mut observer = Observer::new(
            run.path()
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default()
                .as_str(),
            total_steps,
            obs,
            Some(metrics),
        );
        observer.set_position(step);
        observer::install_ctrlc();
        Ok(Self {
            run,
            vars,
            opt,
            rng,
            observer,
            step,
            epoch,
            batch_in_epoch,
            seed,
        })
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether the loop should skip batch `i` of the current epoch because a
    /// resumed checkpoint already covered it.
    pub fn skip_batch(&self, i: u64) -> bool {
        i < self.batch_in_epoch
    }

    /// Backpropagates `loss`, checks it and `fields` are finite (before touching
    /// the parameters), steps the optimizer and records `fields` — plus the loss
    /// value as `loss` unless `fields` has its own `loss` (e.g. per example when
    /// the optimised loss is a batch sum). Returns the loss value.
    pub fn train_step(
        &mut self,
        loss: &Tensor,
        items: usize,
        fields: &[(&str, f64)],
    ) -> Result<f64> {
        let v = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let mut all = Vec::with_capacity(fields.len() + 1);
        if !fields.iter().any(|(k, _)| *k == "loss") {
            all.push(("loss", v));
        }
        all.extend_from_slice(fields);
        observer::check_finite(self.step + 1, self.epoch, &all).map_err(wrap)?;
        self.opt.backward_step(loss)?;
        self.step += 1;
        self.batch_in_epoch += 1;
        self.observer
            .step(self.step, self.epoch, items, &all)
            .map_err(wrap)?;
        Ok(v)
    }

    /// Records a non-train summary (e.g. validation) for the current epoch.
    pub fn record(&mut self, split: &str, fields: &[(&str, f64)]) -> Result<()> {
        self.observer
            .record(self.step, self.epoch, split, fields)
            .map_err(wrap)
    }

    /// Writes `checkpoints/last.safetensors` (atomically).
    pub fn checkpoint(&self) -> Result<()> {
        let mut extra = HashMap::new();
        extra.insert(
            "batch_in_epoch".to_string(),
            self.batch_in_epoch.to_string(),
        );
        let st = TrainState {
            step: self.step,
            epoch: self.epoch,
            rng: Some(self.rng.state()),
            model_rng: Some(self.vars.rng().lock().state()),
            extra,
        };
        checkpoint::save(
            &self.run.last_checkpoint(),
            &self.vars,
            Some(&self.opt),
            &st,
        )
        .map_err(wrap)
    }

    /// Ends an epoch: records `fields` under `train_epoch`, advances the epoch
    /// counter and writes a checkpoint.
    pub fn end_epoch(&mut self, fields: &[(&str, f64)]) -> Result<()> {
        self.observer
            .record(self.step, self.epoch, "train_epoch", fields)
            .map_err(wrap)?;
        self.epoch += 1;
        self.batch_in_epoch = 0;
        self.checkpoint()
    }

    /// True once Ctrl-C was pressed: the caller should call
    /// [`Session::interrupt`] and return.
    pub fn should_stop(&self) -> bool {
        observer::interrupted()
    }

    /// Writes a mid-epoch checkpoint and reports how to resume.
    pub fn interrupt(&self) -> Result<()> {
        self.checkpoint()?;
        self.observer.finish();
        eprintln!(
            "stopped at step {} (epoch {}); resume with --resume {}",
            self.step,
            self.epoch,
            self.run.path().display()
        );
        Ok(())
    }

    /// Finishes the observer and writes `summary.json`.
    pub fn finish(&self, metrics: serde_json::Value) -> Result<()> {
        self.observer.finish();
        self.run.write_summary(self.seed, metrics).map_err(wrap)
    }
}
