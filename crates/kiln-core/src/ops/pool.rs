//! Pooling kernels, one `[H, W]` plane per task. Max-pool's backward recomputes
//! each window's argmax and scatters the gradient there in one pass, which
//! also handles overlapping windows (kernel > stride).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{shape, slice};

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
        let (ho, wo) = shape::pool_out(h, w, kernel, stride, what)?;
        Ok(Self {
            kernel,
            stride,
            h,
            w,
            ho,
            wo,
        })
    }
}

/// Whether the window is the common 2x2, stride 2, which has its own loops.
fn is_2x2(p: &Pool) -> bool {
    p.kernel == 2 && p.stride == 2
}

/// Whether `v` replaces the running maximum `m` in window order: larger, or
/// NaN. PyTorch's rule: NaN propagates (the last NaN of a window is its argmax),
/// ties keep the first maximum.
#[inline(always)]
#[allow(clippy::eq_op)] // `v != v` is the NaN test WithDType offers
fn takes_over<T: WithDType>(v: T, m: T) -> bool {
    v > m || v != v
}

/// Index (0..4, row-major) and value of a 2x2 window's maximum as PyTorch
/// picks it (see [`takes_over`]).
#[inline]
fn argmax4<T: WithDType>(v: [T; 4]) -> (usize, T) {
    let mut at = (0, v[0]);
    for (i, &x) in v.iter().enumerate().skip(1) {
        if takes_over(x, at.1) {
            at = (i, x);
        }
    }
    at
}

/// Whether a row pair and its gradients hold only finite gradients and no NaN
/// inputs, so the branch-free routing gives PyTorch's result.
#[allow(clippy::eq_op)]
fn clean_rows<T: WithDType>(g: &[T], r0: &[T], r1: &[T]) -> bool {
    let zero = T::from_f64(0.0);
    // `g - g` is 0 only for finite g; `v == v` fails only for NaN.
    g.iter().all(|&g| g - g == zero) && r0.iter().chain(r1).all(|&v| v == v)
}

/// 2x2 / stride-2 max pooling of one plane, row pair by row pair.
fn max_fwd_2x2<T: WithDType>(yp: &mut [T], xp: &[T], p: &Pool) {
    for (oy, yr) in yp.chunks_exact_mut(p.wo).enumerate() {
        let r0 = &xp[2 * oy * p.w..][..2 * p.wo];
        let r1 = &xp[(2 * oy + 1) * p.w..][..2 * p.wo];
        for ((o, a), b) in yr
            .iter_mut()
            .zip(r0.chunks_exact(2))
            .zip(r1.chunks_exact(2))
        {
            *o = argmax4([a[0], a[1], b[0], b[1]]).1;
        }
    }
}

/// Routes a 2x2 window's gradient `g` to the first of its maxima, without
/// branches: a branch on the argmax of random data mispredicts most of the time,
/// and x86 has no conditional move for float registers, so the choice is made
/// by multiplying with 0 or 1 (LLVM turns float selects, even bit-masked ones,
/// back into branches). A NaN or infinite `g` would therefore reach all four
/// cells, and a NaN input lose to the others: rows holding either take the
/// exact path instead (see [`clean_rows`]).
trait Route2x2: Copy {
    /// `[a0, a1, b0, b1]` (row-major) to their gradients.
    fn route(w: [Self; 4], g: Self) -> [Self; 4];

    /// A whole row pair's windows at once where the CPU has a vector path:
    /// `d0`/`d1` (zeroed; rows `r0`/`r1`, `2 * g.len()` long) get the
    /// gradients `g`. `false`, with `d0`/`d1` still zero, when there is no
    /// such path or the row is not clean (see [`clean_rows`]).
    fn route_row(
        _g: &[Self],
        _r0: &[Self],
        _r1: &[Self],
        _d0: &mut [Self],
        _d1: &mut [Self],
    ) -> bool {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod route_avx2 {
    use std::arch::x86_64::*;

    /// Eight windows per step: the even and odd columns of both rows are
    /// split out with `shuffle_ps`, which leaves the windows in the order
    /// `0 1 4 5 | 2 3 6 7`; `g` is permuted to match, and `unpacklo/hi`
    /// interleave the results back in column order. Rows with a NaN input or
    /// a non-finite gradient are reported and left to the exact path.
    ///
    /// # Safety
    /// AVX2 is present; `r0`, `r1`, `d0` and `d1` hold `2 * g.len()` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row(
        g: &[f32],
        r0: &[f32],
        r1: &[f32],
        d0: &mut [f32],
        d1: &mut [f32],
    ) -> bool {
        let n = g.len();
        assert!(r0.len() >= 2 * n && r1.len() >= 2 * n && d0.len() >= 2 * n && d1.len() >= 2 * n);
        let mut dirty = _mm256_setzero_ps();
        let ones = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let blocks = n / 8;
        for b in 0..blocks {
            // SAFETY: windows `8b..8b + 8` read columns `16b..16b + 16` of
            // both rows and write the same columns of `d0`/`d1` (asserted).
            unsafe {
                let (i, c) = (8 * b, 16 * b);
                let ld = |r: &[f32], o: usize| _mm256_loadu_ps(r.as_ptr().add(c + o));
                let (a0, a1, b0, b1) = (ld(r0, 0), ld(r0, 8), ld(r1, 0), ld(r1, 8));
                let x00 = _mm256_shuffle_ps::<0x88>(a0, a1);
                let x01 = _mm256_shuffle_ps::<0xDD>(a0, a1);
                let x10 = _mm256_shuffle_ps::<0x88>(b0, b1);
                let x11 = _mm256_shuffle_ps::<0xDD>(b0, b1);
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let gv = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(gv)));
                // NaN inputs, and `g - g` is NaN for an infinite or NaN `g`.
                let nan = |v| _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
                dirty = _mm256_or_ps(dirty, _mm256_or_ps(nan(x00), nan(x01)));
                dirty = _mm256_or_ps(dirty, _mm256_or_ps(nan(x10), nan(x11)));
                dirty = _mm256_or_ps(dirty, nan(_mm256_sub_ps(gv, gv)));
                let m = _mm256_max_ps(_mm256_max_ps(x00, x01), _mm256_max_ps(x10, x11));
                // The first of the maxima in row-major order, as PyTorch.
                let eq = |v| _mm256_cmp_ps::<_CMP_EQ_OQ>(v, m);
                let e0 = eq(x00);
                let e1 = _mm256_andnot_ps(e0, eq(x01));
                let e01 = _mm256_or_ps(e0, e1);
                let e2 = _mm256_andnot_ps(e01, eq(x10));
                let e3 = _mm256_andnot_ps(_mm256_or_ps(e01, e2), ones);
                let (o0, o1) = (_mm256_and_ps(e0, gv), _mm256_and_ps(e1, gv));
                let (o2, o3) = (_mm256_and_ps(e2, gv), _mm256_and_ps(e3, gv));
                let st =
                    |d: &mut [f32], o: usize, v| _mm256_storeu_ps(d.as_mut_ptr().add(c + o), v);
                st(d0, 0, _mm256_unpacklo_ps(o0, o1));
                st(d0, 8, _mm256_unpackhi_ps(o0, o1));
                st(d1, 0, _mm256_unpacklo_ps(o2, o3));
                st(d1, 8, _mm256_unpackhi_ps(o2, o3));
            }
        }
        // The last windows one at a time, as the scalar path does.
        let rest = blocks * 8;
        if _mm256_movemask_ps(dirty) != 0
            || !super::clean_rows(&g[rest..], &r0[2 * rest..2 * n], &r1[2 * rest..2 * n])
        {
            // Undo: the exact path writes only each window's argmax.
            d0[..2 * n].fill(0.0);
            d1[..2 * n].fill(0.0);
            return false;
        }
        for k in rest..n {
            let o = <f32 as super::Route2x2>::route(
                [r0[2 * k], r0[2 * k + 1], r1[2 * k], r1[2 * k + 1]],
                g[k],
            );
            (d0[2 * k], d0[2 * k + 1], d1[2 * k], d1[2 * k + 1]) = (o[0], o[1], o[2], o[3]);
        }
        true
    }
}

macro_rules! route2x2 {
    ($t:ty $(, $row:path)?) => {
        impl Route2x2 for $t {
            $(
                fn route_row(g: &[Self], r0: &[Self], r1: &[Self], d0: &mut [Self], d1: &mut [Self]) -> bool {
                    $row(g, r0, r1, d0, d1)
                }
            )?

            #[inline(always)]
            fn route([a0, a1, b0, b1]: [Self; 4], g: Self) -> [Self; 4] {
                let m = a0.max(a1).max(b0.max(b1));
                let e0 = a0 == m;
                let e1 = !e0 & (a1 == m);
                let e2 = !(e0 | e1) & (b0 == m);
                let e3 = !(e0 | e1 | e2);
                let keep = |e: bool| g * <$t>::from(e as u8);
                [keep(e0), keep(e1), keep(e2), keep(e3)]
            }
        }
    };
}
/// [`Route2x2::route_row`] for f32: AVX2 where the CPU has it.
fn route_row_f32(g: &[f32], r0: &[f32], r1: &[f32], d0: &mut [f32], d1: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; `row` asserts the lengths it relies on.
        return unsafe { route_avx2::row(g, r0, r1, d0, d1) };
    }
    let _ = (g, r0, r1, d0, d1);
    false
}

route2x2!(f32, route_row_f32);
route2x2!(f64);

/// 2x2 / stride-2 max pooling's gradient for one plane (`dxp` starts zeroed).
fn max_bwd_2x2<T: WithDType + Route2x2>(dxp: &mut [T], xp: &[T], dyp: &[T], p: &Pool) {
    let n = 2 * p.wo;
    for (oy, dyr) in dyp.chunks_exact(p.wo).enumerate() {
        let r0 = &xp[2 * oy * p.w..][..n];
        let r1 = &xp[(2 * oy + 1) * p.w..][..n];
        let (d0, d1) = dxp[2 * oy * p.w..].split_at_mut(p.w);
        let (d0, d1) = (&mut d0[..n], &mut d1[..n]);
        if T::route_row(dyr, r0, r1, d0, d1) {
            continue;
        }
        if !clean_rows(dyr, r0, r1) {
            for (k, &g) in dyr.iter().enumerate() {
                let (i, _) = argmax4([r0[2 * k], r0[2 * k + 1], r1[2 * k], r1[2 * k + 1]]);
                let d = if i < 2 { &mut *d0 } else { &mut *d1 };
                d[2 * k + i % 2] = g;
            }
            continue;
        }
        let one = |k: usize, d0: &mut [T], d1: &mut [T], g: T| {
            let o = T::route([r0[2 * k], r0[2 * k + 1], r1[2 * k], r1[2 * k + 1]], g);
            (d0[2 * k], d0[2 * k + 1], d1[2 * k], d1[2 * k + 1]) = (o[0], o[1], o[2], o[3]);
        };
        // Blocks of 8 windows with fixed-size arrays: no bounds checks inside.
        let blocks = p.wo / 8;
        for (bi, ((((g, x0), x1), y0), y1)) in dyr
            .chunks_exact(8)
            .zip(r0.chunks_exact(16))
            .zip(r1.chunks_exact(16))
            .zip(d0.chunks_exact_mut(16))
            .zip(d1.chunks_exact_mut(16))
            .enumerate()
        {
            let (Ok(g), Ok(x0), Ok(x1), Ok(y0), Ok(y1)) = (
                <&[T; 8]>::try_from(g),
                <&[T; 16]>::try_from(x0),
                <&[T; 16]>::try_from(x1),
                <&mut [T; 16]>::try_from(y0),
                <&mut [T; 16]>::try_from(y1),
            ) else {
                unreachable!("chunks_exact gives exact lengths (block {bi})")
            };
            for k in 0..8 {
                let o = T::route([x0[2 * k], x0[2 * k + 1], x1[2 * k], x1[2 * k + 1]], g[k]);
                (y0[2 * k], y0[2 * k + 1], y1[2 * k], y1[2 * k + 1]) = (o[0], o[1], o[2], o[3]);
            }
        }
        for (k, &g) in dyr.iter().enumerate().skip(blocks * 8) {
            one(k, d0, d1, g);
        }
    }
}

/// Planes per parallel task: about 16K input elements, so small planes batch up.
fn planes_per_task(p: &Pool) -> usize {
    ((1 << 14) / (p.h * p.w).max(1)).max(1)
}

fn max_fwd<T: WithDType>(x: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); planes * p.ho * p.wo];
    if is_2x2(p) {
        let k = planes_per_task(p);
        y.par_chunks_mut(k * p.ho * p.wo)
            .zip(x.par_chunks(k * p.h * p.w))
            .for_each(|(ys, xs)| {
                for (yp, xp) in ys.chunks_mut(p.ho * p.wo).zip(xs.chunks(p.h * p.w)) {
                    max_fwd_2x2(yp, xp, p);
                }
            });
        return y;
    }
    y.par_chunks_mut(p.ho * p.wo)
        .zip(x.par_chunks(p.h * p.w))
        .for_each(|(yp, xp)| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    let mut m = xp[base];
                    for ky in 0..p.kernel {
                        for v in &xp[base + ky * p.w..base + ky * p.w + p.kernel] {
                            if takes_over(*v, m) {
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

fn max_bwd<T: WithDType + Route2x2>(x: &[T], dy: &[T], p: &Pool, planes: usize) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); planes * p.h * p.w];
    if is_2x2(p) {
        let k = planes_per_task(p);
        let (n, m) = (p.h * p.w, p.ho * p.wo);
        dx.par_chunks_mut(k * n)
            .zip(x.par_chunks(k * n).zip(dy.par_chunks(k * m)))
            .for_each(|(dxs, (xs, dys))| {
                for ((dxp, xp), dyp) in dxs.chunks_mut(n).zip(xs.chunks(n)).zip(dys.chunks(m)) {
                    max_bwd_2x2(dxp, xp, dyp, p);
                }
            });
        return dx;
    }
    dx.par_chunks_mut(p.h * p.w)
        .zip(x.par_chunks(p.h * p.w).zip(dy.par_chunks(p.ho * p.wo)))
        .for_each(|(dxp, (xp, dyp))| {
            for oy in 0..p.ho {
                for ox in 0..p.wo {
                    let base = oy * p.stride * p.w + ox * p.stride;
                    // The maximum as PyTorch picks it (see `takes_over`).
                    let (mut at, mut m) = (base, xp[base]);
                    for ky in 0..p.kernel {
                        let r = base + ky * p.w;
                        for (j, v) in xp[r..r + p.kernel].iter().enumerate() {
                            if takes_over(*v, m) {
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
        super::pool_cuda::pool_fwd(true, self.kernel, self.stride, s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = shape::dims4(l.dims(), "max_pool2d")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "max_pool2d")?;
        let out = by_float!(s, "max_pool2d", |T| max_fwd::<T>(slice(s, l)?, &p, b * c));
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
        super::pool_cuda::max_pool_bwd(self.kernel, self.stride, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = shape::dims4(l1.dims(), "max_pool2d grad")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "max_pool2d grad")?;
        if l2.dims() != [b, c, p.ho, p.wo] {
            bail!(
                "max_pool2d grad: dy {:?} does not match x {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let out = by_float!(s1, "max_pool2d", |T| max_bwd::<T>(
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
        super::pool_cuda::pool_fwd(false, self.kernel, self.stride, s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = shape::dims4(l.dims(), "avg_pool2d")?;
        let p = Pool::new(h, w, self.kernel, self.stride, "avg_pool2d")?;
        let out = by_float!(s, "avg_pool2d", |T| avg_fwd::<T>(slice(s, l)?, &p, b * c));
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
        super::pool_cuda::avg_pool_bwd(self.kernel, self.stride, (self.h, self.w), s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, ho, wo) = shape::dims4(l.dims(), "avg_pool2d grad")?;
        let p = Pool::new(self.h, self.w, self.kernel, self.stride, "avg_pool2d grad")?;
        if (p.ho, p.wo) != (ho, wo) {
            bail!(
                "avg_pool2d grad: dy {:?} does not match input {}x{}",
                l.dims(),
                self.h,
                self.w
            )
        }
        let out = by_float!(s, "avg_pool2d grad", |T| avg_bwd::<T>(
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

/// The sum of `xs` in eight interleaved partial sums, which the compiler turns
/// into SIMD adds (a single running sum is one dependent add per element).
fn sum_lanes<T: WithDType>(xs: &[T]) -> T {
    let z = T::from_f64(0.0);
    let mut acc = [z; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(z, |a, &v| a + v);
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().fold(tail, |a, &v| a + v)
}

/// Sum of `dy [B, C, H, W]` over all but the channel dimension (a conv bias's
/// gradient), with autograd.
pub(crate) fn channel_sum(dy: &Tensor) -> Result<Tensor> {
    dy.contiguous()?.apply_op1(ChannelSum)
}

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
        super::pool_cuda::channel_bias(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = shape::dims4(l1.dims(), "channel bias")?;
        if l2.dims() != [c] {
            bail!("channel bias: bias {:?} for {c} channels", l2.dims())
        }
        let hw = h * w;
        let out = by_float!(s1, "channel bias", |T| {
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
        super::pool_cuda::channel_sum(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = shape::dims4(l.dims(), "channel sum")?;
        let hw = h * w;
        let out = by_float!(s, "channel sum", |T| {
            let x = slice::<T>(s, l)?;
            // Per-plane sums in parallel, then a small sequential fold over the batch.
            let sums: Vec<T> = x
                .par_chunks(hw.max(1))
                .with_min_len((1 << 14) / hw.max(1))
                .map(sum_lanes)
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
