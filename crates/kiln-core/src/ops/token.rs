//! Per-token log-probabilities and entropies over a vocabulary, one row of
//! `V` logits at a time: no `[B, T, V]` log-softmax is ever materialised, and
//! the backward writes the logits' gradient directly in one pass per row.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{shape, slice};

/// The float types the row kernels run on.
pub(crate) trait Real: candle_core::WithDType + std::ops::Neg<Output = Self> {
    fn f(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;

    /// `(sum e^z, sum e^z z)`, `z = x - m`, over a row whose maximum is `m`;
    /// sums in f64 (50k-term f32 sums drift by ~1e-5 relative).
    fn exp_sums(row: &[Self], m: Self) -> (f64, f64) {
        let (mut s0, mut s1) = (0f64, 0f64);
        for &v in row {
            let z = v - m;
            let e = z.exp();
            s0 += e.to_f64();
            s1 += (e * z).to_f64();
        }
        (s0, s1)
    }

    /// `out[j] = g * e^((row[j] - m) - ls)`.
    fn scaled_exp(out: &mut [Self], row: &[Self], m: Self, ls: Self, g: Self) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = g * ((x - m) - ls).exp();
        }
    }
}

macro_rules! real {
    ($t:ty $(, $fast:item)*) => {
        impl Real for $t {
            fn f(v: f64) -> Self {
                v as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            $($fast)*
        }
    };
}
// f32 rows take the SIMD exp (see `vexp`): GPT-2's 50257-logit rows.
real!(
    f32,
    fn exp_sums(row: &[f32], m: f32) -> (f64, f64) {
        super::vexp::exp_sums(row, m)
    },
    fn scaled_exp(out: &mut [f32], row: &[f32], m: f32, ls: f32, g: f32) {
        super::vexp::scaled_exp(out, row, m, ls, g)
    }
);
real!(f64);

/// Row statistics: max, `sum exp(x - max)`, `sum exp(x - max) * (x - max)`.
fn stats<T: Real>(row: &[T]) -> (T, T, T) {
    let mut m = row[0];
    for &v in row {
        if v > m {
            m = v;
        }
    }
    let (s0, s1) = T::exp_sums(row, m);
    (m, T::from_f64(s0), T::from_f64(s1))
}

/// `(max, ln sum exp(x - max))` of a row: log-probs are `(x - max) - ln_s`,
/// which keeps full precision where `x - lse` would round `lse` at large `|x|`.
fn shift<T: Real>(row: &[T]) -> (T, T) {
    let (m, s0, _) = stats(row);
    (m, s0.ln())
}

/// `log_softmax(row)[i]` of one f32 row, computed as [`token_logprobs`]
/// computes each row's (the `exp` sum in SIMD lanes, see `vexp`).
///
/// # Panics
/// If `i` is outside the row.
pub(super) fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    let (m, ls) = shift(row);
    (row[i] - m) - ls
}

fn targets(s: &CpuStorage, l: &Layout, n: usize, v: usize, what: &str) -> Result<Vec<usize>> {
    let t = slice::<u32>(s, l)?;
    if t.len() != n {
        bail!("{what}: {} targets for {n} rows", t.len())
    }
    t.iter()
        .map(|&i| {
            let i = i as usize;
            if i >= v {
                bail!("{what}: target {i} outside the vocabulary of {v}")
            }
            Ok(i)
        })
        .collect()
}

/// `log_softmax(logits)[target]`; op2 on `(logits [.., V], targets [..] u32)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenLogprobs;

/// Its logits gradient, `g * (onehot - softmax)`; op3 on `(logits, targets, g)`.
#[derive(Debug, Clone, Copy)]
struct TokenLogprobsGrad;

/// `-sum softmax * log_softmax` per row; op1 on `logits [.., V]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenEntropy;

/// Its logits gradient, `-g * p * (log p + H)`; op2 on `(logits, g)`.
#[derive(Debug, Clone, Copy)]
struct TokenEntropyGrad;

fn logprobs_fwd<T: Real>(x: &[T], t: &[usize], v: usize) -> Vec<T> {
    x.par_chunks(v)
        .zip(t.par_iter())
        .map(|(row, &i)| {
            let (m, ls) = shift(row);
            (row[i] - m) - ls
        })
        .collect()
}

fn logprobs_bwd<T: Real>(x: &[T], t: &[usize], g: &[T], v: usize) -> Vec<T> {
    let mut d = vec![T::f(0.0); x.len()];
    d.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(t.par_iter().zip(g.par_iter()))
        .for_each(|((dr, row), (&i, &gi))| {
            let (m, ls) = shift(row);
            T::scaled_exp(dr, row, m, ls, -gi);
            dr[i] += gi;
        });
    d
}

fn entropy_fwd<T: Real>(x: &[T], v: usize) -> Vec<T> {
    // H = ln s0 - s1 / s0 with z = x - max.
    x.par_chunks(v)
        .map(|row| {
            let (_, s0, s1) = stats(row);
            s0.ln() - s1 / s0
        })
        .collect()
}

fn entropy_bwd<T: Real>(x: &[T], g: &[T], v: usize) -> Vec<T> {
    let mut d = vec![T::f(0.0); x.len()];
    d.par_chunks_mut(v)
        .zip(x.par_chunks(v).zip(g.par_iter()))
        .for_each(|(dr, (row, &gi))| {
            let (m, s0, s1) = stats(row);
            let h = s0.ln() - s1 / s0;
            for (o, &xv) in dr.iter_mut().zip(row) {
                let lp = (xv - m) - s0.ln();
                *o = -(gi * lp.exp() * (lp + h));
            }
        });
    d
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "kiln-token-logprobs"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::token_cuda::token_logprobs_fwd(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lead, v) = shape::vocab_rows(l1.dims(), "token_logprobs")?;
        let n = lead.iter().product();
        let t = targets(s2, l2, n, v, "token_logprobs")?;
        let out = by_float!(s1, "token_logprobs", |T| logprobs_fwd::<T>(
            slice(s1, l1)?,
            &t,
            v
        ));
        Ok((out, Shape::from(lead)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.apply_op3_no_bwd(t, &g.contiguous()?, &TokenLogprobsGrad)?;
        Ok((Some(d), None))
    }
}

impl CustomOp3 for TokenLogprobsGrad {
    fn name(&self) -> &'static str {
        "kiln-token-logprobs-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::token_cuda::token_logprobs_bwd(s1, l1, s2, l2, s3, l3)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lead, v) = shape::vocab_rows(l1.dims(), "token_logprobs grad")?;
        let n = lead.iter().product();
        let t = targets(s2, l2, n, v, "token_logprobs grad")?;
        if l3.shape().elem_count() != n {
            bail!("token_logprobs grad: gradient {:?} for {n} rows", l3.dims())
        }
        let out = by_float!(s1, "token_logprobs grad", |T| logprobs_bwd::<T>(
            slice(s1, l1)?,
            &t,
            slice(s3, l3)?,
            v
        ));
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp1 for TokenEntropy {
    fn name(&self) -> &'static str {
        "kiln-token-entropy"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::token_cuda::token_entropy_fwd(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (lead, v) = shape::vocab_rows(l.dims(), "token_entropy")?;
        let out = by_float!(s, "token_entropy", |T| entropy_fwd::<T>(slice(s, l)?, v));
        Ok((out, Shape::from(lead)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&g.contiguous()?, &TokenEntropyGrad)?,
        ))
    }
}

impl CustomOp2 for TokenEntropyGrad {
    fn name(&self) -> &'static str {
        "kiln-token-entropy-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::token_cuda::token_entropy_bwd(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lead, v) = shape::vocab_rows(l1.dims(), "token_entropy grad")?;
        let n: usize = lead.iter().product();
        if l2.shape().elem_count() != n {
            bail!("token_entropy grad: gradient {:?} for {n} rows", l2.dims())
        }
        let out = by_float!(s1, "token_entropy grad", |T| entropy_bwd::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            v
        ));
        Ok((out, l1.shape().clone()))
    }
}
