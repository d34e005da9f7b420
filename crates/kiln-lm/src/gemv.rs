//! Matrix products for decoding: a multithreaded matrix-vector kernel for the
//! few-row products of token-by-token generation, where a general gemm spends
//! its time packing a weight it reads only once. Larger products go to candle.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows up to which the gemv kernel runs (one row per sequence being decoded).
const MAX_ROWS: usize = 8;

/// `x [M, K] @ w [K, N]`, or `x @ w^T` for `w [N, K]` when `transposed`.
pub(crate) fn matmul(x: &Tensor, w: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
    let m = x.dim(0)?;
    let fast = m <= MAX_ROWS
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

struct Gemv {
    transposed: bool,
}

/// Dot product with 16 independent accumulators so the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
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
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (s1, s2) else {
            candle_core::bail!("kiln-gemv: f32 only");
        };
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("kiln-gemv: contiguous inputs only");
        };
        let (x, w) = (&xs[xa..xb], &ws[wa..wb]);
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
        let mut y = vec![0f32; m * n];
        if self.transposed {
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
            // w [K, N]: accumulate x[k] * w[k, cols] over k for a block of columns.
            const COLS: usize = 512;
            let blocks = n.div_ceil(COLS);
            let parts: Vec<Vec<f32>> = (0..blocks)
                .into_par_iter()
                .map(|bi| {
                    let c0 = bi * COLS;
                    let c1 = (c0 + COLS).min(n);
                    let width = c1 - c0;
                    let mut acc = vec![0f32; m * width];
                    for kk in 0..k {
                        let wrow = &w[kk * n + c0..kk * n + c1];
                        for r in 0..m {
                            axpy(x[r * k + kk], wrow, &mut acc[r * width..(r + 1) * width]);
                        }
                    }
                    acc
                })
                .collect();
            for (bi, acc) in parts.iter().enumerate() {
                let c0 = bi * COLS;
                let width = acc.len() / m.max(1);
                for r in 0..m {
                    y[r * n + c0..r * n + c0 + width]
                        .copy_from_slice(&acc[r * width..(r + 1) * width]);
                }
            }
        }
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
    fn gemv_equals_matmul_both_layouts_odd_sizes() {
        for &(m, k, n) in &[(1, 7, 5), (3, 33, 1030), (8, 64, 513), (1, 768, 50)] {
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
        }
    }
}
