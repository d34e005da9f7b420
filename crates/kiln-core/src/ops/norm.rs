//! Batch normalisation over `[B, C, S..]` (statistics per channel over batch and
//! space), one pass for the statistics, one for the output, and two for the whole
//! backward. Built from candle's broadcast ops it took ~20 passes, and the
//! backward's sums over broadcast dimensions (strided reductions) were over a
//! quarter of a SimCLR training step.
//!
//! The op takes `x` and a `[4, C]` tensor of rows (mean, var, weight, bias). The
//! mean and variance rows are the batch's own statistics (training) or the
//! running ones (evaluation), passed detached; in training the backward
//! accounts for their dependence on `x` in `dx` itself (the closed form), so
//! their rows get a zero gradient and nothing is counted twice.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
use candle_core::{Tensor, WithDType};
use rayon::prelude::*;

use super::{shape, slice};

/// `f(channel)` for every channel, in parallel.
fn per_channel<R: Send>(c: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    (0..c).into_par_iter().map(f).collect()
}

/// Lanes of the f64 sums below: independent accumulators, so that the adds
/// overlap instead of waiting on each other (one chain left the batch-norm
/// sums at one element per add latency, ~2% of a DCGAN training step).
const LANES: usize = 4;

/// `[sum f(x, g)[0], sum f(x, g)[1]]` in f64 over pairs of two equally long
/// slices, in [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sums2<T: WithDType>(xs: &[T], gs: &[T], f: impl Fn(f64, f64) -> [f64; 2]) -> [f64; 2] {
    let mut acc = [[0f64; LANES]; 2];
    let (mut cx, mut cg) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
    for (x, g) in (&mut cx).zip(&mut cg) {
        for l in 0..LANES {
            let [a, b] = f(x[l].to_f64(), g[l].to_f64());
            acc[0][l] += a;
            acc[1][l] += b;
        }
    }
    let mut out = [acc[0].iter().sum::<f64>(), acc[1].iter().sum::<f64>()];
    for (&x, &g) in cx.remainder().iter().zip(cg.remainder()) {
        let [a, b] = f(x.to_f64(), g.to_f64());
        out[0] += a;
        out[1] += b;
    }
    out
}

/// Mean and biased variance per channel, in f64, two passes (no cancellation).
fn stats<T: WithDType>(x: &[T], (b, c, s): (usize, usize, usize)) -> Vec<(f64, f64)> {
    let n = (b * s).max(1) as f64;
    per_channel(c, |ch| {
        let plane = |i: usize| &x[(i * c + ch) * s..(i * c + ch + 1) * s];
        let mean = (0..b)
            .map(|i| lane_sums2(plane(i), plane(i), |v, _| [v, 0.0])[0])
            .sum::<f64>()
            / n;
        let var = (0..b)
            .map(|i| lane_sums2(plane(i), plane(i), |v, _| [(v - mean) * (v - mean), 0.0])[0])
            .sum::<f64>()
            / n;
        (mean, var)
    })
}

/// Mean and biased variance per channel of `x [B, C, S..]`, as `[2, C]`; op1
/// (no gradient: callers pass it detached).
pub(crate) struct BnStats;

impl CustomOp1 for BnStats {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-stats"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::norm_cuda::bn_stats(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = shape::batch_channels(l.dims(), "batch_norm stats")?;
        let out = by_float!(s, "batch_norm stats", |T| {
            let st = stats::<T>(slice(s, l)?, dims);
            let mut out: Vec<T> = st.iter().map(|p| T::from_f64(p.0)).collect();
            out.extend(st.iter().map(|p| T::from_f64(p.1)));
            out
        });
        Ok((out, Shape::from((2, dims.1))))
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b`; op2 on `(x, p [4, C])`. `train`: the
/// mean and var rows are `x`'s own batch statistics.
pub(crate) struct BatchNorm {
    pub eps: f64,
    pub train: bool,
}

/// Rows of the `[4, C]` parameter tensor as f64: (mean, rstd, w, b) per channel.
fn params<T: WithDType>(p: &[T], c: usize, eps: f64) -> Vec<[f64; 4]> {
    (0..c)
        .map(|ch| {
            let r = |k: usize| p[k * c + ch].to_f64();
            [r(0), 1.0 / (r(1) + eps).sqrt(), r(2), r(3)]
        })
        .collect()
}

impl CustomOp2 for BatchNorm {
    fn name(&self) -> &'static str {
        "kiln-batch-norm"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::norm_cuda::batch_norm_fwd(self.eps, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = shape::batch_channels(l1.dims(), "batch_norm")?;
        shape::check_bn_params(l2.dims(), c, "batch_norm")?;
        let out = by_float!(s1, "batch_norm", |T| {
            let x = slice::<T>(s1, l1)?;
            let p = params(slice::<T>(s2, l2)?, c, self.eps);
            let s = s.max(1);
            super::par_fill(x.len(), s, |i, yp| {
                let [m, r, w, bb] = p[i % c];
                let (m, k, o) = (T::from_f64(m), T::from_f64(r * w), T::from_f64(bb));
                affine(yp, &x[i * s..i * s + yp.len()], m, k, o);
            })
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // [2, C]: sum(dy), sum(dy * xhat) per channel.
        let sums = x.apply_op3_no_bwd(&dy, p, &BnSums { eps: self.eps })?;
        let dx = x.apply_op3_no_bwd(
            &dy,
            &Tensor::cat(&[p, &sums], 0)?,
            &BnGradX {
                eps: self.eps,
                train: self.train,
            },
        )?;
        let c = p.dim(1)?;
        let zeros = Tensor::zeros((2, c), p.dtype(), p.device())?;
        // Rows (mean, var, w, b): the statistics' influence is inside dx.
        let dp = Tensor::cat(&[&zeros, &sums.narrow(0, 1, 1)?, &sums.narrow(0, 0, 1)?], 0)?;
        Ok((Some(dx), Some(dp)))
    }
}

/// Per channel `sum(dy)` and `sum(dy * xhat)`; op3 on `(x, dy, p [4, C])`.
struct BnSums {
    eps: f64,
}

impl CustomOp3 for BnSums {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-sums"
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
        super::norm_cuda::bn_sums(self.eps, (s1, l1), (s2, l2), (s3, l3))
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
        let (b, c, s) = shape::batch_channels(l1.dims(), "batch_norm grad")?;
        shape::check_bn_params(l3.dims(), c, "batch_norm grad")?;
        if l2.dims() != l1.dims() {
            bail!("batch_norm grad: dy {:?} for x {:?}", l2.dims(), l1.dims())
        }
        let out = by_float!(s1, "batch_norm grad", |T| {
            let (x, dy) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let p = params(slice::<T>(s3, l3)?, c, self.eps);
            let sums = per_channel(c, |ch| {
                let [m, r, _, _] = p[ch];
                let (mut sg, mut sgx) = (0f64, 0f64);
                for i in 0..b {
                    let at = (i * c + ch) * s;
                    let [ga, gb] =
                        lane_sums2(&x[at..at + s], &dy[at..at + s], |v, g| [g, g * (v - m) * r]);
                    sg += ga;
                    sgx += gb;
                }
                (sg, sgx)
            });
            let mut out: Vec<T> = sums.iter().map(|v| T::from_f64(v.0)).collect();
            out.extend(sums.iter().map(|v| T::from_f64(v.1)));
            out
        });
        Ok((out, Shape::from((2, c))))
    }
}

/// `dx`; op3 on `(x, dy, q [6, C])` with rows (mean, var, w, b, sum dy,
/// sum dy*xhat). Training: `w*rstd * (dy - mean(dy) - xhat * mean(dy*xhat))`;
/// evaluation: `w*rstd * dy`.
struct BnGradX {
    eps: f64,
    train: bool,
}

impl CustomOp3 for BnGradX {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-grad-x"
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
        super::norm_cuda::bn_grad_x(self.eps, self.train, (s1, l1), (s2, l2), (s3, l3))
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
        let (b, c, s) = shape::batch_channels(l1.dims(), "batch_norm grad")?;
        if l3.dims() != [6, c] || l2.dims() != l1.dims() {
            bail!(
                "batch_norm grad: bad shapes {:?} {:?}",
                l2.dims(),
                l3.dims()
            )
        }
        let n = (b * s).max(1) as f64;
        let train = self.train;
        let out = by_float!(s1, "batch_norm grad", |T| {
            let (x, dy, q) = (
                slice::<T>(s1, l1)?,
                slice::<T>(s2, l2)?,
                slice::<T>(s3, l3)?,
            );
            let p = params(q, c, self.eps);
            // dx = k * (dy - m1 - xhat * m2), xhat = (x - mean) * rstd, k = w * rstd.
            let coef: Vec<[T; 5]> = (0..c)
                .map(|ch| {
                    let [m, r, w, _] = p[ch];
                    let (m1, m2) = if train {
                        (q[4 * c + ch].to_f64() / n, q[5 * c + ch].to_f64() / n)
                    } else {
                        (0.0, 0.0)
                    };
                    [m, r, w * r, m1, m2].map(T::from_f64)
                })
                .collect();
            let s = s.max(1);
            super::par_fill(x.len(), s, |i, d| {
                let at = i * s..i * s + d.len();
                bn_grad_x(d, &x[at.clone()], &dy[at], coef[i % c]);
            })
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `y = (x - m) * k + o`; scalars by value so the loop vectorises.
#[inline(always)]
fn affine<T: WithDType>(y: &mut [T], x: &[T], m: T, k: T, o: T) {
    for (y, &v) in y.iter_mut().zip(x) {
        *y = (v - m) * k + o;
    }
}

/// `d = k (g - m1 - (x - m) r m2)` for coefficients `[m, r, k, m1, m2]`.
#[inline(always)]
fn bn_grad_x<T: WithDType>(d: &mut [T], x: &[T], g: &[T], [m, r, k, m1, m2]: [T; 5]) {
    for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
        *d = k * (g - m1 - (v - m) * r * m2);
    }
}
