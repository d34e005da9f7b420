//! CUDA launchers of batch norm in `norm.rs` (`kernels/norm.cu`): statistics,
//! the normalisation and the gradient sums, f32 and f64.
//! Each function takes the storages and layouts candle hands the op's
//! `cuda_fwd` and checks shapes with the rules in `shape.rs`, as the CPU op does.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::CudaDevice;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

use super::cuda::{cuda_float, cuda_func, elem_cfg, i32_arg, input, row_cfg, wrap, Float, Module};
use super::shape;

const NORM: Module = Module {
    key: "kiln-norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
};

/// Per-channel mean and biased variance of `x [B, C, S..]`: `[2, C]`.
pub(crate) fn bn_stats(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "batch_norm stats (cuda)";
    let (bs, c, sp) = shape::batch_channels(l.dims(), W)?;
    let dev = s.device();
    let out = cuda_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = cuda_func!(dev, NORM, &format!("bn_stats_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel (one block per channel).
        let mut out = unsafe { dev.alloc::<T>(2 * c) }?;
        let (b_, cc, ss) = (i32_arg(bs, W)?, i32_arg(c, W)?, i32_arg(sp, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&mut out).arg(&b_).arg(&cc).arg(&ss);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(c)) }.w()?;
        wrap(out, dev)
    });
    Ok((out, Shape::from((2, c))))
}

/// Runs a per-channel coefficient kernel `(q, coef, c, extra..)` into a fresh
/// `[rows, C]` buffer.
fn bn_coef<T: Float>(
    dev: &CudaDevice,
    name: &str,
    q: &CudaView<'_, T>,
    rows: usize,
    c: usize,
    extra: (f64, Option<(f64, i32)>),
    what: &str,
) -> Result<CudaSlice<T>> {
    let f = cuda_func!(dev, NORM, &format!("{name}_{}", T::SUFFIX))?;
    // SAFETY: every element is written by the kernel.
    let mut coef = unsafe { dev.alloc::<T>(rows * c) }?;
    let cc = i32_arg(c, what)?;
    let mut b = f.builder();
    b.arg(q).arg(&mut coef).arg(&cc).arg(&extra.0);
    if let Some((n, train)) = &extra.1 {
        b.arg(n).arg(train);
    }
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(elem_cfg(c)) }.w()?;
    Ok(coef)
}

/// Batch norm forward: `(x [B, C, S..], p [4, C]) -> y`, `p` rows (mean, var,
/// weight, bias).
pub(crate) fn batch_norm_fwd(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "batch_norm (cuda)";
    let (_, c, sp) = shape::batch_channels(l1.dims(), W)?;
    shape::check_bn_params(l2.dims(), c, W)?;
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let (x, p) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let coef = bn_coef::<T>(dev, "bn_fwd_coef", &p, 3, c, (eps, None), W)?;
        let f = cuda_func!(dev, NORM, &format!("batch_norm_fwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let (nn, cc, ss) = (n as u64, i32_arg(c, W)?, i32_arg(sp.max(1), W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&coef).arg(&mut y).arg(&nn).arg(&cc).arg(&ss);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(elem_cfg(n)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, l1.shape().clone()))
}

/// Batch norm gradient sums: `(x, dy, p [4, C]) -> [2, C]`, rows `sum(dy)` and
/// `sum(dy * xhat)` per channel.
pub(crate) fn bn_sums(
    eps: f64,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "batch_norm grad (cuda)";
    let (bs, c, sp) = shape::batch_channels(l1.dims(), W)?;
    shape::check_bn_params(l3.dims(), c, W)?;
    if l2.dims() != l1.dims() {
        bail!("{W}: dy {:?} for x {:?}", l2.dims(), l1.dims())
    }
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let (x, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let p = input::<T>(s3, l3, W)?;
        let f = cuda_func!(dev, NORM, &format!("bn_sums_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel (one block per channel).
        let mut out = unsafe { dev.alloc::<T>(2 * c) }?;
        let (b_, cc, ss) = (i32_arg(bs, W)?, i32_arg(c, W)?, i32_arg(sp, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&dy).arg(&p).arg(&mut out);
        b.arg(&b_).arg(&cc).arg(&ss).arg(&eps);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(c)) }.w()?;
        wrap(out, dev)
    });
    Ok((out, Shape::from((2, c))))
}

/// Batch norm input gradient: `(x, dy, q [6, C]) -> dx`, `q` rows (mean, var,
/// weight, bias, sum dy, sum dy*xhat); `train` adds the statistics' terms.
pub(crate) fn bn_grad_x(
    eps: f64,
    train: bool,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "batch_norm grad (cuda)";
    let (bs, c, sp) = shape::batch_channels(l1.dims(), W)?;
    if l3.dims() != [6, c] || l2.dims() != l1.dims() {
        bail!("{W}: bad shapes {:?} {:?}", l2.dims(), l3.dims())
    }
    let count = (bs * sp).max(1) as f64;
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let (x, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let q = input::<T>(s3, l3, W)?;
        let extra = (eps, Some((count, i32::from(train))));
        let coef = bn_coef::<T>(dev, "bn_grad_coef", &q, 5, c, extra, W)?;
        let f = cuda_func!(dev, NORM, &format!("bn_grad_x_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        let (nn, cc, ss) = (n as u64, i32_arg(c, W)?, i32_arg(sp.max(1), W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&dy).arg(&coef).arg(&mut dx);
        b.arg(&nn).arg(&cc).arg(&ss);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(elem_cfg(n)) }.w()?;
        wrap(dx, dev)
    });
    Ok((out, l1.shape().clone()))
}
