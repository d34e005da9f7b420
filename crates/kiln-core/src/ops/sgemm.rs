//! f32 matrix multiply for AVX2+FMA CPUs whose `gemm` runs its AVX2 kernels
//! (no AVX-512, or a `kiln_no_avx512` build): packed panels around a 6 x 16
//! register tile, the loop unrolled four `k` steps deep.
//!
//! Why not `gemm`'s own AVX2 kernel: on the DCGAN convolutions' shapes it ran
//! 52-55 GFLOP/s a core on a Zen 3 whose FMA peak is 89; the same 6 x 16 tile
//! without unrolling ran ~70 on data in L1, unrolled 87-92 (the loop's own
//! pointer and counter work kept the FMA ports from filling).
//!
//! Blocking follows BLIS: `NC` columns of `B` are packed `KC` rows at a time
//! into 16-column strips (k-major, zero padded), `MC` rows of `A` into 6-row
//! strips; each tile sums its `KC` products in `k` order and then adds them to
//! `C`. Every element's sum therefore runs in the same order however the work
//! is split, so the bits do not depend on the thread count.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `a [M, K] @ b [K, N]` for f32 CPU tensors as a candle op (with its
/// gradients), read through their strides (transposed views cost nothing).
pub(super) struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "kiln-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("kiln-matmul: f32 inputs only");
        };
        let ((m, k), (k2, n)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != k2 {
            candle_core::bail!("kiln-matmul: shapes [{m}, {k}] and [{k2}, {n}] do not multiply");
        }
        let (sa, sb) = (l1.stride(), l2.stride());
        let mut out = vec![0f32; m * n];
        if m * n > 0 && k > 0 {
            sgemm(
                (m, n, k),
                &mut out,
                n,
                false,
                &a[l1.start_offset()..],
                (sa[0], sa[1]),
                &b[l2.start_offset()..],
                (sb[0], sb[1]),
                rayon::current_num_threads(),
                false,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // No gradient for an operand outside the graph (a batch of inputs):
        // for a linear layer's first product it cost as much as the weight's.
        let da = if a.track_op() {
            Some(super::matmul(grad, &b.t()?)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(super::matmul(&a.t()?, grad)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two ymm vectors).
const NR: usize = 16;
/// `k` depth of a packed block: an `A` strip (6 KiB) and a `B` strip (16 KiB)
/// stay in L1 while a tile is computed.
const KC: usize = 256;
/// Rows of `A` packed at a time (96 KiB, in L2).
const MC: usize = 96;
/// Columns of `B` packed at a time (2 MiB at most, in L3).
const NC: usize = 2048;
/// Strips of `B` (per `NC` block) up to which `A` is read in place, not
/// packed.
const DIRECT_STRIPS: usize = 2;
/// Multiply-adds below which a product is not split across threads.
const MIN_TASK_MACS: usize = 1 << 20;

/// Which products [`sgemm`] takes from `gemm` here, by the kernels `gemm`
/// runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beside {
    /// No AVX2 and FMA: `gemm` takes every product.
    Nothing,
    /// `gemm`'s AVX2 kernels: see [`suits`].
    Avx2,
    /// `gemm`'s AVX-512 kernels: see [`suits_beside_avx512`].
    Avx512,
}

fn beside() -> Beside {
    use std::sync::OnceLock;
    static ON: OnceLock<Beside> = OnceLock::new();
    *ON.get_or_init(|| match crate::device::gemm_simd_level() {
        _ if !kernel_runs() => Beside::Nothing,
        "avx2" => Beside::Avx2,
        "avx512" => Beside::Avx512,
        _ => Beside::Nothing,
    })
}

/// Whether [`sgemm`] runs `[m, k] @ [k, n]` on `threads` threads here rather
/// than `gemm`; `b_transposed`: `B` is read down its columns (column stride
/// not 1), as a linear layer's `x @ w^T` reads its `[out, in]` weight.
pub(super) fn picks(m: usize, n: usize, k: usize, threads: usize, b_transposed: bool) -> bool {
    match beside() {
        Beside::Nothing => false,
        Beside::Avx2 => suits(m, n, k, threads),
        Beside::Avx512 => b_transposed && suits_beside_avx512(m, n, k, threads),
    }
}

/// Whether [`sgemm`] beats `gemm`'s AVX2 kernels on a product run on
/// `threads` threads.
///
/// - One thread (each convolution's per-image products): only from 64 rows
///   and columns and 48 `k` steps. Below that, `gemm`'s narrower edge kernels
///   waste less of the 6 x 16 tile (Zen 3: 32x256x72 0.88-0.97x, 48x256x64
///   0.86-0.93x of gemm's speed; 64x256x48 1.07-1.24x, 96x256x96 ~1.0-1.2x;
///   without the limit the inpainting autoencoder's step ran 7% slower).
/// - More threads (linear layers, whose batch is often 32): from 8 rows, 32
///   columns and 32 `k` steps. `gemm` splits such products poorly across two
///   threads (Zen 3, two threads, kiln against gemm: 32x3072x512 2.2x,
///   32x512x3072 1.6-1.8x, 3072x512x32 1.5x, 512x32x3072 1.16x, 3072x32x512
///   0.99-1.2x, 8x3072x512 1.4x, 32x32x128 1.1x; with 16 columns 1.0x, 8
///   columns 0.76x).
fn suits(m: usize, n: usize, k: usize, threads: usize) -> bool {
    if threads > 1 {
        m >= 8 && n >= 32 && k >= 32
    } else {
        m >= 64 && n >= 64 && k >= 48
    }
}

/// Whether [`sgemm`] beats `gemm`'s AVX-512 kernels on a product whose `B` is
/// read transposed: up to 256 rows (8 with more than one thread, 16 on one),
/// 32 columns and 32 `k` steps.
///
/// `gemm`'s AVX-512 path is slow on such products with few rows: on a 2-core
/// Zen 4 (AVX-512, `gemm` 0.19), kiln's AVX2 kernel against it, two threads:
/// 8x512x3072 13.5x, 32x512x3072 7.9x, 32x3072x512 3.1x, 128x768x768 1.7x,
/// 256x768x768 1.4x, 512x768x768 1.2x, 1024x768x768 0.96x; one thread:
/// 16x512x512 5.1x, 32x72x256 1.7x, 256x512x512 1.3x, 512x512x512 1.15x, but
/// 8x27x1024 0.28x. Rows are capped at 256 because a CPU with two 512-bit FMA
/// units per core may double `gemm`'s rate and not this kernel's. With `B`
/// read along its rows `gemm` kept up or led (32x512x3072 1.5x, the DCGAN
/// convolutions' one-thread products 1.06-1.12x), so those stay with `gemm`.
fn suits_beside_avx512(m: usize, n: usize, k: usize, threads: usize) -> bool {
    let min_rows = if threads > 1 { 8 } else { 16 };
    (min_rows..=256).contains(&m) && n >= 32 && k >= 32
}

/// Whether this CPU can run the AVX2+FMA kernel at all.
pub(super) fn kernel_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Packed `A` and `B` blocks, kept per thread: a fresh 2 MiB buffer per
    /// call would page-fault on every product.
    static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The three operands' pointers, shared by rayon tasks: each task writes its
/// own rows or columns of `C` and only reads `A` and `B`.
#[derive(Clone, Copy)]
struct Shared(*mut f32, *const f32, *const f32);
impl Shared {
    /// The pointers; a method, so that closures capture the whole struct (a
    /// field pattern would capture the bare, non-`Send` pointers).
    fn get(self) -> (*mut f32, *const f32, *const f32) {
        (self.0, self.1, self.2)
    }
}

// SAFETY: tasks write disjoint parts of the matrix behind the pointer.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]` in f32, `dst` row-major with row
/// stride `dst_rs`, `lhs`/`rhs` given by (row stride, column stride), on
/// `threads` tasks: on [`super::team`] when `on_team` (decoding's products,
/// between the team's other loops), else on rayon. The caller checks that
/// [`kernel_runs`] and that every element touched lies inside the slices (as
/// `conv::mm` does).
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: &[f32],
    ls: (usize, usize),
    rhs: &[f32],
    rs: (usize, usize),
    threads: usize,
    on_team: bool,
) {
    assert!(kernel_runs(), "kiln sgemm: this CPU lacks AVX2 and FMA");
    if m == 0 || n == 0 || k == 0 {
        if !acc && k == 0 {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let last = |rows: usize, cols: usize, r: usize, c: usize| (rows - 1) * r + (cols - 1) * c;
    assert!(
        last(m, n, dst_rs, 1) < dst.len()
            && last(m, k, ls.0, ls.1) < lhs.len()
            && last(k, n, rs.0, rs.1) < rhs.len(),
        "kiln sgemm: operands out of bounds"
    );
    let ptrs = Shared(dst.as_mut_ptr(), lhs.as_ptr(), rhs.as_ptr());
    // Split the larger side into whole tiles; the `k` order of each element's
    // sum is the same in every split.
    let (split_cols, unit, len) = if n >= m {
        (true, NR, n)
    } else {
        (false, MR, m)
    };
    // A task per thread, but none with less than ~1M multiply-adds: waking a
    // rayon worker costs tens of microseconds here, a 32x32x128 product two.
    let work = (m * n).saturating_mul(k).div_ceil(MIN_TASK_MACS);
    let tasks = threads.min(work).clamp(1, len.div_ceil(unit));
    let per = len.div_ceil(unit).div_ceil(tasks) * unit;
    let run = |t: usize| {
        let lo = t * per;
        let hi = len.min(lo + per);
        if lo >= hi {
            return;
        }
        let (c, a, b) = ptrs.get();
        BUFS.with(|bufs| {
            let (pa, pb) = &mut *bufs.borrow_mut();
            // SAFETY: the assert above bounds every element of the full
            // product; a task's rows or columns are a part of it, and no two
            // tasks write the same element of `C`.
            unsafe {
                if split_cols {
                    block(
                        (m, hi - lo, k),
                        c.add(lo),
                        dst_rs,
                        acc,
                        a,
                        ls,
                        b.add(lo * rs.1),
                        rs,
                        pa,
                        pb,
                    );
                } else {
                    block(
                        (hi - lo, n, k),
                        c.add(lo * dst_rs),
                        dst_rs,
                        acc,
                        a.add(lo * ls.0),
                        ls,
                        b,
                        rs,
                        pa,
                        pb,
                    );
                }
            }
        });
    };
    if tasks == 1 {
        run(0);
    } else if on_team {
        super::team::run(tasks, &run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// One thread's product: the BLIS loops over `NC`, `KC` and `MC` blocks.
///
/// # Safety
/// Every element of the `m x n` block of `c` (row stride `ldc`), the `m x k`
/// block of `a` and the `k x n` block of `b` must be valid; AVX2 and FMA must
/// be present.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    acc: bool,
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    pa: &mut Vec<f32>,
    pb: &mut Vec<f32>,
) {
    let mut jc = 0;
    while jc < n {
        let nc = NC.min(n - jc);
        let strips = nc.div_ceil(NR);
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            // The first block overwrites `C` unless the caller accumulates.
            let add = acc || pc > 0;
            // `resize` zero-fills what a smaller block left out. Growing
            // only (skipping that fill, ~0.7% of a DCGAN step in memset) ran
            // the DCGAN step no faster (13 alternated runs, Zen 3), probably
            // because the fill leaves the lines the pack writes in cache.
            pb.resize(strips * kc * NR, 0.0);
            // SAFETY: rows `pc..pc + kc` and columns `jc..jc + nc` of `b` lie
            // in the caller's block.
            unsafe { pack_b(b.add(pc * brs + jc * bcs), (brs, bcs), kc, nc, pb) };
            // With few strips of `B`, each value of `A` is used in too few
            // tiles to repay packing it: the tiles read it in place.
            // Only rows read front to back (`acs == 1`): a transposed `A`
            // read in place strides a whole row per `k` step.
            let direct = strips <= DIRECT_STRIPS && acs == 1;
            let mut ic = 0;
            while ic < m {
                let mc = MC.min(m - ic);
                if !direct {
                    pa.resize(mc.div_ceil(MR) * kc * MR, 0.0);
                    // SAFETY: rows `ic..ic + mc` and columns `pc..pc + kc` of
                    // `a` lie in the caller's block.
                    unsafe { pack_a(a.add(ic * ars + pc * acs), (ars, acs), mc, kc, pa) };
                }
                for js in 0..strips {
                    let w = NR.min(nc - js * NR);
                    for is in 0..mc.div_ceil(MR) {
                        let h = MR.min(mc - is * MR);
                        // SAFETY: the tile's `h x w` elements of `c` lie in the
                        // caller's block; the `B` strip holds `kc` packed
                        // steps, and `A`'s `h` rows and `kc` columns are in
                        // the caller's block (in place) or packed.
                        unsafe {
                            let bs = pb.as_ptr().add(js * kc * NR);
                            let cs = c.add((ic + is * MR) * ldc + jc + js * NR);
                            if direct {
                                let ab = a.add((ic + is * MR) * ars + pc * acs);
                                tile::<true>(kc, ab, (ars, acs), bs, cs, ldc, add, (h, w))
                            } else {
                                let ap = pa.as_ptr().add(is * kc * MR);
                                tile::<false>(kc, ap, (1, MR), bs, cs, ldc, add, (h, w))
                            }
                        };
                    }
                }
                ic += mc;
            }
            pc += kc;
        }
        jc += nc;
    }
}

/// Packs `b[0..kc, 0..nc]` into `NR`-column strips, each `kc x NR` row-major,
/// the last strip zero padded.
///
/// # Safety
/// Every element of the block must be valid; AVX2 and FMA are present.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn pack_b(b: *const f32, (rs, cs): (usize, usize), kc: usize, nc: usize, out: &mut [f32]) {
    let strips = nc.div_ceil(NR);
    if cs == 1 {
        // Row by row: each row of `b` is read front to back. Strip by strip,
        // every row started a new page, and the copy ran at ~2 GB/s.
        let full = nc / NR;
        for p in 0..kc {
            // SAFETY: row `p`, columns `0..nc` are in the block.
            let row = unsafe { std::slice::from_raw_parts(b.add(p * rs), nc) };
            for (s, src) in row.chunks_exact(NR).enumerate() {
                out[s * kc * NR + p * NR..][..NR].copy_from_slice(src);
            }
            if full < strips {
                let tail = &row[full * NR..];
                let dst = &mut out[full * kc * NR + p * NR..][..NR];
                dst[..tail.len()].copy_from_slice(tail);
                dst[tail.len()..].fill(0.0);
            }
        }
        return;
    }
    // Column by column: a transposed `b` (`rs == 1`) reads contiguously.
    for (s, strip) in out.chunks_exact_mut(kc * NR).take(strips).enumerate() {
        let j0 = s * NR;
        let w = NR.min(nc - j0);
        let mut p0 = 0;
        #[cfg(target_arch = "x86_64")]
        if rs == 1 && w == NR {
            // Eight columns by eight `k` steps through an 8x8 transpose, for
            // each half of the strip: element by element, the scattered
            // stores made packing a linear layer's transposed weight cost
            // more than the product at 32 rows.
            while p0 + 8 <= kc {
                for half in 0..2 {
                    let c0 = j0 + half * 8;
                    // SAFETY: columns `c0..c0 + 8` and rows `p0..p0 + 8` are
                    // in the block; each row's eight values fit in the strip.
                    unsafe {
                        let t = super::transpose::avx::tr8x8(std::array::from_fn(|j| {
                            _mm256_loadu_ps(b.add((c0 + j) * cs + p0))
                        }));
                        for (p, v) in t.into_iter().enumerate() {
                            _mm256_storeu_ps(strip.as_mut_ptr().add((p0 + p) * NR + half * 8), v);
                        }
                    }
                }
                p0 += 8;
            }
        }
        for j in 0..NR {
            for p in p0..kc {
                strip[p * NR + j] = if j < w {
                    // SAFETY: row `p`, column `j0 + j < nc` is in the block.
                    unsafe { *b.add(p * rs + (j0 + j) * cs) }
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs `a[0..mc, 0..kc]` into `MR`-row strips, each `kc x MR` (k-major), the
/// last strip zero padded.
///
/// # Safety
/// Every element of the block must be valid; AVX2 and FMA are present.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn pack_a(a: *const f32, (rs, cs): (usize, usize), mc: usize, kc: usize, out: &mut [f32]) {
    let full = mc / MR;
    if rs == 1 && full > 0 {
        // A transposed `a`: each `k` step's `mc` values are contiguous, so
        // read them front to back and deal them out to the strips. Strip by
        // strip, a `k` stride of 12 KiB put every step's line in one L1 set
        // and the lines were fetched again for every strip.
        for p in 0..kc {
            // SAFETY: rows `0..mc` of column `p` are in the block.
            let col = unsafe { std::slice::from_raw_parts(a.add(p * cs), full * MR) };
            for (s, src) in col.chunks_exact(MR).enumerate() {
                out[s * kc * MR + p * MR..][..MR].copy_from_slice(src);
            }
        }
        if full * MR < mc {
            // SAFETY: the remaining rows `full * MR..mc` are in the block.
            let rest = unsafe { a.add(full * MR) };
            let tail = &mut out[full * kc * MR..];
            // SAFETY: as above, for the last, partial strip.
            unsafe { pack_a(rest, (rs, cs), mc - full * MR, kc, tail) };
        }
        return;
    }
    for (s, strip) in out
        .chunks_exact_mut(kc * MR)
        .take(mc.div_ceil(MR))
        .enumerate()
    {
        let i0 = s * MR;
        let h = MR.min(mc - i0);
        let mut p0 = 0;
        #[cfg(target_arch = "x86_64")]
        if cs == 1 && h == MR {
            // Eight columns at a time through an 8x8 transpose (two rows
            // unused): element by element, the gather of six rows cost
            // about a sixth of a convolution's product.
            while p0 + 8 <= kc {
                // SAFETY: rows `i0..i0 + 6` and columns `p0..p0 + 8` are in
                // the block; each column's six values fit in the strip.
                unsafe {
                    let t = super::transpose::avx::tr8x8(std::array::from_fn(|i| {
                        if i < MR {
                            _mm256_loadu_ps(a.add((i0 + i) * rs + p0))
                        } else {
                            _mm256_setzero_ps()
                        }
                    }));
                    for (j, v) in t.into_iter().enumerate() {
                        let d = strip.as_mut_ptr().add((p0 + j) * MR);
                        _mm_storeu_ps(d, _mm256_castps256_ps128(v));
                        _mm_store_sd(
                            d.add(4).cast::<f64>(),
                            _mm_castps_pd(_mm256_extractf128_ps::<1>(v)),
                        );
                    }
                }
                p0 += 8;
            }
        }
        for p in p0..kc {
            for i in 0..MR {
                strip[p * MR + i] = if i < h {
                    // SAFETY: row `i0 + i < mc`, column `p < kc` is in the block.
                    unsafe { *a.add((i0 + i) * rs + p * cs) }
                } else {
                    0.0
                };
            }
        }
    }
}

/// One `MR x NR` tile: `c[0..h, 0..w] (+)= a @ b_strip` over `kc` steps.
///
/// `A` is a packed strip (`DIRECT` false, strides `(1, MR)`), or read in place
/// (`DIRECT` true) with row stride `ars` and `k` stride `aks`; then rows past
/// `h` repeat row `h - 1`, whose sums are never stored.
///
/// # Safety
/// `A`'s rows `0..h` (all `MR` when packed) and `k` steps `0..kc` are valid,
/// `b` holds `kc * NR` floats; `c[i * ldc + j]` is valid for `i < h`, `j < w`;
/// AVX2 and FMA are present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const DIRECT: bool>(
    kc: usize,
    a: *const f32,
    (ars, aks): (usize, usize),
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    (h, w): (usize, usize),
) {
    let mut s = [_mm256_setzero_ps(); 2 * MR];
    if add {
        // The tile's rows lie a row stride apart, beyond the prefetchers'
        // reach; fetch them while the products run.
        for r in 0..h {
            // SAFETY: prefetches do not fault; row `r < h` is valid anyway.
            unsafe {
                _mm_prefetch(c.add(r * ldc).cast::<i8>(), _MM_HINT_T0);
                _mm_prefetch(c.add(r * ldc + w - 1).cast::<i8>(), _MM_HINT_T0);
            }
        }
    }
    let mut ap = a;
    // In place: one pointer per row (rows past `h` repeat the last).
    // SAFETY: row `min(r, h - 1)` is valid.
    let rows: [*const f32; MR] = std::array::from_fn(|r| unsafe { a.add(r.min(h - 1) * ars) });
    let mut off = 0;
    let mut bp = b;
    // One `k` step: two vectors of `B`, six broadcasts of `A`, twelve FMAs.
    macro_rules! step {
        ($o:expr) => {
            // SAFETY: step `$o` of the current four lies inside `A` and the
            // `B` strip.
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add($o * NR));
                let b1 = _mm256_loadu_ps(bp.add($o * NR + 8));
                for r in 0..MR {
                    let x = if DIRECT {
                        _mm256_broadcast_ss(&*rows[r].add(off + $o * aks))
                    } else {
                        _mm256_broadcast_ss(&*ap.add($o * MR + r))
                    };
                    s[2 * r] = _mm256_fmadd_ps(x, b0, s[2 * r]);
                    s[2 * r + 1] = _mm256_fmadd_ps(x, b1, s[2 * r + 1]);
                }
            }
        };
    }
    for _ in 0..kc / 4 {
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        // SAFETY: four steps were read; `A` and the strip hold `kc` of them.
        unsafe {
            if DIRECT {
                off += 4 * aks;
            } else {
                ap = ap.add(4 * MR);
            }
            bp = bp.add(4 * NR);
        }
    }
    for _ in 0..kc % 4 {
        step!(0);
        // SAFETY: as above, one step.
        unsafe {
            if DIRECT {
                off += aks;
            } else {
                ap = ap.add(MR);
            }
            bp = bp.add(NR);
        }
    }
    if h == MR && w == NR {
        for (r, pair) in s.chunks_exact(2).enumerate() {
            // SAFETY: a full tile: row `r`, columns `0..16` are valid.
            unsafe {
                let p = c.add(r * ldc);
                let (mut v0, mut v1) = (pair[0], pair[1]);
                if add {
                    v0 = _mm256_add_ps(_mm256_loadu_ps(p), v0);
                    v1 = _mm256_add_ps(_mm256_loadu_ps(p.add(8)), v1);
                }
                _mm256_storeu_ps(p, v0);
                _mm256_storeu_ps(p.add(8), v1);
            }
        }
    } else {
        let mut t = [0f32; MR * NR];
        for (r, pair) in s.chunks_exact(2).enumerate() {
            // SAFETY: `t` holds MR rows of NR floats.
            unsafe {
                _mm256_storeu_ps(t.as_mut_ptr().add(r * NR), pair[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(r * NR + 8), pair[1]);
            }
        }
        for r in 0..h {
            for j in 0..w {
                // SAFETY: `r < h`, `j < w`.
                unsafe {
                    let p = c.add(r * ldc + j);
                    *p = if add {
                        *p + t[r * NR + j]
                    } else {
                        t[r * NR + j]
                    };
                }
            }
        }
    }
}

/// Never called: [`kernel_runs`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const DIRECT: bool>(
    _: usize,
    _: *const f32,
    _: (usize, usize),
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: bool,
    _: (usize, usize),
) {
    unreachable!("kiln sgemm runs on x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this CPU cannot run the kernel (said on stderr).
    fn skipped() -> bool {
        let skip = !kernel_runs();
        if skip {
            eprintln!("skipped: this CPU lacks AVX2 and FMA, so sgemm never runs here");
        }
        skip
    }

    /// Seeded values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::SeededRng::new(seed).uniform_vec(n, -1.0, 1.0)
    }

    /// Checks one product against an f64 sum: each element within
    /// `k * 2^-23 * sum |a||b|` (f32's worst case for a `k`-term sum is
    /// `(k - 1) u` with `u = 2^-24`; the extra factor covers the final add into
    /// an accumulated `C`), and padding around the block untouched.
    fn check(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, acc: bool, threads: usize) {
        let pad = 3;
        let ldc = n + pad;
        let a = values(m * k, 1 + m as u64);
        let b = values(k * n, 2 + n as u64);
        let la = if a_t { (1, m) } else { (k, 1) };
        let lb = if b_t { (1, k) } else { (n, 1) };
        let c0 = values(m * ldc, 3);
        let mut c = c0.clone();
        sgemm((m, n, k), &mut c, ldc, acc, &a, la, &b, lb, threads, false);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j >= n {
                    assert_eq!(
                        got.to_bits(),
                        c0[i * ldc + j].to_bits(),
                        "padding at ({i}, {j}) changed"
                    );
                    continue;
                }
                let (mut want, mut mag) = (0f64, 0f64);
                for p in 0..k {
                    let x = a[i * la.0 + p * la.1] as f64 * b[p * lb.0 + j * lb.1] as f64;
                    want += x;
                    mag += x.abs();
                }
                if acc {
                    want += c0[i * ldc + j] as f64;
                    mag += (c0[i * ldc + j] as f64).abs();
                }
                let tol = (k as f64 + 1.0) * f64::from(f32::EPSILON) * mag + 1e-30;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{m}x{n}x{k} a_t={a_t} b_t={b_t} acc={acc} t={threads}: ({i}, {j}) = {got}, f64 sum {want}, tolerance {tol:e}"
                );
            }
        }
    }

    #[test]
    fn products_match_f64_sums_across_tile_and_block_edges() {
        if skipped() {
            return;
        }
        // Sizes around the tile (6 x 16), the unrolling (4), the blocks
        // (MC = 96, KC = 256, NC = 2048) and `A` read in place (up to two
        // strips of `B`, 32 columns).
        for &(m, n, k) in &[
            (1, 1, 1),
            (45, 32, 300),
            (101, 20, 8),
            (5, 15, 3),
            (6, 16, 4),
            (7, 17, 5),
            (13, 33, 257),
            (97, 31, 70),
            (100, 40, 513),
            (2, 2049, 9),
        ] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                for acc in [false, true] {
                    check(m, n, k, a_t, b_t, acc, 1);
                }
            }
        }
        check(200, 30, 300, false, false, true, 3);
        check(30, 200, 300, true, true, false, 2);
    }

    #[test]
    fn bits_do_not_depend_on_the_thread_count() {
        if skipped() {
            return;
        }
        for &(m, n, k) in &[(50, 300, 600), (300, 50, 600), (7, 2100, 33)] {
            let a = values(m * k, 5);
            let b = values(k * n, 6);
            let run = |threads, team| {
                let mut c = values(m * n, 7);
                sgemm(
                    (m, n, k),
                    &mut c,
                    n,
                    true,
                    &a,
                    (k, 1),
                    &b,
                    (n, 1),
                    threads,
                    team,
                );
                c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            let one = run(1, false);
            assert_eq!(one, run(2, false), "{m}x{n}x{k}: 1 vs 2 threads");
            assert_eq!(one, run(3, false), "{m}x{n}x{k}: 1 vs 3 threads");
            // split on the team instead of rayon
            assert_eq!(one, run(2, true), "{m}x{n}x{k}: 1 vs 2 on the team");
            assert_eq!(one, run(3, true), "{m}x{n}x{k}: 1 vs 3 on the team");
        }
    }

    #[test]
    fn the_op_and_its_gradients_match_f64_products() -> Result<()> {
        use candle_core::{DType, Device, Var};
        if skipped() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let a = Var::from_vec(values(5 * 70, 11), (5, 70), &dev)?;
        // `b` enters as a transposed view, as a linear layer's weight does.
        let b = Var::from_vec(values(9 * 70, 12), (9, 70), &dev)?;
        let g = Tensor::from_vec(values(5 * 9, 13), (5, 9), &dev)?;
        let y = a.as_tensor().apply_op2(&b.as_tensor().t()?, MatMul)?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let f64s = |t: &Tensor| t.to_dtype(DType::F64);
        let (a64, b64, g64) = (f64s(a.as_tensor())?, f64s(b.as_tensor())?, f64s(&g)?);
        // y = a b^T, dL/da = g b, dL/db = g^T a; each a sum of 70 or 5 terms
        // of magnitude below 1, so 70 * 2^-23 * 70 bounds f32's error.
        let checks = [
            (y.clone(), a64.matmul(&b64.t()?)?),
            (
                grads.get(a.as_tensor()).expect("a has a gradient").clone(),
                g64.matmul(&b64)?,
            ),
            (
                grads.get(b.as_tensor()).expect("b has a gradient").clone(),
                g64.t()?.matmul(&a64)?,
            ),
        ];
        for (i, (got, want)) in checks.iter().enumerate() {
            assert_eq!(got.dims(), want.dims(), "check {i}");
            let err = (f64s(got)? - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(
                err <= 70.0 * 70.0 * f64::from(f32::EPSILON),
                "check {i}: error {err:e}"
            );
        }
        Ok(())
    }

    #[test]
    fn an_operand_outside_the_graph_gets_no_gradient() -> Result<()> {
        use candle_core::{Device, Var};
        if skipped() {
            return Ok(());
        }
        let dev = Device::Cpu;
        // A linear layer's first product: the weight is a variable, the
        // batch of inputs a plain tensor.
        let w = Var::from_vec(values(4 * 3, 21), (4, 3), &dev)?;
        let x = Tensor::from_vec(values(2 * 3, 22), (2, 3), &dev)?;
        let y = w.as_tensor().apply_op2(&x.t()?, MatMul)?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none() && grads.get(&x.t()?).is_none());
        // d sum(W x^T) / dW = 1 x: each row of the gradient is x's column sums.
        let xs = x.sum(0)?.to_vec1::<f32>()?;
        let dw = grads.get(w.as_tensor()).expect("w has a gradient");
        for row in dw.to_vec2::<f32>()? {
            for (g, s) in row.iter().zip(&xs) {
                assert!(
                    (g - s).abs() <= 4.0 * f32::EPSILON * s.abs().max(1.0),
                    "{g} vs {s}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error_naming_both() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::zeros((64, 70), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros((71, 64), candle_core::DType::F32, &dev)?;
        let err = super::super::matmul(&a, &b).expect_err("70 and 71 do not multiply");
        assert!(
            err.to_string().contains("70") && err.to_string().contains("71"),
            "{err}"
        );
        if kernel_runs() {
            let err = a
                .apply_op2(&b, MatMul)
                .expect_err("70 and 71 do not multiply");
            assert!(err.to_string().contains("[64, 70] and [71, 64]"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn nothing_to_sum_zeroes_or_keeps_the_output() {
        if skipped() {
            return;
        }
        let mut c = vec![5f32; 6];
        sgemm(
            (2, 3, 0),
            &mut c,
            3,
            true,
            &[],
            (0, 1),
            &[],
            (3, 1),
            1,
            false,
        );
        assert_eq!(c, [5.0; 6]);
        sgemm(
            (2, 3, 0),
            &mut c,
            3,
            false,
            &[],
            (0, 1),
            &[],
            (3, 1),
            1,
            false,
        );
        assert_eq!(c, [0.0; 6]);
    }

    #[test]
    fn products_go_to_the_kernel_that_led_on_their_shape() {
        // Beside gemm's AVX-512 kernels: a linear layer's `x @ w^T` at small
        // batches, not `B` read along its rows, large batches, or shapes
        // too narrow for the 6 x 16 tile.
        assert!(suits_beside_avx512(32, 512, 3072, 2));
        assert!(suits_beside_avx512(8, 128, 512, 2));
        assert!(suits_beside_avx512(256, 768, 768, 2));
        assert!(suits_beside_avx512(16, 72, 256, 1));
        assert!(!suits_beside_avx512(512, 768, 768, 2));
        assert!(!suits_beside_avx512(8, 27, 1024, 1));
        assert!(!suits_beside_avx512(8, 512, 512, 1));
        assert!(!suits_beside_avx512(32, 16, 512, 2));
        // Beside gemm's AVX2 kernels: from 8 rows on threads, 64 on one.
        assert!(suits(8, 32, 32, 2) && !suits(8, 32, 32, 1));
        assert!(suits(1024, 768, 768, 2) && suits(64, 64, 48, 1));
        // And `picks` applies the rule of the kernels gemm runs here.
        let (t, wide) = ((32, 512, 3072, 2, true), (32, 512, 3072, 2, false));
        let got = (
            picks(t.0, t.1, t.2, t.3, t.4),
            picks(wide.0, wide.1, wide.2, wide.3, wide.4),
        );
        let want = match (kernel_runs(), crate::device::gemm_simd_level()) {
            (true, "avx512") => (true, false),
            (true, "avx2") => (true, true),
            _ => (false, false),
        };
        assert_eq!(got, want, "gemm runs {}", crate::device::gemm_simd_level());
    }
}
