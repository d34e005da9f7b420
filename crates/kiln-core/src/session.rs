//! [`Session`]: what every training loop needs besides its own step: named
//! parts (each with its variables and, when trained, its optimizer), a run
//! folder held by one process, checkpoints with exact resume, the seeded
//! training RNG, the observer (progress, metrics), the NaN guard and Ctrl-C;
//! and the one loop kiln's trainers share, over epochs of a loader or over
//! iterations of rollouts.
//!
//! ```
//! use kiln_core::nn::Linear;
//! use kiln_core::optim::{OptimKind, Optimizer};
//! use kiln_core::run::RunOptions;
//! use kiln_core::session::{Record, Session};
//! use kiln_core::vars::VarStore;
//! use kiln_core::{loss, DType, Device, Module, Tensor};
//!
//! let tmp = tempfile::tempdir()?;
//! let opts = RunOptions::new_run(Some(&tmp.path().join("run"))).quiet(true);
//! let run = opts.open("demo", "demo-net", &serde_json::json!({"lr": 0.1}), &[])?;
//! let vs = VarStore::new(0);
//! let fc = Linear::new(2, 1, vs.builder(DType::F32, &Device::Cpu).pp("fc"))?;
//! let opt = Optimizer::single(OptimKind::sgd(0.0, false), vs.vars(), 0.1, 0.0)?;
//! let mut s = Session::builder(run, 0)
//!     .part("model", &vs, opt)
//!     .epochs(3, 4)
//!     .observer(opts.observer())
//!     .start()?;
//! let x = Tensor::new(&[[1f32, 2.0], [3.0, -1.0]], &Device::Cpu)?;
//! let y = Tensor::new(&[[1f32], [0.5]], &Device::Cpu)?;
//! let end = s.run_epochs(
//!     |_epoch, start| (start..4).map(|_| Ok::<_, kiln_core::session::SessionError>(())),
//!     |s, ()| {
//!         let l = loss::mse(&fc.forward(&x)?, &y, loss::Reduction::Mean)?;
//!         let v = s.train_step("model", &l)?;
//!         Ok(Record::new(2).with("loss", v))
//!     },
//!     |_| Ok(()),
//! )?;
//! assert!(end.completed());
//! assert!(s.last_epoch("loss").unwrap() < 1.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Steps and batches.** A batch may hold several optimizer steps (a GAN's
//! discriminator and generator steps) or one step may span several
//! micro-batches ([`Session::backward`] accumulates, [`Session::step`]
//! applies, with optional gradient clipping per part). The loop counts
//! batches: `step` in `metrics.jsonl` and the checkpoint is the number of
//! batches done; each optimizer keeps its own step count in its state.
//!
//! **Exact resume.** A checkpoint stores every part's variables, optimizer
//! state and RNG, the training RNG, the loop position (epoch and batch in it,
//! or iteration and cursor), the running sums of the epoch's metrics and the
//! length of `metrics.jsonl`. Data order must be a function of
//! `(seed, epoch)`; the loop asks the data source for the batches from the
//! resume point on, so skipped batches are never decoded. Interrupts are
//! honoured at batch boundaries, after all of a batch's steps.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use crate::checkpoint::{self, CheckpointError, PartMut, PartRef, TrainState};
use crate::observer::{self, Observer, ObserverConfig, TrainError};
use crate::optim::{clip_grad_norm, GradAccumulator, Optimizer};
use crate::rng::SeededRng;
use crate::run::{MetricsLog, Run, RunDir, RunError};
use crate::vars::VarStore;

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The run folder.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A loss or metric became NaN or infinite (the parameters are untouched).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The session was built wrongly (a programming error of the caller).
    #[error("session: {0}")]
    Setup(String),
    /// A step named a part the session does not have, or a frozen one.
    #[error("session has no trained part {name:?} (trained parts: {known})")]
    UnknownPart {
        /// The name asked for.
        name: String,
        /// The trained parts.
        known: String,
    },
    /// The resumed run had already finished: nothing was changed.
    #[error(
        "{path} already finished ({done}); nothing was changed. To train further, resume it \
         with a larger --{}",
        .done.rsplit(' ').next().filter(|u| *u == "iterations").unwrap_or("epochs")
    )]
    Finished {
        /// The run folder.
        path: PathBuf,
        /// What was done, e.g. "3 of 3 epochs" or "40 of 40 iterations" (its
        /// last word names the flag to raise).
        done: String,
    },
}

type SResult<T> = std::result::Result<T, SessionError>;

/// What a part takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    /// Optimized and saved.
    Trained,
    /// Saved but not optimized by the session (an EMA copy).
    Saved,
    /// Neither (a frozen reference or reward model, loaded from elsewhere).
    Frozen,
}

#[derive(Debug)]
struct Part {
    name: String,
    vars: VarStore,
    opt: Option<Optimizer>,
    kind: PartKind,
    clip: Option<f64>,
    grads: GradAccumulator,
}

/// How long the session trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Epochs { epochs: u64, batches: u64 },
    Iterations { total: u64 },
}

/// Builds a [`Session`]: its parts, its length and its observer.
#[derive(Debug)]
pub struct SessionBuilder {
    run: Run,
    seed: u64,
    parts: Vec<Part>,
    plan: Option<Plan>,
    observer: ObserverConfig,
    checkpoint_every: u64,
    stop_at: Option<u64>,
    errors: Vec<String>,
}

impl SessionBuilder {
    fn add(mut self, name: &str, vars: &VarStore, opt: Option<Optimizer>, kind: PartKind) -> Self {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            self.errors.push(format!(
                "part name {name:?}: use letters, digits, '_' and '-'"
            ));
        }
        if self.parts.iter().any(|p| p.name == name) {
            self.errors.push(format!("part {name:?} is given twice"));
        }
        self.parts.push(Part {
            name: name.into(),
            vars: vars.clone(),
            opt,
            kind,
            clip: None,
            grads: GradAccumulator::new(),
        });
        self
    }

    /// A trained part: `opt` steps over (some of) `vars`; both are saved.
    pub fn part(self, name: &str, vars: &VarStore, opt: Optimizer) -> Self {
        self.add(name, vars, Some(opt), PartKind::Trained)
    }

    /// A part saved in checkpoints but not optimized by the session (e.g. an
    /// EMA copy that the trainer updates itself).
    pub fn saved(self, name: &str, vars: &VarStore) -> Self {
        self.add(name, vars, None, PartKind::Saved)
    }

    /// A frozen part (a reference or reward model): neither optimized nor
    /// saved, since it is loaded from its own source.
    pub fn frozen(self, name: &str, vars: &VarStore) -> Self {
        self.add(name, vars, None, PartKind::Frozen)
    }

    /// Clips the gradient norm of the last added part to `max_norm` at each
    /// of its steps (PyTorch's `clip_grad_norm_`).
    pub fn clip_grad_norm(mut self, max_norm: f64) -> Self {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            self.errors.push(format!(
                "clip_grad_norm: expected a positive norm, found {max_norm}"
            ));
        }
        match self.parts.last_mut() {
            Some(p) if p.kind == PartKind::Trained => p.clip = Some(max_norm),
            _ => self
                .errors
                .push("clip_grad_norm must follow a trained part".into()),
        }
        self
    }

    /// Trains `epochs` passes of `batches_per_epoch` batches
    /// ([`Session::run_epochs`]).
    pub fn epochs(mut self, epochs: u64, batches_per_epoch: u64) -> Self {
        self.plan = Some(Plan::Epochs {
            epochs,
            batches: batches_per_epoch,
        });
        self
    }

    /// Trains `total` iterations (e.g. rollout-then-update rounds,
    /// [`Session::run_iterations`]).
    pub fn iterations(mut self, total: u64) -> Self {
        self.plan = Some(Plan::Iterations { total });
        self
    }

    /// Progress display.
    pub fn observer(mut self, cfg: ObserverConfig) -> Self {
        self.observer = cfg;
        self
    }

    /// Also writes a checkpoint every `n` batches (0: only at epoch ends, on
    /// Ctrl-C and at the end).
    pub fn checkpoint_every(mut self, n: u64) -> Self {
        self.checkpoint_every = n;
        self
    }

    /// Stops as on Ctrl-C once `step` batches are done in all (tests, and
    /// programs that train in slices).
    pub fn stop_at(mut self, step: u64) -> Self {
        self.stop_at = Some(step);
        self
    }

    /// Starts the session. On a resumed run, loads the last checkpoint into
    /// every saved part and cuts `metrics.jsonl` back to what it held then.
    /// A resumed run that had already finished is refused
    /// ([`SessionError::Finished`]) before anything is written.
    pub fn start(self) -> SResult<Session> {
        // A resume that fails here trains nothing, so the config.toml it
        // rewrote (a larger --epochs, say) goes back to what the run holds.
        let restore = ConfigGuard::of(&self.run);
        if !self.errors.is_empty() {
            return Err(SessionError::Setup(self.errors.join("; ")));
        }
        let plan = self.plan.ok_or_else(|| {
            SessionError::Setup("say how long to train: .epochs(..) or .iterations(..)".into())
        })?;
        if self.parts.is_empty() {
            return Err(SessionError::Setup(
                "a session needs at least one part".into(),
            ));
        }
        let mut s = Session {
            run: self.run,
            parts: self.parts,
            rng: SeededRng::new(self.seed ^ 0x5EED_0FC0_FFEE),
            observer: Observer::new(
                "",
                0,
                ObserverConfig {
                    quiet: true,
                    silent: false,
                    log_every: 0,
                },
                None,
            ),
            seed: self.seed,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            iteration: 0,
            cursor: 0,
            sums: BTreeMap::new(),
            last_epoch: Vec::new(),
            plan,
            checkpoint_every: self.checkpoint_every,
            stop_at: self.stop_at,
        };
        let metrics_path = s.run.dir().join("metrics.jsonl");
        if s.run.resumed() && !s.run.dir().last_checkpoint().exists() {
            // The run stopped before its first checkpoint (a NaN at the
            // first steps, a crash): nothing was kept to continue from, so it
            // starts again, in its folder, from step 0.
            MetricsLog::truncate_to(&metrics_path, 0)?;
            eprintln!(
                "note: {} has no checkpoint yet (it stopped before its first one): \
                 starting it from the beginning",
                s.run.path().display()
            );
        } else if s.run.resumed() {
            let path = s.run.dir().last_checkpoint();
            let st = {
                let mut parts: Vec<PartMut<'_>> = s
                    .parts
                    .iter_mut()
                    .filter(|p| p.kind != PartKind::Frozen)
                    .map(|p| PartMut {
                        name: &p.name,
                        vars: &p.vars,
                        opt: p.opt.as_mut(),
                    })
                    .collect();
                checkpoint::load_parts(&path, &mut parts)?
            };
            s.restore(&st, &path)?;
            if s.is_finished() && s.run.dir().join("summary.json").exists() {
                return Err(SessionError::Finished {
                    path: s.run.path().to_path_buf(),
                    done: s.describe_position(),
                });
            }
            match st.extra.get("metrics_len").and_then(|v| v.parse().ok()) {
                Some(len) => {
                    if !MetricsLog::truncate_to(&metrics_path, len)? {
                        eprintln!(
                            "warning: {} is shorter than when the checkpoint was written; \
                             lines are missing from it",
                            metrics_path.display()
                        );
                    }
                }
                // First-format checkpoints did not record the length.
                None => MetricsLog::truncate_after(&metrics_path, s.step)?,
            }
            // A damaged line would fail the run's figures and summary only
            // at the end, after the whole resumed training: check it now.
            if metrics_path.exists() {
                match crate::run::read_metrics(&metrics_path) {
                    Ok(_) => {}
                    Err(RunError::Invalid { path, reason }) => {
                        return Err(RunError::Invalid {
                            path,
                            reason: format!(
                                "{reason}; the checkpoint is intact: mend or delete that line \
                                 (the file is only the run's log), then resume"
                            ),
                        }
                        .into())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let total = match plan {
            Plan::Epochs { epochs, batches } => epochs.saturating_mul(batches),
            Plan::Iterations { total } => total,
        };
        let task = s
            .run
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        s.observer = Observer::new(&task, total, self.observer, Some(s.run.dir().metrics()?));
        s.observer.set_position(s.step);
        observer::install_ctrlc();
        restore.disarm();
        Ok(s)
    }
}

/// A resumed run's previous `config.toml` and its path, written back on
/// drop unless disarmed (a copy, so the session can take the run).
struct ConfigGuard(Option<(std::path::PathBuf, Vec<u8>)>);

impl ConfigGuard {
    fn of(run: &Run) -> Self {
        Self(
            run.previous_config()
                .map(|b| (run.dir().join("config.toml"), b.to_vec())),
        )
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        if let Some((path, bytes)) = self.0.take() {
            if let Err(e) = crate::files::write_atomic(&path, &bytes) {
                eprintln!("warning: could not put back {}: {e}", path.display());
            }
        }
    }
}

/// One batch's (or iteration's) outcome, returned by the loop's body: the
/// number of items in it (for throughput and for weighting the epoch's
/// means) and the metrics to log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    items: usize,
    fields: Vec<(String, f64)>,
}

impl Record {
    /// A record of `items` examples (images, sequences, tokens).
    pub fn new(items: usize) -> Self {
        Self {
            items,
            fields: Vec::new(),
        }
    }

    /// Adds a metric.
    pub fn with(mut self, name: impl Into<String>, value: f64) -> Self {
        self.fields.push((name.into(), value));
        self
    }

    /// Adds a metric in place.
    pub fn push(&mut self, name: impl Into<String>, value: f64) {
        self.fields.push((name.into(), value));
    }

    /// The metrics.
    pub fn fields(&self) -> &[(String, f64)] {
        &self.fields
    }
}

/// How a loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// Every epoch or iteration was done.
    Completed,
    /// Stopped early (Ctrl-C or [`SessionBuilder::stop_at`]); a checkpoint
    /// was written and `--resume` continues exactly.
    Interrupted,
}

impl LoopEnd {
    /// Whether the loop ran to its end.
    pub fn completed(self) -> bool {
        self == LoopEnd::Completed
    }
}

/// A training session over a held run folder.
#[derive(Debug)]
pub struct Session {
    run: Run,
    parts: Vec<Part>,
    /// The training RNG (noise, masks); saved in checkpoints.
    pub rng: SeededRng,
    /// The observer (progress, metrics).
    pub observer: Observer,
    seed: u64,
    step: u64,
    epoch: u64,
    batch_in_epoch: u64,
    iteration: u64,
    /// A position in the data that the trainer advances and the checkpoint
    /// keeps (e.g. the next prompt of an RLHF run).
    pub cursor: u64,
    /// Running item-weighted sums of the current epoch's metrics.
    sums: BTreeMap<String, (f64, f64)>,
    /// The means of the last finished epoch.
    last_epoch: Vec<(String, f64)>,
    plan: Plan,
    checkpoint_every: u64,
    stop_at: Option<u64>,
}

impl Session {
    /// Starts building a session over `run` (from
    /// [`RunOptions::open`](crate::run::RunOptions::open)); `seed` seeds the
    /// training RNG of a new run.
    pub fn builder(run: Run, seed: u64) -> SessionBuilder {
        SessionBuilder {
            run,
            seed,
            parts: Vec::new(),
            plan: None,
            observer: ObserverConfig::default(),
            checkpoint_every: 0,
            stop_at: None,
            errors: Vec::new(),
        }
    }

    /// The run folder.
    pub fn run(&self) -> &RunDir {
        self.run.dir()
    }

    /// Whether this session continues an earlier one.
    pub fn resumed(&self) -> bool {
        self.run.resumed()
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Batches (or iterations) done in all: the `step` of `metrics.jsonl`.
    pub fn global_step(&self) -> u64 {
        self.step
    }

    /// Completed epochs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches done in the current epoch.
    pub fn batch_in_epoch(&self) -> u64 {
        self.batch_in_epoch
    }

    /// Completed iterations.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The variables of a part.
    pub fn vars(&self, part: &str) -> SResult<&VarStore> {
        self.parts
            .iter()
            .find(|p| p.name == part)
            .map(|p| &p.vars)
            .ok_or_else(|| self.unknown(part))
    }

    /// The optimizer of a trained part (e.g. to apply a learning-rate schedule).
    pub fn opt_mut(&mut self, part: &str) -> SResult<&mut Optimizer> {
        let i = self.trained(part)?;
        self.parts[i]
            .opt
            .as_mut()
            .ok_or_else(|| SessionError::Setup(format!("part {part} has no optimizer")))
    }

    /// The optimizer of a trained part.
    pub fn opt(&self, part: &str) -> SResult<&Optimizer> {
        let i = self.trained(part)?;
        self.parts[i]
            .opt
            .as_ref()
            .ok_or_else(|| SessionError::Setup(format!("part {part} has no optimizer")))
    }

    fn unknown(&self, part: &str) -> SessionError {
        SessionError::UnknownPart {
            name: part.into(),
            known: self
                .parts
                .iter()
                .filter(|p| p.kind == PartKind::Trained)
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn trained(&self, part: &str) -> SResult<usize> {
        self.parts
            .iter()
            .position(|p| p.name == part && p.kind == PartKind::Trained)
            .ok_or_else(|| self.unknown(part))
    }

    /// Backpropagates `loss` and adds its gradients to `part`'s accumulated
    /// ones (one micro-batch); returns the loss value. A non-finite loss is
    /// refused before anything is touched. With `k` micro-batches per step,
    /// normalise each loss by the global item (or token) count, so that the
    /// step equals one over the whole batch.
    pub fn backward(&mut self, part: &str, loss: &Tensor) -> SResult<f64> {
        let i = self.trained(part)?;
        let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let name = format!("{part} loss");
        observer::check_finite(self.step + 1, self.epoch, &[(&name, v)])?;
        self.parts[i].grads.accumulate(loss)?;
        Ok(v)
    }

    /// Applies `part`'s accumulated gradients: clips them if the part asks
    /// for it (a non-finite norm stops training before the update), then
    /// steps its optimizer. Returns the gradient norm before clipping when
    /// clipping is on.
    pub fn step(&mut self, part: &str) -> SResult<Option<f64>> {
        let i = self.trained(part)?;
        let (step, epoch) = (self.step + 1, self.epoch);
        let p = &mut self.parts[i];
        let Some(mut grads) = p.grads.take() else {
            return Err(SessionError::Setup(format!(
                "step({part:?}) without a backward({part:?}) before it"
            )));
        };
        let Some(opt) = p.opt.as_mut() else {
            return Err(SessionError::Setup(format!("part {part} has no optimizer")));
        };
        let norm = match p.clip {
            Some(max) => {
                let vars = p.vars.vars();
                let n = clip_grad_norm(&mut grads, &vars, max)?;
                let name = format!("{part} grad_norm");
                observer::check_finite(step, epoch, &[(&name, n)])?;
                Some(n)
            }
            None => None,
        };
        opt.step(&grads)?;
        Ok(norm)
    }

    /// [`Session::backward`] then [`Session::step`]: one optimizer step on
    /// one loss. Returns the loss value.
    pub fn train_step(&mut self, part: &str, loss: &Tensor) -> SResult<f64> {
        let v = self.backward(part, loss)?;
        self.step(part)?;
        Ok(v)
    }

    /// Records a non-train summary (e.g. validation) at the current position.
    pub fn record(&mut self, split: &str, fields: &[(&str, f64)]) -> SResult<()> {
        Ok(self.observer.record(self.step, self.epoch, split, fields)?)
    }

    /// The mean of metric `name` over the last finished epoch (weighted by
    /// each batch's items).
    pub fn last_epoch(&self, name: &str) -> Option<f64> {
        self.last_epoch
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// Ends one batch: checks and logs its metrics, adds them to the epoch's
    /// sums and advances the position.
    fn end_batch(&mut self, rec: &Record) -> SResult<()> {
        let fields: Vec<(&str, f64)> = rec.fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.observer
            .step(self.step + 1, self.epoch, rec.items, &fields)?;
        self.step += 1;
        self.batch_in_epoch += 1;
        let w = rec.items as f64;
        for (k, v) in &rec.fields {
            let e = self.sums.entry(k.clone()).or_insert((0.0, 0.0));
            e.0 += v * w;
            e.1 += w;
        }
        Ok(())
    }

    /// Whether to stop now (Ctrl-C, or [`SessionBuilder::stop_at`]).
    pub fn should_stop(&self) -> bool {
        observer::interrupted() || self.stop_at.is_some_and(|s| self.step >= s)
    }

    fn periodic_checkpoint(&self) -> SResult<()> {
        if self.checkpoint_every > 0 && self.step.is_multiple_of(self.checkpoint_every) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// The epoch loop. `batches(epoch, start)` yields the batches of `epoch`
    /// from index `start` on (a resumed epoch starts where it stopped, without
    /// producing the batches before it); `body` runs one batch's steps and
    /// returns its [`Record`]; `after_epoch` runs after each epoch's summary
    /// (`train_epoch` line) is logged and the epoch counter advanced, before
    /// the checkpoint (e.g. a validation pass that records its metrics).
    pub fn run_epochs<B, E, I>(
        &mut self,
        mut batches: impl FnMut(u64, usize) -> I,
        mut body: impl FnMut(&mut Session, B) -> Result<Record, E> + Send,
        mut after_epoch: impl FnMut(&mut Session) -> Result<(), E>,
    ) -> Result<LoopEnd, E>
    where
        I: IntoIterator<Item = Result<B, E>>,
        B: Send,
        E: From<SessionError> + Send,
    {
        let Plan::Epochs { epochs, .. } = self.plan else {
            return Err(SessionError::Setup(
                "run_epochs needs a session built with .epochs(..)".into(),
            )
            .into());
        };
        while self.epoch < epochs {
            let start = usize::try_from(self.batch_in_epoch).unwrap_or(usize::MAX);
            for batch in batches(self.epoch, start) {
                let batch = batch?;
                // The batch is fetched outside the pool (a prefetching loader
                // feeds it from another thread); the step runs inside it.
                let rec = crate::ops::on_pool(|| body(self, batch))?;
                self.end_batch(&rec)?;
                self.periodic_checkpoint()?;
                if self.should_stop() {
                    self.interrupt()?;
                    return Ok(LoopEnd::Interrupted);
                }
            }
            self.last_epoch = self
                .sums
                .iter()
                .filter(|(_, (_, w))| *w > 0.0)
                .map(|(k, (s, w))| (k.clone(), s / w))
                .collect();
            let summary: Vec<(&str, f64)> = self
                .last_epoch
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect();
            self.observer
                .record(self.step, self.epoch, "train_epoch", &summary)
                .map_err(SessionError::from)?;
            self.epoch += 1;
            self.batch_in_epoch = 0;
            self.sums.clear();
            after_epoch(self)?;
            self.checkpoint()?;
        }
        Ok(LoopEnd::Completed)
    }

    /// The iteration loop (e.g. RLHF: generate rollouts, score them, update):
    /// `body` runs iteration [`Session::iteration`] and may advance
    /// [`Session::cursor`]; both are kept in checkpoints. A checkpoint is
    /// written every [`SessionBuilder::checkpoint_every`] iterations, on
    /// Ctrl-C and at the end.
    pub fn run_iterations<E>(
        &mut self,
        mut body: impl FnMut(&mut Session) -> Result<Record, E>,
    ) -> Result<LoopEnd, E>
    where
        E: From<SessionError>,
    {
        let Plan::Iterations { total } = self.plan else {
            return Err(SessionError::Setup(
                "run_iterations needs a session built with .iterations(..)".into(),
            )
            .into());
        };
        while self.iteration < total {
            let rec = body(self)?;
            self.end_batch(&rec)?;
            self.iteration += 1;
            self.batch_in_epoch = 0;
            self.sums.clear();
            self.periodic_checkpoint()?;
            if self.should_stop() && self.iteration < total {
                self.interrupt()?;
                return Ok(LoopEnd::Interrupted);
            }
        }
        self.checkpoint()?;
        Ok(LoopEnd::Completed)
    }

    fn is_finished(&self) -> bool {
        match self.plan {
            Plan::Epochs { epochs, .. } => self.epoch >= epochs,
            Plan::Iterations { total } => self.iteration >= total,
        }
    }

    fn describe_position(&self) -> String {
        match self.plan {
            Plan::Epochs { epochs, .. } => format!("{} of {epochs} epochs", self.epoch),
            Plan::Iterations { total } => format!("{} of {total} iterations", self.iteration),
        }
    }

    fn restore(&mut self, st: &TrainState, path: &std::path::Path) -> SResult<()> {
        let bad = |k: &str, e: String| {
            SessionError::Checkpoint(CheckpointError::Invalid {
                path: path.to_path_buf(),
                reason: format!("field extra.{k}: {e}"),
            })
        };
        let num = |k: &str| -> SResult<u64> {
            st.extra
                .get(k)
                .map(|v| v.parse::<u64>().map_err(|e| bad(k, e.to_string())))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        self.rng = checkpoint::restore_rng(st, self.seed);
        self.step = st.step;
        self.epoch = st.epoch;
        self.batch_in_epoch = num("batch_in_epoch")?;
        self.iteration = num("iteration")?;
        self.cursor = num("cursor")?;
        if let Some(j) = st.extra.get("epoch_sums") {
            self.sums = serde_json::from_str(j).map_err(|e| bad("epoch_sums", e.to_string()))?;
        }
        if let Some(j) = st.extra.get("last_epoch") {
            self.last_epoch =
                serde_json::from_str(j).map_err(|e| bad("last_epoch", e.to_string()))?;
        }
        Ok(())
    }

    /// Writes `checkpoints/last.safetensors` (atomically): every saved part,
    /// the RNGs, the loop position, the epoch's sums and the metrics length.
    pub fn checkpoint(&self) -> SResult<()> {
        let mut extra = std::collections::HashMap::new();
        extra.insert(
            "batch_in_epoch".to_string(),
            self.batch_in_epoch.to_string(),
        );
        extra.insert("iteration".to_string(), self.iteration.to_string());
        extra.insert("cursor".to_string(), self.cursor.to_string());
        extra.insert("epoch_sums".to_string(), to_json(&self.sums));
        extra.insert("last_epoch".to_string(), to_json(&self.last_epoch));
        let metrics = self.run.dir().join("metrics.jsonl");
        let len = std::fs::metadata(&metrics).map(|m| m.len()).unwrap_or(0);
        extra.insert("metrics_len".to_string(), len.to_string());
        let st = TrainState {
            step: self.step,
            epoch: self.epoch,
            rng: Some(self.rng.state()),
            model_rng: None,
            extra,
        };
        let parts: Vec<PartRef<'_>> = self
            .parts
            .iter()
            .filter(|p| p.kind != PartKind::Frozen)
            .map(|p| PartRef {
                name: &p.name,
                vars: &p.vars,
                opt: p.opt.as_ref(),
            })
            .collect();
        checkpoint::save_parts(&self.run.dir().last_checkpoint(), &parts, &st)?;
        Ok(())
    }

    /// Writes a checkpoint and says how to resume (a silent run says
    /// nothing: the task around it names the run and what the user can do,
    /// which need not be `--resume` of this one run).
    pub fn interrupt(&self) -> SResult<()> {
        self.checkpoint()?;
        // Printed above the bar, which `finish` then clears.
        self.observer.println(&format!(
            "stopped after step {} (epoch {}, batch {}); resume with --resume {}",
            self.step,
            self.epoch,
            self.batch_in_epoch,
            self.run.path().display()
        ));
        self.observer.finish();
        Ok(())
    }

    /// Finishes the observer and writes `summary.json`.
    pub fn finish(&self, metrics: serde_json::Value) -> SResult<()> {
        self.observer.finish();
        Ok(self.run.dir().write_summary(self.seed, metrics)?)
    }
}

/// JSON for the checkpoint's extra fields (serde_json writes f64 in the
/// shortest form that reads back to the same bits).
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The epoch's sums go through JSON in the checkpoint: they must come back
    /// bit for bit (serde_json's `float_roundtrip`), or a resumed epoch's mean
    /// would differ from an uninterrupted one's in the last digit.
    #[test]
    fn epoch_sums_survive_json_bit_for_bit() {
        let mut rng = SeededRng::new(3);
        let mut sums = BTreeMap::new();
        for i in 0..2000 {
            let a = (rng.uniform_f32(-1.0, 1.0) as f64) * 10f64.powi(i % 17 - 8) / 3.0;
            sums.insert(format!("m{i}"), (a, -936_991.637_620_914_5 * a));
        }
        let back: BTreeMap<String, (f64, f64)> = serde_json::from_str(&to_json(&sums)).unwrap();
        for (k, (a, b)) in &sums {
            let (c, d) = back[k];
            assert_eq!(
                (a.to_bits(), b.to_bits()),
                (c.to_bits(), d.to_bits()),
                "{k}"
            );
        }
    }
}
