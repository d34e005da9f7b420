//! Representation-quality probes as functions of feature matrices and labels,
//! so features from any model (kiln-vae's encoder included) can be probed.

use kiln_core::loss::{cross_entropy, Reduction};
use kiln_core::nn::Linear;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Module, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Linear-probe settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeConfig {
    /// Epochs of mini-batch AdamW over the training features.
    pub epochs: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 weight decay (AdamW).
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Seed of the probe's initialisation and batch order.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 1e-2,
            weight_decay: 1e-4,
            batch_size: 256,
            seed: 0,
        }
    }
}

/// Standardises features with the training set's mean and std (as sklearn's
/// StandardScaler before a logistic regression), returning both sets.
fn standardise(train: &Tensor, test: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = train.mean_keepdim(0)?;
    let std = train
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .maximum(1e-6)?;
    Ok((
        train.broadcast_sub(&mean)?.broadcast_div(&std)?,
        test.broadcast_sub(&mean)?.broadcast_div(&std)?,
    ))
}

fn accuracy(logits_or_pred: &[u32], labels: &[u32]) -> f64 {
    let ok = logits_or_pred
        .iter()
        .zip(labels)
        .filter(|(a, b)| a == b)
        .count();
    ok as f64 / labels.len().max(1) as f64
}

fn check(feats: &Tensor, labels: &[u32], what: &str) -> Result<usize> {
    let (n, _) = feats.dims2()?;
    if n != labels.len() {
        kiln_core::candle::bail!("{what}: {n} feature rows but {} labels", labels.len());
    }
    if n == 0 {
        kiln_core::candle::bail!("{what}: no rows");
    }
    Ok(n)
}

/// Trains a logistic-regression probe on frozen `train` features `[N, d]` and
/// returns its accuracy on `test` features.
pub fn linear_probe(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    test_labels: &[u32],
    cfg: &LinearProbeConfig,
) -> Result<f64> {
    let n = check(train, train_labels, "linear probe (train)")?;
    check(test, test_labels, "linear probe (test)")?;
    let classes = train_labels
        .iter()
        .chain(test_labels)
        .copied()
        .max()
        .unwrap_or(0) as usize
        + 1;
    let (train, test) = standardise(
        &train.detach().to_dtype(DType::F32)?,
        &test.detach().to_dtype(DType::F32)?,
    )?;
    let d = train.dim(1)?;
    let vs = VarStore::new(cfg.seed);
    let head = Linear::new(
        d,
        classes,
        vs.builder(DType::F32, train.device()).pp("probe"),
    )?;
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), cfg.lr, cfg.weight_decay)?;
    let y = Tensor::new(train_labels, train.device())?;
    let bs = cfg.batch_size.max(1);
    for epoch in 0..cfg.epochs {
        let order = SeededRng::derive(cfg.seed, &[epoch as u64]).permutation(n);
        for chunk in order.chunks(bs) {
            let idx = Tensor::new(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                train.device(),
            )?;
            let logits = head.forward(&train.index_select(&idx, 0)?)?;
            let loss = cross_entropy(&logits, &y.index_select(&idx, 0)?, None, Reduction::Mean)?;
            opt.backward_step(&loss)?;
        }
    }
    let pred = head.forward(&test)?.argmax(1)?.to_vec1::<u32>()?;
    Ok(accuracy(&pred, test_labels))
}

/// kNN classification as in Wu et al. (2018) / DINO: cosine similarity to the
/// training features, the `k` nearest vote with weight `exp(sim / temperature)`.
/// Returns the predicted class of each test row.
pub fn knn_predict(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    k: usize,
    temperature: f64,
) -> Result<Vec<u32>> {
    let n = check(train, train_labels, "kNN (train)")?;
    let classes = train_labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let k = k.clamp(1, n);
    let a = crate::loss::l2_normalize(&train.detach().to_dtype(DType::F32)?)?;
    let b = crate::loss::l2_normalize(&test.detach().to_dtype(DType::F32)?)?;
    let sim = b.matmul(&a.t()?)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(sim.len());
    for row in sim {
        let mut idx: Vec<usize> = (0..n).collect();
        // Partial selection of the k most similar, ties broken by index for determinism.
        idx.select_nth_unstable_by(k - 1, |&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let mut votes = vec![0f64; classes];
        for &i in &idx[..k] {
            votes[train_labels[i] as usize] += (row[i] as f64 / temperature).exp();
        }
        let best = votes
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(c, _)| c)
            .unwrap_or(0);
        out.push(best as u32);
    }
    Ok(out)
}

/// kNN accuracy on labelled test features.
pub fn knn_accuracy(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    test_labels: &[u32],
    k: usize,
    temperature: f64,
) -> Result<f64> {
    check(test, test_labels, "kNN (test)")?;
    Ok(accuracy(
        &knn_predict(train, train_labels, test, k, temperature)?,
        test_labels,
    ))
}

/// The standard report: linear probe and kNN (k = 20 and 200, temperature 0.07).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Linear-probe test accuracy.
    pub linear: f64,
    /// kNN (k = 20) test accuracy.
    pub knn20: f64,
    /// kNN (k = 200) test accuracy.
    pub knn200: f64,
    /// Training examples the probes saw: kNN's k is at most this many, so
    /// with fewer than 200 the "k = 200" column used them all (0: a report
    /// written before the count was kept).
    #[serde(default)]
    pub train_examples: usize,
}

impl ProbeReport {
    /// The k a kNN column asked for `k` really used (all the training
    /// examples when there are fewer).
    pub fn knn_k(&self, k: usize) -> usize {
        if self.train_examples == 0 {
            k
        } else {
            k.min(self.train_examples)
        }
    }
}

/// Runs every probe.
pub fn probe_all(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    test_labels: &[u32],
    cfg: &LinearProbeConfig,
) -> Result<ProbeReport> {
    Ok(ProbeReport {
        linear: linear_probe(train, train_labels, test, test_labels, cfg)?,
        knn20: knn_accuracy(train, train_labels, test, test_labels, 20, 0.07)?,
        knn200: knn_accuracy(train, train_labels, test, test_labels, 200, 0.07)?,
        train_examples: train_labels.len(),
    })
}
