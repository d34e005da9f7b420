//! Matrix products for decoding: a multithreaded matrix-vector kernel for the
//! few-row products of token-by-token generation, where a general gemm spends
//! its time packing a weight it reads only once; it serves 1 to 3 rows (one
//! per sequence being decoded). It is bound by memory bandwidth, so it reads
//! each weight as several streams at once, which keeps more reads in flight
//! than one sequential pass. f32 products of 4 to 64 rows go to
//! [`crate::fewrows`], larger ones to `kiln_core::ops::matmul`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// `x [M, K] @ w [K, N]`, or `x @ w^T` for `w [N, K]` when `transposed`:
/// the gemv kernel for 1 to 3 rows, the few-row kernels up to
/// [`crate::fewrows::MAX_ROWS`] (f32 on the CPU), `kiln_core::ops::matmul` beyond.
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
        kiln_core::ops::matmul(x, &w.t()?)
    } else {
        kiln_core::ops::matmul(x, w)
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

    /// Eight weights at `p` widened to f32 lanes.
    ///
    /// # Safety
    /// `p` must be valid for eight reads, and the CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: as the caller promises.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Weight for half::bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: as the caller promises; eight bf16 are 16 bytes.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
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

/// Whether the CPU runs the AVX2+FMA builds of the streaming kernels. They
/// give the same bits as the plain builds (no fused multiply-adds: Rust does
/// not contract `a * b + c`); the wider loads keep more of the weight stream in
/// flight.
fn avx2() -> bool {
    crate::fewrows::avx2_fma()
}

/// Weight rows per band of a `[K, N]` product. A fixed size, not a share per
/// thread, so the partial sums (and so the bits) are the same on any thread
/// count.
const BAND: usize = 64;

/// Weight rows a `[K, N]` band adds at once: eight rows 8 apart are eight
/// streams through memory. On a 2-core Zen 3, GPT-2 small's 48 block weights
/// streamed at 0.63-0.69x the machine's best read one row at a time (SSE2),
/// 0.77x eight adjacent rows at a time (AVX2), 0.87-0.94x eight rows 8 apart.
const ROWS: usize = 8;

/// `acc += x @ w` for one band: `x [kb]`, `w [kb, n]`, `acc [n]`. A full
/// band takes rows `g, g + 8, .., g + 56` together, eight streams 8 rows
/// apart; a short band takes eight adjacent rows, then the rest one by one.
#[inline(always)]
fn band_body<W: Weight>(x: &[f32], w: &[W], acc: &mut [f32]) {
    let (n, kb) = (acc.len(), x.len());
    let spread = if kb == BAND { BAND / ROWS } else { 1 };
    let groups = kb / ROWS;
    for g in 0..groups {
        let row0 = if spread == 1 { g * ROWS } else { g };
        // Sliced to `n` so the compiler drops the bounds checks and vectorises.
        let r: [&[W]; ROWS] = std::array::from_fn(|j| &w[(row0 + j * spread) * n..][..n]);
        let xg: [f32; ROWS] = std::array::from_fn(|j| x[row0 + j * spread]);
        for i in 0..n {
            acc[i] += (xg[0] * r[0][i].f() + xg[1] * r[1][i].f())
                + (xg[2] * r[2][i].f() + xg[3] * r[3][i].f())
                + (xg[4] * r[4][i].f() + xg[5] * r[5][i].f())
                + (xg[6] * r[6][i].f() + xg[7] * r[7][i].f());
        }
    }
    for kk in groups * ROWS..kb {
        axpy(x[kk], &w[kk * n..][..n], acc);
    }
}

/// Weight rows of an `[N, K]` block whose dot products run together, and the
/// spacing between them: four rows 16 apart are four streams through memory.
/// The tied LM head streamed at 0.71-0.83x the best read one row at a time,
/// 0.93-1.0x four rows 16 apart (same Zen 3; four adjacent rows were slower
/// than one).
const DOTS: usize = 4;
const SPREAD: usize = 16;
/// Rows per `[N, K]` task: `DOTS * SPREAD`.
const BLOCK: usize = DOTS * SPREAD;

/// `out[q] = x . w[q]` for four weight rows of length `x.len()`.
#[inline(always)]
fn dot4_body<W: Weight>(x: &[f32], w: [&[W]; DOTS]) -> [f32; DOTS] {
    let k = x.len();
    let (w0, w1, w2, w3) = (&w[0][..k], &w[1][..k], &w[2][..k], &w[3][..k]);
    let mut acc = [[0f32; 8]; DOTS];
    let lanes = x
        .chunks_exact(8)
        .zip(w0.chunks_exact(8))
        .zip(w1.chunks_exact(8))
        .zip(w2.chunks_exact(8))
        .zip(w3.chunks_exact(8));
    for ((((xa, b0), b1), b2), b3) in lanes {
        for l in 0..8 {
            acc[0][l] += xa[l] * b0[l].f();
            acc[1][l] += xa[l] * b1[l].f();
            acc[2][l] += xa[l] * b2[l].f();
            acc[3][l] += xa[l] * b3[l].f();
        }
    }
    let tail = k / 8 * 8;
    std::array::from_fn(|q| {
        let mut s: f32 = acc[q].iter().sum();
        for j in tail..k {
            s += x[j] * w[q][j].f();
        }
        s
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Weight, DOTS};

    /// [`super::band_body`] compiled for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn band<W: Weight>(x: &[f32], w: &[W], acc: &mut [f32]) {
        super::band_body(x, w, acc)
    }

    /// [`super::dot4_body`] in AVX2 lanes: the same eight lanes per row,
    /// each a multiply then an add (no FMA), so the same bits.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot4<W: Weight>(x: &[f32], w: [&[W]; DOTS]) -> [f32; DOTS] {
        use std::arch::x86_64::*;
        let k = x.len();
        assert!(w.iter().all(|r| r.len() >= k));
        let mut acc = [_mm256_setzero_ps(); DOTS];
        let mut i = 0;
        while i + 8 <= k {
            // SAFETY: `i + 8 <= k` and every row holds `k` values (asserted).
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for q in 0..DOTS {
                    let wv = W::load8(w[q].as_ptr().add(i));
                    acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(xv, wv));
                }
            }
            i += 8;
        }
        std::array::from_fn(|q| {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds eight f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[q]) };
            let mut s: f32 = lanes.iter().sum();
            for j in i..k {
                s += x[j] * w[q][j].f();
            }
            s
        })
    }
}

/// One band of a `[K, N]` product, with the widest build the CPU runs.
fn band<W: Weight>(fast: bool, x: &[f32], w: &[W], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is `avx2()`: the CPU has AVX2 and FMA.
        return unsafe { x86::band(x, w, acc) };
    }
    let _ = fast;
    band_body(x, w, acc)
}

/// Four dot products, with the widest build the CPU runs.
fn dot4<W: Weight>(fast: bool, x: &[f32], w: [&[W]; DOTS]) -> [f32; DOTS] {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: as in `band`.
        return unsafe { x86::dot4(x, w) };
    }
    let _ = fast;
    dot4_body(x, w)
}

fn gemv<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, transposed: bool) -> Vec<f32> {
    gemv_with(avx2(), x, m, k, w, n, transposed)
}

fn gemv_with<W: Weight>(
    fast: bool,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    transposed: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if n == 0 || k == 0 {
        return y;
    }
    if transposed {
        // w [N, K]: each output is a dot product with one contiguous weight
        // row. A full block of BLOCK rows takes its rows four at a time,
        // SPREAD apart; the last, partial block one at a time.
        let mut yt = vec![0f32; n * m];
        kiln_core::ops::team::chunks_mut(&mut yt, BLOCK * m, |bi, out| {
            let n0 = bi * BLOCK;
            let row = |j: usize| &w[(n0 + j) * k..(n0 + j + 1) * k];
            if out.len() == BLOCK * m {
                for j in 0..SPREAD {
                    let rows: [&[W]; DOTS] = std::array::from_fn(|q| row(j + q * SPREAD));
                    for r in 0..m {
                        let v = dot4(fast, &x[r * k..(r + 1) * k], rows);
                        for (q, v) in v.into_iter().enumerate() {
                            out[(j + q * SPREAD) * m + r] = v;
                        }
                    }
                }
            } else {
                for (j, o) in out.chunks_mut(m).enumerate() {
                    for (r, v) in o.iter_mut().enumerate() {
                        *v = dot(&x[r * k..(r + 1) * k], row(j));
                    }
                }
            }
        });
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = yt[j * m + r];
            }
        }
    } else {
        // w [K, N]: bands of whole rows, each streamed once into its partial
        // sums (sequential memory), then the partial sums added in order.
        // Column blocks measured 23.5 tokens/s on GPT-2 small, K bands 39.
        let parts: Vec<Vec<f32>> = kiln_core::ops::team::map(k.div_ceil(BAND), |t| {
            let (k0, k1) = (t * BAND, ((t + 1) * BAND).min(k));
            let mut acc = vec![0f32; m * n];
            for (r, a) in acc.chunks_exact_mut(n).enumerate() {
                band(fast, &x[r * k + k0..r * k + k1], &w[k0 * n..k1 * n], a);
            }
            acc
        });
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
        use kiln_core::ops::matmul;
        if self.transposed {
            Ok((Some(matmul(grad, w)?), Some(matmul(&grad.t()?, x)?)))
        } else {
            Ok((Some(matmul(grad, &w.t()?)?), Some(matmul(&x.t()?, grad)?)))
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
    fn gemv_bits_do_not_depend_on_threads_or_simd() {
        // Full and partial blocks and bands, 1 and 3 rows, f32 and bf16.
        for &(m, k, n) in &[(1, 200, 300), (3, 77, 131), (2, 8, 64)] {
            let x: Vec<f32> = rand((m, k), 7).flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = rand((k, n), 8).flatten_all().unwrap().to_vec1().unwrap();
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            for tr in [false, true] {
                let run = |threads: usize, fast: bool| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let a = gemv_with(fast, &x, m, k, &w, n, tr);
                        let b = gemv_with(fast, &x, m, k, &wb, n, tr);
                        (a, b)
                    })
                };
                let want = run(1, false);
                assert_eq!(run(3, false), want, "threads {m}x{k}x{n} T={tr}");
                if avx2() {
                    assert_eq!(run(3, true), want, "simd {m}x{k}x{n} T={tr}");
                }
            }
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
