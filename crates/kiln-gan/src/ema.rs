//! An exponential moving average of a model's variables: weights and
//! batch-norm running statistics alike (the averaged generator samples
//! with averaged statistics, as StudioGAN and BigGAN's EMA do).

use kiln_core::vars::VarStore;
use kiln_core::Result;

/// The EMA recurrence over a store of variables.
///
/// After generator step `t` (1-based): if `t < start`, `ema = g` (the copy
/// follows G exactly); otherwise `ema = decay * ema + (1 - decay) * g`.
#[derive(Debug, Clone)]
pub struct Ema {
    /// The averaged variables (same names and shapes as the source).
    pub vars: VarStore,
    decay: f64,
    start: u64,
}

impl Ema {
    /// An EMA over `vars` (a store built with the same model as the source),
    /// set to a copy of `src` now.
    pub fn new(vars: VarStore, src: &VarStore, decay: f64, start: u64) -> Result<Self> {
        let e = Self { vars, decay, start };
        e.copy_from(src)?;
        Ok(e)
    }

    /// The decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// The first generator step that averages (before it, the copy follows G).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Sets every variable to `src`'s value.
    pub fn copy_from(&self, src: &VarStore) -> Result<()> {
        self.vars.assign(&src.tensors().into_iter().collect())
    }

    /// The update after generator step `step` (1-based).
    pub fn update(&self, src: &VarStore, step: u64) -> Result<()> {
        if step < self.start {
            return self.copy_from(src);
        }
        let d = self.decay;
        for (name, e) in self.vars.vars() {
            let Some(g) = src.get(&name) else {
                kiln_core::candle::bail!("EMA: the source has no variable {name}");
            };
            let next = (e.as_tensor().affine(d, 0.0)? + g.as_tensor().affine(1.0 - d, 0.0)?)?;
            e.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_core::candle_nn::Init;
    use kiln_core::tolerance::F32_UNIT_ROUNDOFF;
    use kiln_core::{DType, Device};

    fn store(seed: u64) -> VarStore {
        let vs = VarStore::new(seed);
        let vb = vs.builder(DType::F32, &Device::Cpu);
        vb.get_with_hints(
            (3, 4),
            "w",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )
        .unwrap();
        vb.get_with_hints(4, "bn.running_var", Init::Const(1.0))
            .unwrap();
        vs
    }

    fn values(vs: &VarStore) -> Vec<f64> {
        vs.tensors()
            .iter()
            .flat_map(|(_, t)| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    }

    /// The EMA equals its recurrence run in f64 on the same source values,
    /// within the f32 rounding of each update (two roundings per step, the
    /// earlier ones decaying by `decay` each step).
    #[test]
    fn ema_follows_its_recurrence_and_its_start_step() {
        let (src, dst) = (store(1), store(2));
        let (decay, start) = (0.9, 4u64);
        let ema = Ema::new(dst.clone(), &src, decay, start).unwrap();
        assert_eq!(values(&dst), values(&src));
        let mut want = values(&src);
        let mut rng = kiln_core::rng::SeededRng::new(5);
        for step in 1..=30u64 {
            // A new "generator" each step.
            for (_, v) in src.vars() {
                let t = rng
                    .normal(v.shape().clone(), 0.0, 2.0, &Device::Cpu)
                    .unwrap();
                v.set(&t).unwrap();
            }
            ema.update(&src, step).unwrap();
            let g = values(&src);
            if step < start {
                want = g.clone();
                assert_eq!(
                    values(&dst),
                    g,
                    "step {step}: before the start the copy is exact"
                );
            } else {
                for (w, g) in want.iter_mut().zip(&g) {
                    *w = decay * *w + (1.0 - decay) * g;
                }
            }
            // Each update rounds the two products and their sum: at most
            // 3u of the magnitude (<= 10 here) per step, the older errors
            // shrinking by `decay` each step: at most 3u * 10 / (1 - decay).
            let tol = 3.0 * F32_UNIT_ROUNDOFF * 10.0 / (1.0 - decay);
            for (i, (got, w)) in values(&dst).iter().zip(&want).enumerate() {
                assert!(
                    (got - w).abs() <= tol,
                    "step {step}, element {i}: {got} vs {w}"
                );
            }
        }
        // The running statistics are averaged too.
        let rv = dst.get("bn.running_var").unwrap();
        assert_ne!(
            rv.as_tensor().to_vec1::<f32>().unwrap(),
            src.get("bn.running_var")
                .unwrap()
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}
