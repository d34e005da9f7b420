//! Test-set evaluation: negative ELBO in nats per image and bits per
//! dimension, and the importance-weighted (IWAE, Burda et al. 2015) bound.

use std::sync::Arc;

use kiln_core::rng::SeededRng;
use kiln_core::{Device, Tensor};
use kiln_data::{DataLoader, Dataset, LoaderConfig};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::loss::{log_normal, logsumexp0, reconstruction_nll};
use crate::model::Vae;

/// Evaluation figures. With a Bernoulli likelihood on continuous pixels these
/// are the usual (unnormalised) figures VAE papers on such data report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Images evaluated.
    pub images: usize,
    /// Mean negative ELBO (β = 1), nats per image.
    pub neg_elbo_nats: f64,
    /// The same in bits per dimension.
    pub neg_elbo_bpd: f64,
    /// Importance samples for the IWAE bound (0 = not computed).
    pub iwae_k: usize,
    /// Mean negative IWAE bound, nats per image (tighter than the ELBO).
    pub iwae_nats: Option<f64>,
    /// The same in bits per dimension.
    pub iwae_bpd: Option<f64>,
}

/// Evaluates `model` on `ds`: one-sample negative ELBO, and with `k > 0` the
/// k-sample IWAE bound. Seeded, so repeated evaluations agree.
pub fn evaluate(
    model: &Vae,
    ds: Arc<dyn Dataset>,
    device: &Device,
    batch: usize,
    k: usize,
    seed: u64,
) -> Result<EvalReport> {
    let cfg = model.config();
    let cond = cfg.num_classes.is_some();
    let lc = LoaderConfig {
        batch_size: batch.max(1),
        shuffle: false,
        seed,
        ..Default::default()
    };
    let loader = DataLoader::new(ds, lc, device)?;
    let mut rng = SeededRng::derive(seed, &[0xE7A1]);
    let (mut n, mut elbo_sum, mut iwae_sum) = (0usize, 0f64, 0f64);
    for batch in loader.epoch(0) {
        let batch = batch?;
        let x = &batch.images;
        let labels = cond.then_some(&batch.labels);
        let b = batch.len();
        let out = model.forward(x, labels, &mut rng)?;
        let t = crate::loss::elbo_loss(&out, x, cfg.likelihood, model.logvar_x(), 1.0)?;
        elbo_sum += t.loss.to_scalar::<f32>()? as f64;
        if k > 0 {
            let post = model.encode(x, labels)?;
            let mut logw = Vec::with_capacity(k);
            for _ in 0..k {
                let eps = rng.normal(&[b, cfg.latent], 0.0, 1.0, device)?;
                let z = (&post.mean + ((&post.logvar * 0.5)?.exp()? * eps)?)?;
                let logits = model.decode_logits(&z, labels)?;
                let log_px =
                    reconstruction_nll(&logits, x, cfg.likelihood, model.logvar_x())?.neg()?;
                let log_pz = log_normal(&z, &z.zeros_like()?, &z.zeros_like()?)?;
                let log_qz = log_normal(&z, &post.mean, &post.logvar)?;
                logw.push(((log_px + log_pz)? - log_qz)?);
            }
            let lw = Tensor::stack(&logw, 0)?;
            let bound = (logsumexp0(&lw)? - (k as f64).ln())?;
            iwae_sum -= bound.sum_all()?.to_scalar::<f32>()? as f64;
        }
        n += b;
    }
    let dims = cfg.input_dim() as f64;
    let bpd = |nats: f64| nats / (dims * std::f64::consts::LN_2);
    let neg_elbo = elbo_sum / n.max(1) as f64;
    let iwae = (k > 0).then(|| iwae_sum / n.max(1) as f64);
    Ok(EvalReport {
        images: n,
        neg_elbo_nats: neg_elbo,
        neg_elbo_bpd: bpd(neg_elbo),
        iwae_k: k,
        iwae_nats: iwae,
        iwae_bpd: iwae.map(bpd),
    })
}
