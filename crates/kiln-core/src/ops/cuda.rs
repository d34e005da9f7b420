//! CUDA glue for kiln's custom ops (`cuda` feature): the PTX that `build.rs`
//! compiles from `kernels/*.cu`, loaded once per device through candle's
//! `CudaDevice::get_or_load_custom_func`, and one launcher per kernel. Each
//! op's `cuda_fwd` (in `token.rs`, `fused.rs`, `pool.rs`, `act.rs`,
//! `norm.rs`) calls the function here with the same storages and layouts it
//! got from candle, so the shape checks and output shapes mirror the CPU
//! kernels'.
//!
//! Kernels run on candle's stream, so they order with candle's own ops.
//! Token, pooling, channel bias, ReLU and batch norm ops take f32 and f64; the
//! fused transformer ops f32 only (`ops::mod` sends other dtypes to candle's
//! ops). Convolutions (f32, f64) are in the child module `conv` (`cuda_conv.rs`,
//! kernels in `kernels/conv.cu`).
//!
//! The optimizer's fused Adam/AdamW step (`optim.rs`) is here too: [`Moment`]
//! is a moment buffer the optimizer owns (no tensor shares it, so the kernel
//! may write it in place) and [`adam_step`] runs one in-place update of a
//! parameter.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp2, Layout};
use candle_core::{Result, Shape, Storage, Tensor, WithDType};
use std::cell::RefCell;

use crate::optim::AdamScalars;

/// One compiled `kernels/<name>.cu`.
#[derive(Clone, Copy)]
struct Module {
    /// The key candle caches the loaded module under.
    key: &'static str,
    ptx: &'static str,
}

const TOKEN: Module = Module {
    key: "kiln-token",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/token.ptx")),
};
const FUSED: Module = Module {
    key: "kiln-fused",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
};
const POOL: Module = Module {
    key: "kiln-pool",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")),
};
const ACT: Module = Module {
    key: "kiln-act",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/act.ptx")),
};
const NORM: Module = Module {
    key: "kiln-norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
};
const OPTIM: Module = Module {
    key: "kiln-optim",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
};

/// Threads per block of the row kernels (`KILN_ROW_THREADS` in `common.cuh`).
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels (grid-stride loops).
const ELEM_THREADS: u32 = 256;

/// Float types with a kernel, and the suffix of their kernel names.
trait Float: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType {
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f64 {
    const SUFFIX: &'static str = "f64";
}

/// Calls `$body` with `$t` bound to the storage's float type.
macro_rules! by_float {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s.dtype() {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            d => bail!("{}: no kiln CUDA kernel for {d:?}", $what),
        }
    };
}

/// Loads (once per device) and returns a kernel of a module.
macro_rules! func {
    ($dev:expr, $m:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, $m.key, $m.ptx)
    };
}

/// The contiguous view behind a storage and layout.
fn input<'a, T: Float>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: non-contiguous input")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn u32_input<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, u32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: non-contiguous input")
    };
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

fn wrap<T: Float>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

fn i32_arg(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: size {v} over i32")))
}

/// One block of `ROW_THREADS` per row.
fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Enough blocks for a grid-stride loop over `n` elements.
fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEM_THREADS as usize).clamp(1, 1 << 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 32-column tiles over row ranges (the column-sum kernels).
fn col_cfg(rows: usize, c: usize) -> LaunchConfig {
    let gy = rows.div_ceil(64).clamp(1, 1024);
    LaunchConfig {
        grid_dim: (c.div_ceil(32).max(1) as u32, gy as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// `[.., V]` logits: the leading dims and `V`.
fn vocab_rows(l: &Layout, what: &str) -> Result<(Vec<usize>, usize)> {
    let d = l.dims();
    let Some((&v, lead)) = d.split_last() else {
        bail!("{what}: logits need a vocabulary dimension")
    };
    if v == 0 {
        bail!("{what}: empty vocabulary")
    }
    Ok((lead.to_vec(), v))
}

/// Rows and row length of a `[.., C]` layout.
fn last_rows(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let Some(&c) = l.dims().last() else {
        bail!("{what}: row op on a scalar")
    };
    Ok((l.shape().elem_count() / c.max(1), c))
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [b, c, h, w] => Ok((b, c, h, w)),
        ref d => bail!("{what}: expected [B, C, H, W], got {d:?}"),
    }
}

#[path = "cuda_conv.rs"]
pub(super) mod conv;

// ---------------------------------------------------------------- token.cu

/// `token_logprobs` forward: `(logits [.., V], targets [..] u32) -> [..]`.
pub(crate) fn token_logprobs_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "token_logprobs (cuda)";
    let (lead, v) = vocab_rows(l1, W)?;
    let rows: usize = lead.iter().product();
    if l2.shape().elem_count() != rows {
        bail!("{W}: {} targets for {rows} rows", l2.shape().elem_count())
    }
    let dev = s1.device();
    let t = u32_input(s2, l2, W)?;
    let out = by_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let f = func!(dev, TOKEN, &format!("token_logprobs_fwd_{}", T::SUFFIX))?;
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
    let (lead, v) = vocab_rows(l1, W)?;
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
    let out = by_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let g = input::<T>(s3, l3, W)?;
        let f = func!(dev, TOKEN, &format!("token_logprobs_bwd_{}", T::SUFFIX))?;
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
    let (lead, v) = vocab_rows(l, W)?;
    let rows: usize = lead.iter().product();
    let dev = s.device();
    let out = by_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = func!(dev, TOKEN, &format!("token_entropy_fwd_{}", T::SUFFIX))?;
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
    let (lead, v) = vocab_rows(l1, W)?;
    let rows: usize = lead.iter().product();
    if l2.shape().elem_count() != rows {
        bail!("{W}: gradient {:?} for {rows} rows", l2.dims())
    }
    let dev = s1.device();
    let out = by_float!(s1, W, |T| {
        let x = input::<T>(s1, l1, W)?;
        let g = input::<T>(s2, l2, W)?;
        let f = func!(dev, TOKEN, &format!("token_entropy_bwd_{}", T::SUFFIX))?;
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

// ---------------------------------------------------------------- fused.cu

fn f32_input<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        bail!("{what}: f32 only (got {:?})", s.dtype())
    }
    input::<f32>(s, l, what)
}

/// An element-wise f32 kernel over `ins` (all of `l`'s shape), `(ins.., out, n)`.
fn elementwise(
    name: &str,
    ins: &[(&CudaStorage, &Layout)],
    what: &str,
) -> Result<(CudaStorage, Shape)> {
    let (s0, l0) = ins[0];
    let n = l0.shape().elem_count();
    let views = ins
        .iter()
        .map(|(s, l)| {
            if l.shape().elem_count() != n {
                bail!(
                    "{what}: inputs of {n} and {} elements",
                    l.shape().elem_count()
                )
            }
            f32_input(s, l, what)
        })
        .collect::<Result<Vec<_>>>()?;
    let dev = s0.device();
    let f = func!(dev, FUSED, name)?;
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(n) }?;
    let nn = n as u64;
    let mut b = f.builder();
    for v in &views {
        b.arg(v);
    }
    b.arg(&mut y).arg(&nn);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(elem_cfg(n)) }.w()?;
    Ok((wrap(y, dev), l0.shape().clone()))
}

/// GELU (tanh form) forward.
pub(crate) fn gelu_tanh_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    elementwise("gelu_tanh_fwd_f32", &[(s, l)], "gelu (cuda)")
}

/// GELU (tanh form) gradient: `(x, g) -> dx`.
pub(crate) fn gelu_tanh_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    elementwise(
        "gelu_tanh_bwd_f32",
        &[(s1, l1), (s2, l2)],
        "gelu grad (cuda)",
    )
}

/// A row kernel over `[rows, c]` inputs of `l`'s shape: `(ins.., out, rows, c, extra..)`.
fn row_kernel(
    name: &str,
    ins: &[(&CudaStorage, &Layout)],
    eps: Option<f32>,
    what: &str,
) -> Result<(CudaStorage, Shape)> {
    let (s0, l0) = ins[0];
    let (rows, c) = last_rows(l0, what)?;
    let views = ins
        .iter()
        .map(|(s, l)| f32_input(s, l, what))
        .collect::<Result<Vec<_>>>()?;
    let dev = s0.device();
    let f = func!(dev, FUSED, name)?;
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(rows * c) }?;
    let (r, cc) = (i32_arg(rows, what)?, i32_arg(c, what)?);
    let mut b = f.builder();
    for v in &views {
        b.arg(v);
    }
    b.arg(&mut y).arg(&r).arg(&cc);
    if let Some(e) = &eps {
        b.arg(e);
    }
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(row_cfg(rows)) }.w()?;
    Ok((wrap(y, dev), l0.shape().clone()))
}

/// Softmax over the last dimension.
pub(crate) fn softmax_fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    row_kernel("softmax_fwd_f32", &[(s, l)], None, "softmax (cuda)")
}

/// Softmax gradient: `(y, g) -> y * (g - sum(g * y))`.
pub(crate) fn softmax_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_len(l1, l2, "softmax grad (cuda)")?;
    row_kernel(
        "softmax_bwd_f32",
        &[(s1, l1), (s2, l2)],
        None,
        "softmax grad (cuda)",
    )
}

fn same_len(a: &Layout, b: &Layout, what: &str) -> Result<()> {
    if a.shape().elem_count() != b.shape().elem_count() {
        bail!("{what}: shapes {:?} and {:?}", a.dims(), b.dims())
    }
    Ok(())
}

fn check_affine(l: &Layout, w: &Layout, b: Option<&Layout>, what: &str) -> Result<()> {
    let (_, c) = last_rows(l, what)?;
    if w.shape().elem_count() != c || b.is_some_and(|b| b.shape().elem_count() != c) {
        bail!("{what}: weight/bias {:?} for rows of {c}", w.dims())
    }
    Ok(())
}

/// Layer norm forward: `(x, w, b) -> y`.
pub(crate) fn layer_norm_fwd(
    eps: f32,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    check_affine(l1, l2, Some(l3), "layer_norm (cuda)")?;
    row_kernel(
        "layer_norm_fwd_f32",
        &[(s1, l1), (s2, l2), (s3, l3)],
        Some(eps),
        "layer_norm (cuda)",
    )
}

/// Layer norm input gradient: `(x, w, g) -> dx`.
pub(crate) fn layer_norm_bwd_x(
    eps: f32,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    check_affine(l1, l2, None, "layer_norm grad (cuda)")?;
    same_len(l1, l3, "layer_norm grad (cuda)")?;
    row_kernel(
        "layer_norm_bwd_x_f32",
        &[(s1, l1), (s2, l2), (s3, l3)],
        Some(eps),
        "layer_norm grad (cuda)",
    )
}

/// Layer norm weight and bias gradients: `(x, g) -> [2, C]` (row 0 weight, row 1 bias).
pub(crate) fn layer_norm_bwd_wb(
    eps: f32,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "layer_norm grad (cuda)";
    same_len(l1, l2, W)?;
    let (rows, c) = last_rows(l1, W)?;
    let (x, g) = (f32_input(s1, l1, W)?, f32_input(s2, l2, W)?);
    let dev = s1.device();
    let (r, cc) = (i32_arg(rows, W)?, i32_arg(c, W)?);
    // SAFETY: every element is written by the stats kernel.
    let mut stats = unsafe { dev.alloc::<f32>(2 * rows.max(1)) }?;
    let f = func!(dev, FUSED, "layer_norm_stats_f32")?;
    let mut b = f.builder();
    b.arg(&x).arg(&mut stats).arg(&r).arg(&cc).arg(&eps);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(row_cfg(rows)) }.w()?;
    let mut out = dev.alloc_zeros::<f32>(2 * c)?;
    let f = func!(dev, FUSED, "layer_norm_bwd_wb_f32")?;
    let mut b = f.builder();
    b.arg(&x).arg(&g).arg(&stats).arg(&mut out).arg(&r).arg(&cc);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(col_cfg(rows, c)) }.w()?;
    Ok((wrap(out, dev), Shape::from((2, c))))
}

/// `x [.., C] + b [C]`.
pub(crate) fn add_bias_last(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "add_bias (cuda)";
    let (_, c) = last_rows(l1, W)?;
    if l2.shape().elem_count() != c {
        bail!("{W}: bias {:?} for rows of {c}", l2.dims())
    }
    let (x, bias) = (f32_input(s1, l1, W)?, f32_input(s2, l2, W)?);
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let f = func!(dev, FUSED, "add_bias_last_f32")?;
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(n) }?;
    let (nn, cc) = (n as u64, i32_arg(c, W)?);
    let mut b = f.builder();
    b.arg(&x).arg(&bias).arg(&mut y).arg(&nn).arg(&cc);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(elem_cfg(n)) }.w()?;
    Ok((wrap(y, dev), l1.shape().clone()))
}

/// Column sums of `g [.., C]`: `[C]` (the bias gradient of `add_bias_last`).
pub(crate) fn sum_rows(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "sum_rows (cuda)";
    let (rows, c) = last_rows(l, W)?;
    let g = f32_input(s, l, W)?;
    let dev = s.device();
    let f = func!(dev, FUSED, "sum_rows_f32")?;
    let mut out = dev.alloc_zeros::<f32>(c)?;
    let (r, cc) = (i32_arg(rows, W)?, i32_arg(c, W)?);
    let mut b = f.builder();
    b.arg(&g).arg(&mut out).arg(&r).arg(&cc);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(col_cfg(rows, c)) }.w()?;
    Ok((wrap(out, dev), Shape::from(c)))
}

// ---------------------------------------------------------------- pool.cu

/// Output size of a square pooling window (no padding, floor mode).
fn pool_out(h: usize, w: usize, k: usize, s: usize, what: &str) -> Result<(usize, usize)> {
    if k == 0 || s == 0 || k > h || k > w {
        bail!("{what}: kernel {k} stride {s} does not fit input {h}x{w}")
    }
    Ok(((h - k) / s + 1, (w - k) / s + 1))
}

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
    let f = func!(dev, POOL, &format!("{name}_{}", T::SUFFIX))?;
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
    let (bs, c, h, w) = dims4(l, what)?;
    let (ho, wo) = pool_out(h, w, kernel, stride, what)?;
    let dev = s.device();
    let n = bs * c * ho * wo;
    let out = by_float!(s, what, |T| {
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
    let (bs, c, h, w) = dims4(l1, W)?;
    let (ho, wo) = pool_out(h, w, kernel, stride, W)?;
    if l2.dims() != [bs, c, ho, wo] {
        bail!("{W}: dy {:?} does not match x {:?}", l2.dims(), l1.dims())
    }
    let dev = s1.device();
    let out = by_float!(s1, W, |T| {
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
    let (bs, c, ho, wo) = dims4(l, W)?;
    if pool_out(h, w, kernel, stride, W)? != (ho, wo) {
        bail!("{W}: dy {:?} does not match input {h}x{w}", l.dims())
    }
    let dev = s.device();
    let out = by_float!(s, W, |T| {
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
fn channel_bias_kernel(
    m: Module,
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    what: &str,
) -> Result<(CudaStorage, Shape)> {
    let (bs, c, h, w) = dims4(l1, what)?;
    if l2.dims() != [c] {
        bail!("{what}: bias {:?} for {c} channels", l2.dims())
    }
    let n = bs * c * h * w;
    let dev = s1.device();
    let out = by_float!(s1, what, |T| {
        let (x, bias) = (input::<T>(s1, l1, what)?, input::<T>(s2, l2, what)?);
        let f = func!(dev, m, &format!("{name}_{}", T::SUFFIX))?;
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
    let (bs, c, h, w) = dims4(l, W)?;
    let dev = s.device();
    let out = by_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = func!(dev, POOL, &format!("channel_sum_{}", T::SUFFIX))?;
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

// ---------------------------------------------------------------- act.cu

/// ReLU (`slope` 0) or leaky ReLU forward.
pub(crate) fn relu_fwd(slope: f64, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "relu (cuda)";
    let n = l.shape().elem_count();
    let dev = s.device();
    let out = by_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = func!(dev, ACT, &format!("relu_fwd_{}", T::SUFFIX))?;
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
    let out = by_float!(s1, W, |T| {
        let (y, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let f = func!(dev, ACT, &format!("relu_bwd_{}", T::SUFFIX))?;
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

// ---------------------------------------------------------------- norm.cu

/// Per-channel mean and biased variance of `x [B, C, S..]`: `[2, C]`.
pub(crate) fn bn_stats(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const W: &str = "batch_norm stats (cuda)";
    let (bs, c, sp) = super::norm::bcs(l, W)?;
    let dev = s.device();
    let out = by_float!(s, W, |T| {
        let x = input::<T>(s, l, W)?;
        let f = func!(dev, NORM, &format!("bn_stats_{}", T::SUFFIX))?;
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
    let f = func!(dev, NORM, &format!("{name}_{}", T::SUFFIX))?;
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
    let (_, c, sp) = super::norm::bcs(l1, W)?;
    super::norm::check_p(l2, c, W)?;
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let out = by_float!(s1, W, |T| {
        let (x, p) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let coef = bn_coef::<T>(dev, "bn_fwd_coef", &p, 3, c, (eps, None), W)?;
        let f = func!(dev, NORM, &format!("batch_norm_fwd_{}", T::SUFFIX))?;
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
    let (bs, c, sp) = super::norm::bcs(l1, W)?;
    super::norm::check_p(l3, c, W)?;
    if l2.dims() != l1.dims() {
        bail!("{W}: dy {:?} for x {:?}", l2.dims(), l1.dims())
    }
    let dev = s1.device();
    let out = by_float!(s1, W, |T| {
        let (x, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let p = input::<T>(s3, l3, W)?;
        let f = func!(dev, NORM, &format!("bn_sums_{}", T::SUFFIX))?;
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
    let (bs, c, sp) = super::norm::bcs(l1, W)?;
    if l3.dims() != [6, c] || l2.dims() != l1.dims() {
        bail!("{W}: bad shapes {:?} {:?}", l2.dims(), l3.dims())
    }
    let count = (bs * sp).max(1) as f64;
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let out = by_float!(s1, W, |T| {
        let (x, dy) = (input::<T>(s1, l1, W)?, input::<T>(s2, l2, W)?);
        let q = input::<T>(s3, l3, W)?;
        let extra = (eps, Some((count, i32::from(train))));
        let coef = bn_coef::<T>(dev, "bn_grad_coef", &q, 5, c, extra, W)?;
        let f = func!(dev, NORM, &format!("bn_grad_x_{}", T::SUFFIX))?;
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

// ---------------------------------------------------------------- optim.cu

/// One Adam/AdamW moment buffer of a CUDA f32 parameter, owned by the
/// optimizer (`optim.rs`): no tensor shares its memory (state is copied out
/// and loaded state copied in), so the fused step may write it in place.
pub(crate) struct Moment(CudaSlice<f32>);

impl std::fmt::Debug for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Moment({} f32 on CUDA)", self.0.len())
    }
}

impl Moment {
    /// `n` zeros on `dev` (a CUDA device).
    pub(crate) fn zeros(dev: &Device, n: usize) -> Result<Self> {
        Ok(Self(dev.as_cuda_device()?.alloc_zeros::<f32>(n)?))
    }

    /// A copy of the contents of `t` (f32, on a CUDA device).
    pub(crate) fn copy_of(t: &Tensor) -> Result<Self> {
        const W: &str = "optimizer state (cuda)";
        let t = t.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            bail!("{W}: expected a CUDA tensor")
        };
        let src = f32_input(cs, l, W)?;
        let dev = cs.device();
        // SAFETY: every element is written by the copy below.
        let mut dst = unsafe { dev.alloc::<f32>(src.len()) }?;
        dev.memcpy_dtod(&src, &mut dst)?;
        Ok(Self(dst))
    }

    /// A second buffer with the same contents (copy-on-write for optimizer clones).
    pub(crate) fn try_clone(&self) -> Result<Self> {
        let dev = self.0.stream();
        Ok(Self(dev.clone_dtod(&self.0).w()?))
    }

    /// A new tensor of `shape` on `dev` holding a copy of the contents.
    pub(crate) fn to_tensor(&self, shape: &Shape, dev: &Device) -> Result<Tensor> {
        if shape.elem_count() != self.0.len() {
            bail!(
                "optimizer state (cuda): {} values for {shape:?}",
                self.0.len()
            )
        }
        let copy = self.try_clone()?.0;
        let st = CudaStorage::wrap_cuda_slice(copy, dev.as_cuda_device()?.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(st),
            shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

/// One fused Adam/AdamW step of the f32 CUDA parameter `p` with gradient `g`,
/// in place on `p` and the moments `m` and `v` (one kernel, on candle's stream).
pub(crate) fn adam_step(
    a: &AdamScalars,
    p: &Tensor,
    g: &Tensor,
    m: &mut Moment,
    v: &mut Moment,
) -> Result<()> {
    let op = AdamOp {
        a: *a,
        mv: RefCell::new((&mut m.0, &mut v.0)),
    };
    p.inplace_op2(&g.to_dtype(DType::F32)?.contiguous()?, &op)
}

/// The in-place op behind [`adam_step`]: the parameter's storage is the
/// destination, the gradient the source, the moments borrowed for the call.
struct AdamOp<'a> {
    a: AdamScalars,
    mv: RefCell<(&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
}

impl InplaceOp2 for AdamOp<'_> {
    fn name(&self) -> &'static str {
        "kiln-fused-adam-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("fused Adam update (cuda): the parameter is not on a CUDA device")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let mut mv = self.mv.borrow_mut();
        let (m, v) = &mut *mv;
        adam_update(&self.a, (p, lp), (g, lg), m, v)
    }
}

/// One fused Adam/AdamW step in place: parameter `p` (contiguous f32),
/// gradient `g`, moment buffers `m` and `v` of the same length.
pub(crate) fn adam_update(
    a: &AdamScalars,
    (p, lp): (&mut CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
) -> Result<()> {
    const W: &str = "fused Adam update (cuda)";
    let n = lp.shape().elem_count();
    if lg.shape().elem_count() != n || m.len() != n || v.len() != n {
        bail!(
            "{W}: gradient of {} and moments of {} and {} elements for a parameter of {n}",
            lg.shape().elem_count(),
            m.len(),
            v.len()
        )
    }
    let Some((p0, p1)) = lp.contiguous_offsets() else {
        bail!("{W}: the parameter must be contiguous")
    };
    let dev = p.device().clone();
    let gs = f32_input(g, lg, W)?;
    let mut ps = p.as_cuda_slice_mut::<f32>()?.slice_mut(p0..p1);
    let f = func!(&dev, OPTIM, "adam_update_f32")?;
    let nn = n as u64;
    let dec = i32::from(a.decoupled);
    let mut b = f.builder();
    b.arg(&mut ps).arg(&gs).arg(m).arg(v).arg(&nn);
    b.arg(&a.step_size)
        .arg(&a.bc2_sqrt)
        .arg(&a.eps)
        .arg(&a.wd)
        .arg(&a.decay)
        .arg(&a.w1)
        .arg(&a.b2)
        .arg(&a.w2)
        .arg(&dec);
    // SAFETY: argument types match the kernel's signature; the moments are
    // borrowed mutably, so nothing else reads or writes them meanwhile.
    unsafe { b.launch(elem_cfg(n)) }.w()?;
    Ok(())
}

/// Each CUDA op against the CPU op (its reference): forward values and the
/// gradients of `sum(f(x) * r)`. Built and run only with `--features cuda`
/// on a machine with a GPU.
#[cfg(test)]
mod tests {
    use crate::ops;
    use crate::rng::SeededRng;
    use candle_core::{DType, Device, Result, Tensor, Var};

    fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        SeededRng::new(seed)
            .normal(shape, 0.0, scale, &Device::Cpu)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let b = b
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn run(
        dev: &Device,
        xs: &[Tensor],
        r_seed: u64,
        f: &dyn Fn(&[Tensor], &Device) -> Result<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = xs
            .iter()
            .map(|x| Var::from_tensor(&x.to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts, dev).unwrap();
        let r = rand(y.dims(), r_seed, 1.0)
            .to_dtype(y.dtype())
            .unwrap()
            .to_device(dev)
            .unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
        (y, grads)
    }

    fn check(
        what: &str,
        xs: &[Tensor],
        tol: f64,
        f: &dyn Fn(&[Tensor], &Device) -> Result<Tensor>,
    ) {
        let gpu = Device::new_cuda(0).expect("a CUDA device");
        let (yc, gc) = run(&Device::Cpu, xs, 99, f);
        let (yg, gg) = run(&gpu, xs, 99, f);
        assert!(yg.device().is_cuda(), "{what}: output left the GPU");
        let d = max_diff(&yc, &yg);
        assert!(d <= tol, "{what}: forward differs by {d}");
        for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
            let d = max_diff(a, b);
            assert!(d <= tol * 10.0, "{what}: gradient {i} differs by {d}");
        }
    }

    #[test]
    fn token_ops_match_the_cpu() {
        for dt in [DType::F32, DType::F64] {
            let x = rand(&[3, 4, 5003], 1, 3.0).to_dtype(dt).unwrap();
            let t: Vec<u32> = (0..12).map(|i| (i * 1237 + 5) % 5003).collect();
            check(
                "token_logprobs",
                std::slice::from_ref(&x),
                1e-5,
                &|xs, dev| {
                    let t = Tensor::from_slice(&t, (3, 4), dev)?;
                    ops::token_logprobs(&xs[0], &t)
                },
            );
            check("token_entropy", &[x], 1e-5, &|xs, _| {
                ops::token_entropy(&xs[0])
            });
        }
    }

    #[test]
    fn fused_ops_match_the_cpu() {
        let x = rand(&[5, 7, 769], 2, 2.0);
        check("gelu", std::slice::from_ref(&x), 1e-5, &|xs, _| {
            ops::gelu_tanh(&xs[0])
        });
        check("softmax", std::slice::from_ref(&x), 1e-5, &|xs, _| {
            ops::softmax_last_dim(&xs[0])
        });
        let w = rand(&[769], 3, 1.0);
        let b = rand(&[769], 4, 1.0);
        check(
            "layer_norm",
            &[(x.clone() + 3.0).unwrap(), w, b.clone()],
            1e-4,
            &|xs, _| ops::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5),
        );
        check("add_bias_last", &[x, b], 1e-4, &|xs, _| {
            ops::add_bias_last(&xs[0], &xs[1])
        });
    }

    #[test]
    fn pooling_and_channel_bias_match_the_cpu() {
        for dt in [DType::F32, DType::F64] {
            let x = rand(&[2, 3, 13, 10], 5, 1.0).to_dtype(dt).unwrap();
            for (k, s) in [(2, 2), (3, 2), (3, 1)] {
                check("max_pool2d", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                    ops::max_pool2d(&xs[0], k, s)
                });
                check("avg_pool2d", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                    ops::avg_pool2d(&xs[0], k, s)
                });
            }
            let b = rand(&[3], 6, 1.0).to_dtype(dt).unwrap();
            check("add_channel_bias", &[x, b], 1e-5, &|xs, _| {
                ops::add_channel_bias(&xs[0], &xs[1])
            });
        }
    }

    /// `t` with every fifth element set to exactly 0 (the ReLU gradient's edge).
    fn with_zeros(t: &Tensor) -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 5 == 0 { 0.0 } else { x })
            .collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    }

    #[test]
    fn activations_match_the_cpu() {
        for dt in [DType::F32, DType::F64] {
            let x = with_zeros(&rand(&[2, 3, 13, 10], 7, 1.0))
                .to_dtype(dt)
                .unwrap();
            check("relu", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                ops::relu(&xs[0])
            });
            for slope in [0.0, 0.2] {
                check("leaky_relu", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                    ops::leaky_relu(&xs[0], slope)
                });
            }
            // A zero bias on channel 1 puts exact zeros into x + b there.
            let b = Tensor::new(&[0.3f32, 0.0, -0.2], &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            check("add_channel_bias_relu", &[x, b], 1e-5, &|xs, _| {
                ops::add_channel_bias_relu(&xs[0], &xs[1])
            });
        }
    }

    #[test]
    fn batch_norm_matches_the_cpu() {
        let gpu = Device::new_cuda(0).expect("a CUDA device");
        for dt in [DType::F32, DType::F64] {
            // [B, C, H, W], [B, C, L] and [B, C]; an offset mean tests the
            // statistics' cancellation.
            for (shape, seed) in [
                (&[4usize, 3, 7, 9][..], 8u64),
                (&[5usize, 4, 33][..], 9),
                (&[16usize, 5][..], 10),
            ] {
                let x = (rand(shape, seed, 2.0) + 5.0)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let c = shape[1];
                let stats = |dev: &Device| {
                    let (m, v) = ops::batch_norm_stats(&x.to_device(dev).unwrap()).unwrap();
                    Tensor::stack(&[m, v], 0).unwrap()
                };
                let (sc, sg) = (stats(&Device::Cpu), stats(&gpu));
                assert!(sg.device().is_cuda());
                let d = max_diff(&sc, &sg);
                assert!(d <= 1e-5, "batch_norm_stats {shape:?}: differs by {d}");
                let w = rand(&[c], seed + 10, 1.0).to_dtype(dt).unwrap();
                let b = rand(&[c], seed + 20, 1.0).to_dtype(dt).unwrap();
                check(
                    "batch_norm train",
                    &[x.clone(), w.clone(), b.clone()],
                    1e-5,
                    &|xs, _| {
                        let (m, v) = ops::batch_norm_stats(&xs[0])?;
                        ops::batch_norm(&xs[0], &m, &v, &xs[1], &xs[2], 1e-5, true)
                    },
                );
                let rm = rand(&[c], seed + 30, 1.0).to_dtype(dt).unwrap();
                let rv = (rand(&[c], seed + 40, 1.0).abs().unwrap() + 0.5)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                check("batch_norm eval", &[x, w, b], 1e-5, &|xs, dev| {
                    let (m, v) = (rm.to_device(dev)?, rv.to_device(dev)?);
                    ops::batch_norm(&xs[0], &m, &v, &xs[1], &xs[2], 1e-5, false)
                });
            }
        }
        // Half types keep candle's ops on CUDA.
        let x = rand(&[4, 3, 5, 5], 11, 1.0)
            .to_dtype(DType::F16)
            .unwrap()
            .to_device(&gpu)
            .unwrap();
        let (m, v) = ops::batch_norm_stats(&x).unwrap();
        let y = ops::batch_norm(&x, &m, &v, &m.ones_like().unwrap(), &m, 1e-5, true).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(ops::relu(&x).unwrap().dtype(), DType::F16);
    }
}
