//! Evaluating a generator: features of real images (cached under a hash of
//! the extractor and of the images themselves), features of generated
//! images, and the report of every metric, naming the extractor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_core::checkpoint::read_tensors;
use kiln_core::rng::SeededRng;
use kiln_core::{DType, Device, Tensor};
use kiln_data::Dataset;
use serde::Serialize;

use crate::error::{GanError, Result};
use crate::metrics::{
    frechet_distance, inception_score, kid, memorisation, prdc, Extracted, FeatureExtractor,
    Features, GaussianStats, KidOptions, Memorisation,
};
use crate::model::Generator;

/// How to evaluate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// Generated images (10,000 for FID comparisons as in StudioGAN).
    pub n: usize,
    /// Images per extractor batch (pytorch-fid's default 50).
    pub batch: usize,
    /// Seed of the latents.
    pub seed: u64,
    /// KID's subsets.
    pub kid: KidOptions,
    /// PRDC's k (5).
    pub prdc_k: usize,
    /// Inception Score splits (10).
    pub is_splits: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            n: 10_000,
            batch: 50,
            seed: 0,
            kid: KidOptions::default(),
            prdc_k: 5,
            is_splits: 10,
        }
    }
}

/// Every metric of one evaluation, with what it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The extractor's name.
    pub extractor: String,
    /// Its hash (weights and settings).
    pub extractor_hash: String,
    /// What the generated images were compared with (dataset and split).
    pub reference: String,
    /// Generated images.
    pub n_generated: usize,
    /// Reference images.
    pub n_reference: usize,
    /// Feature dimension.
    pub dim: usize,
    /// FID.
    pub fid: f64,
    /// Whether both covariances had full rank (false with no more images
    /// than dimensions, or with degenerate features: FID is then not
    /// comparable).
    pub fid_full_rank: bool,
    /// The covariances' numerical ranks (reference, generated).
    pub fid_rank: [usize; 2],
    /// KID mean.
    pub kid_mean: f64,
    /// KID standard deviation over subsets; `None` when every subset of both
    /// sets is the whole set (every subset then gives the same MMD, so there
    /// is no spread to estimate).
    pub kid_std: Option<f64>,
    /// KID subsets.
    pub kid_subsets: usize,
    /// Images per KID subset.
    pub kid_subset_size: usize,
    /// Whether KID's subsets are the whole set (reference, generated).
    pub kid_whole_set: [bool; 2],
    /// PRDC precision (`None`: PRDC skipped, too few images for its k).
    pub precision: Option<f64>,
    /// PRDC recall (`None`: skipped).
    pub recall: Option<f64>,
    /// PRDC density (`None`: skipped).
    pub density: Option<f64>,
    /// PRDC coverage (`None`: skipped).
    pub coverage: Option<f64>,
    /// PRDC's k.
    pub prdc_k: usize,
    /// Inception Score (mean, std) when the extractor has class logits.
    pub inception_score: Option<(f64, f64)>,
    /// The nearest-training-image check, when training features were given.
    pub memorisation: Option<MemorisationReport>,
}

/// [`Memorisation`] in a report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemorisationReport {
    /// Median nearest-training distance of generated images.
    pub generated_median: f64,
    /// The same for held-out real images.
    pub held_out_median: f64,
    /// Their ratio (well below 1: copying).
    pub ratio: f64,
    /// Share of generated images nearer a training image than 99% of
    /// held-out images are.
    pub near_copies: f64,
    /// Training images searched.
    pub n_train: usize,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "extractor: {} (hash {}, {}-d)",
            self.extractor, self.extractor_hash, self.dim
        )?;
        writeln!(
            f,
            "{} generated images against {} images of {}",
            self.n_generated, self.n_reference, self.reference
        )?;
        write!(f, "FID {}", num(self.fid))?;
        if !self.fid_full_rank {
            write!(
                f,
                " (covariance ranks {} and {} of {} dimensions: {})",
                self.fid_rank[0],
                self.fid_rank[1],
                self.dim,
                self.rank_reason()
            )?;
        }
        writeln!(f)?;
        let [whole_ref, whole_gen] = self.kid_whole_set;
        match self.kid_std {
            None => writeln!(
                f,
                "KID {} +- n/a (subsets are the whole set): {} images each side, so every one \
                 of the {} subsets gives the same value and there is no spread to estimate",
                num(self.kid_mean),
                self.kid_subset_size,
                self.kid_subsets
            )?,
            Some(sd) => {
                write!(
                    f,
                    "KID {} +- {} ({} subsets of {}",
                    num(self.kid_mean),
                    num(sd),
                    self.kid_subsets,
                    self.kid_subset_size
                )?;
                match (whole_ref, whole_gen) {
                    (true, false) => write!(
                        f,
                        "; the reference subsets are the whole set, so the +- reflects the \
                         generated images' draws only"
                    )?,
                    (false, true) => write!(
                        f,
                        "; the generated subsets are the whole set, so the +- reflects the \
                         reference images' draws only"
                    )?,
                    _ => {}
                }
                writeln!(f, ")")?;
            }
        }
        match (self.precision, self.recall, self.density, self.coverage) {
            (Some(p), Some(r), Some(d), Some(c)) => writeln!(
                f,
                "precision {p:.4}, recall {r:.4}, density {d:.4}, coverage {c:.4} (k = {})",
                self.prdc_k
            )?,
            _ => writeln!(
                f,
                "precision / recall / density / coverage: skipped: k = {} nearest neighbours \
                 need at least {} images in each set ({} generated, {} reference)",
                self.prdc_k,
                self.prdc_k + 1,
                self.n_generated,
                self.n_reference
            )?,
        }
        match self.inception_score {
            Some((m, s)) => writeln!(f, "Inception Score {} +- {}", num(m), num(s))?,
            None => writeln!(
                f,
                "Inception Score: not available (the extractor has no classifier)"
            )?,
        }
        if let Some(m) = &self.memorisation {
            writeln!(
                f,
                "memorisation: median nearest-training distance {} generated vs {} held-out \
                 (ratio {:.3}); {:.1}% of generated images nearer than 99% of held-out ones \
                 ({} training images)",
                num(m.generated_median),
                num(m.held_out_median),
                m.ratio,
                100.0 * m.near_copies,
                m.n_train
            )?;
        }
        Ok(())
    }
}

impl EvalReport {
    /// Why a covariance is below full rank: too few images for the
    /// dimensions (a covariance of `n` images has rank at most `n - 1`), or,
    /// with enough images, features that are degenerate (collinear, or
    /// constant along some direction).
    fn rank_reason(&self) -> String {
        let d = self.dim;
        let low: Vec<(&str, usize)> = [
            ("reference", self.n_reference, self.fid_rank[0]),
            ("generated", self.n_generated, self.fid_rank[1]),
        ]
        .into_iter()
        .filter(|&(_, _, r)| r < d)
        .map(|(which, n, _)| (which, n))
        .collect();
        let few: Vec<String> = low
            .iter()
            .filter(|(_, n)| *n <= d)
            .map(|(which, n)| format!("{n} {which} images"))
            .collect();
        let degenerate: Vec<String> = low
            .iter()
            .filter(|(_, n)| *n > d)
            .map(|(which, n)| format!("{which} ({n} images)"))
            .collect();
        let mut why = Vec::new();
        if !few.is_empty() {
            why.push(format!(
                "{} for {d} dimensions (a covariance of n images has rank at most n - 1)",
                few.join(" and ")
            ));
        }
        if !degenerate.is_empty() {
            why.push(format!(
                "degenerate {} features although there are more images than dimensions: \
                 collinear, or constant along some direction (check the extractor)",
                degenerate.join(" and ")
            ));
        }
        let effect = match few.is_empty() {
            true => "this FID is not comparable",
            false => "this FID is biased upward and not comparable",
        };
        format!("{}; {effect}", why.join("; "))
    }
}

/// Four decimals, or four significant digits for values below 1e-3 (an
/// extractor's scale sets the metrics' scale).
fn num(x: f64) -> String {
    match x != 0.0 && x.abs() < 1e-3 {
        true => format!("{x:.3e}"),
        false => format!("{x:.4}"),
    }
}

/// Images `[B, 3, H, W]` in `[0, 1]` for an extractor: grayscale repeated
/// to three channels.
fn rgb(x: Tensor) -> kiln_core::Result<Tensor> {
    match x.dim(1)? {
        1 => x.repeat((1, 3, 1, 1)),
        _ => Ok(x),
    }
}

/// Features of batches of images.
fn extract_all(
    ex: &dyn FeatureExtractor,
    mut next: impl FnMut(usize, usize) -> Result<Tensor>,
    n: usize,
    batch: usize,
) -> Result<Extracted> {
    let mut feats = Features::empty(ex.dim());
    let mut logits: Option<Features> = None;
    for start in (0..n).step_by(batch.max(1)) {
        let b = batch.min(n - start);
        let e = ex.extract(&rgb(next(start, b)?)?)?;
        feats.extend(&e.features)?;
        if let Some(l) = e.logits {
            match &mut logits {
                Some(all) => all.extend(&l)?,
                None => logits = Some(l),
            }
        }
    }
    Ok(Extracted {
        features: feats,
        logits,
    })
}

/// FNV-1a (64-bit), fed in pieces.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Feeds bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Feeds f32 values by their bits.
    pub fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.bytes(&x.to_bits().to_le_bytes());
        }
    }

    /// The hash in hex.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// What [`dataset_features_cached`] did with the feature cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache folder was given: the features were extracted.
    Off,
    /// The features were read from this file, its checksum verified.
    Read(PathBuf),
    /// The features were extracted and written to this file.
    Written(PathBuf),
    /// This file was damaged (a checksum mismatch, a truncated file, the
    /// wrong shape) or unreadable: the features were extracted again and the
    /// file replaced.
    Rebuilt {
        /// The cache file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
}

/// Features of the first `limit` images of `ds` (all when `None`), read
/// once. With `cache`, they are kept in
/// `cache/<extractor hash>-<data hash>.safetensors`, the data hash covering
/// every pixel and the count, so a changed dataset or extractor never reads
/// stale features. The file carries a CRC-32 of its data (kiln-core's
/// checkpoint format), checked on every read; a damaged file is reported on
/// stderr (`warning: feature cache ...`) and rebuilt.
pub fn dataset_features(
    ex: &dyn FeatureExtractor,
    ds: &dyn Dataset,
    limit: Option<usize>,
    batch: usize,
    device: &Device,
    cache: Option<&Path>,
) -> Result<Features> {
    let (f, used) = dataset_features_cached(ex, ds, limit, batch, device, cache)?;
    if let CacheUse::Rebuilt { path, reason } = used {
        eprintln!(
            "warning: feature cache {} was damaged ({reason}); extracted the features again \
             and rewrote it",
            path.display()
        );
    }
    Ok(f)
}

/// [`dataset_features`], saying what it did with the cache instead of
/// printing a warning for a damaged file.
pub fn dataset_features_cached(
    ex: &dyn FeatureExtractor,
    ds: &dyn Dataset,
    limit: Option<usize>,
    batch: usize,
    device: &Device,
    cache: Option<&Path>,
) -> Result<(Features, CacheUse)> {
    if let Some(c) = cache.filter(|c| c.exists() && !c.is_dir()) {
        return Err(GanError::Metric(format!(
            "feature cache {}: a file is there, but the cache is a folder (its files are named \
             after the extractor and the images); give a folder, or move the file away",
            c.display()
        )));
    }
    let n = limit.unwrap_or(ds.len()).min(ds.len());
    if n == 0 {
        return Err(GanError::Metric(format!(
            "{}: no images to evaluate against",
            ds.name()
        )));
    }
    let mut images = Vec::with_capacity(n);
    let mut h = Fnv::default();
    h.bytes(&(n as u64).to_le_bytes());
    for i in 0..n {
        let s = ds.get(i)?;
        h.bytes(
            &(s.image.shape().map(|d| d as u64))
                .map(u64::to_le_bytes)
                .concat(),
        );
        h.f32s(&s.image.data);
        images.push(s.image);
    }
    let meta = HashMap::from([
        ("kiln-gan.extractor".to_string(), ex.hash()),
        ("kiln-gan.data".to_string(), h.hex()),
    ]);
    let file: Option<PathBuf> =
        cache.map(|c| c.join(format!("{}-{}.safetensors", ex.hash(), h.hex())));
    let mut damaged = None;
    if let Some(f) = file.as_ref().filter(|f| f.exists()) {
        match read_cache(f, n, ex.dim(), &meta) {
            Ok(features) => return Ok((features, CacheUse::Read(f.clone()))),
            Err(reason) => damaged = Some(reason),
        }
    }
    let e = extract_all(
        ex,
        |start, b| {
            let imgs: Vec<Tensor> = images[start..start + b]
                .iter()
                .map(|im| Tensor::from_vec(im.data.clone(), im.shape().to_vec(), device))
                .collect::<kiln_core::Result<_>>()?;
            Ok(Tensor::stack(&imgs, 0)?)
        },
        n,
        batch,
    )?;
    let Some(f) = file else {
        return Ok((e.features, CacheUse::Off));
    };
    let t = Tensor::from_vec(
        e.features
            .as_slice()
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<f32>>(),
        (n, ex.dim()),
        &Device::Cpu,
    )?;
    // The features are f32 outputs, so f32 keeps them exactly. Written
    // atomically (temp file, rename) with a CRC-32 of the data.
    kiln_core::checkpoint::save_safetensors(&[("features".to_string(), t)], Some(meta), &f)
        .map_err(|e| GanError::Metric(format!("feature cache {}: {e}", f.display())))?;
    let used = match damaged {
        Some(reason) => CacheUse::Rebuilt { path: f, reason },
        None => CacheUse::Written(f),
    };
    Ok((e.features, used))
}

/// The `n x dim` features of a cache file, its checksum and metadata
/// verified; what is wrong with it otherwise.
fn read_cache(
    f: &Path,
    n: usize,
    dim: usize,
    meta: &HashMap<String, String>,
) -> std::result::Result<Features, String> {
    use kiln_core::checkpoint::CheckpointError;
    let (t, stored) = read_tensors(f, &Device::Cpu).map_err(|e| match e {
        CheckpointError::Invalid { reason, .. } => reason,
        CheckpointError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    })?;
    for (k, v) in meta {
        if stored.get(k) != Some(v) {
            return Err(format!(
                "its {k} is {:?}, expected {v:?}",
                stored.get(k).map_or("missing", String::as_str)
            ));
        }
    }
    let features = t
        .get("features")
        .ok_or_else(|| "no `features` tensor".to_string())?;
    match features.dims2() {
        Ok((rows, d)) if rows == n && d == dim => {}
        _ => {
            return Err(format!(
                "holds features of shape {:?}, expected [{n}, {dim}]",
                features.dims()
            ))
        }
    }
    Features::from_tensor(features).map_err(|e| e.to_string())
}

/// Features (and logits) of `n` images from `g` in evaluation mode, latents
/// from `seed`; a conditional generator cycles through its classes.
pub fn generated_features(
    ex: &dyn FeatureExtractor,
    g: &Generator,
    num_classes: Option<usize>,
    n: usize,
    batch: usize,
    seed: u64,
    device: &Device,
) -> Result<Extracted> {
    let mut rng = SeededRng::new(seed);
    extract_all(
        ex,
        |start, b| {
            let labels = match num_classes {
                Some(k) => Some(Tensor::new(
                    (start..start + b)
                        .map(|i| (i % k) as u32)
                        .collect::<Vec<_>>(),
                    device,
                )?),
                None => None,
            };
            let x = g.sample(b, labels.as_ref(), &mut rng)?;
            // The generator's tanh range [-1, 1] to the extractor's [0, 1].
            Ok(((x.to_dtype(DType::F32)? + 1.0)? * 0.5)?.clamp(0f32, 1f32)?)
        },
        n,
        batch,
    )
}

/// Every metric of `generated` against `reference` (and the memorisation
/// check against `train` when given).
pub fn evaluate(
    ex: &dyn FeatureExtractor,
    generated: &Extracted,
    reference: &Features,
    reference_name: &str,
    train: Option<&Features>,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let g = &generated.features;
    let fid = frechet_distance(&GaussianStats::of(reference)?, &GaussianStats::of(g)?)?;
    let k = kid(reference, g, opts.kid)?;
    // PRDC needs more than k images in each set; with fewer it is skipped
    // (said in the report) rather than losing FID and KID with it.
    let p = match reference.len() > opts.prdc_k && g.len() > opts.prdc_k {
        true => Some(prdc(reference, g, opts.prdc_k)?),
        false => None,
    };
    let is = match &generated.logits {
        Some(l) => {
            let s = inception_score(l, opts.is_splits)?;
            Some((s.mean, s.std))
        }
        None => None,
    };
    let mem = match train {
        Some(t) => {
            let m: Memorisation = memorisation(g, t, reference)?;
            Some(MemorisationReport {
                generated_median: m.generated_median,
                held_out_median: m.held_out_median,
                ratio: m.ratio,
                near_copies: m.near_copies,
                n_train: t.len(),
            })
        }
        None => None,
    };
    Ok(EvalReport {
        extractor: ex.name(),
        extractor_hash: ex.hash(),
        reference: reference_name.to_string(),
        n_generated: g.len(),
        n_reference: reference.len(),
        dim: g.dim(),
        fid: fid.value,
        fid_full_rank: fid.full_rank(),
        fid_rank: fid.rank,
        kid_mean: k.mean,
        kid_std: (!(k.whole_set[0] && k.whole_set[1])).then_some(k.std),
        kid_subsets: opts.kid.subsets,
        kid_subset_size: k.subset_size,
        kid_whole_set: k.whole_set,
        precision: p.map(|p| p.precision),
        recall: p.map(|p| p.recall),
        density: p.map(|p| p.density),
        coverage: p.map(|p| p.coverage),
        prdc_k: opts.prdc_k,
        inception_score: is,
        memorisation: mem,
    })
}

/// Features of a generator collapsed to one image: `g`'s first image from
/// `seed`, repeated `n` times. A baseline for the report: recall and
/// coverage near zero, the FID of a single mode.
pub fn collapsed_features(
    ex: &dyn FeatureExtractor,
    g: &Generator,
    num_classes: Option<usize>,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<Extracted> {
    let one = generated_features(ex, g, num_classes, 1, 1, seed, device)?;
    let rep = |f: &Features| -> Result<Features> {
        let mut all = Features::empty(f.dim());
        for _ in 0..n {
            all.extend(f)?;
        }
        Ok(all)
    };
    Ok(Extracted {
        features: rep(&one.features)?,
        logits: one.logits.as_ref().map(rep).transpose()?,
    })
}
