//! Fused row-wise kernels for transformers: GELU (tanh form), softmax over the
//! last dimension and layer norm, each one pass forward and one pass backward.
//! candle builds GELU's backward from ~12 element-wise tensors (two `powf`s and
//! a recomputed `tanh`), and kiln's composite softmax and layer norm take 5-10
//! passes each; in a small GPT's training step these were ~30% of the time.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::shape;

/// Elements per parallel task: small enough to spread, large enough to amortise.
const CHUNK: usize = 1 << 14;

pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !matches!(s, CpuStorage::F32(_)) {
        bail!("{what}: f32 only")
    }
    super::slice(s, l)
}

/// `f(out, in)` over an f32 tensor in parallel [`CHUNK`]s (`f` fills the
/// shorter length of the two).
fn map_f32(
    s: &CpuStorage,
    l: &Layout,
    what: &str,
    f: fn(&mut [f32], &[f32]),
) -> Result<(CpuStorage, Shape)> {
    let x = f32_slice(s, l, what)?;
    let y = super::par_fill(x.len(), CHUNK, |i, y| f(y, &x[i * CHUNK..]));
    Ok((CpuStorage::F32(y), l.shape().clone()))
}

/// GELU, tanh approximation (`gelu_new`, PyTorch's `approximate="tanh"`).
pub(crate) struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "kiln-gelu-tanh"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::gelu_tanh_fwd(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, "gelu", super::vexp::gelu_tanh)
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?,
        ))
    }
}

struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "kiln-gelu-tanh-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::gelu_tanh_bwd(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu grad")?;
        let g = f32_slice(s2, l2, "gelu grad")?;
        let out = super::par_fill(x.len(), CHUNK, |i, o| {
            let at = i * CHUNK..i * CHUNK + o.len();
            super::vexp::gelu_tanh_grad(o, &x[at.clone()], &g[at]);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `tanh`, f32 on the CPU: vexp's (~2 ulp, SIMD) in parallel tasks, and a
/// one-pass backward `dy (1 - y^2)` from the output. candle's runs glibc's
/// scalar `tanhf` on one thread and its backward in four passes (~1.3% of the
/// main thread's samples in a DCGAN step, the generator's last layer, with the
/// other core idle).
pub(crate) struct Tanh;

impl CustomOp1 for Tanh {
    fn name(&self) -> &'static str {
        "kiln-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_f32(s, l, "tanh", super::vexp::tanh)
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &TanhGrad)?))
    }
}

/// `dy (1 - y^2)`; op2 on `(y, dy)`.
struct TanhGrad;

impl CustomOp2 for TanhGrad {
    fn name(&self) -> &'static str {
        "kiln-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("tanh grad: dy {:?} for y {:?}", l2.dims(), l1.dims())
        }
        let (y, g) = (
            f32_slice(s1, l1, "tanh grad")?,
            f32_slice(s2, l2, "tanh grad")?,
        );
        let out = super::par_fill(y.len(), CHUNK, |i, o| {
            let at = i * CHUNK..i * CHUNK + o.len();
            for ((o, &y), &g) in o.iter_mut().zip(&y[at.clone()]).zip(&g[at]) {
                *o = g * (1.0 - y * y);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Rows per parallel task for rows of `c` elements.
fn row_block(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

/// A vector of `len` elements whose every row of `c` is `f(out_row, [input
/// rows])`, built in parallel blocks of rows; every input has the output's layout.
fn map_rows<const N: usize>(
    len: usize,
    ins: [&[f32]; N],
    c: usize,
    f: impl Fn(&mut [f32], [&[f32]; N]) + Sync + Send,
) -> Vec<f32> {
    let rb = row_block(c) * c;
    super::par_fill(len, rb, |bi, o| {
        for (ri, row) in o.chunks_mut(c).enumerate() {
            let at = bi * rb + ri * c;
            f(row, ins.map(|x| &x[at..at + c]));
        }
    })
}

/// `y = softmax(scale * x)` of one row, max-subtracted (in SIMD lanes: see
/// `vexp`). With `scale` 1 the product is exact, so the plain softmax shares
/// this code.
#[inline]
pub(super) fn softmax_row(y: &mut [f32], x: &[f32], scale: f32) {
    super::vexp::softmax(y, x, scale)
}

/// The gradient of [`softmax_row`]: `scale * y * (g - sum(g * y))`.
#[inline]
pub(super) fn softmax_grad_row(o: &mut [f32], y: &[f32], g: &[f32], scale: f32) {
    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
    for ((o, &yv), &gv) in o.iter_mut().zip(y).zip(g) {
        *o = scale * yv * (gv - dot);
    }
}

/// Softmax over the last dimension.
pub(crate) struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "kiln-softmax-last"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::softmax_fwd(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let (_, c) = shape::last_rows(l.dims(), "softmax")?;
        let y = map_rows(x.len(), [x], c, |y, [x]| softmax_row(y, x, 1.0));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxLastGrad)?,
        ))
    }
}

struct SoftmaxLastGrad;

impl CustomOp2 for SoftmaxLastGrad {
    fn name(&self) -> &'static str {
        "kiln-softmax-last-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::softmax_bwd(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax grad")?;
        let g = f32_slice(s2, l2, "softmax grad")?;
        let (_, c) = shape::last_rows(l1.dims(), "softmax grad")?;
        let out = map_rows(y.len(), [y, g], c, |o, [y, g]| {
            softmax_grad_row(o, y, g, 1.0)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension with affine weight and bias.
pub(crate) struct LayerNorm {
    pub eps: f32,
}

/// Mean and 1/std of a row (two passes, for precision).
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "kiln-layer-norm"
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
        super::fused_cuda::layer_norm_fwd(self.eps, (s1, l1), (s2, l2), (s3, l3))
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
        let x = f32_slice(s1, l1, "layer_norm")?;
        let w = f32_slice(s2, l2, "layer_norm weight")?;
        let b = f32_slice(s3, l3, "layer_norm bias")?;
        let (_, c) = shape::last_rows(l1.dims(), "layer_norm")?;
        if w.len() != c || b.len() != c {
            bail!(
                "layer_norm: weight/bias of {} and {} for rows of {c}",
                w.len(),
                b.len()
            );
        }
        let eps = self.eps;
        let y = map_rows(x.len(), [x], c, |y, [x]| {
            let (mean, rstd) = moments(x, eps);
            for (((y, &v), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (v - mean) * rstd * wv + bv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        w: &candle_core::Tensor,
        _b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
    )> {
        let g = grad.contiguous()?;
        let gx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX { eps: self.eps })?;
        let gwb = x.apply_op2_no_bwd(&g, &LayerNormGradWB { eps: self.eps })?;
        let gw = gwb.get(0)?.reshape(w.shape())?;
        let gb = gwb.get(1)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "kiln-layer-norm-grad-x"
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
        super::fused_cuda::layer_norm_bwd_x(self.eps, (s1, l1), (s2, l2), (s3, l3))
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
        let x = f32_slice(s1, l1, "layer_norm grad")?;
        let w = f32_slice(s2, l2, "layer_norm grad")?;
        let g = f32_slice(s3, l3, "layer_norm grad")?;
        let (_, c) = shape::last_rows(l1.dims(), "layer_norm grad")?;
        let eps = self.eps;
        let out = map_rows(x.len(), [x, g], c, |o, [x, g]| {
            let (mean, rstd) = moments(x, eps);
            // gx = rstd * (gh - mean(gh) - xh * mean(gh * xh)), gh = g * w.
            let (mut s_gh, mut s_ghxh) = (0f32, 0f32);
            for ((&v, &gv), &wv) in x.iter().zip(g).zip(w) {
                let gh = gv * wv;
                s_gh += gh;
                s_ghxh += gh * (v - mean) * rstd;
            }
            let n = c as f32;
            let (m_gh, m_ghxh) = (s_gh / n, s_ghxh / n);
            for (((o, &v), &gv), &wv) in o.iter_mut().zip(x).zip(g).zip(w) {
                let xh = (v - mean) * rstd;
                *o = rstd * (gv * wv - m_gh - xh * m_ghxh);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "kiln-layer-norm-grad-wb"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::layer_norm_bwd_wb(self.eps, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm grad")?;
        let g = f32_slice(s2, l2, "layer_norm grad")?;
        let (_, c) = shape::last_rows(l1.dims(), "layer_norm grad")?;
        let eps = self.eps;
        let rb = row_block(c) * c;
        // Per-block partial sums of g * xh and g (both in one vector), added
        // in block order (`sum_in_order`): the same bits on every run.
        let parts: Vec<Vec<f32>> = x
            .par_chunks(rb)
            .zip(g.par_chunks(rb))
            .map(|(x, g)| {
                let mut gw = vec![0f32; c];
                let mut gb = vec![0f32; c];
                for (x, g) in x.chunks(c).zip(g.chunks(c)) {
                    let (mean, rstd) = moments(x, eps);
                    for (((w, b), &v), &gv) in gw.iter_mut().zip(gb.iter_mut()).zip(x).zip(g) {
                        *w += gv * (v - mean) * rstd;
                        *b += gv;
                    }
                }
                gw.extend_from_slice(&gb);
                gw
            })
            .collect();
        let out = super::sum_in_order(parts, 2 * c);
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `x [.., C] + b [C]`, whose backward sums the gradient's rows in one
/// contiguous pass (candle reduces over leading dimensions with strided loops).
pub(crate) struct AddBiasLast;

impl CustomOp2 for AddBiasLast {
    fn name(&self) -> &'static str {
        "kiln-add-bias-last"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::add_bias_last(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "add_bias")?;
        let b = f32_slice(s2, l2, "add_bias")?;
        let (_, c) = shape::last_rows(l1.dims(), "add_bias_last")?;
        if b.len() != c {
            bail!("add_bias: bias of {} for rows of {c}", b.len());
        }
        let y = map_rows(x.len(), [x], c, |y, [x]| {
            for ((y, &v), &bv) in y.iter_mut().zip(x).zip(b) {
                *y = v + bv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &candle_core::Tensor,
        b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let g = grad.contiguous()?;
        let gb = super::sum_rows(&g)?.reshape(b.shape())?;
        Ok((Some(g), Some(gb)))
    }
}

/// Column sums of `[.., C]`: `[C]`.
pub(super) struct SumRows;

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "kiln-sum-rows"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::sum_rows(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "sum_rows")?;
        let (_, c) = shape::last_rows(l.dims(), "sum_rows")?;
        let rb = row_block(c) * c;
        let out: Vec<Vec<f32>> = g
            .par_chunks(rb)
            .map(|g| {
                let mut acc = vec![0f32; c];
                for row in g.chunks(c) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let out = super::sum_in_order(out, c);
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

#[cfg(test)]
mod tests {
    use crate::rng::SeededRng;
    use candle_core::{DType, Device, Tensor, Var};

    fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        SeededRng::new(seed)
            .normal(shape, 0.0, scale, &Device::Cpu)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Forward values and the gradient of `sum(f(x) * r)` for a fused op and a reference.
    fn fwd_bwd(
        x: &Tensor,
        r: &Tensor,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let g = (&y * r.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn gelu_matches_the_f64_closed_form_forward_and_backward() {
        for (shape, seed) in [(vec![3, 7, 33], 1), (vec![1000], 2), (vec![4, 3072], 3)] {
            let x = rand(&shape, seed, 3.0);
            let r = rand(&shape, seed + 10, 1.0);
            let (y, g) = fwd_bwd(&x, &r, super::super::gelu_tanh);
            let reference = |t: &Tensor| {
                let inner =
                    ((t + (t.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
                (t * 0.5)?.mul(&(inner.tanh()? + 1.0)?)
            };
            let (y64, g64) = fwd_bwd(&x.to_dtype(DType::F64).unwrap(), &r, reference);
            assert!(max_diff(&y, &y64) < 2e-6, "{shape:?} forward");
            assert!(
                max_diff(&g, &g64) < 2e-5,
                "{shape:?} backward {}",
                max_diff(&g, &g64)
            );
        }
    }

    #[test]
    fn softmax_matches_the_composite_with_extreme_rows() {
        for (shape, seed) in [(vec![2, 3, 5, 17], 4), (vec![7, 1], 5), (vec![3, 50257], 6)] {
            let x = rand(&shape, seed, 20.0);
            let r = rand(&shape, seed + 10, 1.0);
            let (y, g) = fwd_bwd(&x, &r, crate::ops::softmax_last_dim);
            let (yc, gc) = fwd_bwd(&x, &r, |t| {
                crate::ops::composite::softmax_composite(t, 1 + shape.len() - 2)
            });
            assert!(max_diff(&y, &yc) < 1e-6, "{shape:?}");
            assert!(max_diff(&g, &gc) < 1e-5, "{shape:?}");
        }
        // Masked rows (f32::MIN everywhere but one) stay finite.
        let x = Tensor::new(
            &[[f32::MIN, 0.0, f32::MIN], [f32::MIN, f32::MIN, f32::MIN]],
            &Device::Cpu,
        )
        .unwrap();
        let y = crate::ops::softmax_last_dim(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y[0], vec![0.0, 1.0, 0.0]);
        assert!(y[1].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn add_bias_matches_broadcast_add_and_its_gradients() {
        let x = Var::from_tensor(&rand(&[3, 5, 37], 20, 1.0)).unwrap();
        let b = Var::from_tensor(&rand(&[37], 21, 1.0)).unwrap();
        let r = rand(&[3, 5, 37], 22, 1.0);
        let y = crate::ops::add_bias_last(x.as_tensor(), b.as_tensor()).unwrap();
        let yc = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        assert_eq!(max_diff(&y, &yc), 0.0);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb_want = r.sum((0, 1)).unwrap();
        assert!(max_diff(g.get(b.as_tensor()).unwrap(), &gb_want) < 1e-5);
        assert_eq!(max_diff(g.get(x.as_tensor()).unwrap(), &r), 0.0);
    }

    #[test]
    fn layer_norm_matches_the_composite_for_input_weight_and_bias() {
        for (shape, seed) in [(vec![2, 5, 768], 7), (vec![9, 3], 8), (vec![1, 1, 129], 9)] {
            let c = *shape.last().unwrap();
            let x = (rand(&shape, seed, 2.0) + 5.0).unwrap();
            let w = Var::from_tensor(&rand(&[c], seed + 1, 1.0)).unwrap();
            let b = Var::from_tensor(&rand(&[c], seed + 2, 1.0)).unwrap();
            let r = rand(&shape, seed + 3, 1.0);
            let run = |fused: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let f = if fused {
                    crate::ops::layer_norm
                } else {
                    crate::ops::composite::layer_norm_composite
                };
                let y = f(xv.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
                let gs = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |t: &Tensor| gs.get(t).unwrap().clone();
                (
                    y,
                    get(xv.as_tensor()),
                    get(w.as_tensor()),
                    get(b.as_tensor()),
                )
            };
            let (y, gx, gw, gb) = run(true);
            let (yc, gxc, gwc, gbc) = run(false);
            assert!(max_diff(&y, &yc) < 1e-5, "{shape:?} y");
            assert!(
                max_diff(&gx, &gxc) < 1e-4,
                "{shape:?} gx {}",
                max_diff(&gx, &gxc)
            );
            assert!(
                max_diff(&gw, &gwc) < 1e-3,
                "{shape:?} gw {}",
                max_diff(&gw, &gwc)
            );
            assert!(max_diff(&gb, &gbc) < 1e-4, "{shape:?} gb");
        }
    }
}

/// splitmix64's output function: a bijective mix of a 64-bit counter, so
/// `mix(seed + i * GOLDEN)` is element `i` of splitmix64's stream from `seed`.
#[inline]
fn splitmix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Inverted dropout's mask as a pure function of `(seed, element index)`:
/// element `i` is kept when the 32-bit half `i % 2` of draw `i / 2` is below
/// `threshold` (`keep * 2^32`). Every element's fate depends on its index
/// alone, so the mask is generated in parallel, identical for any thread
/// count, and the backward pass regenerates it instead of storing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutMask {
    pub(crate) seed: u64,
    pub(crate) threshold: u64,
    pub(crate) scale: f32,
}

impl DropoutMask {
    pub(crate) fn new(seed: u64, keep: f64) -> Self {
        Self {
            seed,
            threshold: (keep.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The factors (`scale` or 0) of elements `2d` and `2d + 1`: draw `d`'s two halves.
    #[inline]
    fn pair(&self, d: usize) -> [f32; 2] {
        let z = splitmix(
            self.seed
                .wrapping_add((d as u64).wrapping_add(1).wrapping_mul(GOLDEN)),
        );
        [z & 0xffff_ffff, z >> 32].map(|h| if h < self.threshold { self.scale } else { 0.0 })
    }

    /// `out[j] = x[j] * mask(start + j)` for a run starting at an even index.
    fn apply_run<T: Copy>(&self, start: usize, x: &[T], out: &mut [T], mul: impl Fn(T, f32) -> T) {
        debug_assert!(start.is_multiple_of(2));
        for (p, (o, x)) in out.chunks_mut(2).zip(x.chunks(2)).enumerate() {
            for ((o, &x), m) in o.iter_mut().zip(x).zip(self.pair(start / 2 + p)) {
                *o = mul(x, m);
            }
        }
    }

    /// `x[j] *= mask(start + j)`, for a run starting at any index.
    pub(crate) fn scale_run(&self, start: usize, x: &mut [f32]) {
        let (mut e, mut i) = (start, 0);
        if e % 2 == 1 && !x.is_empty() {
            x[0] *= self.pair(e / 2)[1];
            (e, i) = (e + 1, 1);
        }
        while i + 1 < x.len() {
            let [a, b] = self.pair(e / 2);
            x[i] *= a;
            x[i + 1] *= b;
            (e, i) = (e + 2, i + 2);
        }
        if i < x.len() {
            x[i] *= self.pair(e / 2)[0];
        }
    }

    /// The mask itself (`scale` or 0 per element), for devices without the fused op.
    pub(crate) fn values(&self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            for (p, o) in o.chunks_mut(2).enumerate() {
                o.copy_from_slice(&self.pair(i * CHUNK / 2 + p)[..o.len()]);
            }
        });
        out
    }
}

/// `x * mask`, the mask drawn in the same pass (see [`DropoutMask`]); its
/// gradient is the same op on the incoming gradient.
pub(crate) struct Dropout(pub(crate) DropoutMask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "kiln-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = &self.0;
        let out = by_float!(s, "dropout", |T| {
            let x: &[T] = super::slice(s, l)?;
            super::par_fill(x.len(), CHUNK, |i, y| {
                m.apply_run(i * CHUNK, &x[i * CHUNK..i * CHUNK + y.len()], y, |x, k| {
                    x * k as T
                })
            })
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::fused_cuda::dropout(&self.0, s, l)
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Dropout(self.0))?))
    }
}

/// `softmax(scale * x + causal mask)` over the last dimension of
/// `[.., T, S]` scores (`S >= T`: query `i` sees keys `0..=i + S - T`);
/// masked entries are exactly 0. One pass each way, replacing a scale, a
/// broadcast bias add and a softmax (and their backward passes).
pub(crate) struct SoftmaxCausal {
    pub(crate) scale: f32,
}

/// Row geometry of causal scores: `(t, s)` from the last two dimensions.
fn causal_dims(dims: &[usize], what: &str) -> Result<(usize, usize)> {
    match dims {
        [.., t, s] if s >= t && *t > 0 => Ok((*t, *s)),
        _ => bail!("{what}: expected [.., T, S] scores with S >= T >= 1, got {dims:?}"),
    }
}

/// A vector of `len` causal scores whose every row is `f(visible_len,
/// out_row, [input rows])` (the row starts zeroed: the masked keys stay 0),
/// built in parallel blocks of rows.
fn map_causal_rows<const N: usize>(
    len: usize,
    ins: [&[f32]; N],
    (t, s): (usize, usize),
    f: impl Fn(usize, &mut [f32], [&[f32]; N]) + Sync + Send,
) -> Vec<f32> {
    let rb = row_block(s) * s;
    super::par_fill(len, rb, |bi, o| {
        for (ri, row) in o.chunks_mut(s).enumerate() {
            let at = bi * rb + ri * s;
            let i = (at / s) % t;
            f(i + s - t + 1, row, ins.map(|x| &x[at..at + s]));
        }
    })
}

impl CustomOp1 for SoftmaxCausal {
    fn name(&self) -> &'static str {
        "kiln-softmax-causal"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "causal softmax")?;
        let geom = causal_dims(l.dims(), "causal softmax")?;
        let scale = self.scale;
        let y = map_causal_rows(x.len(), [x], geom, |n, y, [x]| {
            softmax_row(&mut y[..n], &x[..n], scale)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxCausalGrad { scale: self.scale },
        )?))
    }
}

/// `scale * y * (g - sum(g * y))` over each row's visible keys; 0 elsewhere.
struct SoftmaxCausalGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxCausalGrad {
    fn name(&self) -> &'static str {
        "kiln-softmax-causal-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "causal softmax grad")?;
        let g = f32_slice(s2, l2, "causal softmax grad")?;
        let geom = causal_dims(l1.dims(), "causal softmax grad")?;
        let scale = self.scale;
        let out = map_causal_rows(y.len(), [y, g], geom, |n, o, [y, g]| {
            softmax_grad_row(&mut o[..n], &y[..n], &g[..n], scale)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
