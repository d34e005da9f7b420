//! CUDA launchers of the fused transformer ops in `fused.rs`
//! (`kernels/fused.cu`): GELU, softmax, layer norm, the row bias add and row
//! sums, f32 only (`ops::mod` sends other dtypes to candle's ops).
//! Each function takes the storages and layouts candle hands the op's
//! `cuda_fwd` and checks shapes with the rules in `shape.rs`, as the CPU op does.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

use super::cuda::{col_cfg, cuda_func, elem_cfg, f32_input, i32_arg, row_cfg, wrap, Module};
use super::shape;

const FUSED: Module = Module {
    key: "kiln-fused",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
};

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
    let f = cuda_func!(dev, FUSED, name)?;
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
    let (rows, c) = shape::last_rows(l0.dims(), what)?;
    let views = ins
        .iter()
        .map(|(s, l)| f32_input(s, l, what))
        .collect::<Result<Vec<_>>>()?;
    let dev = s0.device();
    let f = cuda_func!(dev, FUSED, name)?;
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
    let (_, c) = shape::last_rows(l.dims(), what)?;
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
    let (rows, c) = shape::last_rows(l1.dims(), W)?;
    let (x, g) = (f32_input(s1, l1, W)?, f32_input(s2, l2, W)?);
    let dev = s1.device();
    let (r, cc) = (i32_arg(rows, W)?, i32_arg(c, W)?);
    // SAFETY: every element is written by the stats kernel.
    let mut stats = unsafe { dev.alloc::<f32>(2 * rows.max(1)) }?;
    let f = cuda_func!(dev, FUSED, "layer_norm_stats_f32")?;
    let mut b = f.builder();
    b.arg(&x).arg(&mut stats).arg(&r).arg(&cc).arg(&eps);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(row_cfg(rows)) }.w()?;
    let mut out = dev.alloc_zeros::<f32>(2 * c)?;
    let f = cuda_func!(dev, FUSED, "layer_norm_bwd_wb_f32")?;
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
    let (_, c) = shape::last_rows(l1.dims(), W)?;
    if l2.shape().elem_count() != c {
        bail!("{W}: bias {:?} for rows of {c}", l2.dims())
    }
    let (x, bias) = (f32_input(s1, l1, W)?, f32_input(s2, l2, W)?);
    let n = l1.shape().elem_count();
    let dev = s1.device();
    let f = cuda_func!(dev, FUSED, "add_bias_last_f32")?;
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
    let (rows, c) = shape::last_rows(l.dims(), W)?;
    let g = f32_input(s, l, W)?;
    let dev = s.device();
    let f = cuda_func!(dev, FUSED, "sum_rows_f32")?;
    let mut out = dev.alloc_zeros::<f32>(c)?;
    let (r, cc) = (i32_arg(rows, W)?, i32_arg(c, W)?);
    let mut b = f.builder();
    b.arg(&g).arg(&mut out).arg(&r).arg(&cc);
    // SAFETY: argument types match the kernel's signature.
    unsafe { b.launch(col_cfg(rows, c)) }.w()?;
    Ok((wrap(out, dev), Shape::from(c)))
}

/// Inverted dropout `x * mask(i)` with the CPU op's mask (`DropoutMask`),
/// drawn on the GPU: the mask never crosses the bus, and the backward pass
/// runs the same kernel on the gradient.
pub(crate) fn dropout(
    m: &super::fused::DropoutMask,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const W: &str = "dropout (cuda)";
    let x = f32_input(s, l, W)?;
    let n = l.shape().elem_count();
    let dev = s.device();
    let f = cuda_func!(dev, FUSED, "dropout_f32")?;
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<f32>(n) }?;
    let nn = n as u64;
    let mut b = f.builder();
    b.arg(&x)
        .arg(&mut y)
        .arg(&nn)
        .arg(&m.seed)
        .arg(&m.threshold)
        .arg(&m.scale);
    // SAFETY: argument types match the kernel's signature
    // (pointers, size_t, uint64_t, uint64_t, float).
    unsafe { b.launch(elem_cfg(n)) }.w()?;
    Ok((wrap(y, dev), l.shape().clone()))
}
