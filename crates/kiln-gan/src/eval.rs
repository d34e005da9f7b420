//! Evaluating a generator: features of real images (cached under a hash of
//! the extractor and of the images themselves), features of generated
//! images, and the report of every metric, naming the extractor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    /// Whether both covariances had full rank (false with fewer images than
    /// dimensions: FID is then biased and not comparable).
    pub fid_full_rank: bool,
    /// The covariances' numerical ranks (reference, generated).
    pub fid_rank: [usize; 2],
    /// KID mean.
    pub kid_mean: f64,
    /// KID standard deviation over subsets.
    pub kid_std: f64,
    /// KID subsets.
    pub kid_subsets: usize,
    /// Images per KID subset.
    pub kid_subset_size: usize,
    /// PRDC precision.
    pub precision: f64,
    /// PRDC recall.
    pub recall: f64,
    /// PRDC density.
    pub density: f64,
    /// PRDC coverage.
    pub coverage: f64,
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
                " (covariance ranks {} and {} below the {} dimensions: fewer images than \
                 dimensions, so this FID is biased upward and not comparable)",
                self.fid_rank[0], self.fid_rank[1], self.dim
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "KID {} +- {} ({} subsets of {})",
            num(self.kid_mean),
            num(self.kid_std),
            self.kid_subsets,
            self.kid_subset_size
        )?;
        writeln!(
            f,
            "precision {:.4}, recall {:.4}, density {:.4}, coverage {:.4} (k = {})",
            self.precision, self.recall, self.density, self.coverage, self.prdc_k
        )?;
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

/// Features of the first `limit` images of `ds` (all when `None`), read
/// once. With `cache`, they are kept in
/// `cache/<extractor hash>-<data hash>.safetensors`, the data hash covering
/// every pixel and the count, so a changed dataset or extractor never reads
/// stale features.
pub fn dataset_features(
    ex: &dyn FeatureExtractor,
    ds: &dyn Dataset,
    limit: Option<usize>,
    batch: usize,
    device: &Device,
    cache: Option<&Path>,
) -> Result<Features> {
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
    let file: Option<PathBuf> =
        cache.map(|c| c.join(format!("{}-{}.safetensors", ex.hash(), h.hex())));
    if let Some(f) = file.as_ref().filter(|f| f.is_file()) {
        let t = kiln_core::candle::safetensors::load(f, &Device::Cpu).map_err(|e| {
            GanError::Metric(format!("feature cache {}: {e}; delete it", f.display()))
        })?;
        match t.get("features").map(|t| t.dims2()) {
            Some(Ok((rows, d))) if rows == n && d == ex.dim() => {
                return Features::from_tensor(&t["features"]);
            }
            _ => {
                return Err(GanError::Metric(format!(
                    "feature cache {}: does not hold {n} x {} features; delete it",
                    f.display(),
                    ex.dim()
                )))
            }
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
    if let Some(f) = file {
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| GanError::Metric(format!("feature cache {}: {e}", dir.display())))?;
        }
        let t = Tensor::from_vec(
            e.features
                .as_slice()
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<f32>>(),
            (n, ex.dim()),
            &Device::Cpu,
        )?;
        // The features are f32 outputs, so f32 keeps them exactly.
        let tmp = f.with_extension(format!("tmp-{}", std::process::id()));
        kiln_core::candle::safetensors::save(&HashMap::from([("features".to_string(), t)]), &tmp)?;
        std::fs::rename(&tmp, &f)
            .map_err(|e| GanError::Metric(format!("feature cache {}: {e}", f.display())))?;
    }
    Ok(e.features)
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
    let p = prdc(reference, g, opts.prdc_k)?;
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
        kid_std: k.std,
        kid_subsets: opts.kid.subsets,
        kid_subset_size: k.subset_size,
        precision: p.precision,
        recall: p.recall,
        density: p.density,
        coverage: p.coverage,
        prdc_k: p.k,
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
