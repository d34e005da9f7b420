//! Collapse and divergence detection.
//!
//! A GAN has collapsed when its discriminator wins outright: it tells real
//! from generated images with near certainty, so the generator's gradient
//! vanishes (saturating loss) or points nowhere useful. The check is
//! D(x) > 0.99 and D(G(z)) < 0.01 (means of the sigmoid of D's logits,
//! after the discriminator's step) for 200 steps in a row; a NaN or
//! infinite output is divergence and stops at once.
//!
//! The monitor's state is a function of the logged metrics, so a resumed
//! run rebuilds it from `metrics.jsonl` ([`CollapseMonitor::replay`]).

use kiln_core::run::MetricRecord;

/// The metric names the monitor reads (logged by the trainer each step).
pub const D_REAL: &str = "d_real_after";
/// See [`D_REAL`].
pub const D_FAKE: &str = "d_fake_after";

/// What the monitor saw at one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing wrong (or a streak that has not reached the window yet).
    Healthy,
    /// D(x) and D(G(z)) crossed their thresholds for `window` steps in a row,
    /// starting at `since`.
    Collapsed {
        /// The first step of the streak.
        since: u64,
        /// What was seen.
        reason: String,
    },
    /// A value was NaN or infinite.
    Diverged {
        /// What was seen.
        reason: String,
    },
}

/// Watches D(x) and D(G(z)) step by step.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseMonitor {
    window: u64,
    real_above: f64,
    fake_below: f64,
    streak_start: Option<u64>,
    streak: u64,
}

impl CollapseMonitor {
    /// A monitor that reports a collapse after `window` steps (0: never)
    /// with D(x) > `real_above` and D(G(z)) < `fake_below`.
    pub fn new(window: u64, real_above: f64, fake_below: f64) -> Self {
        Self {
            window,
            real_above,
            fake_below,
            streak_start: None,
            streak: 0,
        }
    }

    /// The first step of the current streak of suspicious steps, if any.
    pub fn streak_start(&self) -> Option<u64> {
        self.streak_start
    }

    /// Observes step `step`'s D(x) and D(G(z)).
    pub fn observe(&mut self, step: u64, d_real: f64, d_fake: f64) -> Verdict {
        if !(d_real.is_finite() && d_fake.is_finite()) {
            return Verdict::Diverged {
                reason: format!(
                    "the discriminator's output diverged (D(x) = {d_real}, D(G(z)) = {d_fake})"
                ),
            };
        }
        if self.window == 0 {
            return Verdict::Healthy;
        }
        if d_real > self.real_above && d_fake < self.fake_below {
            let since = *self.streak_start.get_or_insert(step);
            self.streak += 1;
            if self.streak >= self.window {
                return Verdict::Collapsed {
                    since,
                    reason: format!(
                        "the discriminator won: D(x) > {} and D(G(z)) < {} for {} steps in a \
                         row, since step {since} (now D(x) = {d_real:.4}, D(G(z)) = {d_fake:.4}); \
                         the generator gets no useful gradient",
                        self.real_above, self.fake_below, self.streak
                    ),
                };
            }
        } else {
            self.streak_start = None;
            self.streak = 0;
        }
        Verdict::Healthy
    }

    /// Rebuilds the state from a run's `train` records (on resume). Returns
    /// the verdict of the last record.
    pub fn replay(&mut self, records: &[MetricRecord]) -> Verdict {
        let mut last = Verdict::Healthy;
        for r in records.iter().filter(|r| r.split == "train") {
            let get = |k: &str| r.values.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
            if let (Some(a), Some(b)) = (get(D_REAL), get(D_FAKE)) {
                last = self.observe(r.step, a, b);
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_of_certain_wins_is_a_collapse_and_a_break_resets_it() {
        let mut m = CollapseMonitor::new(3, 0.99, 0.01);
        assert_eq!(m.observe(1, 0.995, 0.005), Verdict::Healthy);
        assert_eq!(m.observe(2, 0.995, 0.005), Verdict::Healthy);
        assert_eq!(m.streak_start(), Some(1));
        // The boundary values themselves do not count.
        assert_eq!(m.observe(3, 0.99, 0.005), Verdict::Healthy);
        assert_eq!(m.streak_start(), None);
        for s in 4..6 {
            assert_eq!(m.observe(s, 0.999, 0.001), Verdict::Healthy);
        }
        match m.observe(6, 0.999, 0.001) {
            Verdict::Collapsed { since, reason } => {
                assert_eq!(since, 4);
                assert!(
                    reason.contains("3 steps in a row, since step 4"),
                    "{reason}"
                );
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            m.observe(7, f64::NAN, 0.5),
            Verdict::Diverged { .. }
        ));
        let mut off = CollapseMonitor::new(0, 0.99, 0.01);
        for s in 0..1000 {
            assert_eq!(off.observe(s, 1.0, 0.0), Verdict::Healthy);
        }
    }

    #[test]
    fn replay_rebuilds_the_streak_from_metrics() {
        let rec = |step: u64, a: f64, b: f64| MetricRecord {
            step,
            epoch: 0,
            split: "train".into(),
            values: vec![(D_REAL.into(), a), (D_FAKE.into(), b)],
        };
        let records = vec![
            rec(1, 0.5, 0.5),
            rec(2, 0.999, 0.001),
            MetricRecord {
                step: 2,
                epoch: 1,
                split: "train_epoch".into(),
                values: vec![(D_REAL.into(), 0.2), (D_FAKE.into(), 0.9)],
            },
            rec(3, 0.999, 0.001),
        ];
        let mut m = CollapseMonitor::new(3, 0.99, 0.01);
        assert_eq!(m.replay(&records), Verdict::Healthy);
        assert_eq!(m.streak_start(), Some(2));
        assert!(matches!(
            m.observe(4, 0.999, 0.0),
            Verdict::Collapsed { since: 2, .. }
        ));
    }
}
