//! CUDA launchers of the activations in `act.rs` (`kernels/act.cu`): ReLU /
//! leaky ReLU and the fused channel bias + ReLU, f32 and f64.
//! Each function takes the storages and layouts candle hands the op's
//! `cuda_fwd` and checks shapes with the rules in `shape.rs`, as the CPU op does.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

use super::cuda::{cuda_float, cuda_func, elem_cfg, input, wrap, Float, Module};
use super::pool_cuda::channel_bias_kernel;

const ACT: Module = Module {
    key: "kiln-act",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/act.ptx")),
};

/// ReLU (`slope` 0) or leaky ReLU forward.
pub(crate) fn relu_fwd(slope: f64, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "relu (cuda)";
    let n = l.shape().elem_count();
    let dev = s.device();
    let out = cuda_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = cuda_func!(dev, ACT, &format!("relu_fwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let nn = n as u64;
        let mut b = f.builder();
        b.arg(&x).arg(&mut y).arg(&nn).arg(&slope);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(elem_cfg(n)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, l.shape().clone()))
}

/// ReLU / leaky ReLU gradient: `(y, dy) -> dx`.
pub(crate) fn relu_bwd(
    slope: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "relu grad (cuda)";
    if l1.dims() != l2.dims() {
        bail!("{W}: dy {:?} for y {:?}", l2.dims(), l1.dims())
    }
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let (y, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let f = cuda_func!(dev, ACT, &format!("relu_bwd_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(n) }?;
        let nn = n as u64;
        let mut b = f.builder();
        b.arg(&y).arg(&dy).arg(&mut dx).arg(&nn).arg(&slope);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(elem_cfg(n)) }.w()?;
        wrap(dx, dev)
    });
    Ok((out, l1.shape().clone()))
}

/// `max(x [B, C, H, W] + b [C], 0)`.
pub(crate) fn channel_bias_relu(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    channel_bias_kernel(
        ACT,
        "channel_bias_relu",
        (s1, l1),
        (s2, l2),
        "channel bias relu (cuda)",
    )
}
