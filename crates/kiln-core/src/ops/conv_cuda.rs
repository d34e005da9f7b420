//! CUDA convolutions (`cuda` feature): the `cuda_fwd` of the three conv ops in
//! `conv.rs` ([`conv2d_fwd`], [`conv2d_grad_input`] = transposed convolution,
//! [`conv2d_grad_weight`]), built from kiln's kernels in `kernels/conv.cu` and
//! candle's own CUDA matmul (cuBLAS, strided-batched over the groups).
//!
//! A slice of `nb` images is unrolled into one column matrix
//! `col [c_in*kh*kw, nb*ho*wo]` (image index outermost in the columns), whose
//! rows of one group are contiguous, so each pass is a single gemm batched
//! over the groups with transposes expressed as strided layouts:
//!
//! - forward: `y' [c_out, nb*n] = W [g, c_out/g, k] @ col [g, k, nb*n]`, then
//!   `cn_to_nchw` puts `y'` back in `[nb, c_out, ho, wo]`;
//! - weight gradient: `dy' = nchw_to_cn(dy)`, `dW = dy' @ col^T`, summed over
//!   slices by `accumulate`;
//! - input gradient: `dcol = W^T @ dy'`, then `col2im` with one thread per
//!   input pixel summing its taps (no atomics: deterministic).
//!
//! Slices hold as many images as keep the largest scratch matrix under
//! [`SCRATCH_BYTES`]; with one image the permutes are skipped (its `dy` already
//! is `[c_out, n]`), and so is im2col for a 1x1, stride-1, unpadded kernel.
//! The shapes are checked by [`ConvGeom::new`](super::shape::ConvGeom), as the
//! CPU op checks them; [`cuda_geom`] adds what the kernels need on top.

use std::ops::Range;

use super::cuda::{cuda_float, cuda_func, elem_cfg, i32_arg, input, wrap, Float, Module};
use super::shape::{ConvGeom as Geom, ConvParams};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape};

const CONV: Module = Module {
    key: "kiln-conv",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/conv.ptx")),
};

/// Upper bound on one slice's column matrix (or permuted gradient) in bytes.
const SCRATCH_BYTES: usize = 256 << 20;

/// The geometry of a CUDA convolution: [`Geom::new`]'s checks (the CPU op's),
/// and what the launches also need: non-empty tensors (`ops::mod` sends
/// empty ones to candle's op) and sizes that fit the kernels' `int`s.
fn cuda_geom(x: &[usize], w: &[usize], p: ConvParams, what: &str) -> Result<Geom> {
    if x.contains(&0) || w.contains(&0) {
        bail!("{what}: empty tensors (x {x:?}, weight {w:?}) have no CUDA kernel")
    }
    let g = Geom::new(x, w, p, what)?;
    // The kernels index planes and rows with i32.
    for v in [
        g.c_in * g.kh * g.kw,
        g.c_out,
        g.h * g.w,
        g.ho * g.wo,
        p.stride,
        p.padding,
        p.dilation,
    ] {
        i32_arg(v, what)?;
    }
    Ok(g)
}

impl Geom {
    /// Image ranges of the slices, each small enough for [`SCRATCH_BYTES`].
    fn slices(&self, elem: usize) -> Vec<Range<usize>> {
        let per_image = (self.groups() * self.k()).max(self.c_out) * self.n() * elem;
        let nb = (SCRATCH_BYTES / per_image.max(1)).clamp(1, self.b);
        (0..self.b)
            .step_by(nb)
            .map(|b0| b0..(b0 + nb).min(self.b))
            .collect()
    }
    /// The geometry arguments of `im2col`/`col2im` after `(.., n, nb)`.
    fn kernel_args(&self, what: &str) -> Result<Vec<i32>> {
        let p = &self.p;
        [
            self.c_in, self.h, self.w, self.kh, self.kw, self.ho, self.wo, p.stride, p.padding,
            p.dilation,
        ]
        .iter()
        .map(|&v| i32_arg(v, what))
        .collect()
    }
}

/// A matrix for candle's matmul: an input's storage at an offset, or scratch.
enum Mat<'a> {
    In(&'a CudaStorage, usize),
    Own(CudaStorage),
}

impl Mat<'_> {
    /// The storage and a layout of `shape` over it, contiguous from the offset.
    fn at(&self, shape: (usize, usize, usize)) -> (&CudaStorage, Layout) {
        match self {
            Mat::In(s, o) => (*s, Layout::contiguous_with_offset(shape, *o)),
            Mat::Own(s) => (s, Layout::contiguous(shape)),
        }
    }
}

/// Launches `<name>_<T>(ins.., out, n, ints..)` over the `n` elements of `out`.
fn launch<T: Float>(
    dev: &CudaDevice,
    name: &str,
    ins: &[&CudaView<'_, T>],
    out: &mut CudaViewMut<'_, T>,
    ints: &[i32],
) -> Result<()> {
    let f = cuda_func!(dev, CONV, &format!("{name}_{}", T::SUFFIX))?;
    let n = out.len() as u64;
    let mut b = f.builder();
    for v in ins {
        b.arg(*v);
    }
    b.arg(out).arg(&n);
    for v in ints {
        b.arg(v);
    }
    // SAFETY: argument types match the kernel's signature; the kernel writes
    // `n` elements of `out` and reads within the inputs' sizes.
    unsafe { b.launch(elem_cfg(n as usize)) }.w()?;
    Ok(())
}

/// The column matrix `[c_in*kh*kw, nb*n]` of images `r` of `x` (the whole
/// batch's contiguous view; `x_off` its offset in `xs`, for the pointwise case).
fn im2col<'a, T: Float>(
    g: &Geom,
    (xs, x_off): (&'a CudaStorage, usize),
    x: &CudaView<'_, T>,
    r: &Range<usize>,
    what: &str,
) -> Result<Mat<'a>> {
    let nb = r.len();
    if g.pointwise() && nb == 1 {
        return Ok(Mat::In(xs, x_off + r.start * g.x_item()));
    }
    let dev = xs.device();
    let xv = x.slice(r.start * g.x_item()..r.end * g.x_item());
    // SAFETY: every element is written by the kernel.
    let mut col = unsafe { dev.alloc::<T>(g.groups() * g.k() * nb * g.n()) }?;
    let mut ints = vec![i32_arg(nb, what)?];
    ints.extend(g.kernel_args(what)?);
    launch::<T>(dev, "im2col", &[&xv], &mut col.slice_mut(..), &ints)?;
    Ok(Mat::Own(wrap(col, dev)))
}

/// `dy` of images `r` as `[c_out, nb*n]` (the gemm's layout); the input itself for one image.
fn dy_cn<'a, T: Float>(
    g: &Geom,
    (dys, dy_off): (&'a CudaStorage, usize),
    dy: &CudaView<'_, T>,
    r: &Range<usize>,
    what: &str,
) -> Result<Mat<'a>> {
    let nb = r.len();
    if nb == 1 {
        return Ok(Mat::In(dys, dy_off + r.start * g.y_item()));
    }
    let dev = dys.device();
    let v = dy.slice(r.start * g.y_item()..r.end * g.y_item());
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(nb * g.y_item()) }?;
    let ints = [nb, g.c_out, g.n()]
        .iter()
        .map(|&v| i32_arg(v, what))
        .collect::<Result<Vec<_>>>()?;
    launch::<T>(dev, "nchw_to_cn", &[&v], &mut out.slice_mut(..), &ints)?;
    Ok(Mat::Own(wrap(out, dev)))
}

/// The weight as `[groups, c_out/g, k]` from its offset (it must be contiguous).
fn weight_layout(g: &Geom, l: &Layout, what: &str) -> Result<Layout> {
    if !l.is_contiguous() {
        bail!("{what}: non-contiguous weight")
    }
    Ok(Layout::contiguous_with_offset(
        (g.groups(), g.cout_g(), g.k()),
        l.start_offset(),
    ))
}

fn contiguous_start(l: &Layout, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => bail!("{what}: non-contiguous input"),
    }
}

fn conv_fwd<T: Float>(
    g: &Geom,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    what: &str,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let x = input::<T>(xs, xl, what)?;
    let x_off = contiguous_start(xl, what)?;
    let w_l = weight_layout(g, wl, what)?;
    let (grp, cog, k) = (g.groups(), g.cout_g(), g.k());
    let slices = g.slices(std::mem::size_of::<T>());
    if let [r] = slices.as_slice() {
        if r.len() == 1 {
            // One image: the gemm's [c_out, n] output already is y.
            let col = im2col::<T>(g, (xs, x_off), &x, r, what)?;
            let (cs, cl) = col.at((grp, k, g.n()));
            return ws.matmul(cs, (grp, cog, g.n(), k), &w_l, &cl);
        }
    }
    // SAFETY: every element is written by `cn_to_nchw`, slice by slice.
    let mut y = unsafe { dev.alloc::<T>(g.b * g.y_item()) }?;
    for r in &slices {
        let nbn = r.len() * g.n();
        let col = im2col::<T>(g, (xs, x_off), &x, r, what)?;
        let (cs, cl) = col.at((grp, k, nbn));
        let out = ws.matmul(cs, (grp, cog, nbn, k), &w_l, &cl)?;
        let ov = out.as_cuda_slice::<T>()?.slice(..);
        let ints = [r.len(), g.c_out, g.n()]
            .iter()
            .map(|&v| i32_arg(v, what))
            .collect::<Result<Vec<_>>>()?;
        let mut yv = y.slice_mut(r.start * g.y_item()..r.end * g.y_item());
        launch::<T>(dev, "cn_to_nchw", &[&ov], &mut yv, &ints)?;
    }
    Ok(wrap(y, dev))
}

fn conv_grad_input<T: Float>(
    g: &Geom,
    (dys, dyl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    what: &str,
) -> Result<CudaStorage> {
    let dev = dys.device();
    let dy = input::<T>(dys, dyl, what)?;
    let dy_off = contiguous_start(dyl, what)?;
    // W^T: [groups, k, c_out/g] over the same elements.
    let wt_l = weight_layout(g, wl, what)?.transpose(1, 2)?;
    let (grp, cog, k) = (g.groups(), g.cout_g(), g.k());
    // SAFETY: every element is written by `col2im`, slice by slice.
    let mut dx = unsafe { dev.alloc::<T>(g.b * g.x_item()) }?;
    for r in &g.slices(std::mem::size_of::<T>()) {
        let nbn = r.len() * g.n();
        let d = dy_cn::<T>(g, (dys, dy_off), &dy, r, what)?;
        let (ds, dl) = d.at((grp, cog, nbn));
        let dcol = ws.matmul(ds, (grp, k, nbn, cog), &wt_l, &dl)?;
        let cv = dcol.as_cuda_slice::<T>()?.slice(..);
        let mut ints = vec![i32_arg(r.len(), what)?];
        ints.extend(g.kernel_args(what)?);
        let mut xv = dx.slice_mut(r.start * g.x_item()..r.end * g.x_item());
        launch::<T>(dev, "col2im", &[&cv], &mut xv, &ints)?;
    }
    Ok(wrap(dx, dev))
}

fn conv_grad_weight<T: Float>(
    g: &Geom,
    (xs, xl): (&CudaStorage, &Layout),
    (dys, dyl): (&CudaStorage, &Layout),
    what: &str,
) -> Result<CudaStorage> {
    let dev = xs.device();
    let x = input::<T>(xs, xl, what)?;
    let dy = input::<T>(dys, dyl, what)?;
    let (x_off, dy_off) = (contiguous_start(xl, what)?, contiguous_start(dyl, what)?);
    let (grp, cog, k) = (g.groups(), g.cout_g(), g.k());
    let mut dw: Option<CudaStorage> = None;
    for r in &g.slices(std::mem::size_of::<T>()) {
        let nbn = r.len() * g.n();
        let d = dy_cn::<T>(g, (dys, dy_off), &dy, r, what)?;
        let col = im2col::<T>(g, (xs, x_off), &x, r, what)?;
        let (ds, dl) = d.at((grp, cog, nbn));
        let (cs, cl) = col.at((grp, k, nbn));
        // dW [groups, c_out/g, k] = dy' [groups, c_out/g, nb*n] @ col^T [groups, nb*n, k]
        let part = ds.matmul(cs, (grp, cog, k, nbn), &dl, &cl.transpose(1, 2)?)?;
        match &mut dw {
            None => dw = Some(part),
            Some(acc) => {
                let pv = part.as_cuda_slice::<T>()?.slice(..);
                let mut av = acc.as_cuda_slice_mut::<T>()?.slice_mut(..);
                launch::<T>(dev, "accumulate", &[&pv], &mut av, &[])?;
            }
        }
    }
    match dw {
        Some(dw) => Ok(dw),
        None => bail!("{what}: empty batch"),
    }
}

fn same_dtype(a: &CudaStorage, b: &CudaStorage, what: &str) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("{what}: dtypes {:?} and {:?}", a.dtype(), b.dtype())
    }
    Ok(())
}

/// `Conv2dOp`'s CUDA forward: `(x [B, C_in, H, W], w [C_out, C_in/g, kh, kw]) -> y`.
pub(crate) fn conv2d_fwd(
    p: ConvParams,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "conv2d (cuda)";
    same_dtype(s1, s2, W)?;
    let g = cuda_geom(l1.dims(), l2.dims(), p, W)?;
    let y = cuda_float!(s1, W, |T| conv_fwd::<T>(&g, (s1, l1), (s2, l2), W)?);
    Ok((y, Shape::from((g.b, g.c_out, g.ho, g.wo))))
}

/// `Conv2dGradInput`'s CUDA forward (the transposed convolution):
/// `(dy [B, C_out, ho, wo], w) -> dx [B, C_in, h, w]`.
pub(crate) fn conv2d_grad_input(
    p: ConvParams,
    (h, w): (usize, usize),
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "conv transpose (cuda)";
    same_dtype(s1, s2, W)?;
    let (&[b, c_out, ho, wo], &[c_out_w, cin_g, _, _]) = (l1.dims(), l2.dims()) else {
        bail!(
            "{W}: expected 4-D input and weight, got {:?} and {:?}",
            l1.dims(),
            l2.dims()
        )
    };
    if c_out != c_out_w {
        bail!(
            "{W}: input has {c_out} channels, weight {:?} expects {c_out_w}",
            l2.dims()
        )
    }
    let xd = [b, cin_g * p.groups, h, w];
    let g = cuda_geom(&xd, l2.dims(), p, W)?;
    if (g.ho, g.wo) != (ho, wo) {
        bail!("{W}: output {h}x{w} does not match input {ho}x{wo} for the given stride/padding")
    }
    let dx = cuda_float!(s1, W, |T| conv_grad_input::<T>(&g, (s1, l1), (s2, l2), W)?);
    Ok((dx, Shape::from(xd.to_vec())))
}

/// `Conv2dGradWeight`'s CUDA forward: `(x, dy) -> dw [C_out, C_in/g, kh, kw]`.
pub(crate) fn conv2d_grad_weight(
    p: ConvParams,
    (kh, kw): (usize, usize),
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "conv weight grad (cuda)";
    same_dtype(s1, s2, W)?;
    let (&[b, c_in, _, _], &[b2, c_out, ho, wo]) = (l1.dims(), l2.dims()) else {
        bail!(
            "{W}: expected 4-D x and dy, got {:?} and {:?}",
            l1.dims(),
            l2.dims()
        )
    };
    let wd = [c_out, c_in / p.groups.max(1), kh, kw];
    let g = cuda_geom(l1.dims(), &wd, p, W)?;
    if b != b2 || (g.ho, g.wo) != (ho, wo) {
        bail!("{W}: dy {:?} does not match x {:?}", l2.dims(), l1.dims())
    }
    let dw = cuda_float!(s1, W, |T| conv_grad_weight::<T>(&g, (s1, l1), (s2, l2), W)?);
    Ok((dw, Shape::from(wd.to_vec())))
}

/// kiln's CUDA convolutions against its CPU ops (their reference): forward
/// values and both gradients of `sum(f(x, w) * r)`, f32 and f64, over the
/// geometries of `tests/ops.rs`. Built and run only with `--features cuda`
/// on a machine with a GPU.
#[cfg(test)]
mod tests {
    use crate::ops;
    use crate::rng::SeededRng;
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// `tests/ops.rs`'s CONV_CASES: `[b, c_in, c_out, h, w, k, stride, padding, dilation, groups]`.
    const CONV_CASES: &[[usize; 10]] = &[
        [2, 3, 8, 32, 32, 3, 1, 1, 1, 1],
        [32, 8, 32, 16, 16, 3, 1, 1, 1, 1],
        [1, 3, 5, 7, 9, 3, 2, 1, 1, 1],
        [3, 4, 6, 11, 9, 3, 2, 0, 2, 2],
        [1, 6, 6, 8, 8, 1, 1, 0, 1, 3],
        [4, 5, 7, 9, 8, 1, 1, 0, 1, 1],
        [2, 2, 3, 13, 7, 5, 3, 2, 1, 1],
        [1, 4, 4, 6, 6, 2, 2, 0, 1, 4],
        [5, 3, 2, 5, 5, 4, 1, 3, 1, 1],
        [6, 5, 3, 4, 4, 4, 1, 0, 1, 1],
        [4, 7, 2, 1, 1, 1, 1, 0, 1, 1],
    ];

    /// `tests/ops.rs`'s CONVT_CASES: `[b, c_in, c_out, h, w, k, stride, padding, output_padding, dilation]`.
    const CONVT_CASES: &[[usize; 10]] = &[
        [32, 32, 8, 8, 8, 2, 2, 0, 0, 1],
        [2, 8, 3, 16, 16, 2, 2, 0, 0, 1],
        [1, 3, 5, 5, 7, 3, 2, 1, 1, 1],
        [3, 4, 2, 6, 5, 3, 1, 1, 0, 1],
        [2, 2, 3, 4, 5, 3, 3, 2, 2, 2],
        [1, 5, 4, 3, 3, 1, 1, 0, 0, 1],
        [4, 3, 3, 9, 4, 4, 2, 1, 1, 1],
        [5, 6, 4, 1, 1, 4, 1, 0, 0, 1],
        [3, 5, 2, 1, 1, 1, 1, 0, 0, 1],
    ];

    fn rand(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        SeededRng::new(seed)
            .normal(shape, 0.0, 1.0, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Max abs difference relative to the reference's largest magnitude (at least 1).
    fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
        let f = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (a, b) = (f(got), f(want));
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    type Op<'a> = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + 'a;

    /// `f(x, w)` and the gradients of `sum(f(x, w) * r)` to `x` and `w` on `dev`.
    fn run(dev: &Device, x: &Tensor, w: &Tensor, r: &Tensor, f: &Op<'_>) -> [Tensor; 3] {
        let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&w.to_device(dev).unwrap()).unwrap();
        let y = f(xv.as_tensor(), wv.as_tensor()).unwrap();
        let r = r.to_device(dev).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap().clone();
        let dw = g.get(wv.as_tensor()).unwrap().clone();
        [y, dx, dw]
    }

    fn check(what: &str, x: &Tensor, w: &Tensor, f: &Op<'_>, seed: u64) {
        let gpu = Device::new_cuda(0).expect("a CUDA device");
        let dt = x.dtype();
        // Full-precision f32 gemms (candle's default; no TF32).
        let tol = if dt == DType::F64 { 1e-10 } else { 1e-4 };
        let y = f(x, w).unwrap();
        let r = rand(y.dims(), seed, dt);
        let cpu = run(&Device::Cpu, x, w, &r, f);
        let cuda = run(&gpu, x, w, &r, f);
        for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
            assert!(cuda[i].device().is_cuda(), "{what}: {name} left the GPU");
            assert_eq!(cuda[i].dims(), cpu[i].dims(), "{what}: {name} shape");
            let d = rel_diff(&cuda[i], &cpu[i]);
            assert!(d <= tol, "{what} {dt:?}: {name} differs by {d} (relative)");
        }
    }

    #[test]
    fn conv2d_matches_the_cpu() {
        for dt in [DType::F32, DType::F64] {
            for (i, c) in CONV_CASES.iter().enumerate() {
                let [b, ci, co, h, w, k, s, p, d, g] = *c;
                let x = rand(&[b, ci, h, w], 10 + i as u64, dt);
                let wt = rand(&[co, ci / g, k, k], 50 + i as u64, dt);
                check(
                    &format!("conv2d {c:?}"),
                    &x,
                    &wt,
                    &|x, w| ops::conv2d(x, w, s, p, d, g),
                    100 + i as u64,
                );
            }
        }
    }

    #[test]
    fn conv_transpose2d_matches_the_cpu() {
        for dt in [DType::F32, DType::F64] {
            for (i, c) in CONVT_CASES.iter().enumerate() {
                let [b, ci, co, h, w, k, s, p, op, d] = *c;
                let x = rand(&[b, ci, h, w], 20 + i as u64, dt);
                let wt = rand(&[ci, co, k, k], 60 + i as u64, dt);
                check(
                    &format!("conv_transpose2d {c:?}"),
                    &x,
                    &wt,
                    &|x, w| ops::conv_transpose2d(x, w, s, p, op, d),
                    200 + i as u64,
                );
            }
        }
    }

    /// The CUDA path runs kiln's ops (not candle's fallback), and batches split
    /// into several slices agree with one slice: 300 images of a 64-channel
    /// 3x3 convolution on 32x32 maps take three slices of at most 256 MiB.
    #[test]
    fn large_batches_run_in_slices() {
        let gpu = Device::new_cuda(0).expect("a CUDA device");
        let x = rand(&[300, 64, 32, 32], 1, DType::F32);
        let w = rand(&[16, 64, 3, 3], 2, DType::F32);
        let g = super::cuda_geom(
            x.dims(),
            w.dims(),
            crate::ops::shape::ConvParams {
                stride: 1,
                padding: 1,
                dilation: 1,
                groups: 1,
            },
            "test",
        )
        .unwrap();
        assert!(g.slices(4).len() >= 3, "{:?}", g.slices(4));
        let f: &Op<'_> = &|x, w| ops::conv2d(x, w, 1, 1, 1, 1);
        let r = rand(&[300, 16, 32, 32], 3, DType::F32);
        let cpu = run(&Device::Cpu, &x, &w, &r, f);
        let cuda = run(&gpu, &x, &w, &r, f);
        for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
            let d = rel_diff(&cuda[i], &cpu[i]);
            assert!(d <= 1e-4, "sliced conv2d: {name} differs by {d} (relative)");
        }
    }
}
