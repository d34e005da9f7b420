//! Reward functions of the online trainers, as in TRL's `reward_funcs`:
//! each sees the prompts, the completions (text and ids) and any extra
//! dataset columns, and returns one score per completion (`NaN`: "not
//! mine to score", as TRL's `None`). Several combine with weights into a
//! [`RewardSet`]; each is logged on its own (`rewards/<name>/mean`,
//! `rewards/<name>/std`). A reward model from part 1 is one of them
//! ([`RewardModelFn`]); a Rust closure is another ([`FnReward`]).

use std::collections::BTreeMap;

use kiln_lm::Gpt2Tokenizer;

use crate::error::{Result, RlhfError};
use crate::labeller::LexiconLabeller;
use crate::reward::RewardModel;

/// What a reward function receives: one entry per completion (a prompt is
/// repeated for each of its completions).
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt of each completion.
    pub prompts: &'a [String],
    /// The completion texts (EOS not included).
    pub completions: &'a [String],
    /// The completion ids (EOS included when the completion ended on it).
    pub completion_ids: &'a [Vec<u32>],
    /// Whether each completion ended with EOS.
    pub eos: &'a [bool],
    /// Extra dataset columns (e.g. `answer`), one value per completion.
    pub columns: &'a BTreeMap<String, Vec<serde_json::Value>>,
}

impl RewardInput<'_> {
    /// Completions.
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// Column `name`, or an error naming it and the columns there are.
    pub fn column(&self, name: &str) -> Result<&[serde_json::Value]> {
        self.columns.get(name).map(Vec::as_slice).ok_or_else(|| {
            RlhfError::Input(format!(
                "the reward function needs a dataset column `{name}`; the prompts have: [{}]",
                self.columns.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// A reward function.
pub trait RewardFn {
    /// Its name in the logs (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// One score per completion (`NaN` where it does not apply).
    fn score(&self, input: &RewardInput<'_>) -> Result<Vec<f64>>;
}

/// A reward function from a closure returning one score per completion
/// (implement [`RewardFn`] for one that can fail, e.g. on a missing column).
pub struct FnReward<F> {
    name: String,
    f: F,
}

impl<F: Fn(&RewardInput<'_>) -> Vec<f64>> FnReward<F> {
    /// Wraps `f` under `name`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F: Fn(&RewardInput<'_>) -> Vec<f64>> RewardFn for FnReward<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Vec<f64>> {
        Ok((self.f)(input))
    }
}

/// A part-1 reward model as a reward function: scores `prompt + completion`
/// with EOS appended when the completion ended on it, read at the last real
/// token (the EOS itself, never a pad).
pub struct RewardModelFn<'a> {
    /// The model.
    pub model: &'a RewardModel,
    /// The tokenizer its inputs are written with.
    pub tokenizer: &'a Gpt2Tokenizer,
    /// Rows per forward pass.
    pub batch: usize,
}

impl RewardFn for RewardModelFn<'_> {
    fn name(&self) -> &str {
        "reward_model"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Vec<f64>> {
        let eos = self.tokenizer.eos_id().map(|_| kiln_lm::END_OF_TEXT);
        let seqs = input
            .prompts
            .iter()
            .zip(input.completions)
            .zip(input.eos)
            .map(|((p, c), &e)| {
                let tail = if e { eos.unwrap_or("") } else { "" };
                let mut ids = self.tokenizer.encode(&format!("{p}{c}{tail}"))?;
                let n = self.model.config().n_positions;
                if ids.len() > n {
                    ids.drain(..ids.len() - n);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .model
            .score_all(&seqs, self.batch.max(1))?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

/// The lexicon labeller's sentiment score (positive words minus negative
/// ones) as a reward: the experiment's ground truth, usable as a
/// rule-based reward.
pub struct LexiconReward(pub LexiconLabeller);

impl RewardFn for LexiconReward {
    fn name(&self) -> &str {
        "lexicon"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Vec<f64>> {
        Ok(input
            .completions
            .iter()
            .map(|c| self.0.score(c) as f64)
            .collect())
    }
}

/// Exact-answer reward for verifiable tasks: 1 when the completion, up to
/// its first newline and trimmed, equals the `answer` column (a string or a
/// number), else 0.
pub struct ExactAnswer;

impl RewardFn for ExactAnswer {
    fn name(&self) -> &str {
        "exact_answer"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Vec<f64>> {
        let answers = input.column("answer")?;
        Ok(input
            .completions
            .iter()
            .zip(answers)
            .map(|(c, a)| {
                let want = match a {
                    serde_json::Value::String(s) => s.trim().to_string(),
                    other => other.to_string(),
                };
                let got = c.split('\n').next().unwrap_or("").trim();
                f64::from(u8::from(got == want))
            })
            .collect())
    }
}

/// The scores of a [`RewardSet`] on one batch.
#[derive(Debug, Clone)]
pub struct Scores {
    /// `Σ weight × score` per completion, `NaN` scores skipped (TRL's
    /// `nansum`); `NaN` when every function returned `NaN`.
    pub total: Vec<f64>,
    /// Each function's raw scores, by name.
    pub per_fn: Vec<(String, Vec<f64>)>,
}

impl Scores {
    /// `rewards/<name>/mean` and `/std` (NaN-aware, unbiased std as
    /// `torch.std`) for each function.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (name, v) in &self.per_fn {
            let (m, s) = nan_mean_std(v);
            out.push((format!("rewards/{name}/mean"), m));
            out.push((format!("rewards/{name}/std"), s));
        }
        out
    }
}

/// Mean and unbiased standard deviation of the non-NaN values (NaN when
/// there are none; std 0 for one value).
pub fn nan_mean_std(v: &[f64]) -> (f64, f64) {
    let x: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if x.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (m, 0.0);
    }
    let var = x.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// Weighted reward functions.
#[derive(Default)]
pub struct RewardSet<'a> {
    fns: Vec<(Box<dyn RewardFn + 'a>, f64)>,
}

impl<'a> RewardSet<'a> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `f` with `weight`.
    pub fn with(mut self, f: impl RewardFn + 'a, weight: f64) -> Self {
        self.fns.push((Box::new(f), weight));
        self
    }

    /// Functions in the set.
    pub fn len(&self) -> usize {
        self.fns.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.fns.is_empty()
    }

    /// Scores a batch with every function and combines them.
    pub fn score(&self, input: &RewardInput<'_>) -> Result<Scores> {
        if self.fns.is_empty() {
            return Err(RlhfError::Input("no reward functions".into()));
        }
        let n = input.len();
        let mut total = vec![0.0; n];
        let mut any = vec![false; n];
        let mut per_fn = Vec::with_capacity(self.fns.len());
        for (f, w) in &self.fns {
            let v = f.score(input)?;
            if v.len() != n {
                return Err(RlhfError::Input(format!(
                    "reward function `{}` returned {} scores for {n} completions",
                    f.name(),
                    v.len()
                )));
            }
            for (i, &x) in v.iter().enumerate() {
                if !x.is_nan() {
                    total[i] += w * x;
                    any[i] = true;
                }
            }
            per_fn.push((f.name().to_string(), v));
        }
        for (t, a) in total.iter_mut().zip(any) {
            if !a {
                *t = f64::NAN;
            }
        }
        Ok(Scores { total, per_fn })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_skips_nan_and_logs_each_function() -> Result<()> {
        let prompts = vec!["p".to_string(); 3];
        let completions = vec!["a".to_string(), "bb".into(), "ccc".into()];
        let ids = vec![vec![1], vec![2, 2], vec![3, 3, 3]];
        let eos = vec![true; 3];
        let columns = BTreeMap::new();
        let input = RewardInput {
            prompts: &prompts,
            completions: &completions,
            completion_ids: &ids,
            eos: &eos,
            columns: &columns,
        };
        let len = FnReward::new("len", |x: &RewardInput<'_>| {
            x.completion_ids.iter().map(|c| c.len() as f64).collect()
        });
        let only_first = FnReward::new("first", |x: &RewardInput<'_>| {
            (0..x.len())
                .map(|i| if i == 0 { 10.0 } else { f64::NAN })
                .collect()
        });
        let set = RewardSet::new().with(len, 0.5).with(only_first, 2.0);
        let s = set.score(&input)?;
        assert_eq!(s.total, vec![0.5 + 20.0, 1.0, 1.5]);
        let m: BTreeMap<String, f64> = s.metrics().into_iter().collect();
        assert_eq!(m["rewards/len/mean"], 2.0);
        assert_eq!(m["rewards/len/std"], 1.0);
        assert_eq!(m["rewards/first/mean"], 10.0);
        // A function missing a column says which.
        let e = ExactAnswer.score(&input).unwrap_err().to_string();
        assert!(e.contains("`answer`"), "{e}");
        Ok(())
    }

    #[test]
    fn exact_answer_reads_the_first_line() -> Result<()> {
        let prompts = vec!["2+3=".to_string(); 3];
        let completions = vec!["5\n7+1".to_string(), " 5".into(), "6".into()];
        let ids = vec![vec![]; 3];
        let eos = vec![true; 3];
        let mut columns = BTreeMap::new();
        columns.insert("answer".to_string(), vec![serde_json::json!(5); 3]);
        let input = RewardInput {
            prompts: &prompts,
            completions: &completions,
            completion_ids: &ids,
            eos: &eos,
            columns: &columns,
        };
        assert_eq!(ExactAnswer.score(&input)?, vec![1.0, 1.0, 0.0]);
        Ok(())
    }
}
