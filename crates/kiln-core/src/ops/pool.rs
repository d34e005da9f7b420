//! Pooling kernels, one `[H, W]` plane per task. Max-pool's backward recomputes
//! each window's argmax and scatters the gradient there in one pass, which
//! also handles overlapping windows (kernel > stride).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::slice;

/// Window and stride of a square pooling, and the input plane it was applied to.
#[derive(Debug, Clone, Copy)]
struct Pool {
    kernel: usize,
    stride: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl Pool {
    fn new(h: usize, w: usize, kernel: usize, stride: usize, what: &str) -> Result<Self> {
        if kernel == 0 || stride == 0 || kernel > h || kernel > w {
            bail!("{what}: kernel {kernel} stride {stride} does not fit input {h}x{w}")
        }
        Ok(Self {
            kernel,
            stride,
            h,
            w,
            ho: (h - kernel) / stride + 1,
            wo: (w - kernel) / stride + 1,
        })
    }
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [b, c, h, w] => Ok((b, c, h, w)),
        ref d => bail!("{what}: expected [B, C, H, W], got {d:?}"),
    }
}

fn max_fwd<T: WithDType>(x: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); planes * p.ho * p.wo];
    y.par_chunks_mut(p.ho * p.wo)
        .zip(x.par_chunks(p.h * p.w))
        .for_each(|(yp, xp)| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    let mut m = xp[base];
                    for ky in 0..p.kernel {
                        for v in &xp[base + ky * p.w..base + ky * p.w + p.kernel] {
                            if *v > m {
                                m = *v;
                            }
                        }
                    }
                    yp[oy * p.wo + ox] = m;
                }
            }
        });
    y
}

fn max_bwd<T: WithDType>(x: &[T], dy: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); planes * p.h * p.w];
    dx.par_chunks_mut(p.h * p.w)
        .zip(x.par_chunks(p.h * p.w).zip(dy.par_chunks(p.ho * p.wo)))
        .for_each(|(dxp, (xp, dyp))| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    // First maximum in row-major window order, as PyTorch picks.
                    let (mut at, mut m) = (base, xp[base]);
                    for ky in 0..p.kernel {
                        let r = base + ky * p.w;
                        for (j, v) in xp[r..r + p.kernel].iter().enumerate() {
                            if *v > m {
                                m = *v;
                                at = r + j;
                            }
                        }
                    }
                    dxp[at] += dyp[oy * p.wo + ox];
                }
            }
        });
    dx
}

fn avg_fwd<T: WithDType>(x: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); planes * p.ho * p.wo];
    let scale = T::from_f64(1.0 / (p.kernel * p.kernel) as f64);
    y.par_chunks_mut(p.ho * p.wo)
        .zip(x.par_chunks(p.h * p.w))
        .for_each(|(yp, xp)| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    let mut s = T::from_f64(0.0);
                    for ky in 0..p.kernel {
                        for v in &xp[base + ky * p.w..base + ky * p.w + p.kernel] {
                            s += *v;
                        }
                    }
                    yp[oy * p.wo + ox] = s * scale;
                }
            }
        });
    y
}

fn avg_bwd<T: WithDType>(dy: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); planes * p.h * p.w];
    let scale = T::from_f64(1.0 / (p.kernel * p.kernel) as f64);
    dx.par_chunks_mut(p.h * p.w)
        .zip(dy.par_chunks(p.ho * p.wo))
        .for_each(|(dxp, dyp)| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    let g = dyp[oy * p.wo + ox] * scale;
                    for ky in 0..p.kernel {
                        for v in &mut dxp[base + ky * p.w..base + ky * p.w + p.kernel] {
                            *v += g;
                        }
                    }
                }
            }
        });
    dx
}

macro_rules! by_dtype {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            s => bail!(
                "{}: only f32 and f64 have a kiln CPU kernel (got {:?})",
                $what,
                s.dtype()
            ),
        }
    };
}

/// Max pooling; op1 on `x`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
}

/// Max pooling's input gradient; op2 on `(x, dy)`.
#[derive(Debug, Clone, Copy)]
struct MaxPoolGrad {
    kernel: usize,
    stride: usize,
}

/// Average pooling; op1 on `x`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AvgPool {
    pub kernel: usize,
    pub stride: usize,
}

/// Average pooling's input gradient (its adjoint); op1 on `dy`, giving `[B, C, h, w]`.
#[derive(Debug, Clone, Copy)]
struct AvgPoolGrad {
    kernel: usize,
    stride: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "kiln-max-pool2d"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::pool_fwd(true, self.kernel, self.stride, s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l, "max_pool2d")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "max_pool2d")?;
        let out = by_dtype!(s, "max_pool2d", |T| max_fwd::<T>(slice(s, l)?, &p, b * c));
        Ok((out, Shape::from((b, c, p.ho, p.wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let g = MaxPoolGrad {
            kernel: self.kernel,
            stride: self.stride,
        };
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &g)?))
    }
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "kiln-max-pool2d-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool_bwd(self.kernel, self.stride, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l1, "max_pool2d grad")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "max_pool2d grad")?;
        if l2.dims() != [b, c, p.ho, p.wo] {
            bail!(
                "max_pool2d grad: dy {:?} does not match x {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let out = by_dtype!(s1, "max_pool2d", |T| max_bwd::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            &p,
            b * c
        ));
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "kiln-avg-pool2d"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::pool_fwd(false, self.kernel, self.stride, s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l, "avg_pool2d")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "avg_pool2d")?;
        let out = by_dtype!(s, "avg_pool2d", |T| avg_fwd::<T>(slice(s, l)?, &p, b * c));
        Ok((out, Shape::from((b, c, p.ho, p.wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let g = AvgPoolGrad {
            kernel: self.kernel,
            stride: self.stride,
            h,
            w,
        };
        Ok(Some(dy.contiguous()?.apply_op1(g)?))
    }
}

impl CustomOp1 for AvgPoolGrad {
    fn name(&self) -> &'static str {
        "kiln-avg-pool2d-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::avg_pool_bwd(self.kernel, self.stride, (self.h, self.w), s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, ho, wo) = dims4(l, "avg_pool2d grad")?;
        let p = Pool::new(self.h, self.w, self.kernel, self.stride, "avg_pool2d grad")?;
        if (p.ho, p.wo) != (ho, wo) {
            bail!(
                "avg_pool2d grad: dy {:?} does not match input {}x{}",
                l.dims(),
                self.h,
                self.w
            )
        }
        let out = by_dtype!(s, "avg_pool2d grad", |T| avg_bwd::<T>(
            slice(s, l)?,
            &p,
            b * c
        ));
        Ok((out, Shape::from((b, c, self.h, self.w))))
    }

    fn bwd(&self, _dy: &Tensor, _dx: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // The adjoint of the adjoint is the pooling itself.
        let op = AvgPool {
            kernel: self.kernel,
            stride: self.stride,
        };
        Ok(Some(g.contiguous()?.apply_op1(op)?))
    }
}

/// `x [B, C, H, W] + b [C]` broadcast over batch and pixels; op2 on `(x, b)`.
/// One pass forward; the bias gradient is one pass over `dy` too, where candle's
/// broadcast add and its sum-over-three-dims backward take several.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelBias;

/// Sum of `dy [B, C, H, W]` over all but the channel dimension; op1.
#[derive(Debug, Clone, Copy)]
struct ChannelSum;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "kiln-channel-bias"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::channel_bias(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l1, "channel bias")?;
        if l2.dims() != [c] {
            bail!("channel bias: bias {:?} for {c} channels", l2.dims())
        }
        let hw = h * w;
        let out = by_dtype!(s1, "channel bias", |T| {
            let (x, bias) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let mut y = vec![T::from_f64(0.0); b * c * hw];
            y.par_chunks_mut(hw)
                .zip(x.par_chunks(hw))
                .enumerate()
                .for_each(|(i, (yp, xp))| {
                    let bv = bias[i % c];
                    for (o, v) in yp.iter_mut().zip(xp) {
                        *o = *v + bv;
                    }
                });
            y
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy.contiguous()?.apply_op1(ChannelSum)?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "kiln-channel-sum"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::channel_sum(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = dims4(l, "channel sum")?;
        let hw = h * w;
        let out = by_dtype!(s, "channel sum", |T| {
            let x = slice::<T>(s, l)?;
            // Per-plane sums in parallel, then a small sequential fold over the batch.
            let sums: Vec<T> = x
                .par_chunks(hw)
                .map(|p| p.iter().fold(T::from_f64(0.0), |a, v| a + *v))
                .collect();
            let mut out = vec![T::from_f64(0.0); c];
            for (i, s) in sums.iter().enumerate() {
                out[i % c] += *s;
            }
            out
        });
        Ok((out, Shape::from(c)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        Ok(Some(g.reshape((1, c, 1, 1))?.broadcast_as((b, c, h, w))?))
    }
}
