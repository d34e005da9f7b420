//! Channels-last column matrices for convolutions with many input channels
//! (DCGAN's 64-256-channel 4x4 layers).
//!
//! The channel-major path ([`super::conv`]) builds `cols [cin*kh*kw, pixels]`
//! one element at a time through the tap table, adds it back the same way,
//! and hands gemm transposed operands for both gradients (a transposed right
//! operand ran gemm at half speed: 52 against 112 GFLOP/s single-threaded at
//! 128x256x1024). Here each image is first transposed to `[h*w, cin]`, so a
//! column matrix `[pixels, kh*kw*cin]` is built from whole channel runs
//! (copies of `cin` contiguous values) and every gemm operand is row-major:
//!
//! - forward: `y^T [pixels, cout] = cols @ Wt [kh*kw*cin, cout]`;
//! - input gradient: `dcols [pixels, kh*kw*cin] = dy^T [pixels, cout] @ Wr [cout, kh*kw*cin]`,
//!   added back channel run by channel run;
//! - weight gradient: `dWr [cout, kh*kw*cin] += dy [cout, pixels] @ cols`.
//!
//! `Wr` is the weight with its taps before its channels (`[cout, kh, kw, cin]`),
//! `Wt` its transpose; both are permuted once per call (the weight is small).

use candle_core::WithDType;
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{chunks_per_task, gather_channels, images_per_chunk, mm, tap_table, PAD};
use super::shape::ConvGeom as Geom;
use super::transpose::transpose;

/// Input channels from which the channels-last path pays: a channel run of
/// 16 f32 is one cache line.
const MIN_CHANNELS: usize = 16;

/// Whether the channels-last path serves `g`: one group, many input channels,
/// a real window (pointwise convolutions need no column matrix at all) and
/// more than one output pixel (one-pixel outputs batch the images instead).
pub(super) fn suits(g: &Geom) -> bool {
    g.p.groups == 1 && g.c_in >= MIN_CHANNELS && !g.pointwise() && g.n() > 1
}

/// `Wr [cout, kk*cin]` (taps before channels) from `w [cout, cin, kk]`.
fn taps_first<T: WithDType>(w: &[T], g: &Geom) -> Vec<T> {
    let (kk, ci, k) = (g.kh * g.kw, g.c_in, g.k());
    let mut wr = vec![T::from_f64(0.0); w.len()];
    for (src, dst) in w.chunks_exact(k).zip(wr.chunks_exact_mut(k)) {
        transpose(src, ci, kk, dst);
    }
    wr
}

/// The inverse of [`taps_first`]: `w [cout, cin, kk]` from `Wr [cout, kk*cin]`.
fn channels_first<T: WithDType>(wr: &[T], g: &Geom) -> Vec<T> {
    let (kk, ci, k) = (g.kh * g.kw, g.c_in, g.k());
    let mut w = vec![T::from_f64(0.0); wr.len()];
    for (src, dst) in wr.chunks_exact(k).zip(w.chunks_exact_mut(k)) {
        transpose(src, kk, ci, dst);
    }
    w
}

/// One image's column matrix `col [n, kk*cin]` from its channels-last pixels
/// `xt [h*w, cin]`: pixel `o`, tap `r` is the run `xt[tab[r, o]]` (zeros in
/// the padding).
fn im2col<T: WithDType>(xt: &[T], ci: usize, tab: &[u32], n: usize, col: &mut [T]) {
    let kk = tab.len() / n;
    let zero = T::from_f64(0.0);
    for (o, row) in col.chunks_exact_mut(kk * ci).take(n).enumerate() {
        for (r, run) in row.chunks_exact_mut(ci).enumerate() {
            match tab[r * n + o] {
                PAD => run.fill(zero),
                s => run.copy_from_slice(&xt[s as usize * ci..(s as usize + 1) * ci]),
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `col [n, kk*cin]` into `xt [h*w, cin]`.
fn col2im<T: WithDType>(col: &[T], ci: usize, tab: &[u32], n: usize, xt: &mut [T]) {
    let kk = tab.len() / n;
    for (o, row) in col.chunks_exact(kk * ci).take(n).enumerate() {
        for (r, run) in row.chunks_exact(ci).enumerate() {
            let s = tab[r * n + o];
            if s != PAD {
                let dst = &mut xt[s as usize * ci..(s as usize + 1) * ci];
                for (d, v) in dst.iter_mut().zip(run) {
                    *d += *v;
                }
            }
        }
    }
}

/// Scratch buffers of one parallel task, from the thread's kept scratch
/// ([`super::with_scratch`]: left over from earlier calls, so every use writes
/// what it reads).
struct Scratch<'a, T> {
    /// Column matrix `[c*n, kk*cin]`.
    col: &'a mut [T],
    /// One image, channels last: `[h*w, cin]`.
    xt: &'a mut [T],
    /// Gemm rows by output channel: `[c*n, cout]` (or `[cout, c*n]`).
    out: &'a mut [T],
}

impl<'a, T: WithDType> Scratch<'a, T> {
    /// Runs `f` with this thread's scratch for chunks of `c` images.
    fn with<R>(g: &Geom, c: usize, f: impl FnOnce(&mut Scratch<'_, T>) -> R) -> R {
        let (cols, xts) = (c * g.n() * g.k(), g.h * g.w * g.c_in);
        super::with_scratch(cols + xts + c * g.n() * g.c_out, |s| {
            let (col, rest) = s.split_at_mut(cols);
            let (xt, out) = rest.split_at_mut(xts);
            f(&mut Scratch { col, xt, out })
        })
    }

    /// Fills `col` with the column matrices of images `b0..b0+nb` of `x`.
    fn im2col(&mut self, x: &[T], g: &Geom, tab: &[u32], (b0, nb): (usize, usize)) {
        let (n, k, hw) = (g.n(), g.k(), g.h * g.w);
        for i in 0..nb {
            let xb = &x[(b0 + i) * g.x_item()..(b0 + i + 1) * g.x_item()];
            transpose(xb, g.c_in, hw, self.xt);
            im2col(self.xt, g.c_in, tab, n, &mut self.col[i * n * k..]);
        }
    }
}

/// A vector of `b * item` elements (`item` per image) built by
/// `f(b0, nb, out_chunk, scratch)` for each chunk of `c` images, one task per
/// thread, each with its scratch (see [`super::par_fill`]).
fn per_chunk<T: WithDType, F>(b: usize, item: usize, g: &Geom, c: usize, f: F) -> Vec<T>
where
    F: Fn(usize, usize, &mut [T], &mut Scratch<'_, T>) + Sync + Send,
{
    let per_task = chunks_per_task(b, c);
    super::par_fill(b * item, per_task * c * item, |t, ot| {
        Scratch::with(g, c, |s| {
            for (j, os) in ot.chunks_mut(c * item).enumerate() {
                f((t * per_task + j) * c, os.len() / item, os, s);
            }
        })
    })
}

/// Forward: `y [b, cout, n]` (every element written).
pub(super) fn fwd<T: WithDType>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, n, co) = (g.k(), g.n(), g.c_out);
    let tab = tap_table(g);
    let wr = taps_first(w, g);
    let mut wt = vec![T::from_f64(0.0); wr.len()];
    transpose(&wr, co, k, &mut wt);
    let c = images_per_chunk(g);
    per_chunk(g.b, g.y_item(), g, c, |b0, nb, ys, s| {
        s.im2col(x, g, &tab, (b0, nb));
        let rows = nb * n;
        mm(
            (rows, co, k),
            s.out,
            co,
            false,
            s.col,
            (k, 1),
            &wt,
            (co, 1),
            Parallelism::None,
        );
        for (i, yb) in ys.chunks_exact_mut(co * n).enumerate() {
            transpose(&s.out[i * n * co..(i + 1) * n * co], n, co, yb);
        }
    })
}

/// Input gradient: `dx [b, cin, h*w]` (every element written).
pub(super) fn grad_input<T: WithDType>(dy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, n, co, hw) = (g.k(), g.n(), g.c_out, g.h * g.w);
    let tab = tap_table(g);
    let wr = taps_first(w, g);
    let c = images_per_chunk(g);
    let zero = T::from_f64(0.0);
    per_chunk(g.b, g.x_item(), g, c, |b0, nb, dxs, s| {
        for i in 0..nb {
            let dyb = &dy[(b0 + i) * g.y_item()..(b0 + i + 1) * g.y_item()];
            transpose(dyb, co, n, &mut s.out[i * n * co..(i + 1) * n * co]);
        }
        mm(
            (nb * n, k, co),
            s.col,
            k,
            false,
            s.out,
            (co, 1),
            &wr,
            (k, 1),
            Parallelism::None,
        );
        for (i, dxb) in dxs.chunks_exact_mut(g.x_item()).enumerate() {
            s.xt.fill(zero);
            col2im(&s.col[i * n * k..], g.c_in, &tab, n, s.xt);
            transpose(s.xt, hw, g.c_in, dxb);
        }
    })
}

/// Weight gradient `[cout, cin, kh, kw]`: per-task partial sums, added in task
/// order so the result is the same bits on every run with the same threads.
pub(super) fn grad_weight<T: WithDType>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let (k, n, co) = (g.k(), g.n(), g.c_out);
    let tab = tap_table(g);
    let c = images_per_chunk(g);
    let ld = c * n;
    let per_task = chunks_per_task(g.b, c);
    let chunks = g.b.div_ceil(c);
    let parts: Vec<Vec<T>> = (0..chunks.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let mut dwr = vec![T::from_f64(0.0); co * k];
            Scratch::with(g, c, |s| {
                for ci in t * per_task..((t + 1) * per_task).min(chunks) {
                    let b0 = ci * c;
                    let nb = c.min(g.b - b0);
                    s.im2col(x, g, &tab, (b0, nb));
                    let dyc = &dy[b0 * g.y_item()..(b0 + nb) * g.y_item()];
                    gather_channels(dyc, co, n, s.out, ld);
                    mm(
                        (co, k, nb * n),
                        &mut dwr,
                        k,
                        true,
                        s.out,
                        (ld, 1),
                        s.col,
                        (k, 1),
                        Parallelism::None,
                    );
                }
            });
            dwr
        })
        .collect();
    channels_first(&super::sum_in_order(parts, co * k), g)
}
