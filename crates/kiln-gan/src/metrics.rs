//! Sample-quality metrics in f64 on the features of a [`FeatureExtractor`]:
//! FID (pytorch-fid's `calculate_frechet_distance`), KID (clean-fid and
//! torchmetrics), precision / recall / density / coverage (Naeem et al. 2020,
//! the `prdc` package), Inception Score (torchmetrics' formula) and a
//! nearest-training-image check for memorisation.
//!
//! Features are rows of an `n x d` matrix ([`Features`]). Means and
//! covariances come from streaming sums ([`GaussianStats`]), so a reference set
//! is read once and can be cached.
//!
//! KID's subsets and the nearest-neighbour distances of PRDC and the
//! memorisation check run on rayon's threads (the current pool: xtask's
//! `--threads`). The subsets are drawn on one thread in a seeded order before
//! the work is shared out, and every partial result is combined in a fixed
//! order, so results are bit-for-bit those of one thread.

use faer::{Mat, MatRef, Side};
use kiln_core::rng::SeededRng;
use kiln_core::Tensor;
use rayon::prelude::*;

use crate::error::{GanError, Result};

/// An `n x dim` matrix of features, one row per image, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    dim: usize,
    data: Vec<f64>,
}

impl Features {
    /// Rows of `data` (row-major, `data.len()` a multiple of `dim`).
    pub fn new(dim: usize, data: Vec<f64>) -> Result<Self> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(metric_err(format!(
                "features: {} values do not make rows of {dim}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(metric_err(format!(
                "features: row {} column {} is {} (not finite)",
                i / dim,
                i % dim,
                data[i]
            )));
        }
        Ok(Self { dim, data })
    }

    /// An empty set of `dim`-d features.
    pub fn empty(dim: usize) -> Self {
        Self {
            dim,
            data: Vec::new(),
        }
    }

    /// The rows of a `[n, dim]` tensor (any float dtype).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (_, d) = t.dims2()?;
        let v = t
            .to_dtype(kiln_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        Self::new(d, v)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    /// Appends the rows of `other` (same dimension).
    pub fn extend(&mut self, other: &Features) -> Result<()> {
        if other.dim != self.dim {
            return Err(metric_err(format!(
                "features: cannot append {}-d rows to {}-d rows",
                other.dim, self.dim
            )));
        }
        self.data.extend_from_slice(&other.data);
        Ok(())
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Features {
        let mut data = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Features {
            dim: self.dim,
            data,
        }
    }

    /// The first `n` rows (all of them when there are fewer).
    pub fn head(&self, n: usize) -> Features {
        Features {
            dim: self.dim,
            data: self.data[..n.min(self.len()) * self.dim].to_vec(),
        }
    }

    fn mat(&self) -> Mat<f64> {
        Mat::from_fn(self.len(), self.dim, |i, j| self.data[i * self.dim + j])
    }
}

/// What a feature extractor gives for a batch of images.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// The features FID, KID, PRDC and the memorisation check use.
    pub features: Features,
    /// Class logits for the Inception Score, if the extractor has a classifier.
    pub logits: Option<Features>,
}

/// A network that maps images to features for the metrics.
///
/// Images are `[B, 3, H, W]` f32 with values in `[0, 1]` (pytorch-fid's
/// convention: each extractor does its own resizing and scaling).
pub trait FeatureExtractor {
    /// A name that says what the features are, stated in every report so
    /// that nobody mistakes another network's FID for Inception-FID.
    fn name(&self) -> String;
    /// A hash of the weights and settings (hex), naming caches and reports.
    fn hash(&self) -> String;
    /// Feature dimension.
    fn dim(&self) -> usize;
    /// Features (and logits, if any) of a batch.
    fn extract(&self, images: &Tensor) -> Result<Extracted>;
}

/// Streaming sums of features: count, sum and sum of outer products, from
/// which the mean and the covariance (ddof = 1, as `np.cov`) follow.
#[derive(Debug, Clone)]
pub struct GaussianStats {
    n: u64,
    sum: Vec<f64>,
    outer: Mat<f64>,
}

impl GaussianStats {
    /// No features yet.
    pub fn new(dim: usize) -> Self {
        Self {
            n: 0,
            sum: vec![0.0; dim],
            outer: Mat::zeros(dim, dim),
        }
    }

    /// Mean and covariance of `f` (one update).
    pub fn of(f: &Features) -> Result<Self> {
        let mut s = Self::new(f.dim());
        s.update(f)?;
        Ok(s)
    }

    /// Adds a batch of rows.
    pub fn update(&mut self, f: &Features) -> Result<()> {
        if f.dim() != self.sum.len() {
            return Err(metric_err(format!(
                "statistics: {}-d features given to {}-d statistics",
                f.dim(),
                self.sum.len()
            )));
        }
        if f.is_empty() {
            return Ok(());
        }
        let m = f.mat();
        self.outer += m.transpose() * &m;
        for i in 0..f.len() {
            for (s, v) in self.sum.iter_mut().zip(f.row(i)) {
                *s += v;
            }
        }
        self.n += f.len() as u64;
        Ok(())
    }

    /// Number of rows seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.sum.len()
    }

    /// The mean.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    /// The covariance with ddof = 1: `(sum x x^T - n mu mu^T) / (n - 1)`.
    pub fn covariance(&self) -> Result<Mat<f64>> {
        if self.n < 2 {
            return Err(metric_err(format!(
                "a covariance needs at least 2 images, got {}",
                self.n
            )));
        }
        let n = self.n as f64;
        let mu = self.mean();
        let d = self.dim();
        Ok(Mat::from_fn(d, d, |i, j| {
            (self.outer[(i, j)] - n * mu[i] * mu[j]) / (n - 1.0)
        }))
    }

    /// The sums as f64 tensors (`n`, `sum`, `outer`), for caching.
    pub fn to_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let d = self.dim();
        let dev = kiln_core::Device::Cpu;
        let outer: Vec<f64> = (0..d * d).map(|k| self.outer[(k / d, k % d)]).collect();
        Ok(vec![
            ("n".into(), Tensor::new(&[self.n as f64], &dev)?),
            ("sum".into(), Tensor::from_vec(self.sum.clone(), d, &dev)?),
            ("outer".into(), Tensor::from_vec(outer, (d, d), &dev)?),
        ])
    }

    /// Statistics from [`GaussianStats::to_tensors`]' tensors.
    pub fn from_tensors(n: &Tensor, sum: &Tensor, outer: &Tensor) -> Result<Self> {
        let n = n.to_dtype(kiln_core::DType::F64)?.to_vec1::<f64>()?;
        let sum: Vec<f64> = sum.to_dtype(kiln_core::DType::F64)?.to_vec1()?;
        let d = sum.len();
        let (r, c) = outer.dims2()?;
        if n.len() != 1 || n[0] < 0.0 || n[0].fract() != 0.0 || r != d || c != d {
            return Err(metric_err(format!(
                "statistics: count {n:?}, sum of {d}, outer {r}x{c} do not fit together"
            )));
        }
        let o: Vec<f64> = outer
            .to_dtype(kiln_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self {
            n: n[0] as u64,
            sum,
            outer: Mat::from_fn(d, d, |i, j| o[i * d + j]),
        })
    }
}

/// A Fréchet distance and what it rests on.
#[derive(Debug, Clone, PartialEq)]
pub struct Fid {
    /// `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`.
    pub value: f64,
    /// Feature dimension.
    pub dim: usize,
    /// Numerical ranks of the two covariances.
    pub rank: [usize; 2],
    /// Images behind each covariance.
    pub count: [u64; 2],
}

impl Fid {
    /// Whether both covariances have full rank. With fewer images than
    /// dimensions (rank <= n - 1 < d) they cannot, and FID is biased upward
    /// and not comparable with FIDs from more images.
    pub fn full_rank(&self) -> bool {
        self.rank.iter().all(|&r| r == self.dim)
    }
}

/// The Fréchet distance between two Gaussians fitted to features, as
/// pytorch-fid's `calculate_frechet_distance`.
///
/// pytorch-fid takes `scipy.linalg.sqrtm(S1 S2)` (adding `eps I` to both when
/// that is not finite) and the trace of its real part. `S1 S2` is similar to
/// the symmetric positive semi-definite `sqrt(S1) S2 sqrt(S1)`, so the trace
/// of its principal square root is the sum of the square roots of that
/// matrix's eigenvalues: two symmetric eigendecompositions, always finite,
/// with eigenvalues below zero by rounding set to zero (scipy's Schur route
/// turns them into imaginary parts, which pytorch-fid drops). The two agree
/// to 1e-10 relative at full rank and to 3e-9 below it (tests).
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<Fid> {
    if a.dim() != b.dim() {
        return Err(metric_err(format!(
            "FID: {}-d statistics against {}-d statistics",
            a.dim(),
            b.dim()
        )));
    }
    let (s1, s2) = (a.covariance()?, b.covariance()?);
    let (mu1, mu2) = (a.mean(), b.mean());
    let diff: f64 = mu1.iter().zip(&mu2).map(|(x, y)| (x - y) * (x - y)).sum();
    let d = a.dim();
    let tr = |m: &Mat<f64>| (0..d).map(|i| m[(i, i)]).sum::<f64>();

    let e1 = s1.self_adjoint_eigen(Side::Lower).map_err(eig_err)?;
    let l1: Vec<f64> = e1.S().column_vector().iter().copied().collect();
    let u1 = e1.U();
    // sqrt(S1) = U diag(sqrt(l)) U^T, the diagonal applied to U's columns.
    let us = Mat::from_fn(d, d, |i, j| u1[(i, j)] * l1[j].max(0.0).sqrt());
    let sqrt1 = &us * u1.transpose();
    let m = &sqrt1 * &s2 * &sqrt1;
    let m = symmetrise(m.as_ref());
    let lm = m.self_adjoint_eigenvalues(Side::Lower).map_err(eig_err)?;
    let tr_covmean: f64 = lm.iter().map(|l| l.max(0.0).sqrt()).sum();

    let l2 = s2.self_adjoint_eigenvalues(Side::Lower).map_err(eig_err)?;
    Ok(Fid {
        value: diff + tr(&s1) + tr(&s2) - 2.0 * tr_covmean,
        dim: d,
        rank: [rank(&l1, a), rank(&l2, b)],
        count: [a.count(), b.count()],
    })
}

/// `(m + m^T) / 2`: removes the rounding asymmetry of a product.
fn symmetrise(m: MatRef<'_, f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| 0.5 * (m[(i, j)] + m[(j, i)]))
}

/// Numerical rank of a covariance from its eigenvalues: those above
/// `d * eps` times the larger of the top eigenvalue and the largest second
/// moment (the sums the covariance was cancelled from set its rounding), and
/// never above `n - 1`.
fn rank(l: &[f64], st: &GaussianStats) -> usize {
    let top = l.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let n = st.count();
    let moment = (0..st.dim())
        .map(|i| st.outer[(i, i)] / (n.max(2) - 1) as f64)
        .fold(0.0f64, f64::max);
    let tol = top.max(moment) * l.len() as f64 * f64::EPSILON;
    let r = l.iter().filter(|v| **v > tol).count();
    r.min(n.saturating_sub(1) as usize)
}

fn eig_err(e: faer::linalg::evd::EvdError) -> GanError {
    metric_err(format!("FID: eigendecomposition failed ({e:?})"))
}

/// KID's settings: clean-fid's and torchmetrics' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KidOptions {
    /// Subsets drawn (100).
    pub subsets: usize,
    /// Images per subset (1000); fewer when a set is smaller (clean-fid's
    /// `min(len, 1000)`).
    pub subset_size: usize,
    /// Seed of the subset draws.
    pub seed: u64,
}

impl Default for KidOptions {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: 1000,
            seed: 0,
        }
    }
}

/// Kernel Inception Distance: mean and (population) standard deviation
/// over subsets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    /// Mean of the subsets' unbiased MMD^2.
    pub mean: f64,
    /// Their standard deviation (torchmetrics' `std(unbiased=False)`).
    pub std: f64,
    /// Images per subset.
    pub subset_size: usize,
    /// Whether every subset is the whole set, for the real and the fake
    /// images: a set no larger than the subset size is drawn whole each time
    /// (only reordered), so the subsets vary on the other side alone, and
    /// when both are whole every subset gives the same MMD and `std` is
    /// rounding, not an estimate.
    pub whole_set: [bool; 2],
}

/// The unbiased MMD^2 of one subset pair (equal sizes `m`) with the cubic
/// polynomial kernel `k(x, y) = (x.y / d + 1)^3`: clean-fid's
/// `kernel_distance` per subset, torchmetrics' `poly_mmd`.
pub fn kid_mmd(x: &Features, y: &Features) -> Result<f64> {
    let m = x.len();
    if m != y.len() || m < 2 || x.dim() != y.dim() {
        return Err(metric_err(format!(
            "KID: subsets of {}x{} and {}x{} (need equal sizes of at least 2)",
            x.len(),
            x.dim(),
            y.len(),
            y.dim()
        )));
    }
    let d = x.dim() as f64;
    let (xm, ym) = (x.mat(), y.mat());
    let k = |a: &Mat<f64>, b: &Mat<f64>| {
        let g = a * b.transpose();
        let (mut all, mut diag) = (0.0, 0.0);
        for j in 0..g.ncols() {
            for i in 0..g.nrows() {
                let v = (g[(i, j)] / d + 1.0).powi(3);
                all += v;
                if i == j {
                    diag += v;
                }
            }
        }
        (all, diag)
    };
    let (xx, xd) = k(&xm, &xm);
    let (yy, yd) = k(&ym, &ym);
    let (xy, _) = k(&xm, &ym);
    let mf = m as f64;
    Ok((xx - xd + yy - yd) / (mf * (mf - 1.0)) - 2.0 * xy / (mf * mf))
}

/// KID over `opts.subsets` random subsets of `min(subset_size, len)` rows of
/// each set, drawn without replacement (torchmetrics' `randperm[:m]`).
///
/// The subsets are drawn in order from `opts.seed` first; their MMDs are then
/// computed on rayon's threads and kept in subset order, so the result does
/// not depend on the number of threads.
pub fn kid(real: &Features, fake: &Features, opts: KidOptions) -> Result<Kid> {
    let m = opts.subset_size.min(real.len()).min(fake.len());
    if opts.subsets == 0 {
        return Err(metric_err("KID: subsets must be at least 1"));
    }
    let mut rng = SeededRng::new(opts.seed);
    let draws: Vec<(Vec<usize>, Vec<usize>)> = (0..opts.subsets)
        .map(|_| {
            let ir = rng.permutation(real.len())[..m].to_vec();
            let jf = rng.permutation(fake.len())[..m].to_vec();
            (ir, jf)
        })
        .collect();
    let scores = draws
        .par_iter()
        .map(|(ir, jf)| kid_mmd(&real.select(ir), &fake.select(jf)))
        .collect::<Result<Vec<f64>>>()?;
    let (mean, var) = mean_var(&scores, 0);
    Ok(Kid {
        mean,
        std: var.sqrt(),
        subset_size: m,
        whole_set: [m == real.len(), m == fake.len()],
    })
}

/// Mean and variance with `ddof`.
fn mean_var(v: &[f64], ddof: usize) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let ss: f64 = v.iter().map(|x| (x - mean) * (x - mean)).sum();
    let denom = n - ddof as f64;
    (mean, if denom > 0.0 { ss / denom } else { f64::NAN })
}

/// Euclidean distances between the rows of `a` and of `b`, `[a.len(), b.len()]`
/// column-major in a faer matrix, from `|x|^2 + |y|^2 - 2 x.y` (sklearn's
/// `euclidean_distances`, which `prdc` uses).
fn distances(a: &Features, b: &Features) -> Mat<f64> {
    let (am, bm) = (a.mat(), b.mat());
    let g = &am * bm.transpose();
    let na: Vec<f64> = (0..a.len()).map(|i| dot(a.row(i), a.row(i))).collect();
    let nb: Vec<f64> = (0..b.len()).map(|j| dot(b.row(j), b.row(j))).collect();
    Mat::from_fn(a.len(), b.len(), |i, j| {
        (na[i] + nb[j] - 2.0 * g[(i, j)]).max(0.0).sqrt()
    })
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Rows of `a` per distance chunk.
const CHUNK: usize = 512;

/// `f(first_row, distances)` for chunks of at most [`CHUNK`] rows of `a`
/// against all of `b`, on rayon's threads, the results in chunk order.
/// Memory is bounded by `CHUNK x b.len()` per thread; each chunk's distances
/// are the same whichever thread computes them.
fn distance_chunks<T: Send>(
    a: &Features,
    b: &Features,
    f: impl Fn(usize, &Mat<f64>) -> T + Sync,
) -> Vec<T> {
    let starts: Vec<usize> = (0..a.len()).step_by(CHUNK).collect();
    starts
        .into_par_iter()
        .map(|start| {
            let idx: Vec<usize> = (start..(start + CHUNK).min(a.len())).collect();
            f(start, &distances(&a.select(&idx), b))
        })
        .collect()
}

/// Distance from each row to its `k`-th nearest other row (`prdc`'s
/// `compute_nearest_neighbour_distances`: the (k+1)-th smallest with itself).
fn kth_neighbour(f: &Features, k: usize) -> Vec<f64> {
    distance_chunks(f, f, |_, d| {
        (0..d.nrows())
            .map(|i| {
                let mut row: Vec<f64> = (0..d.ncols()).map(|j| d[(i, j)]).collect();
                let (_, v, _) = row.select_nth_unstable_by(k, f64::total_cmp);
                *v
            })
            .collect::<Vec<f64>>()
    })
    .concat()
}

/// Precision, recall, density and coverage (Naeem et al. 2020).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prdc {
    /// Share of generated images inside some real image's k-NN ball.
    pub precision: f64,
    /// Share of real images inside some generated image's k-NN ball.
    pub recall: f64,
    /// Mean count of real k-NN balls holding a generated image, over k.
    pub density: f64,
    /// Share of real images whose k-NN ball holds a generated image.
    pub coverage: f64,
    /// The k.
    pub k: usize,
}

/// PRDC with `k` nearest neighbours, as `prdc.compute_prdc`.
pub fn prdc(real: &Features, fake: &Features, k: usize) -> Result<Prdc> {
    if k == 0 || real.len() <= k || fake.len() <= k || real.dim() != fake.dim() {
        return Err(metric_err(format!(
            "PRDC: k = {k} needs more than k images in each set and equal dimensions \
             (got {}x{} real, {}x{} generated)",
            real.len(),
            real.dim(),
            fake.len(),
            fake.dim()
        )));
    }
    let rr = kth_neighbour(real, k);
    let ff = kth_neighbour(fake, k);
    let (nr, nf) = (real.len(), fake.len());
    // Each chunk of real rows: which generated images fell in its balls, and
    // its counts; combined below (an OR and integer sums: order-free).
    let parts = distance_chunks(real, fake, |start, d| {
        let mut fake_inside = vec![false; nf];
        let (mut balls_holding, mut recall, mut coverage) = (0usize, 0usize, 0usize);
        for r in 0..d.nrows() {
            let i = start + r;
            let (mut recalled, mut nearest) = (false, f64::INFINITY);
            for (j, inside) in fake_inside.iter_mut().enumerate() {
                let v = d[(r, j)];
                if v < rr[i] {
                    *inside = true;
                    balls_holding += 1;
                }
                recalled |= v < ff[j];
                nearest = nearest.min(v);
            }
            recall += usize::from(recalled);
            coverage += usize::from(nearest < rr[i]);
        }
        (fake_inside, balls_holding, recall, coverage)
    });
    let mut fake_inside = vec![false; nf];
    let (mut balls_holding, mut recall, mut coverage) = (0usize, 0usize, 0usize);
    for (inside, b, r, c) in parts {
        fake_inside
            .iter_mut()
            .zip(inside)
            .for_each(|(x, y)| *x |= y);
        balls_holding += b;
        recall += r;
        coverage += c;
    }
    let precision = fake_inside.iter().filter(|&&b| b).count();
    Ok(Prdc {
        precision: precision as f64 / nf as f64,
        recall: recall as f64 / nr as f64,
        density: balls_holding as f64 / (k as f64 * nf as f64),
        coverage: coverage as f64 / nr as f64,
        k,
    })
}

/// Inception Score: mean and (unbiased) standard deviation over splits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InceptionScore {
    /// Mean over splits of `exp(E_x KL(p(y|x) || p(y)))`.
    pub mean: f64,
    /// Standard deviation over splits (`torch.std`, ddof = 1).
    pub std: f64,
    /// Splits used (`torch.chunk` may give fewer than asked).
    pub splits: usize,
}

/// Inception Score of class `logits` in `splits` chunks, as torchmetrics'
/// `InceptionScore.compute` after its shuffle (the rows are taken in the
/// order given: generated images are already independent draws).
pub fn inception_score(logits: &Features, splits: usize) -> Result<InceptionScore> {
    let n = logits.len();
    if splits == 0 || n == 0 {
        return Err(metric_err(format!(
            "Inception Score: {n} images in {splits} splits"
        )));
    }
    // Row-wise softmax and log-softmax in f64.
    let c = logits.dim();
    let mut p = vec![0.0; n * c];
    let mut lp = vec![0.0; n * c];
    for i in 0..n {
        let r = logits.row(i);
        let mx = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = mx + r.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        for j in 0..c {
            lp[i * c + j] = r[j] - lse;
            p[i * c + j] = lp[i * c + j].exp();
        }
    }
    // torch.chunk: chunks of ceil(n / splits) rows, the last one shorter.
    let size = n.div_ceil(splits);
    let mut scores = Vec::new();
    for start in (0..n).step_by(size) {
        let end = (start + size).min(n);
        let rows = (end - start) as f64;
        let mut marg = vec![0.0; c];
        for i in start..end {
            for j in 0..c {
                marg[j] += p[i * c + j] / rows;
            }
        }
        let mut kl = 0.0;
        for i in start..end {
            for j in 0..c {
                kl += p[i * c + j] * (lp[i * c + j] - marg[j].ln());
            }
        }
        scores.push((kl / rows).exp());
    }
    let (mean, var) = mean_var(&scores, 1);
    Ok(InceptionScore {
        mean,
        std: var.sqrt(),
        splits: scores.len(),
    })
}

/// Distance from each row of `queries` to its nearest row of `refs`.
pub fn nearest_distances(queries: &Features, refs: &Features) -> Result<Vec<f64>> {
    if queries.dim() != refs.dim() || refs.is_empty() {
        return Err(metric_err(format!(
            "nearest neighbours: {}-d queries against {} rows of {}-d",
            queries.dim(),
            refs.len(),
            refs.dim()
        )));
    }
    Ok(distance_chunks(queries, refs, |_, d| {
        (0..d.nrows())
            .map(|i| {
                (0..d.ncols())
                    .map(|j| d[(i, j)])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect::<Vec<f64>>()
    })
    .concat())
}

/// The nearest-training-image check: generated images should be no closer to
/// their nearest training image than held-out real images are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memorisation {
    /// Median distance from a generated image to its nearest training image.
    pub generated_median: f64,
    /// The same for held-out real images (the reference split).
    pub held_out_median: f64,
    /// `generated_median / held_out_median`: well below 1 suggests copying.
    pub ratio: f64,
    /// Share of generated images closer to a training image than the 1st
    /// percentile of held-out images' nearest distances (about 0.01 for a
    /// generator that does not copy).
    pub near_copies: f64,
}

/// The memorisation check of `generated` against `train`, calibrated by the
/// held-out real images.
pub fn memorisation(
    generated: &Features,
    train: &Features,
    held_out: &Features,
) -> Result<Memorisation> {
    if generated.is_empty() || held_out.is_empty() {
        return Err(metric_err("memorisation: no generated or held-out images"));
    }
    let mut g = nearest_distances(generated, train)?;
    let mut h = nearest_distances(held_out, train)?;
    g.sort_by(f64::total_cmp);
    h.sort_by(f64::total_cmp);
    let median = |v: &[f64]| {
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    };
    // numpy's default (linear) percentile.
    let pos = 0.01 * (h.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos.fract());
    let p1 = h[lo] + frac * (h[(lo + 1).min(h.len() - 1)] - h[lo]);
    let (gm, hm) = (median(&g), median(&h));
    Ok(Memorisation {
        generated_median: gm,
        held_out_median: hm,
        ratio: gm / hm,
        near_copies: g.iter().filter(|&&v| v < p1).count() as f64 / g.len() as f64,
    })
}

fn metric_err(msg: impl Into<String>) -> GanError {
    GanError::Metric(msg.into())
}
