//! Matrix products for decoding: a multithreaded matrix-vector kernel for the
//! few-row products of token-by-token generation, where a general gemm spends
//! its time packing a weight it reads only once; it serves 1 to 3 rows (one
//! per sequence being decoded). f32 products of 4 to 64 rows go to
//! [`crate::fewrows`], larger ones to candle.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `x [M, K] @ w [K, N]`, or `x @ w^T` for `w [N, K]` when `transposed`:
/// the gemv kernel for 1 to 3 rows, the few-row kernels up to
/// [`crate::fewrows::MAX_ROWS`] (f32 on the CPU), candle's gemm beyond.
pub(crate) fn matmul(x: &Tensor, w: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
    let m = x.dim(0)?;
    let fast = m <= crate::fewrows::MAX_ROWS
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous();
    if fast {
        return x.contiguous()?.apply_op2(w, Gemv { transposed });
    }
    if transposed {
        x.matmul(&w.t()?)
    } else {
        x.matmul(w)
    }
}

/// `x [M, K] (f32) @ w` with a bf16 weight (inference only): half the bytes
/// per token of an f32 weight. Meant for 1 to 3 rows: from 4 the f32 few-row
/// kernels are faster (4 rows: 20.7 against 27.4 ms for 48 `[768, 2304]`
/// weights).
pub(crate) fn matmul_bf16(x: &Tensor, w: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(w, &Gemv { transposed })
}

struct Gemv {
    transposed: bool,
}

/// A weight element the kernels read as f32.
pub(crate) trait Weight: Copy + Send + Sync {
    fn f(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Dot product with 16 independent accumulators so the compiler vectorises it.
#[inline]
pub(crate) fn dot<W: Weight>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i].f();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.f();
    }
    s
}

#[inline]
pub(crate) fn axpy<W: Weight>(alpha: f32, x: &[W], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi.f();
    }
}

fn gemv<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, transposed: bool) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if transposed {
        // w [N, K]: each output is a dot product with one contiguous weight row;
        // a block of rows serves all M inputs while it is in cache.
        const BLOCK: usize = 64;
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(BLOCK * m)
            .enumerate()
            .for_each(|(bi, out)| {
                let n0 = bi * BLOCK;
                for (j, o) in out.chunks_mut(m).enumerate() {
                    let row = &w[(n0 + j) * k..(n0 + j + 1) * k];
                    for (r, v) in o.iter_mut().enumerate() {
                        *v = dot(&x[r * k..(r + 1) * k], row);
                    }
                }
            });
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = yt[j * m + r];
            }
        }
    } else {
        // w [K, N]: split K so each task streams a contiguous band of whole rows
        // (sequential memory, even shares), then add the partial sums. Column
        // blocks measured 23.5 tokens/s on GPT-2 small, K bands 39.
        let tasks = (4 * rayon::current_num_threads()).clamp(1, k.max(1));
        let band = k.div_ceil(tasks);
        let parts: Vec<Vec<f32>> = (0..k.div_ceil(band))
            .into_par_iter()
            .map(|t| {
                let k0 = t * band;
                let k1 = (k0 + band).min(k);
                let mut acc = vec![0f32; m * n];
                for kk in k0..k1 {
                    let wrow = &w[kk * n..(kk + 1) * n];
                    for r in 0..m {
                        axpy(x[r * k + kk], wrow, &mut acc[r * n..(r + 1) * n]);
                    }
                }
                acc
            })
            .collect();
        for p in &parts {
            y.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
    y
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "kiln-gemv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xs) = s1 else {
            candle_core::bail!("kiln-gemv: f32 inputs only");
        };
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("kiln-gemv: contiguous inputs only");
        };
        let x = &xs[xa..xb];
        let (m, k) = l1.shape().dims2()?;
        let (w0, w1) = l2.shape().dims2()?;
        let n = if self.transposed { w0 } else { w1 };
        let wk = if self.transposed { w1 } else { w0 };
        if wk != k {
            candle_core::bail!(
                "kiln-gemv: shapes [{m}, {k}] and {:?} do not multiply",
                l2.dims()
            );
        }
        let y = match s2 {
            CpuStorage::F32(w) if m >= crate::fewrows::MIN_ROWS => crate::fewrows::matmul(
                x,
                m,
                k,
                &w[wa..wb],
                n,
                self.transposed,
                crate::fewrows::Level::detect(),
            ),
            CpuStorage::F32(w) => gemv(x, m, k, &w[wa..wb], n, self.transposed),
            CpuStorage::BF16(w) => gemv(x, m, k, &w[wa..wb], n, self.transposed),
            _ => candle_core::bail!("kiln-gemv: f32 or bf16 weights only"),
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Same gradients as the matmul it replaces.
        if self.transposed {
            Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
        } else {
            Ok((Some(grad.matmul(&w.t()?)?), Some(x.t()?.matmul(grad)?)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let mut r = kiln_core::rng::SeededRng::new(seed);
        r.normal(shape, 0.0, 1.0, &Device::Cpu).unwrap()
    }

    #[test]
    fn few_row_products_pass_gradients_like_matmul() {
        // 20 rows take the few-row kernels; their backward is candle's matmul.
        let x = candle_core::Var::from_tensor(&rand((20, 12), 4)).unwrap();
        let w = candle_core::Var::from_tensor(&rand((12, 7), 5)).unwrap();
        let loss = matmul(x.as_tensor(), w.as_tensor(), false)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let want = x.as_tensor().matmul(w.as_tensor()).unwrap();
        let want_gx = (want.clone() * 2.0)
            .unwrap()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        let want_gw = x
            .as_tensor()
            .t()
            .unwrap()
            .matmul(&(want * 2.0).unwrap())
            .unwrap();
        for (got, want) in [
            (g.get(x.as_tensor()).unwrap(), want_gx),
            (g.get(w.as_tensor()).unwrap(), want_gw),
        ] {
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-3);
        }
    }

    #[test]
    fn gemv_equals_matmul_both_layouts_odd_sizes() {
        // Up to 3 rows: the gemv; 4 to 64: the few-row kernels; 65: candle.
        let shapes = [
            (1, 7, 5),
            (3, 33, 1030),
            (4, 40, 100),
            (8, 64, 513),
            (1, 768, 50),
            (9, 40, 97),
            (32, 96, 200),
            (64, 33, 61),
            (65, 20, 30),
        ];
        for &(m, k, n) in &shapes {
            let x = rand((m, k), 1);
            let w = rand((k, n), 2);
            let want = x.matmul(&w).unwrap();
            let got = matmul(&x, &w, false).unwrap();
            let d = (want - &got).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{m}x{k}x{n}");
            let wt = rand((n, k), 3);
            let want = x.matmul(&wt.t().unwrap()).unwrap();
            let got = matmul(&x, &wt, true).unwrap();
            let d = (want - &got).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "T {m}x{k}x{n}");
            // bf16 weights: the same product as with the weights rounded to bf16.
            for (wt_, tr) in [(&w, false), (&wt, true)] {
                let wb = wt_.to_dtype(DType::BF16).unwrap();
                let wr = wb.to_dtype(DType::F32).unwrap();
                let want = if tr {
                    x.matmul(&wr.t().unwrap()).unwrap()
                } else {
                    x.matmul(&wr).unwrap()
                };
                let got = matmul_bf16(&x, &wb, tr).unwrap();
                let d = (want - &got).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-3, "bf16 {m}x{k}x{n}");
            }
        }
    }
}
