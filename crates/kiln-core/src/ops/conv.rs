//! Convolution kernels: im2col/col2im around candle's `gemm`, batch items in
//! parallel (each gemm single-threaded) when the batch covers the threads,
//! otherwise one item at a time with a multithreaded gemm.
//!
//! Three custom ops close over each other's gradients: [`Conv2dOp`] (forward),
//! [`Conv2dGradInput`] (its input gradient, which is also the transposed
//! convolution) and [`Conv2dGradWeight`] (its weight gradient). Each op's `bwd`
//! is expressed through the other two, so gradients of gradients work too.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::shape::{ConvGeom as Geom, ConvParams};
use super::slice;

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]`, `dst` row-major with row stride `dst_rs`;
/// `lhs`/`rhs` given by (row stride, column stride) so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    acc: bool,
    lhs: &[T],
    (lrs, lcs): (usize, usize),
    rhs: &[T],
    (rrs, rcs): (usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, 1) < dst.len()
            && (k == 0 || (last(m, k, lrs, lcs) < lhs.len() && last(k, n, rrs, rcs) < rhs.len())),
        "kiln ops: gemm operands out of bounds"
    );
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::from_f64(0.0));
            }
        }
        return;
    }
    let threads = match par {
        Parallelism::Rayon(t) => t,
        _ => 1,
    };
    if T::DTYPE == candle_core::DType::F32 && super::sgemm::picks(m, n, k, threads, rcs != 1) {
        // SAFETY: `T` is f32 (checked above), so the slices are f32 slices.
        let f = |s: &[T]| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) };
        // SAFETY: as above.
        let d =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()) };
        let ls = (lrs, lcs);
        super::sgemm::sgemm(
            (m, n, k),
            d,
            dst_rs,
            acc,
            f(lhs),
            ls,
            f(rhs),
            (rrs, rcs),
            threads,
            false,
        );
        return;
    }
    // SAFETY: the assert above bounds every element gemm reads or writes in the
    // three slices; `dst` is borrowed mutably, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            par,
        )
    }
}

/// Valid output columns `[lo, hi)` for kernel column offset `off = kj*d - p`:
/// those with `0 <= ox*s + off < w`.
fn valid_range(off: isize, s: usize, w: usize, wo: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off < 0 { (-off + s - 1) / s } else { 0 };
    let hi = if (w as isize) - off <= 0 {
        0
    } else {
        ((w as isize - 1 - off) / s + 1).min(wo as isize)
    };
    (lo.max(0) as usize, hi.max(lo.max(0)) as usize)
}

/// Marks a tap that falls in the padding.
pub(super) const PAD: u32 = u32::MAX;

/// For each kernel offset `(ki, kj)` and output pixel, the input pixel it reads
/// within a channel plane (or [`PAD`]): `[kh*kw, ho*wo]`. Small or strided maps
/// gather through this table; per output row, the row copy's slicing, fills and
/// strided iterator cost more than the few elements they move (DCGAN's 4x4 and
/// 8x8 maps spent ~20% of a training step there).
type Taps = Vec<u32>;

/// The tap table when it pays: strided convolutions and rows shorter than 16.
fn taps(g: &Geom) -> Option<Taps> {
    if g.p.stride == 1 && g.wo >= 16 {
        return None;
    }
    Some(tap_table(g))
}

/// The tap table `[kh*kw, ho*wo]` whatever the geometry.
pub(super) fn tap_table(g: &Geom) -> Taps {
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    let mut t = Vec::with_capacity(g.kh * g.kw * g.n());
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            for oy in 0..g.ho {
                let iy = (oy * s + ki * d) as isize - p;
                for ox in 0..g.wo {
                    let ix = (ox * s + kj * d) as isize - p;
                    let inside = (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                    t.push(if inside {
                        (iy as usize * g.w + ix as usize) as u32
                    } else {
                        PAD
                    });
                }
            }
        }
    }
    t
}

/// Column matrix `[cin_g*kh*kw, ho*wo]` of one batch item's group (`x` = its
/// channels), row `r` at `col[r * ld..]` (`ld >= ho*wo`, so several images'
/// matrices can sit side by side); through the tap table when there is one.
fn im2col<T: WithDType>(x: &[T], g: &Geom, col: &mut [T], ld: usize, tab: Option<&[u32]>) {
    let Some(tab) = tab else {
        return im2col_rows(x, g, col, ld);
    };
    let (n, hw, kk) = (g.n(), g.h * g.w, g.kh * g.kw);
    let zero = T::from_f64(0.0);
    for ci in 0..g.cin_g() {
        let xc = &x[ci * hw..(ci + 1) * hw];
        for (r, t) in tab.chunks_exact(n).enumerate() {
            let row = (ci * kk + r) * ld;
            for (o, &i) in col[row..row + n].iter_mut().zip(t) {
                *o = xc.get(i as usize).copied().unwrap_or(zero);
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds the column matrix back into the image.
fn col2im<T: WithDType>(col: &[T], g: &Geom, x: &mut [T], ld: usize, tab: Option<&[u32]>) {
    let Some(tab) = tab else {
        return col2im_rows(col, g, x, ld);
    };
    let (n, hw, kk) = (g.n(), g.h * g.w, g.kh * g.kw);
    for ci in 0..g.cin_g() {
        let xc = &mut x[ci * hw..(ci + 1) * hw];
        for (r, t) in tab.chunks_exact(n).enumerate() {
            let row = (ci * kk + r) * ld;
            for (v, &i) in col[row..row + n].iter().zip(t) {
                if let Some(o) = xc.get_mut(i as usize) {
                    *o += *v;
                }
            }
        }
    }
}

/// Column matrix `[cin_g*kh*kw, ho*wo]` of one batch item's group (`x` = its
/// channels), row `r` at `col[r * ld..]` (`ld >= ho*wo`, so several images'
/// matrices can sit side by side).
fn im2col_rows<T: WithDType>(x: &[T], g: &Geom, col: &mut [T], ld: usize) {
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    let n = g.n();
    let zero = T::from_f64(0.0);
    let mut row = 0;
    for ci in 0..g.cin_g() {
        let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let dst = &mut col[row * ld..row * ld + n];
                let offx = (kj * d) as isize - p;
                let (lo, hi) = valid_range(offx, s, g.w, g.wo);
                for oy in 0..g.ho {
                    let iy = (oy * s + ki * d) as isize - p;
                    let drow = &mut dst[oy * g.wo..(oy + 1) * g.wo];
                    if iy < 0 || iy >= g.h as isize || lo >= hi {
                        drow.fill(zero);
                        continue;
                    }
                    let xr = &xc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    drow[..lo].fill(zero);
                    drow[hi..].fill(zero);
                    let start = (lo as isize * s as isize + offx) as usize;
                    if s == 1 {
                        drow[lo..hi].copy_from_slice(&xr[start..start + (hi - lo)]);
                    } else {
                        for (o, v) in drow[lo..hi].iter_mut().zip(xr[start..].iter().step_by(s)) {
                            *o = *v;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Adds a column matrix (row `r` at `col[r * ld..]`) back into one batch item's
/// group (the adjoint of [`im2col`]).
fn col2im_rows<T: WithDType>(col: &[T], g: &Geom, x: &mut [T], ld: usize) {
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    let n = g.n();
    let mut row = 0;
    for ci in 0..g.cin_g() {
        let xc = &mut x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let src = &col[row * ld..row * ld + n];
                let offx = (kj * d) as isize - p;
                let (lo, hi) = valid_range(offx, s, g.w, g.wo);
                row += 1;
                if lo >= hi {
                    continue;
                }
                for oy in 0..g.ho {
                    let iy = (oy * s + ki * d) as isize - p;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let srow = &src[oy * g.wo + lo..oy * g.wo + hi];
                    let xr = &mut xc[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let start = (lo as isize * s as isize + offx) as usize;
                    if s == 1 {
                        for (o, v) in xr[start..start + (hi - lo)].iter_mut().zip(srow) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in xr[start..].iter_mut().step_by(s).zip(srow) {
                            *o += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Batch items in parallel with sequential gemms, or the reverse for small batches.
fn split(b: usize) -> (bool, Parallelism) {
    let t = rayon::current_num_threads();
    if t <= 1 {
        (false, Parallelism::None)
    } else if b >= t {
        (true, Parallelism::None)
    } else {
        (false, Parallelism::Rayon(t))
    }
}

/// Whether the output is a single pixel with one group: DCGAN's first generator
/// and last discriminator layers. Per-image products are then gemvs
/// (`[c_out, k] @ [k, 1]`), so the batch becomes the gemm's other dimension.
fn one_pixel(g: &Geom) -> bool {
    g.n() == 1 && g.p.groups == 1
}

/// The whole batch's im2col with one pixel per image: `[b, k]`, row `i` being
/// image `i`'s patch (borrowed from `x` itself for a pointwise conv).
fn patch_rows<'a, T: WithDType>(x: &'a [T], g: &Geom, buf: &'a mut Vec<T>) -> &'a [T] {
    let tab = taps(g);
    let tab = tab.as_deref();
    if g.pointwise() {
        return x;
    }
    let k = g.k();
    *buf = vec![T::from_f64(0.0); g.b * k];
    buf.par_chunks_mut(k.max(1))
        .zip(x.par_chunks(g.x_item().max(1)))
        .for_each(|(c, xb)| im2col(xb, g, c, 1, tab));
    buf
}

/// gemm's own threads when there are several.
fn gemm_par() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

/// Output pixels per gemm that the chunked path aims for: below this, each
/// per-image product is too thin (DCGAN's 4x4 maps give 16 columns, so the
/// weight gradient re-read and re-wrote all of `dW` every 16 products).
const CHUNK_COLS: usize = 256;

/// Images per gemm: enough for [`CHUNK_COLS`] output pixels, but no more than
/// leaves every thread a chunk. 1 (a gemm per image, no copies) for grouped
/// convolutions and maps that are large already.
fn chunk_images(g: &Geom) -> usize {
    if g.p.groups != 1 || one_pixel(g) {
        return 1;
    }
    images_per_chunk(g)
}

/// Images per chunk: enough for [`CHUNK_COLS`] output pixels, but every
/// thread a chunk (shared with the channels-last path).
pub(super) fn images_per_chunk(g: &Geom) -> usize {
    let per_thread = g.b.div_ceil(rayon::current_num_threads().max(1));
    CHUNK_COLS.div_ceil(g.n().max(1)).min(per_thread).max(1)
}

/// `dst[c, i*n..(i+1)*n] = src[i][c*n..(c+1)*n]` for the images of a chunk:
/// `[images, c, n]` to `[c, images*n]` with row stride `ld`.
pub(super) fn gather_channels<T: WithDType>(
    src: &[T],
    c: usize,
    n: usize,
    dst: &mut [T],
    ld: usize,
) {
    for (i, img) in src.chunks(c * n).enumerate() {
        for (ch, row) in img.chunks(n).enumerate() {
            dst[ch * ld + i * n..ch * ld + (i + 1) * n].copy_from_slice(row);
        }
    }
}

/// The inverse of [`gather_channels`]: `[c, images*n]` (row stride `ld`) back to `[images, c, n]`.
fn scatter_channels<T: WithDType>(src: &[T], c: usize, n: usize, dst: &mut [T], ld: usize) {
    for (i, img) in dst.chunks_mut(c * n).enumerate() {
        for (ch, row) in img.chunks_mut(n).enumerate() {
            row.copy_from_slice(&src[ch * ld + i * n..ch * ld + (i + 1) * n]);
        }
    }
}

/// Chunks of `c` images per parallel task: one task per thread, so each
/// allocates its scratch once (rayon's `for_each_init` may call its init
/// once per split, and zeroing megabytes of column buffer showed up as 2%).
pub(super) fn chunks_per_task(b: usize, c: usize) -> usize {
    let chunks = b.div_ceil(c);
    chunks.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// Fills `col` (row stride `ld`) with the column matrices of images `b0..b0+nb`.
fn im2col_images<T: WithDType>(
    x: &[T],
    g: &Geom,
    (b0, nb): (usize, usize),
    col: &mut [T],
    ld: usize,
    tab: Option<&[u32]>,
) {
    let n = g.n();
    for (i, xb) in x[b0 * g.x_item()..(b0 + nb) * g.x_item()]
        .chunks(g.x_item())
        .enumerate()
    {
        im2col(xb, g, &mut col[i * n..], ld, tab);
    }
}

/// A vector of `b * item` elements (`item` per image, zeroed by the task that
/// fills it, see [`super::par_fill`]) built by `f(b0, nb, out_chunk, col, ch)`
/// for each chunk of `c` images: one task per thread, each with its scratch
/// column matrix `col [k, c*n]` and channel-major buffer `ch [c_out, c*n]`
/// (left over from earlier calls: `f` writes what it reads).
fn per_chunk<T: WithDType, F>(item: usize, g: &Geom, c: usize, f: F) -> Vec<T>
where
    F: Fn(usize, usize, &mut [T], &mut [T], &mut [T]) + Sync + Send,
{
    let ld = c * g.n();
    let per_task = chunks_per_task(g.b, c);
    super::par_fill(g.b * item, per_task * c * item, |t, ot| {
        super::with_scratch((g.k() + g.c_out) * ld, |s| {
            let (col, ch) = s.split_at_mut(g.k() * ld);
            for (j, os) in ot.chunks_mut(c * item).enumerate() {
                let nb = os.len() / item;
                f((t * per_task + j) * c, nb, os, col, ch);
            }
        })
    })
}

/// Forward over chunks of `c` images: `y_chunk [c_out, c*n] = W @ cols [k, c*n]`,
/// tasks in parallel (one group; see [`chunk_images`]).
fn conv_fwd_chunked<T: WithDType>(x: &[T], w: &[T], g: &Geom, c: usize) -> Vec<T> {
    let tab = taps(g);
    let tab = tab.as_deref();
    let (k, n, co, ld) = (g.k(), g.n(), g.c_out, c * g.n());
    per_chunk(g.y_item(), g, c, |b0, nb, ys, col, ych| {
        im2col_images(x, g, (b0, nb), col, ld, tab);
        mm(
            (co, nb * n, k),
            ych,
            ld,
            false,
            w,
            (k, 1),
            col,
            (ld, 1),
            Parallelism::None,
        );
        scatter_channels(ych, co, n, ys, ld);
    })
}

/// Input gradient over chunks of `c` images: `dcols = W^T @ dy_chunk`, then col2im.
fn conv_grad_input_chunked<T: WithDType>(dy: &[T], w: &[T], g: &Geom, c: usize) -> Vec<T> {
    let tab = taps(g);
    let tab = tab.as_deref();
    let (k, n, co, ld) = (g.k(), g.n(), g.c_out, c * g.n());
    per_chunk(g.x_item(), g, c, |b0, nb, dxs, col, dych| {
        let dyc = &dy[b0 * g.y_item()..(b0 + nb) * g.y_item()];
        gather_channels(dyc, co, n, dych, ld);
        mm(
            (k, nb * n, co),
            col,
            ld,
            false,
            w,
            (1, k),
            dych,
            (ld, 1),
            Parallelism::None,
        );
        for (i, dxb) in dxs.chunks_mut(g.x_item()).enumerate() {
            col2im(&col[i * n..], g, dxb, ld, tab);
        }
    })
}

/// Weight gradient over chunks of `c` images: `dW += dy_chunk [c_out, c*n] @ cols^T`,
/// one accumulator per parallel task, summed at the end.
fn conv_grad_weight_chunked<T: WithDType>(x: &[T], dy: &[T], g: &Geom, c: usize) -> Vec<T> {
    let tab = taps(g);
    let tab = tab.as_deref();
    let (k, n, co) = (g.k(), g.n(), g.c_out);
    let ld = c * n;
    let zero = T::from_f64(0.0);
    let per_task = chunks_per_task(g.b, c);
    let chunks = g.b.div_ceil(c);
    let parts: Vec<Vec<T>> = (0..chunks.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let mut dw = vec![zero; co * k];
            super::with_scratch((k + co) * ld, |s| {
                let (col, dych) = s.split_at_mut(k * ld);
                for ci in t * per_task..((t + 1) * per_task).min(chunks) {
                    let b0 = ci * c;
                    let nb = c.min(g.b - b0);
                    im2col_images(x, g, (b0, nb), col, ld, tab);
                    let dyc = &dy[b0 * g.y_item()..(b0 + nb) * g.y_item()];
                    gather_channels(dyc, co, n, dych, ld);
                    mm(
                        (co, k, nb * n),
                        &mut dw,
                        k,
                        true,
                        dych,
                        (ld, 1),
                        col,
                        (1, ld),
                        Parallelism::None,
                    );
                }
            });
            dw
        })
        .collect();
    super::sum_in_order(parts, co * k)
}

fn conv_fwd<T: WithDType>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    if super::conv_cl::suits(g) {
        return super::conv_cl::fwd(x, w, g);
    }
    let tab = taps(g);
    let tab = tab.as_deref();
    if one_pixel(g) {
        let mut y = vec![T::from_f64(0.0); g.b * g.y_item()];
        // y [b, c_out] = patches [b, k] @ W^T [k, c_out]
        let (k, co) = (g.k(), g.c_out);
        let mut buf = Vec::new();
        let cols = patch_rows(x, g, &mut buf);
        mm(
            (g.b, co, k),
            &mut y,
            co,
            false,
            cols,
            (k, 1),
            w,
            (1, k),
            gemm_par(),
        );
        return y;
    }
    let c = chunk_images(g);
    if c > 1 {
        return conv_fwd_chunked(x, w, g, c);
    }
    let (k, n, cog, cig) = (g.k(), g.n(), g.cout_g(), g.cin_g());
    let (batch_par, gpar) = split(g.b);
    let item = |col: &mut [T], (bi, yb): (usize, &mut [T])| {
        let xb = &x[bi * g.x_item()..(bi + 1) * g.x_item()];
        for gi in 0..g.p.groups {
            let xg = &xb[gi * cig * g.h * g.w..(gi + 1) * cig * g.h * g.w];
            let c: &[T] = if g.pointwise() {
                xg
            } else {
                im2col(xg, g, col, n, tab);
                col
            };
            mm(
                (cog, n, k),
                &mut yb[gi * cog * n..(gi + 1) * cog * n],
                n,
                false,
                &w[gi * cog * k..(gi + 1) * cog * k],
                (k, 1),
                c,
                (n, 1),
                gpar,
            );
        }
    };
    let colsize = if g.pointwise() { 0 } else { k * n };
    if batch_par {
        // Each image's task zeroes and fills its output: no serial memset first.
        return super::par_fill(g.b * g.y_item(), g.y_item(), |bi, yb| {
            super::with_scratch(colsize, |col| item(col, (bi, yb)))
        });
    }
    let mut y = vec![T::from_f64(0.0); g.b * g.y_item()];
    super::with_scratch(colsize, |col| {
        y.chunks_mut(g.y_item())
            .enumerate()
            .for_each(|a| item(col, a))
    });
    y
}

fn conv_grad_input<T: WithDType>(dy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    if super::conv_cl::suits(g) {
        return super::conv_cl::grad_input(dy, w, g);
    }
    let tab = taps(g);
    let tab = tab.as_deref();
    if one_pixel(g) {
        let mut dx = vec![T::from_f64(0.0); g.b * g.x_item()];
        // dpatches [b, k] = dy [b, c_out] @ W [c_out, k], then each row back to its image.
        let (k, co) = (g.k(), g.c_out);
        if g.pointwise() {
            mm(
                (g.b, k, co),
                &mut dx,
                k,
                false,
                dy,
                (co, 1),
                w,
                (k, 1),
                gemm_par(),
            );
            return dx;
        }
        let mut cols = vec![T::from_f64(0.0); g.b * k];
        mm(
            (g.b, k, co),
            &mut cols,
            k,
            false,
            dy,
            (co, 1),
            w,
            (k, 1),
            gemm_par(),
        );
        dx.par_chunks_mut(g.x_item().max(1))
            .zip(cols.par_chunks(k.max(1)))
            .for_each(|(dxb, c)| col2im(c, g, dxb, 1, tab));
        return dx;
    }
    let c = chunk_images(g);
    if c > 1 {
        return conv_grad_input_chunked(dy, w, g, c);
    }
    let (k, n, cog, cig) = (g.k(), g.n(), g.cout_g(), g.cin_g());
    let (batch_par, gpar) = split(g.b);
    let pw = g.pointwise();
    let item = |col: &mut [T], (bi, dxb): (usize, &mut [T])| {
        let dyb = &dy[bi * g.y_item()..(bi + 1) * g.y_item()];
        for gi in 0..g.p.groups {
            let dxg = &mut dxb[gi * cig * g.h * g.w..(gi + 1) * cig * g.h * g.w];
            // dcol = W_g^T @ dy_g; a pointwise conv writes straight into dx.
            let dst: &mut [T] = if pw { dxg } else { col };
            mm(
                (k, n, cog),
                dst,
                n,
                false,
                &w[gi * cog * k..(gi + 1) * cog * k],
                (1, k),
                &dyb[gi * cog * n..(gi + 1) * cog * n],
                (n, 1),
                gpar,
            );
            if !pw {
                col2im(
                    col,
                    g,
                    &mut dxb[gi * cig * g.h * g.w..(gi + 1) * cig * g.h * g.w],
                    n,
                    tab,
                );
            }
        }
    };
    let colsize = if pw { 0 } else { k * n };
    if batch_par {
        // Zeroed per image inside its task (col2im adds into it).
        return super::par_fill(g.b * g.x_item(), g.x_item(), |bi, dxb| {
            super::with_scratch(colsize, |col| item(col, (bi, dxb)))
        });
    }
    let mut dx = vec![T::from_f64(0.0); g.b * g.x_item()];
    super::with_scratch(colsize, |col| {
        dx.chunks_mut(g.x_item())
            .enumerate()
            .for_each(|a| item(col, a))
    });
    dx
}

fn conv_grad_weight<T: WithDType>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let tab = taps(g);
    let tab = tab.as_deref();
    let (k, n, cog, cig) = (g.k(), g.n(), g.cout_g(), g.cin_g());
    let wsize = g.c_out * k;
    let zero = T::from_f64(0.0);
    if one_pixel(g) {
        // dW [c_out, k] = dy^T [c_out, b] @ patches [b, k]
        let mut dw = vec![zero; wsize];
        let mut buf = Vec::new();
        let cols = patch_rows(x, g, &mut buf);
        let co = g.c_out;
        mm(
            (co, k, g.b),
            &mut dw,
            k,
            false,
            dy,
            (1, co),
            cols,
            (k, 1),
            gemm_par(),
        );
        return dw;
    }
    if super::conv_cl::suits(g) {
        return super::conv_cl::grad_weight(x, dy, g);
    }
    let c = chunk_images(g);
    if c > 1 {
        return conv_grad_weight_chunked(x, dy, g, c);
    }
    let (batch_par, gpar) = split(g.b);
    let pw = g.pointwise();
    // dW_g += dy_g [cog, n] @ col^T [n, k], summed over the batch.
    let item = |dw: &mut [T], col: &mut [T], bi: usize| {
        let xb = &x[bi * g.x_item()..(bi + 1) * g.x_item()];
        let dyb = &dy[bi * g.y_item()..(bi + 1) * g.y_item()];
        for gi in 0..g.p.groups {
            let xg = &xb[gi * cig * g.h * g.w..(gi + 1) * cig * g.h * g.w];
            let c: &[T] = if pw {
                xg
            } else {
                im2col(xg, g, col, n, tab);
                col
            };
            mm(
                (cog, k, n),
                &mut dw[gi * cog * k..(gi + 1) * cog * k],
                k,
                true,
                &dyb[gi * cog * n..(gi + 1) * cog * n],
                (n, 1),
                c,
                (1, n),
                gpar,
            );
        }
    };
    let colsize = if pw { 0 } else { k * n };
    // The images `range` summed into one fresh accumulator.
    let sum = |range: std::ops::Range<usize>| {
        let mut dw = vec![zero; wsize];
        super::with_scratch(colsize, |col| range.for_each(|bi| item(&mut dw, col, bi)));
        dw
    };
    if batch_par {
        // Fixed contiguous ranges, summed in order: the same sum every run
        // (rayon's fold/reduce tree follows work stealing).
        let per = g.b.div_ceil(rayon::current_num_threads().max(1));
        let parts: Vec<Vec<T>> = (0..g.b.div_ceil(per))
            .into_par_iter()
            .map(|t| sum(t * per..((t + 1) * per).min(g.b)))
            .collect();
        super::sum_in_order(parts, wsize)
    } else {
        sum(0..g.b)
    }
}

fn dispatch<F32, F64>(s: &CpuStorage, f32: F32, f64: F64, what: &str) -> Result<CpuStorage>
where
    F32: FnOnce() -> Result<Vec<f32>>,
    F64: FnOnce() -> Result<Vec<f64>>,
{
    Ok(match s {
        CpuStorage::F32(_) => CpuStorage::F32(f32()?),
        CpuStorage::F64(_) => CpuStorage::F64(f64()?),
        _ => bail!(
            "{what}: only f32 and f64 have a kiln CPU kernel (got {:?})",
            s.dtype()
        ),
    })
}

/// `y = conv2d(x, w)`; op2 on `(x, w)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp(pub ConvParams);

/// The input gradient of a conv2d, i.e. a transposed convolution: op2 on
/// `(dy, w)` giving `dx [b, c_in, h, w]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dGradInput {
    pub p: ConvParams,
    pub h: usize,
    pub w: usize,
}

/// The weight gradient of a conv2d: op2 on `(x, dy)` giving `dw [c_out, c_in/groups, kh, kw]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dGradWeight {
    pub p: ConvParams,
    pub kh: usize,
    pub kw: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::conv_cuda::conv2d_fwd(self.0, s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.0, "conv2d")?;
        let out = dispatch(
            s1,
            || Ok(conv_fwd(slice::<f32>(s1, l1)?, slice(s2, l2)?, &g)),
            || Ok(conv_fwd(slice::<f64>(s1, l1)?, slice(s2, l2)?, &g)),
            "conv2d",
        )?;
        Ok((out, Shape::from((g.b, g.c_out, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        // An input that needs no gradient (the image itself) skips the col2im pass.
        let dx = if x.track_op() {
            Some(dy.apply_op2(
                w,
                Conv2dGradInput {
                    p: self.0,
                    h,
                    w: wd,
                },
            )?)
        } else {
            None
        };
        // A frozen weight (detached, as in a GAN's generator step through
        // `nn::frozen`) skips the weight-gradient pass, the costliest of the two.
        let dw = if w.track_op() {
            Some(x.apply_op2(&dy, Conv2dGradWeight { p: self.0, kh, kw })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "kiln-conv2d-grad-input"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::conv_cuda::conv2d_grad_input(self.p, (self.h, self.w), s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[b, c_out, ho, wo], &[c_out_w, cin_g, _, _]) = (l1.dims(), l2.dims()) else {
            bail!(
                "conv transpose: expected 4-D input and weight, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        };
        if c_out != c_out_w {
            bail!(
                "conv transpose: input has {c_out} channels, weight {:?} expects {c_out_w}",
                l2.dims()
            )
        }
        let xd = [b, cin_g * self.p.groups, self.h, self.w];
        let g = Geom::new(&xd, l2.dims(), self.p, "conv transpose")?;
        if (g.ho, g.wo) != (ho, wo) {
            bail!("conv transpose: output {}x{} does not match input {ho}x{wo} for the given stride/padding", self.h, self.w)
        }
        let out = dispatch(
            s1,
            || Ok(conv_grad_input(slice::<f32>(s1, l1)?, slice(s2, l2)?, &g)),
            || Ok(conv_grad_input(slice::<f64>(s1, l1)?, slice(s2, l2)?, &g)),
            "conv transpose",
        )?;
        Ok((out, Shape::from(xd.to_vec())))
    }

    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _dx: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (_, _, kh, kw) = w.dims4()?;
        // Only the gradients someone needs: the noise fed to a generator's first
        // transposed convolution, or a frozen weight, needs none.
        let d_dy = match dy.track_op() {
            true => Some(g.apply_op2(w, Conv2dOp(self.p))?),
            false => None,
        };
        let d_w = match w.track_op() {
            true => Some(g.apply_op2(dy, Conv2dGradWeight { p: self.p, kh, kw })?),
            false => None,
        };
        Ok((d_dy, d_w))
    }
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "kiln-conv2d-grad-weight"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::conv_cuda::conv2d_grad_weight(self.p, (self.kh, self.kw), s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[b, c_in, _, _], &[b2, c_out, ho, wo]) = (l1.dims(), l2.dims()) else {
            bail!(
                "conv weight grad: expected 4-D x and dy, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        };
        let groups = self.p.groups.max(1);
        let wd = [c_out, c_in / groups, self.kh, self.kw];
        let g = Geom::new(l1.dims(), &wd, self.p, "conv weight grad")?;
        if b != b2 || (g.ho, g.wo) != (ho, wo) {
            bail!(
                "conv weight grad: dy {:?} does not match x {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let out = dispatch(
            s1,
            || Ok(conv_grad_weight(slice::<f32>(s1, l1)?, slice(s2, l2)?, &g)),
            || Ok(conv_grad_weight(slice::<f64>(s1, l1)?, slice(s2, l2)?, &g)),
            "conv weight grad",
        )?;
        Ok((out, Shape::from(wd.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _dw: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let d_x = match x.track_op() {
            true => Some(dy.apply_op2(
                &g,
                Conv2dGradInput {
                    p: self.p,
                    h,
                    w: wd,
                },
            )?),
            false => None,
        };
        let d_dy = match dy.track_op() {
            true => Some(x.apply_op2(&g, Conv2dOp(self.p))?),
            false => None,
        };
        Ok((d_x, d_dy))
    }
}
