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
//!
//! The op can also apply a ReLU or leaky ReLU to its output (`slope`), as the
//! DCGAN's every hidden layer does. The backward then recomputes each
//! pre-activation from `x` (one multiply-add, the forward's exact bits) to
//! mask `dy`, instead of an activation op of its own: that op's output, its
//! forward and backward passes and candle's gradient sum for it (a zeroed
//! buffer plus an add, on one thread) are each a pass over the activation.

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
/// mean and var rows are `x`'s own batch statistics. `slope`: followed by
/// `max(v, 0) + slope * min(v, 0)` (ReLU at 0, leaky ReLU above; `slope >= 0`,
/// so the output is positive exactly where the pre-activation is).
pub(crate) struct BatchNorm {
    pub eps: f64,
    pub train: bool,
    pub slope: Option<f64>,
}

/// The forward's per-channel `(m, k, o)` of `pre = (x - m) * k + o`, in `T`
/// as the forward rounds them, so that the backward's recomputed
/// pre-activations are the forward's bits.
#[inline(always)]
fn pre_coef<T: WithDType>([m, r, w, b]: [f64; 4]) -> (T, T, T) {
    (T::from_f64(m), T::from_f64(r * w), T::from_f64(b))
}

/// `dy` masked by the activation's derivative at `pre = (x - m) * k + o`:
/// `dy` where `pre > 0`, else `slope * dy` (0 for ReLU; the gradient at
/// exactly 0 is the slope's, PyTorch's convention).
#[inline(always)]
fn act_grad<T: WithDType>(o: &mut [T], x: &[T], dy: &[T], (m, k, o0): (T, T, T), slope: T) {
    let zero = T::from_f64(0.0);
    if slope == zero {
        for ((o, &v), &g) in o.iter_mut().zip(x).zip(dy) {
            *o = if (v - m) * k + o0 > zero { g } else { zero };
        }
    } else {
        for ((o, &v), &g) in o.iter_mut().zip(x).zip(dy) {
            *o = if (v - m) * k + o0 > zero {
                g
            } else {
                g * slope
            };
        }
    }
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
        if self.slope.is_some() {
            bail!("batch_norm: the fused activation has no CUDA kernel (ops::batch_norm_act composes there)")
        }
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
            let slope = self.slope.map(T::from_f64);
            super::par_fill(x.len(), s, |i, yp| {
                let (m, k, o) = pre_coef::<T>(p[i % c]);
                let x = &x[i * s..i * s + yp.len()];
                match slope {
                    None => affine(yp, x, m, k, o),
                    Some(a) if a == T::from_f64(0.0) => affine_relu(yp, x, m, k, o),
                    Some(a) => affine_leaky(yp, x, m, k, o, a),
                }
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
        let sums = x.apply_op3_no_bwd(
            &dy,
            p,
            &BnSums {
                eps: self.eps,
                slope: self.slope,
            },
        )?;
        let dx = x.apply_op3_no_bwd(
            &dy,
            &Tensor::cat(&[p, &sums], 0)?,
            &BnGradX {
                eps: self.eps,
                train: self.train,
                slope: self.slope,
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
/// With `slope`, `dy` is first masked by the activation (see [`BatchNorm`]).
struct BnSums {
    eps: f64,
    slope: Option<f64>,
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
        if self.slope.is_some() {
            bail!("batch_norm grad: the fused activation has no CUDA kernel (ops::batch_norm_act composes there)")
        }
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
            let slope = self.slope.map(T::from_f64);
            let sums = per_channel(c, |ch| {
                let [m, r, _, _] = p[ch];
                let (mut sg, mut sgx) = (0f64, 0f64);
                // The masked gradient of one plane at a time (with an activation).
                let mut masked = vec![T::from_f64(0.0); if slope.is_some() { s } else { 0 }];
                for i in 0..b {
                    let at = (i * c + ch) * s;
                    let (xs, mut gs) = (&x[at..at + s], &dy[at..at + s]);
                    if let Some(a) = slope {
                        act_grad(&mut masked, xs, gs, pre_coef::<T>(p[ch]), a);
                        gs = &masked;
                    }
                    let [ga, gb] = lane_sums2(xs, gs, |v, g| [g, g * (v - m) * r]);
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
/// evaluation: `w*rstd * dy`. With `slope`, `dy` is first masked by the
/// activation (see [`BatchNorm`]); the sums in `q` are the masked ones.
struct BnGradX {
    eps: f64,
    train: bool,
    slope: Option<f64>,
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
        if self.slope.is_some() {
            bail!("batch_norm grad: the fused activation has no CUDA kernel (ops::batch_norm_act composes there)")
        }
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
            let slope = self.slope.map(T::from_f64);
            super::par_fill(x.len(), s, |i, d| {
                let at = i * s..i * s + d.len();
                let (xs, dys) = (&x[at.clone()], &dy[at]);
                match slope {
                    None => bn_grad_x(d, xs, dys, coef[i % c]),
                    Some(a) => {
                        // The masked dy goes to `d` first, then `d` is
                        // rewritten in place from it.
                        act_grad(d, xs, dys, pre_coef::<T>(p[i % c]), a);
                        bn_grad_x_in_place(d, xs, coef[i % c]);
                    }
                }
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

/// `y = max((x - m) * k + o, 0)`.
#[inline(always)]
fn affine_relu<T: WithDType>(y: &mut [T], x: &[T], m: T, k: T, o: T) {
    let zero = T::from_f64(0.0);
    for (y, &v) in y.iter_mut().zip(x) {
        let u = (v - m) * k + o;
        *y = if u > zero { u } else { zero };
    }
}

/// `y = u` where `u = (x - m) * k + o` is positive, else `a * u`.
#[inline(always)]
fn affine_leaky<T: WithDType>(y: &mut [T], x: &[T], m: T, k: T, o: T, a: T) {
    let zero = T::from_f64(0.0);
    for (y, &v) in y.iter_mut().zip(x) {
        let u = (v - m) * k + o;
        *y = if u > zero { u } else { u * a };
    }
}

/// [`bn_grad_x`] with `g` read from `d` itself.
#[inline(always)]
fn bn_grad_x_in_place<T: WithDType>(d: &mut [T], x: &[T], [m, r, k, m1, m2]: [T; 5]) {
    for (d, &v) in d.iter_mut().zip(x) {
        *d = k * (*d - m1 - (v - m) * r * m2);
    }
}

/// `d = k (g - m1 - (x - m) r m2)` for coefficients `[m, r, k, m1, m2]`.
#[inline(always)]
fn bn_grad_x<T: WithDType>(d: &mut [T], x: &[T], g: &[T], [m, r, k, m1, m2]: [T; 5]) {
    for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
        *d = k * (g - m1 - (v - m) * r * m2);
    }
}
