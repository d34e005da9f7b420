//! CUDA launchers of the token ops in `token.rs` (`kernels/token.cu`):
//! per-token log-probabilities and entropies, forward and backward, f32 and f64.
//! Each function takes the storages and layouts candle hands the op's
//! `cuda_fwd` and checks shapes with the rules in `shape.rs`, as the CPU op does.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

use super::cuda::{cuda_float, cuda_func, i32_arg, input, row_cfg, u32_input, wrap, Float, Module};
use super::shape;

const TOKEN: Module = Module {
    key: "kiln-token",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/token.ptx")),
};

/// `token_logprobs` forward: `(logits [.., V], targets [..] u32) -> [..]`.
pub(crate) fn token_logprobs_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "token_logprobs (cuda)";
    let (lead, v) = shape::vocab_rows(l1.dims(), W)?;
    let rows: usize = lead.iter().product();
    if l2.shape().elem_count() != rows {
        bail!("{W}: {} targets for {rows} rows", l2.shape().elem_count())
    }
    let dev = s1.device();
    let t = u32_input(s2, l2, W)?;
    let out = cuda_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let f = cuda_func!(dev, TOKEN, &format!("token_logprobs_fwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(rows) }?;
        let (r, vv) = (i32_arg(rows, W)?, i32_arg(v, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&mut y).arg(&r).arg(&vv);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(rows)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, Shape::from(lead)))
}

/// `token_logprobs` gradient: `(logits, targets, g [..]) -> [.., V]`.
pub(crate) fn token_logprobs_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "token_logprobs grad (cuda)";
    let (lead, v) = shape::vocab_rows(l1.dims(), W)?;
    let rows: usize = lead.iter().product();
    if l2.shape().elem_count() != rows || l3.shape().elem_count() != rows {
        bail!(
            "{W}: targets {:?} and gradient {:?} for {rows} rows",
            l2.dims(),
            l3.dims()
        )
    }
    let dev = s1.device();
    let t = u32_input(s2, l2, W)?;
    let out = cuda_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let g = input::<T>(s3, l3, W)?;
        let f = cuda_func!(dev, TOKEN, &format!("token_logprobs_bwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut d = unsafe { dev.alloc::<T>(rows * v) }?;
        let (r, vv) = (i32_arg(rows, W)?, i32_arg(v, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&g).arg(&mut d).arg(&r).arg(&vv);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(rows)) }.w()?;
        wrap(d, dev)
    });
    Ok((out, l1.shape().clone()))
}

/// `token_entropy` forward: `logits [.., V] -> [..]`.
pub(crate) fn token_entropy_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "token_entropy (cuda)";
    let (lead, v) = shape::vocab_rows(l.dims(), W)?;
    let rows: usize = lead.iter().product();
    let dev = s.device();
    let out = cuda_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = cuda_func!(dev, TOKEN, &format!("token_entropy_fwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(rows) }?;
        let (r, vv) = (i32_arg(rows, W)?, i32_arg(v, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&mut y).arg(&r).arg(&vv);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(rows)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, Shape::from(lead)))
}

/// `token_entropy` gradient: `(logits, g [..]) -> [.., V]`.
pub(crate) fn token_entropy_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "token_entropy grad (cuda)";
    let (lead, v) = shape::vocab_rows(l1.dims(), W)?;
    let rows: usize = lead.iter().product();
    if l2.shape().elem_count() != rows {
        bail!("{W}: gradient {:?} for {rows} rows", l2.dims())
    }
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let g = input::<T>(s2, l2, W)?;
        let f = cuda_func!(dev, TOKEN, &format!("token_entropy_bwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut d = unsafe { dev.alloc::<T>(rows * v) }?;
        let (r, vv) = (i32_arg(rows, W)?, i32_arg(v, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&g).arg(&mut d).arg(&r).arg(&vv);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(rows)) }.w()?;
        wrap(d, dev)
    });
    Ok((out, l1.shape().clone()))
}
