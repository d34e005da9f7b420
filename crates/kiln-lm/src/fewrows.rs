//! Matrix products of a few rows (4 to 64: a short prompt, or a batch of
//! sequences decoding together) against a weight that is read once from
//! memory per product.
//!
//! A general gemm first packs the weight into panels. For a few rows that
//! packing is most of the work, and it reads the weight with strides the
//! hardware prefetcher does not follow. Measured on a 2-core Zen 4, 48 products
//! `[32, 768] @ [768, 2304]` over distinct weights (GPT-2 small's prompt): candle
//! 57-65 ms, these kernels 41-49 ms; at 16 rows 52 against 33 ms. At 4 and 8
//! rows they also beat the matrix-vector kernel of `gemv` (19-20 against 28
//! ms, 23 against 49 ms), whose per-row passes over the weight cost more than
//! the padding of a 4-row tile; at 1 to 3 rows the gemv stays ahead.
//!
//! The kernels keep a tile of the output in registers and stream the weight
//! through it, with AVX-512 or AVX2+FMA code chosen at run time and a plain
//! path elsewhere. The AVX2 build does pack, but only one task's 96-column
//! panel, a block at a time, just before its tiles read it (see
//! `panel_tiles`). On that level `[N, K]` products of 24 rows or more go to
//! kiln-core's AVX2 gemm instead (see [`AVX2_GEMM_ROWS`]). Every output is
//! one task's sum in `k` order, so results do not depend on the thread count.

/// Rows from which these kernels beat the gemv (f32 weights).
pub(crate) const MIN_ROWS: usize = 4;

/// Rows up to which these kernels beat candle's gemm on a weight read from
/// memory (at 64 rows: 74 against 93 ms in the probe above).
pub(crate) const MAX_ROWS: usize = 64;

/// Rows of `x` per register tile.
const MR: usize = 4;
/// Columns of the output per task in the `[K, N]` layout (GPT-2's widths are
/// multiples of 96).
const NB: usize = 96;
/// Rows of `k` per cache block in the `[K, N]` layout.
const KC: usize = 256;
/// Weight rows per task in the `[N, K]` layout (a multiple of every tile's
/// weight rows, so only the last task has a tail).
const RB: usize = 60;

/// One `[K, N]` panel: columns `c0..c0 + cw` of `xp [mp, k] @ w [k, n]`.
#[derive(Clone, Copy)]
struct PanelJob<'a> {
    xp: &'a [f32],
    mp: usize,
    k: usize,
    w: &'a [f32],
    n: usize,
    c0: usize,
    cw: usize,
}

/// One `[N, K]` block: `xp [mp, k] @ w [rows, k]^T`.
#[derive(Clone, Copy)]
struct DotJob<'a> {
    xp: &'a [f32],
    mp: usize,
    k: usize,
    w: &'a [f32],
    rows: usize,
}

/// Which code the CPU runs. Only [`Level::detect`] (and the tests'
/// `available`) make one, from run-time feature detection: the kernels it
/// selects are compiled for those features, so a level the CPU lacks would be
/// undefined behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Level(Kind);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Plain Rust, no FMA.
    Plain,
    /// AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (with FMA).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// The widest level this CPU runs (cached by std's feature detection).
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // `--cfg kiln_no_avx512` (the AVX-512-off data point) leaves these
            // kernels out as it does gemm's.
            if cfg!(not(kiln_no_avx512))
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self(Kind::Avx512);
            }
            if avx2_fma() {
                return Self(Kind::Avx2);
            }
        }
        Self(Kind::Plain)
    }

    /// Every level this CPU runs (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Self(Kind::Plain)];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2_fma() {
                v.push(Self(Kind::Avx2));
            }
            if cfg!(not(kiln_no_avx512))
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Self(Kind::Avx512));
            }
        }
        v
    }

    /// Whether [`matmul`] hands an `m`-row product to kiln-core's AVX2 gemm
    /// (`kiln_core::ops::matmul_f32_slices`) rather than these kernels: on
    /// the AVX2 level, an `[N, K]` weight from [`AVX2_GEMM_ROWS`] rows.
    fn hands_to_gemm(self, m: usize, transposed: bool) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.0 == Kind::Avx2 && transposed && m >= AVX2_GEMM_ROWS
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (self, m, transposed);
            false
        }
    }
}

/// Rows from which the AVX2 level's `[N, K]` products (the tied LM head of a
/// batch of prompts or rollouts) go to kiln-core's gemm: its 6 x 16 tile over
/// packed panels outruns the dot-product tiles here once it has rows to fill.
/// Measured on a 2-core Zen 3 (AVX2, no AVX-512), two threads, 14 alternated
/// runs, best (median), gemm against these kernels: GPT-2 small's 48 block
/// weights as `[N, K]` at 16 rows 62 (70) against 48 (55) ms, 24 rows 58 (62)
/// against 66 (68), 32 rows 72 (78) against 89 (91); the `[50257, 768]` head
/// three times at 16 rows 68 (75) against 60 (62), 32 rows 108 (114) against
/// 122 (127), 64 rows 138 (164) against 230 (240). `[K, N]` weights stay here:
/// the packed panel kept up with the gemm (32 rows 56 (67) against 65 (73),
/// 64 rows 106 (121) against 104 (111)). The AVX-512 level keeps its own
/// kernels (unmeasured against the gemm).
const AVX2_GEMM_ROWS: usize = 24;

/// Whether this CPU runs AVX2 with FMA (cached by std's feature detection);
/// false off x86-64. Also `gemv`'s test for its AVX2 builds.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x [m, k] @ w [k, n]`, or `x @ w^T` for `w [n, k]` when `transposed`, as
/// a row-major `[m, n]`.
///
/// # Panics
/// If `x` or `w` is shorter than its shape (a kiln bug, not user input).
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    transposed: bool,
    level: Level,
) -> Vec<f32> {
    if level.hands_to_gemm(m, transposed) {
        let threads = rayon::current_num_threads();
        if let Some(y) = kiln_core::ops::matmul_f32_slices(x, m, k, w, n, transposed, threads) {
            return y;
        }
    }
    matmul_by(
        // SAFETY (both): `matmul_by` checks each job's slices before it
        // runs a kernel.
        Kernels {
            panel: &|job, out| unsafe { panel(level, job, out) },
            dots: &|job, out| unsafe { dots(level, job, out) },
        },
        x,
        m,
        k,
        w,
        n,
        transposed,
    )
}

/// The two kernels a product runs: the `[K, N]` panel and the `[N, K]` dots.
#[derive(Clone, Copy)]
struct Kernels<'k> {
    panel: &'k (dyn Fn(&PanelJob<'_>, &mut [f32]) + Sync),
    dots: &'k (dyn Fn(&DotJob<'_>, &mut [f32]) + Sync),
}

/// [`matmul`] with the kernels given (the tests run every build's tile
/// shapes through it on any CPU).
fn matmul_by(
    kernels: Kernels<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    transposed: bool,
) -> Vec<f32> {
    let fits = |len: usize, a: usize, b: usize| a.checked_mul(b).is_some_and(|need| len >= need);
    assert!(
        fits(x.len(), m, k) && fits(w.len(), k, n),
        "kiln few-row matmul: [{m}, {k}] x {} weights over slices of {} and {}",
        if transposed { "[n, k]" } else { "[k, n]" },
        x.len(),
        w.len()
    );
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // Pad x to whole register tiles with zero rows.
    let mp = m.div_ceil(MR) * MR;
    let mut xp = vec![0f32; mp * k];
    xp[..m * k].copy_from_slice(&x[..m * k]);
    if transposed {
        column_blocks(m, mp, n, RB, |j0, rows, out| {
            let job = DotJob {
                xp: &xp,
                mp,
                k,
                w: &w[j0 * k..(j0 + rows) * k],
                rows,
            };
            check_dots(&job, out);
            (kernels.dots)(&job, out);
        })
    } else {
        column_blocks(m, mp, n, NB, |c0, cw, out| {
            let job = PanelJob {
                xp: &xp,
                mp,
                k,
                w,
                n,
                c0,
                cw,
            };
            check_panel(&job, out);
            (kernels.panel)(&job, out);
        })
    }
}

/// `panel_tiles`' contract on the slices' sizes, asserted before any kernel
/// runs (sizes come from `matmul`, whose products were checked for overflow).
fn check_panel(j: &PanelJob<'_>, out: &[f32]) {
    assert!(j.xp.len() >= j.mp * j.k && j.w.len() >= j.k * j.n);
    assert!(j.c0 + j.cw <= j.n && j.cw <= NB);
    assert!(out.len() >= j.mp * NB && j.mp.is_multiple_of(MR));
}

/// `dot_tiles`' contract on the slices' sizes, as [`check_panel`].
fn check_dots(job: &DotJob<'_>, out: &[f32]) {
    let DotJob { xp, mp, k, w, rows } = *job;
    assert!(xp.len() >= mp * k && w.len() >= rows * k && out.len() >= mp * RB && rows <= RB);
    assert!(mp.is_multiple_of(MR));
}

/// Output columns `0..n` in blocks of `width`, one task each: `block(c0, cw,
/// out)` fills `out [mp, width]` with columns `c0..c0 + cw` for every padded
/// row; the first `m` rows are gathered into the row-major `[m, n]` result.
fn column_blocks(
    m: usize,
    mp: usize,
    n: usize,
    width: usize,
    block: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = kiln_core::ops::team::map(n.div_ceil(width), |b| {
        let c0 = b * width;
        let mut out = vec![0f32; mp * width];
        block(c0, width.min(n - c0), &mut out);
        out
    });
    let mut y = vec![0f32; m * n];
    for (b, out) in blocks.iter().enumerate() {
        let c0 = b * width;
        let cw = width.min(n - c0);
        for i in 0..m {
            y[i * n + c0..i * n + c0 + cw].copy_from_slice(&out[i * width..i * width + cw]);
        }
    }
    y
}

/// A `[K, N]` panel into `out [mp, NB]`, with the kernel of `level`.
///
/// # Safety
/// `job` and `out` pass [`check_panel`].
unsafe fn panel(level: Level, job: &PanelJob<'_>, out: &mut [f32]) {
    match level.0 {
        // SAFETY (all arms): the slices hold the shapes the caller checked,
        // and `level` came from run-time detection of these CPU features.
        #[cfg(target_arch = "x86_64")]
        Kind::Avx512 => unsafe { x86::panel_avx512(job, out) },
        #[cfg(target_arch = "x86_64")]
        Kind::Avx2 => unsafe { x86::panel_avx2(job, out) },
        Kind::Plain => unsafe { panel_tiles::<8, false, 0, false>(job, out) },
    }
}

/// An `[N, K]` block into `out [mp, RB]` (weight row `j` in column `j`).
///
/// # Safety
/// `job` and `out` pass [`check_dots`].
unsafe fn dots(level: Level, job: &DotJob<'_>, out: &mut [f32]) {
    match level.0 {
        // SAFETY (all arms): as in `panel`.
        #[cfg(target_arch = "x86_64")]
        Kind::Avx512 => unsafe { x86::dots_avx512(job, out) },
        #[cfg(target_arch = "x86_64")]
        Kind::Avx2 => unsafe { x86::dots_avx2(job, out) },
        Kind::Plain => unsafe { dot_tiles::<4, 2, false, 2>(job, out) },
    }
}

/// One fused multiply-add, or a multiply then an add where the CPU has no FMA
/// (`mul_add` would be a slow library call there).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        c + a * b
    }
}

/// Rows of `k` per block when the panel is packed: 128 rows of the 96-column
/// panel are 48 KiB, which stay in L2 while every row tile passes over them.
const KC_PACKED: usize = 128;

/// f32 values per 64-byte cache line.
const LINE: usize = 16;

/// The `[K, N]` panel: `NR`-column register tiles over `MR` rows, `k` in
/// blocks of `KC`; the first row tile prefetches the weight `PF` rows ahead
/// (0: none), since each weight row of a panel lies in another page.
///
/// With `PACK`, each block of the panel is first copied into `NR`-wide strips,
/// so the tiles read contiguous memory instead of one short piece of each
/// weight row (a new page per row), and the next block's rows are prefetched
/// while this one computes. Measured on a 2-core Zen 3 (AVX2), GPT-2 small's
/// 48 block weights at 32 rows: 143 ms unpacked 4 x 24, 95 packed 4 x 16, 84
/// with the prefetch. Every output is still one sum in `k` order, so packing
/// and the block size leave the bits unchanged.
///
/// Where the AVX2 build's time goes (perf, one thread, the same 48 weights):
/// ~65% in the 4 x 16 loop, ~18% packing, ~10% issuing the prefetches; 53-57
/// GFLOP/s against ~100 for FMAs alone, and the loop alone reaches ~95 in C.
/// Tried without gain: 6 x 16 tiles (12 sums; 47-48 ms either way on two
/// threads), strips outside the row tiles, a row-major pack read at a 96-float
/// stride, prefetching into L2 only, and huge pages for the weights (~2%).
/// Four weights read again and again (28 MB, about the L3) ran no faster, so
/// the packing does not wait on memory alone.
///
/// # Safety
/// `xp` holds `mp * k` and `w` `k * n` elements, `c0 + cw <= n`, `cw <= NB`,
/// `out` holds `mp * NB`, `mp` is a multiple of `MR`; and the caller's target
/// features hold.
#[inline(always)]
unsafe fn panel_tiles<const NR: usize, const FMA: bool, const PF: usize, const PACK: bool>(
    job: &PanelJob<'_>,
    out: &mut [f32],
) {
    let PanelJob {
        xp,
        mp,
        k,
        w,
        n,
        c0,
        cw,
    } = *job;
    let full = cw / NR * NR;
    let kc = if PACK { KC_PACKED } else { KC };
    // Cache lines per panel row.
    let lines = full.div_ceil(LINE);
    let mut pack = if PACK {
        vec![0f32; KC_PACKED * full]
    } else {
        Vec::new()
    };
    let (xp, wp, op, pp) = (xp.as_ptr(), w.as_ptr(), out.as_mut_ptr(), pack.as_mut_ptr());
    for k0 in (0..k).step_by(kc) {
        let k1 = (k0 + kc).min(k);
        if PACK {
            for kk in k0..k1 {
                for s in (0..full).step_by(NR) {
                    // SAFETY: row kk < k, columns c0+s..c0+s+NR <= c0+cw <= n;
                    // strip s/NR row kk-k0 lies inside `pack` (KC_PACKED * full).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            wp.add(kk * n + c0 + s),
                            pp.add(s * KC_PACKED + (kk - k0) * NR),
                            NR,
                        );
                    }
                }
            }
        }
        // The next block's weight lines, spread over this block's tiles (when
        // there are enough tiles to hide them: 16 padded rows or more).
        let next = if PACK && mp >= 4 * MR {
            (k - k1).min(kc) * lines
        } else {
            0
        };
        let per_tile = next.div_ceil(((mp / MR) * (full / NR)).max(1));
        let mut asked = 0;
        for r0 in (0..mp).step_by(MR) {
            for j in (0..full).step_by(NR) {
                // SAFETY: rows r0..r0+MR < mp, columns c0+j..c0+j+NR <= c0+cw
                // <= n, and output columns j..j+NR <= cw <= NB; packed strip
                // j/NR holds rows k0..k1 at stride NR.
                unsafe {
                    let (x, o) = (xp.add(r0 * k), op.add(r0 * NB + j));
                    if PACK {
                        for _ in 0..per_tile.min(next - asked) {
                            let (row, line) = (asked / lines, asked % lines);
                            let p = (k1 + row) * n + c0 + line * LINE;
                            prefetch::<LINE>(wp.wrapping_add(p));
                            asked += 1;
                        }
                        tile::<NR, FMA, 0>(x, k, k0, k1, pp.add(j * KC_PACKED), NR, o);
                    } else if r0 == 0 {
                        tile::<NR, FMA, PF>(x, k, k0, k1, wp.add(k0 * n + c0 + j), n, o);
                    } else {
                        tile::<NR, FMA, 0>(x, k, k0, k1, wp.add(k0 * n + c0 + j), n, o);
                    }
                }
            }
            // Columns past the last whole tile.
            for jj in full..cw {
                for i in r0..r0 + MR {
                    // SAFETY: as above, element by element.
                    unsafe {
                        let mut s = *op.add(i * NB + jj);
                        for kk in k0..k1 {
                            s = madd::<FMA>(*xp.add(i * k + kk), *wp.add(kk * n + c0 + jj), s);
                        }
                        *op.add(i * NB + jj) = s;
                    }
                }
            }
        }
    }
}

/// Asks for the cache lines of `NR` floats from `p` (x86-64; elsewhere a no-op).
#[inline(always)]
fn prefetch<const NR: usize>(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    for l in 0..(NR * 4).div_ceil(64) {
        // SAFETY: a prefetch is a hint and never faults, so an address past
        // the weight's end (the last block's look-ahead) is harmless.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.cast::<i8>().wrapping_add(l * 64),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `o[i][..NR] += sum over kk in k0..k1 of x[i][kk] * w[kk - k0][..NR]` for
/// `MR` rows, the `MR x NR` sums held in registers (`w` starts at block row
/// `k0`, rows `n` apart).
///
/// # Safety
/// `x` rows `0..MR` (stride `k`) reach column `k1`, `w` rows `0..k1 - k0`
/// (stride `n`) hold `NR` columns, `o` rows `0..MR` (stride `NB`) hold `NR`.
#[inline(always)]
unsafe fn tile<const NR: usize, const FMA: bool, const PF: usize>(
    x: *const f32,
    k: usize,
    k0: usize,
    k1: usize,
    w: *const f32,
    n: usize,
    o: *mut f32,
) {
    let mut acc = [[0f32; NR]; MR];
    // SAFETY: the bounds are the caller's contract.
    unsafe {
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = *o.add(i * NB + j);
            }
        }
        for kk in k0..k1 {
            let wr = w.add((kk - k0) * n);
            if PF > 0 {
                prefetch::<NR>(wr.wrapping_add(PF * n));
            }
            let mut wv = [0f32; NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = *wr.add(j);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = *x.add(i * k + kk);
                for (v, wj) in a.iter_mut().zip(&wv) {
                    *v = madd::<FMA>(xi, *wj, *v);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                *o.add(i * NB + j) = *v;
            }
        }
    }
}

/// The `[N, K]` layout: `MR` x rows by `NW` weight rows per tile, each output
/// a `V`-lane dot product summed across lanes at the end.
///
/// # Safety
/// `xp` holds `mp * k`, `w` `rows * k`, `out` `mp * RB` elements, `rows <= RB`, `mp` is a
/// multiple of `MR`; and the caller's target features hold.
#[inline(always)]
unsafe fn dot_tiles<const V: usize, const NW: usize, const FMA: bool, const PFT: usize>(
    job: &DotJob<'_>,
    out: &mut [f32],
) {
    let DotJob { xp, mp, k, w, rows } = *job;
    let kv = k / V * V;
    let full = rows / NW * NW;
    let (xp, wp, op) = (xp.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    for j0 in (0..full).step_by(NW) {
        for r0 in (0..mp).step_by(MR) {
            let mut acc = [[[0f32; V]; NW]; MR];
            // SAFETY: x rows r0..r0+MR <= mp and weight rows j0..j0+NW <=
            // rows, columns below k; outputs (i, j) inside [mp, RB].
            unsafe {
                for kk in (0..kv).step_by(V) {
                    let mut xv = [[0f32; V]; MR];
                    for (i, v) in xv.iter_mut().enumerate() {
                        for (l, e) in v.iter_mut().enumerate() {
                            *e = *xp.add((r0 + i) * k + kk + l);
                        }
                    }
                    // A later tile's weight rows, while this one computes
                    // (each row here is too short a stream for the hardware
                    // prefetcher to catch), spread over the x-row passes.
                    for j in (r0 / MR..NW).step_by(mp / MR) {
                        prefetch::<V>(wp.wrapping_add((j0 + PFT * NW + j) * k + kk));
                    }
                    for j in 0..NW {
                        let mut wv = [0f32; V];
                        for (l, e) in wv.iter_mut().enumerate() {
                            *e = *wp.add((j0 + j) * k + kk + l);
                        }
                        for (a, xi) in acc.iter_mut().zip(&xv) {
                            for ((s, xl), wl) in a[j].iter_mut().zip(xi).zip(&wv) {
                                *s = madd::<FMA>(*xl, *wl, *s);
                            }
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    for (j, lanes) in a.iter().enumerate() {
                        let mut s = sum_lanes(lanes);
                        for kk in kv..k {
                            s = madd::<FMA>(
                                *xp.add((r0 + i) * k + kk),
                                *wp.add((j0 + j) * k + kk),
                                s,
                            );
                        }
                        *op.add((r0 + i) * RB + j0 + j) = s;
                    }
                }
            }
        }
    }
    // Weight rows past the last whole tile.
    for j in full..rows {
        for i in 0..mp {
            // SAFETY: as above, row by row.
            unsafe {
                let mut s = 0f32;
                for kk in 0..k {
                    s = madd::<FMA>(*xp.add(i * k + kk), *wp.add(j * k + kk), s);
                }
                *op.add(i * RB + j) = s;
            }
        }
    }
}

/// The lanes of a vector accumulator added pairwise, in a fixed order.
#[inline(always)]
fn sum_lanes<const V: usize>(lanes: &[f32; V]) -> f32 {
    let mut v = *lanes;
    let mut w = V;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] += v[l + w];
        }
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The kernels compiled for AVX-512 and AVX2+FMA: the same generic code,
    //! with tile shapes sized to the register file (32 zmm, 16 ymm; the AVX2
    //! panel tile leaves room so that no sum spills).

    use super::{dot_tiles, panel_tiles, DotJob, PanelJob};

    /// A kernel compiled with `$features`: `$inner::<$consts>` on `$job`;
    /// and, for the tests, `$twin`: the same code without those features, so
    /// that every build's tile shapes and prefetch distances are checked on
    /// any CPU (an AVX-512 kernel's logic included, on a machine without it).
    /// `mul_add` stays fused in software, so a twin gives the same bits.
    macro_rules! compiled_for {
        ($(#[$doc:meta])* $name:ident / $twin:ident, $features:literal, $job:ident, $inner:ident::<$($c:tt),+>) => {
            $(#[$doc])*
            ///
            /// # Safety
            #[doc = concat!("As `", stringify!($inner), "`, on a CPU with ", $features, ".")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(job: &$job<'_>, out: &mut [f32]) {
                // SAFETY: the caller's contract.
                unsafe { $inner::<$($c),+>(job, out) }
            }

            #[cfg(test)]
            #[doc = concat!("`", stringify!($name), "` without its target features.")]
            ///
            /// # Safety
            #[doc = concat!("As `", stringify!($inner), "`, on any CPU.")]
            pub(super) unsafe fn $twin(job: &$job<'_>, out: &mut [f32]) {
                // SAFETY: the caller's contract.
                unsafe { $inner::<$($c),+>(job, out) }
            }
        };
    }

    compiled_for!(
        /// 4 x 96: 24 zmm sums, 6 weight loads and 4 broadcasts per 24 FMAs.
        panel_avx512 / panel_avx512_twin, "avx512f,fma", PanelJob, panel_tiles::<96, true, 8, false>
    );
    compiled_for!(
        /// 4 x 16 on packed strips: 8 ymm sums, 2 weight loads and 4
        /// broadcasts per 8 FMAs (4 x 24 needed a 17th register and spilled
        /// a sum every step).
        panel_avx2 / panel_avx2_twin, "avx2,fma", PanelJob, panel_tiles::<16, true, 0, true>
    );
    compiled_for!(
        /// 4 x rows by 6 weight rows: 24 zmm sums.
        dots_avx512 / dots_avx512_twin, "avx512f,fma", DotJob, dot_tiles::<16, 6, true, 2>
    );
    compiled_for!(
        /// 4 x rows by 3 weight rows: 12 ymm sums.
        dots_avx2 / dots_avx2_twin, "avx2,fma", DotJob, dot_tiles::<8, 3, true, 2>
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut r = kiln_core::rng::SeededRng::new(seed);
        (0..len).map(|_| r.normal_f32()).collect()
    }

    /// The product in f64, element by element: an independent reference.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, tr: bool) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|kk| {
                        let wv = if tr { w[j * k + kk] } else { w[kk * n + j] };
                        f64::from(x[i * k + kk]) * f64::from(wv)
                    })
                    .sum();
            }
        }
        y
    }

    #[test]
    fn every_level_matches_the_f64_product_on_odd_shapes() {
        let shapes = [
            (4, 50, 33),
            (5, 17, 8),
            (9, 1, 1),
            (13, 7, 97),
            (16, 300, 200),
            (33, 769, 96),
            (64, 256, 61),
            (10, 40, 193),
        ];
        for level in Level::available() {
            for &(m, k, n) in &shapes {
                for tr in [false, true] {
                    let x = data(m * k, 1);
                    let w = data(k * n, 2);
                    let want = reference(&x, m, k, &w, n, tr);
                    let got = matmul(&x, m, k, &w, n, tr, level);
                    let what = format!("{level:?} m={m} k={k} n={n} transposed={tr}");
                    assert_close(&got, &want, k, &what);
                }
            }
        }
    }

    /// Checks `got` against the f64 product.
    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        // f32 sums of k products of unit normals: error ~ sqrt(k) ulps.
        let tol = 1e-5 * (k as f64).sqrt() * 8.0;
        for (idx, (g, r)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - r).abs() <= tol * (1.0 + r.abs()),
                "{what} at {idx}: {g} vs {r}"
            );
        }
    }

    /// Every x86 build's kernels, run as plain code: the AVX-512 tiles (4 x
    /// 96 unpacked with an 8-row prefetch, 4 x 6 dot rows) are checked here
    /// even where the CPU lacks AVX-512, and must give the bits of the build
    /// this CPU runs where both exist.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_builds_tiles_match_the_f64_product_on_any_cpu() {
        // SAFETY (each closure): `matmul_by` asserts the kernels' contract
        // on the slices first, and the twins need no CPU features.
        let builds: [(Kind, Kernels<'_>); 2] = [
            (
                Kind::Avx512,
                Kernels {
                    panel: &|j, o| unsafe { x86::panel_avx512_twin(j, o) },
                    dots: &|j, o| unsafe { x86::dots_avx512_twin(j, o) },
                },
            ),
            (
                Kind::Avx2,
                Kernels {
                    panel: &|j, o| unsafe { x86::panel_avx2_twin(j, o) },
                    dots: &|j, o| unsafe { x86::dots_avx2_twin(j, o) },
                },
            ),
        ];
        // Odd sizes, several cache blocks of k (KC, KC_PACKED), panels with a
        // column tail, weight rows past the last whole dot tile.
        let shapes = [
            (4, 50, 33),
            (5, 17, 8),
            (9, 1, 1),
            (13, 7, 97),
            (6, 2 * KC + 9, 200),
            (33, 769, 96),
            (10, 40, 193),
        ];
        for (kind, kernels) in builds {
            for &(m, k, n) in &shapes {
                for tr in [false, true] {
                    let x = data(m * k, 1);
                    let w = data(k * n, 2);
                    let got = matmul_by(kernels, &x, m, k, &w, n, tr);
                    let what = format!("{kind:?} tiles, m={m} k={k} n={n} transposed={tr}");
                    assert_close(&got, &reference(&x, m, k, &w, n, tr), k, &what);
                    if Level::detect() != Level(kind) {
                        continue;
                    }
                    let native = matmul(&x, m, k, &w, n, tr, Level(kind));
                    if Level(kind).hands_to_gemm(m, tr) {
                        // Not these tiles: kiln-core's gemm, checked on its own.
                        let what = format!("{what} (kiln-core's gemm)");
                        assert_close(&native, &reference(&x, m, k, &w, n, tr), k, &what);
                    } else {
                        assert!(
                            native
                                .iter()
                                .zip(&got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}: the native build's bits differ"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packing_the_panel_leaves_the_bits_unchanged() {
        // 37 rows of x (padded to 40), k over three packed blocks, a panel with
        // a column tail: the packed and the direct reads must give the same sums.
        let (m, k, n): (usize, usize, usize) = (37, 2 * KC_PACKED + 45, 200);
        let mp = m.div_ceil(MR) * MR;
        let mut xp = data(mp * k, 5);
        xp[m * k..].fill(0.0);
        let w = data(k * n, 6);
        for (c0, cw) in [(0, NB), (96, 93), (189, 11), (195, 5)] {
            let job = PanelJob {
                xp: &xp,
                mp,
                k,
                w: &w,
                n,
                c0,
                cw,
            };
            let mut direct = vec![0f32; mp * NB];
            let mut packed = vec![0f32; mp * NB];
            // SAFETY: the shapes above satisfy `panel_tiles`' contract, and
            // the plain build needs no CPU features.
            unsafe {
                panel_tiles::<8, false, 0, false>(&job, &mut direct);
                panel_tiles::<8, false, 0, true>(&job, &mut packed);
            }
            assert!(
                direct
                    .iter()
                    .zip(&packed)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "columns {c0}..{}",
                c0 + cw
            );
            assert!(direct.iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // 20 rows: these kernels; 40 transposed: kiln-core's gemm on an AVX2 CPU.
        for (m, k, n, tr) in [
            (20, 500, 400, false),
            (20, 500, 400, true),
            (40, 500, 400, false),
            (40, 500, 400, true),
        ] {
            let x = data(m * k, 3);
            let w = data(k * n, 4);
            let level = Level::detect();
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| matmul(&x, m, k, &w, n, tr, level));
            let three = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(|| matmul(&x, m, k, &w, n, tr, level));
            assert!(one
                .iter()
                .zip(&three)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn empty_shapes_give_empty_or_zero_products() {
        assert!(matmul(&[], 0, 3, &[0.0; 6], 2, false, Level(Kind::Plain)).is_empty());
        assert_eq!(
            matmul(&[1.0; 30], 10, 3, &[], 0, true, Level::detect()).len(),
            0
        );
        // k = 0: every output is an empty sum.
        assert_eq!(
            matmul(&[], 10, 0, &[], 4, false, Level::detect()),
            vec![0.0; 40]
        );
        assert_eq!(
            matmul(&[], 10, 0, &[], 4, true, Level::detect()),
            vec![0.0; 40]
        );
    }
}
