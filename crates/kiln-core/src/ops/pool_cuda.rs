//! CUDA launchers of the pooling and channel-bias ops in `pool.rs`
//! (`kernels/pool.cu`), f32 and f64.
//! Each function takes the storages and layouts candle hands the op's
//! `cuda_fwd` and checks shapes with the rules in `shape.rs`, as the CPU op does.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::CudaDevice;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

use super::cuda::{cuda_float, cuda_func, elem_cfg, i32_arg, input, row_cfg, wrap, Float, Module};
use super::shape;

const POOL: Module = Module {
    key: "kiln-pool",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")),
};

/// Launches a pooling kernel: `(ins.., out, planes, h, w, ho, wo, k, s)`.
#[allow(clippy::too_many_arguments)]
fn pool_launch<T: Float>(
    dev: &CudaDevice,
    name: &str,
    ins: &[CudaView<'_, T>],
    n_out: usize,
    planes: usize,
    (h, w, ho, wo): (usize, usize, usize, usize),
    (k, s): (usize, usize),
    what: &str,
) -> Result<CudaSlice<T>> {
    let f = cuda_func!(dev, POOL, &format!("{name}_{}", T::SUFFIX))?;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n_out) }?;
    let a = [planes, h, w, ho, wo, k, s]
        .iter()
        .map(|&v| i32_arg(v, what))
        .collect::<Result<Vec<i32>>>()?;
    let mut b = f.builder();
    for v in ins {
        b.arg(v);
    }
    b.arg(&mut out);
    for v in &a {
        b.arg(v);
    }
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(elem_cfg(n_out)) }.w()?;
    Ok(out)
}

/// Max (`max == true`) or average pooling forward.
pub(crate) fn pool_fwd(
    max: bool,
    kernel: usize,
    stride: usize,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let what = if max {
        "max_pool2d (cuda)"
    } else {
        "avg_pool2d (cuda)"
    };
    let name = if max {
        "max_pool2d_fwd"
    } else {
        "avg_pool2d_fwd"
    };
    let (bs, c, h, w) = shape::dims4(l.dims(), what)?;
    let (ho, wo) = shape::pool_out(h, w, kernel, stride, what)?;
    let dev = s.device();
    let n = bs * c * ho * wo;
    let out = cuda_float!(s, what, |T| {
        let x = input::<T>(s, l, what)?;
        let y = pool_launch::<T>(
            dev,
            name,
            &[x],
            n,
            bs * c,
            (h, w, ho, wo),
            (kernel, stride),
            what,
        )?;
        wrap(y, dev)
    });
    Ok((out, Shape::from((bs, c, ho, wo))))
}

/// Max pooling's input gradient: `(x, dy) -> dx`.
pub(crate) fn max_pool_bwd(
    kernel: usize,
    stride: usize,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "max_pool2d grad (cuda)";
    let (bs, c, h, w) = shape::dims4(l1.dims(), W)?;
    let (ho, wo) = shape::pool_out(h, w, kernel, stride, W)?;
    if l2.dims() != [bs, c, ho, wo] {
        bail!("{W}: dy {:?} does not match x {:?}", l2.dims(), l1.dims())
    }
    let dev = s1.device();
    let out = cuda_float!(s1, W, |T| {
        let ins = [input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?];
        let dx = pool_launch::<T>(
            dev,
            "max_pool2d_bwd",
            &ins,
            bs * c * h * w,
            bs * c,
            (h, w, ho, wo),
            (kernel, stride),
            W,
        )?;
        wrap(dx, dev)
    });
    Ok((out, l1.shape().clone()))
}

/// Average pooling's input gradient: `dy -> dx [B, C, h, w]`.
pub(crate) fn avg_pool_bwd(
    kernel: usize,
    stride: usize,
    (h, w): (usize, usize),
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "avg_pool2d grad (cuda)";
    let (bs, c, ho, wo) = shape::dims4(l.dims(), W)?;
    if shape::pool_out(h, w, kernel, stride, W)? != (ho, wo) {
        bail!("{W}: dy {:?} does not match input {h}x{w}", l.dims())
    }
    let dev = s.device();
    let out = cuda_float!(s, W, |T| {
        let dy = input::<T>(s, l, W)?;
        let dx = pool_launch::<T>(
            dev,
            "avg_pool2d_bwd",
            &[dy],
            bs * c * h * w,
            bs * c,
            (h, w, ho, wo),
            (kernel, stride),
            W,
        )?;
        wrap(dx, dev)
    });
    Ok((out, Shape::from((bs, c, h, w))))
}

/// `x [B, C, H, W] + b [C]`.
pub(crate) fn channel_bias(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    channel_bias_kernel(
        POOL,
        "channel_bias",
        (s1, l1),
        (s2, l2),
        "channel bias (cuda)",
    )
}

/// An element-wise per-channel bias kernel `(x, b, y, n, c, hw)` of a module.
pub(super) fn channel_bias_kernel(
    m: Module,
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    what: &str,
) -> Result<(CudaStorage, Shape)> {
    let (bs, c, h, w) = shape::dims4(l1.dims(), what)?;
    if l2.dims() != [c] {
        bail!("{what}: bias {:?} for {c} channels", l2.dims())
    }
    let n = bs * c * h * w;
    let dev = s1.device();
    let out = cuda_float!(s1, what, |T| {
        let (x, bias) = (input::<T>(s1, l1, what)?, input::<T>(s2, l2, what)?);
        let f = cuda_func!(dev, m, &format!("{name}_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n) }?;
        let (nn, cc, hw) = (n as u64, i32_arg(c, what)?, i32_arg(h * w, what)?);
        let mut b = f.builder();
        b.arg(&x).arg(&bias).arg(&mut y).arg(&nn).arg(&cc).arg(&hw);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(elem_cfg(n)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, l1.shape().clone()))
}

/// Sum of `dy [B, C, H, W]` over all but the channel dimension: `[C]`.
pub(crate) fn channel_sum(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "channel sum (cuda)";
    let (bs, c, h, w) = shape::dims4(l.dims(), W)?;
    let dev = s.device();
    let out = cuda_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = cuda_func!(dev, POOL, &format!("channel_sum_{}", T::SUFFIX))?;
        // SAFETY: every element is written by the kernel (one block per channel).
        let mut y = unsafe { dev.alloc::<T>(c) }?;
        let (b_, cc, hw) = (i32_arg(bs, W)?, i32_arg(c, W)?, i32_arg(h * w, W)?);
        let mut b = f.builder();
        b.arg(&x).arg(&mut y).arg(&b_).arg(&cc).arg(&hw);
        // SAFETY: argument types match the kernel's signature.
        unsafe { b.launch(row_cfg(c)) }.w()?;
        wrap(y, dev)
    });
    Ok((out, Shape::from(c)))
}
