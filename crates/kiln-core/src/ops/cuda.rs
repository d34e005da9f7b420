//! The launch plumbing that every CUDA launcher of kiln's ops shares
//! (`cuda` feature): how a compiled `kernels/<name>.cu` is named and loaded
//! (once per device, through candle's `CudaDevice::get_or_load_custom_func`),
//! the float types with kernels, contiguous views of candle's storages and
//! launch configurations. It imports no op.
//!
//! The launchers live beside their CPU ops, as candle keeps each launcher
//! with its op: `token_cuda.rs`, `fused_cuda.rs`, `pool_cuda.rs`,
//! `act_cuda.rs`, `norm_cuda.rs` and `conv_cuda.rs` next to `token.rs`,
//! `fused.rs`, `pool.rs`, `act.rs`, `norm.rs` and `conv.rs`; the optimizer's
//! fused Adam step is in `optim.rs`. Each op's `cuda_fwd` calls its launcher
//! with the storages and layouts it got from candle, and both check shapes
//! with the rules in `shape.rs`. Kernels run on candle's stream, so they
//! order with candle's own ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

/// One compiled `kernels/<name>.cu`: each launcher file defines the one it uses.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    /// The key candle caches the loaded module under.
    pub(crate) key: &'static str,
    /// The PTX text `build.rs` compiled.
    pub(crate) ptx: &'static str,
}

/// Threads per block of the row kernels (`KILN_ROW_THREADS` in `common.cuh`).
const ROW_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels (grid-stride loops).
const ELEM_THREADS: u32 = 256;

/// Float types with a kernel, and the suffix of their kernel names.
pub(crate) trait Float: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType {
    /// `f32` or `f64`, the suffix of the kernels' names.
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f64 {
    const SUFFIX: &'static str = "f64";
}

/// Calls `$body` with `$t` bound to the storage's float type (f32 or f64);
/// other dtypes are an error naming the op.
macro_rules! cuda_float {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s.dtype() {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            d => candle_core::bail!("{}: no kiln CUDA kernel for {d:?}", $what),
        }
    };
}
pub(crate) use cuda_float;

/// Loads (once per device) and returns a kernel of a [`Module`].
macro_rules! cuda_func {
    ($dev:expr, $m:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, $m.key, $m.ptx)
    };
}
pub(crate) use cuda_func;

/// The contiguous view behind a storage and layout.
pub(crate) fn input<'a, T: Float>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: non-contiguous input")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// The contiguous view behind a u32 storage (token ids).
pub(crate) fn u32_input<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, u32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: non-contiguous input")
    };
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

/// The contiguous view behind an f32 storage; other dtypes are an error.
pub(crate) fn f32_input<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        bail!("{what}: f32 only (got {:?})", s.dtype())
    }
    input::<f32>(s, l, what)
}

/// A kernel's output buffer as candle storage on `dev`.
pub(crate) fn wrap<T: Float>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// A size as the kernels' `int`, or an error naming the op.
pub(crate) fn i32_arg(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: size {v} over i32")))
}

/// One block of `ROW_THREADS` per row.
pub(crate) fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Enough blocks for a grid-stride loop over `n` elements.
pub(crate) fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEM_THREADS as usize).clamp(1, 1 << 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 32-column tiles over row ranges (the column-sum kernels).
pub(crate) fn col_cfg(rows: usize, c: usize) -> LaunchConfig {
    let gy = rows.div_ceil(64).clamp(1, 1024);
    LaunchConfig {
        grid_dim: (c.div_ceil(32).max(1) as u32, gy as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}
