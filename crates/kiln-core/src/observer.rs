//! The training observer: a progress bar with loss and throughput on a
//! terminal, plain periodic log lines otherwise (CI), metrics to
//! `metrics.jsonl`, a NaN/Inf guard, and Ctrl-C handling that lets the training
//! loop checkpoint and exit.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::run::{MetricsLog, RunError, RunOptions};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<bool> = OnceLock::new();
static PRESSES: AtomicUsize = AtomicUsize::new(0);

/// Installs a Ctrl-C handler (once per process): the first press asks the
/// training loop to stop at the next step (see [`interrupted`]); a second
/// press exits at once. SIGTERM and SIGHUP count as presses too, so a job
/// stopped by `timeout`, systemd or a batch scheduler keeps its progress.
/// Returns false if another handler was already set.
pub fn install_ctrlc() -> bool {
    *HANDLER.get_or_init(|| {
        ctrlc::set_handler(|| {
            if PRESSES.fetch_add(1, Ordering::SeqCst) >= 1 {
                eprintln!("\ninterrupted twice: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: finishing this step, writing a checkpoint (press again to quit now)"
            );
            INTERRUPTED.store(true, Ordering::SeqCst);
        })
        .is_ok()
    })
}

/// Whether Ctrl-C was pressed (or [`request_stop`] called).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Asks training loops to stop as if Ctrl-C had been pressed (tests, embedding).
pub fn request_stop(stop: bool) {
    INTERRUPTED.store(stop, Ordering::SeqCst);
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A metric became NaN or infinite.
    #[error(
        "{name} is {value} at step {step} (epoch {epoch}): training stopped before this \
         step's update, keeping the run's last checkpoint if it had written one. Start again \
         with a lower learning rate or gradient clipping (--overwrite reuses the folder)."
    )]
    NonFinite {
        /// The metric.
        name: String,
        /// Its value.
        value: f64,
        /// The step.
        step: u64,
        /// The epoch.
        epoch: u64,
    },
    /// Writing metrics failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Observer settings.
#[derive(Debug, Clone, Copy)]
pub struct ObserverConfig {
    /// No progress bar and no periodic lines (epoch summaries still print).
    pub quiet: bool,
    /// Nothing at all, epoch summaries and [`Observer::println`] included
    /// (implies `quiet`): for a run inside a larger task that reports on it
    /// itself. Metrics are still written.
    pub silent: bool,
    /// When not on a terminal, print a line every this many steps (0 = never).
    pub log_every: u64,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            quiet: false,
            silent: false,
            log_every: 50,
        }
    }
}

impl RunOptions {
    /// The observer settings these options ask for (quiet or not; a line
    /// every 50 steps when not on a terminal).
    pub fn observer(&self) -> ObserverConfig {
        ObserverConfig {
            quiet: self.quiet,
            silent: self.silent,
            log_every: 50,
        }
    }
}

/// Watches a training loop.
#[derive(Debug)]
pub struct Observer {
    cfg: ObserverConfig,
    bar: Option<ProgressBar>,
    metrics: Option<MetricsLog>,
    started: Instant,
    items: u64,
    task: String,
}

impl Observer {
    /// An observer for `total_steps` steps of `task`, appending to `metrics`.
    pub fn new(
        task: &str,
        total_steps: u64,
        cfg: ObserverConfig,
        metrics: Option<MetricsLog>,
    ) -> Self {
        let bar = (!cfg.quiet && !cfg.silent && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} (eta {eta})",
            ) {
                b.set_style(style);
            }
            b.set_prefix(task.to_string());
            b
        });
        Self {
            cfg,
            bar,
            metrics,
            started: Instant::now(),
            items: 0,
            task: task.to_string(),
        }
    }

    /// Sets the bar position (after resuming).
    pub fn set_position(&mut self, step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
        }
    }

    /// Records one step: checks every value is finite, logs to metrics, updates
    /// the bar. `items` is the number of examples in the step (for throughput).
    pub fn step(
        &mut self,
        step: u64,
        epoch: u64,
        items: usize,
        fields: &[(&str, f64)],
    ) -> Result<(), TrainError> {
        check_finite(step, epoch, fields)?;
        self.items += items as u64;
        if let Some(m) = &mut self.metrics {
            m.log(step, epoch, "train", fields)?;
        }
        let rate = self.items as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let summary = fields
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(format!("{summary} {rate:.0}/s"));
            }
            None => {
                if !self.cfg.quiet
                    && !self.cfg.silent
                    && self.cfg.log_every > 0
                    && step.is_multiple_of(self.cfg.log_every)
                {
                    eprintln!(
                        "{} step {step} epoch {epoch}: {summary} ({rate:.0} items/s)",
                        self.task
                    );
                }
            }
        }
        Ok(())
    }

    /// Records an evaluation or epoch summary under `split` and prints it.
    pub fn record(
        &mut self,
        step: u64,
        epoch: u64,
        split: &str,
        fields: &[(&str, f64)],
    ) -> Result<(), TrainError> {
        check_finite(step, epoch, fields)?;
        if let Some(m) = &mut self.metrics {
            m.log(step, epoch, split, fields)?;
        }
        let summary = fields
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        self.println(&format!("{} epoch {epoch} [{split}] {summary}", self.task));
        Ok(())
    }

    /// Prints a line without breaking the progress bar (nothing when silent).
    pub fn println(&self, msg: &str) {
        if self.cfg.silent {
            return;
        }
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Finishes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Examples per second since the observer started.
    pub fn throughput(&self) -> f64 {
        self.items as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// Errors if any value is NaN or infinite, naming it and the step.
pub fn check_finite(step: u64, epoch: u64, fields: &[(&str, f64)]) -> Result<(), TrainError> {
    match fields.iter().find(|(_, v)| !v.is_finite()) {
        Some((k, v)) => Err(TrainError::NonFinite {
            name: (*k).to_string(),
            value: *v,
            step,
            epoch,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nan_guard_names_metric_and_step() {
        let mut o = Observer::new(
            "t",
            10,
            ObserverConfig {
                quiet: true,
                silent: false,
                log_every: 0,
            },
            None,
        );
        o.step(1, 0, 4, &[("loss", 1.0)]).unwrap();
        let e = o
            .step(2, 0, 4, &[("loss", 1.0), ("kl", f64::NAN)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("kl is NaN at step 2"), "{e}");
        let e = o
            .record(3, 1, "val", &[("loss", f64::INFINITY)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss is inf at step 3"), "{e}");
    }

    /// What each level prints, read from a child process's standard error
    /// (this test re-run with `KILN_OBSERVER_LEVEL` set).
    #[test]
    fn silent_prints_nothing_and_quiet_keeps_the_epoch_summaries() {
        const NAME: &str =
            "observer::tests::silent_prints_nothing_and_quiet_keeps_the_epoch_summaries";
        if let Ok(level) = std::env::var("KILN_OBSERVER_LEVEL") {
            let cfg = ObserverConfig {
                quiet: level != "normal",
                silent: level == "silent",
                log_every: 1,
            };
            let mut o = Observer::new("task", 4, cfg, None);
            o.step(1, 0, 8, &[("loss", 2.0)]).unwrap();
            o.record(1, 1, "val", &[("loss", 1.5)]).unwrap();
            o.println("a line of the trainer's");
            o.finish();
            return;
        }
        let stderr = |level: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env("KILN_OBSERVER_LEVEL", level)
                .output()
                .unwrap();
            assert!(out.status.success(), "{level}: {out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let (step, summary, line) = (
            "task step 1 epoch 0: loss 2.0000",
            "task epoch 1 [val] loss 1.5000",
            "a line of the trainer's",
        );
        // Not a terminal: no bar, so a normal observer logs the step too.
        let normal = stderr("normal");
        assert!(
            [step, summary, line].iter().all(|m| normal.contains(m)),
            "{normal}"
        );
        let quiet = stderr("quiet");
        assert!(
            !quiet.contains(step) && quiet.contains(summary) && quiet.contains(line),
            "{quiet}"
        );
        let silent = stderr("silent");
        assert!(
            [step, summary, line].iter().all(|m| !silent.contains(m)),
            "{silent}"
        );
    }
}
