//! ReLU, alone and fused with a conv layer's channel bias, each one pass forward
//! and one pass backward. candle's `relu` backward builds five tensors
//! (`zeros_like`, `ge`, `to_dtype`, `mul`, plus the gradient sum); in the
//! chapter's conv autoencoder that comparison alone was ~10% of a training step.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use candle_core::{WithDType, D};

use super::slice;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `max(x + b, 0)` where `b = bias(i)` for the `i`-th run of `plane` elements;
/// parallel tasks hold whole planes.
fn relu_map<T: WithDType>(
    x: &[T],
    plane: usize,
    slope: f64,
    bias: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let k = T::from_f64(slope);
    let plane = plane.max(1);
    let per_task = (CHUNK / plane).max(1);
    let run = per_task * plane;
    super::par_fill(x.len(), run, |t, y| {
        let x = &x[t * run..t * run + y.len()];
        for (i, (y, x)) in y.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let b = bias(t * per_task + i);
            if slope == 0.0 {
                relu_add(y, x, b);
            } else {
                leaky_add(y, x, b, k);
            }
        }
    })
}

// The loops below are free functions taking their scalars by value. Written
// inline in the parallel closures, the slope and the zero were captured by
// reference and re-loaded through a pointer every element (the output might
// alias them, as far as LLVM could tell), so the loops stayed scalar and
// branchy: 2.7 GB/s, and ~11% of a DCGAN training step. One loop per case
// (a slope test inside the loop also kept it scalar).

/// `o = max(x + b, 0)`.
#[inline(always)]
fn relu_add<T: WithDType>(o: &mut [T], x: &[T], b: T) {
    let zero = T::from_f64(0.0);
    for (o, &v) in o.iter_mut().zip(x) {
        let s = v + b;
        *o = if s > zero { s } else { zero };
    }
}

/// `o = x + b` where positive, else `k (x + b)`.
#[inline(always)]
fn leaky_add<T: WithDType>(o: &mut [T], x: &[T], b: T, k: T) {
    let zero = T::from_f64(0.0);
    for (o, &v) in o.iter_mut().zip(x) {
        let s = v + b;
        *o = if s > zero { s } else { s * k };
    }
}

/// `o = g` where `y > 0`, else `0`.
#[inline(always)]
fn relu_grad<T: WithDType>(o: &mut [T], y: &[T], g: &[T]) {
    let zero = T::from_f64(0.0);
    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
        *o = if y > zero { g } else { zero };
    }
}

/// `o = g` where `y > 0`, else `k g`.
#[inline(always)]
fn leaky_grad<T: WithDType>(o: &mut [T], y: &[T], g: &[T], k: T) {
    let zero = T::from_f64(0.0);
    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
        *o = if y > zero { g } else { g * k };
    }
}

/// `x` where positive, else `slope * x` (ReLU at slope 0, leaky ReLU otherwise;
/// `slope >= 0`, so the output's sign is the input's); op1. The gradient passes
/// where the output is positive (PyTorch's convention: `slope` at exactly 0).
pub(crate) struct Relu {
    pub slope: f64,
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "kiln-relu"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::act_cuda::relu_fwd(self.slope, s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_float!(s, "relu", |T| relu_map::<T>(
            slice(s, l)?,
            CHUNK,
            self.slope,
            |_| { T::from_f64(0.0) }
        ));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let g = ReluGrad { slope: self.slope };
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &g)?))
    }
}

/// `dy` where `y > 0`, else `slope * dy`; op2 on `(y, dy)`.
struct ReluGrad {
    slope: f64,
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "kiln-relu-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::act_cuda::relu_bwd(self.slope, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("relu grad: dy {:?} for y {:?}", l2.dims(), l1.dims())
        }
        let out = by_float!(s1, "relu grad", |T| {
            let (y, dy) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let (slope, k) = (self.slope, T::from_f64(self.slope));
            super::par_fill(y.len(), CHUNK, |t, o| {
                let at = t * CHUNK..t * CHUNK + o.len();
                if slope == 0.0 {
                    relu_grad(o, &y[at.clone()], &dy[at]);
                } else {
                    leaky_grad(o, &y[at.clone()], &dy[at], k);
                }
            })
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `max(x + b, 0)` for `x [B, C, H, W]`, `b [C]`; op2 on `(x, b)`. One pass
/// forward; backward is the masked gradient and its per-channel sum.
pub(crate) struct ChannelBiasRelu;

impl CustomOp2 for ChannelBiasRelu {
    fn name(&self) -> &'static str {
        "kiln-channel-bias-relu"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::act_cuda::channel_bias_relu(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [_, c, h, w] = *l1.dims() else {
            bail!(
                "channel bias relu: expected x [B, C, H, W], got {:?}",
                l1.dims()
            )
        };
        if l2.dims() != [c] {
            bail!("channel bias relu: bias {:?} for {c} channels", l2.dims())
        }
        let hw = (h * w).max(1);
        let out = by_float!(s1, "channel bias relu", |T| {
            let bias = slice::<T>(s2, l2)?;
            relu_map::<T>(slice(s1, l1)?, hw, 0.0, |plane| bias[plane % c])
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad { slope: 0.0 })?;
        let db = super::pool::channel_sum(&dx)?;
        Ok((Some(dx), Some(db)))
    }
}

/// ReLU through candle's ops: the fallback off the CPU and the tests' reference.
pub(crate) fn relu_composite(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

/// `max(x + b[c], 0)` through candle's ops.
pub(crate) fn channel_bias_relu_composite(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = b.dim(D::Minus1)?;
    x.broadcast_add(&b.reshape((1, c, 1, 1))?)?.relu()
}
