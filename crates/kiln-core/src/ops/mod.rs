//! kiln's own CPU kernels as candle custom ops, each with its backward, so
//! autograd runs through them: convolution and transposed convolution
//! (im2col/col2im + gemm, batch-parallel with rayon) and max/average pooling
//! with a single-pass backward that also handles kernel != stride; ReLU, conv
//! bias + ReLU and batch norm fused into one pass each way; per-token
//! log-probabilities and entropies that never build `[B, T, V]` log-softmaxes;
//! and GELU, softmax, layer norm and bias adds fused for transformers.
//!
//! Each function takes the kiln kernel for f32/f64 tensors on the CPU and falls
//! back to candle's own op elsewhere (half types, and CUDA in the default
//! build), so callers need no device checks of their own. With the `cuda`
//! feature, CUDA tensors go to kiln's CUDA kernels (`kernels/*.cu`, each
//! family's launchers in `<op>_cuda.rs` beside its CPU op, shared plumbing in
//! `cuda.rs`, shape rules in [`shape`]): token log-probs/entropy, pooling, channel bias, ReLU / leaky
//! ReLU, bias + ReLU, batch norm and convolutions (f32/f64; convolutions as
//! im2col/col2im kernels around candle's cuBLAS matmul, no cuDNN), GELU,
//! softmax, layer norm and the row bias add (f32).
//!
//! ```
//! use kiln_core::{ops, Device, Tensor};
//! let x = Tensor::ones((1, 2, 5, 5), kiln_core::DType::F32, &Device::Cpu)?;
//! let w = Tensor::ones((4, 2, 3, 3), kiln_core::DType::F32, &Device::Cpu)?;
//! let y = ops::conv2d(&x, &w, 1, 1, 1, 1)?;
//! assert_eq!(y.dims(), &[1, 4, 5, 5]);
//! let b = Tensor::new(&[-20f32, 0.0, 1.0, 2.0], &Device::Cpu)?;
//! let h = ops::add_channel_bias_relu(&y, &b)?; // max(y + b, 0)
//! assert_eq!(h.get(0)?.get(0)?.max_keepdim(1)?.max_keepdim(0)?.flatten_all()?.to_vec1::<f32>()?, [0.0]);
//! assert_eq!(ops::max_pool2d(&h, 2, 2)?.dims(), &[1, 4, 2, 2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

/// Runs `$body` with the type alias `$t` bound to the storage's float type and
/// wraps the `Vec<$t>` it returns back into a storage; other dtypes are an error
/// naming the op. Defined before the modules so that all of them see it.
macro_rules! by_float {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            s => candle_core::bail!(
                "{}: only f32 and f64 have a kiln CPU kernel (got {:?})",
                $what,
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    };
}

mod act;
#[cfg(feature = "cuda")]
mod act_cuda;
mod attention;
pub(crate) mod composite;
mod conv;
mod conv_cl;
#[cfg(feature = "cuda")]
mod conv_cuda;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
#[cfg(feature = "cuda")]
mod cuda_tests;
mod fused;
#[cfg(feature = "cuda")]
mod fused_cuda;
mod linear;
mod norm;
#[cfg(feature = "cuda")]
mod norm_cuda;
mod pool;
#[cfg(feature = "cuda")]
mod pool_cuda;
mod sgemm;
pub mod shape;
pub use linear::WeightLayout;
pub mod team;
mod token;
#[cfg(feature = "cuda")]
mod token_cuda;
mod transpose;
mod vexp;

use candle_core::{DType, Result, Tensor};

use conv::{Conv2dGradInput, Conv2dOp};
use shape::ConvParams;

/// Runs `f` on a thread of the CPU kernels' rayon pool and returns its result.
///
/// Every CPU kernel splits its work with rayon. Called from a thread outside
/// the pool (a program's main thread), each kernel call hands its whole loop
/// over to the pool and sleeps until it comes back: two thread wake-ups per
/// op, a few microseconds each, which small ops (a decode step's ~200, a small
/// model's training step) pay over and over. Inside `on_pool`, a kernel's loop
/// starts on the current thread and the pool's other threads steal from it.
/// Wrap compute only (a forward pass, a training step): code that blocks on
/// another thread's rayon work (a data loader's channel) must stay outside,
/// or a one-thread pool would wait on itself.
///
/// ```
/// // The result comes back; inside, rayon sees one of its own threads, and
/// // a nested call runs in place.
/// let (inside, nested) = kiln_core::ops::on_pool(|| {
///     let here = rayon::current_thread_index();
///     (here, kiln_core::ops::on_pool(rayon::current_thread_index))
/// });
/// assert!(inside.is_some());
/// assert_eq!(inside, nested);
/// assert!(rayon::current_thread_index().is_none());
/// ```
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // The job runs with the caller's `nn::frozen` state, not that of the
    // pool thread that takes it (one may be inside another step's `frozen`).
    let frozen = crate::nn::is_frozen();
    rayon::scope(|_| crate::nn::with_frozen(frozen, f))
}

/// Per-task partial sums added in task order, so the result is the same bits
/// on every run with the same thread count (rayon's `reduce` combines partials
/// in a tree that follows the work stealing). Conv weight gradients, layer
/// norm's weight and bias gradients and the bias-add gradient use it.
pub(super) fn sum_in_order<T: candle_core::WithDType>(parts: Vec<Vec<T>>, len: usize) -> Vec<T> {
    parts
        .into_iter()
        .reduce(|mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        })
        .unwrap_or_else(|| vec![T::from_f64(0.0); len])
}

/// The contiguous slice behind a storage and layout (ops make inputs contiguous first).
fn slice<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("kiln ops: non-contiguous input")
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

thread_local! {
    /// Each thread's scratch for [`with_scratch`], kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch kept per thread up to this many bytes (a 64-channel 3x3
/// convolution over a 128x128 map needs 37 MiB); larger requests get a fresh
/// buffer each time, so one huge convolution does not stay pinned on every
/// thread of a many-core machine.
const SCRATCH_KEEP: usize = 64 << 20;

/// Runs `f` on `len` elements of scratch that this thread keeps between calls
/// (the convolutions' column matrices and channel-major copies), so neither an
/// allocation nor a memset runs per call: zero-filling fresh column buffers
/// was ~2% of the DCGAN step and ~4% of the inpainting autoencoder's.
///
/// The contents are left over from earlier use: `f` must write every element
/// it reads. Debug builds (the tests) fill the slice with NaN first, so a read
/// of an unwritten element shows up as NaN. A nested call on the same thread
/// (work stolen while `f` runs) gets a fresh buffer instead.
pub(super) fn with_scratch<T: candle_core::WithDType, R>(
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let poison = |s: &mut [T]| {
        if cfg!(debug_assertions) {
            s.fill(T::from_f64(f64::NAN));
        }
    };
    let bytes = len * std::mem::size_of::<T>();
    // `Vec<f64>` storage: 8-byte aligned, enough for every candle dtype.
    debug_assert!(std::mem::align_of::<T>() <= 8);
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if bytes <= SCRATCH_KEEP => {
            let words = bytes.div_ceil(8);
            if buf.len() < words {
                buf.resize(words, 0.0);
            }
            // SAFETY: the buffer holds at least `bytes` bytes, 8-byte aligned;
            // `T` is one of candle's plain numeric types, for which every bit
            // pattern is a value; the borrow of `buf` outlives the slice.
            let s = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
            poison(s);
            f(s)
        }
        _ => {
            let mut v = vec![T::from_f64(0.0); len];
            poison(&mut v);
            f(&mut v)
        }
    })
}

/// A vector of `len` elements built in parallel: `f(i, part)` fills the
/// `i`-th run of `chunk` elements, which the same task has just zeroed.
/// A `vec![0; len]` made before the parallel loop is a serial memset on the
/// calling thread while the pool waits: kiln's allocator settings reuse large
/// blocks from the heap, so calloc clears them itself (DCGAN's outputs and
/// gradients are 1-4 MB each; the zeroing was ~2% of a training step).
fn par_fill<T, F>(len: usize, chunk: usize, f: F) -> Vec<T>
where
    T: candle_core::WithDType,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    use rayon::prelude::*;
    let zero = T::from_f64(0.0);
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| {
            for v in part.iter_mut() {
                v.write(zero);
            }
            // SAFETY: every element of `part` was initialised just above, and
            // `MaybeUninit<T>` has `T`'s layout.
            let part = unsafe {
                std::slice::from_raw_parts_mut(part.as_mut_ptr().cast::<T>(), part.len())
            };
            f(i, part);
        });
    // SAFETY: the parts above cover `0..len`, and each task initialised its own.
    unsafe { out.set_len(len) };
    out
}

/// Whether the kiln CPU kernels serve these tensors.
fn kiln_cpu(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// Whether the kiln CUDA kernels serve these tensors: all on one CUDA device,
/// all f32 (or all f64 where `f64_too`). Always false without the `cuda` feature.
fn kiln_cuda(ts: &[&Tensor], f64_too: bool) -> bool {
    #[cfg(feature = "cuda")]
    {
        let (dt, dev) = (ts[0].dtype(), ts[0].device());
        (dt == DType::F32 || (f64_too && dt == DType::F64))
            && ts
                .iter()
                .all(|t| t.device().is_cuda() && t.device().same_device(dev) && t.dtype() == dt)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ts, f64_too);
        false
    }
}

/// Whether kiln's CUDA convolution serves these tensors: f32/f64 on one CUDA
/// device, none of them empty (candle's op takes those).
fn kiln_cuda_conv(ts: &[&Tensor]) -> bool {
    kiln_cuda(ts, true) && ts.iter().all(|t| t.elem_count() > 0)
}

/// Whether a kiln kernel (CPU, or CUDA with the feature) serves these f32/f64 tensors.
fn kiln_any(ts: &[&Tensor]) -> bool {
    kiln_cpu(ts) || kiln_cuda(ts, true)
}

/// 2-D convolution of `x [B, C_in, H, W]` with `w [C_out, C_in/groups, kh, kw]`,
/// giving `[B, C_out, H_out, W_out]` (PyTorch's `conv2d` without bias).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if !(kiln_cpu(&[x, w]) || kiln_cuda_conv(&[x, w])) {
        return x.conv2d(w, padding, stride, dilation, groups);
    }
    let p = ConvParams {
        stride,
        padding,
        dilation,
        groups,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(p))
}

/// 2-D transposed convolution of `x [B, C_in, H, W]` with `w [C_in, C_out, kh, kw]`,
/// giving `[B, C_out, (H-1)*stride - 2*padding + dilation*(kh-1) + output_padding + 1, ..]`
/// (PyTorch's `conv_transpose2d` without bias, groups 1).
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let fallback = || x.conv_transpose2d(w, padding, output_padding, stride, dilation);
    // output_padding >= stride (allowed by PyTorch when dilation is larger) leaves
    // rows no input reaches and no conv2d maps back to: candle's direct loop handles it.
    if !(kiln_cpu(&[x, w]) || kiln_cuda_conv(&[x, w])) || output_padding >= stride.max(1) {
        return fallback();
    }
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let side = |i: usize, k: usize| {
        ((i.max(1) - 1) * stride + dilation * (k.max(1) - 1) + output_padding + 1)
            .checked_sub(2 * padding)
            .filter(|&s| s > 0)
    };
    let (Some(ho), Some(wo)) = (side(h, kh), side(wd, kw)) else {
        candle_core::bail!(
            "conv_transpose2d: padding {padding} leaves no output for input {h}x{wd}, kernel {kh}x{kw}"
        )
    };
    let p = ConvParams {
        stride,
        padding,
        dilation,
        groups: 1,
    };
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dGradInput { p, h: ho, w: wo })
}

/// Max pooling of `x [B, C, H, W]` over `kernel x kernel` windows every `stride`
/// (no padding, floor mode). The gradient goes to the first maximum of each window.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if !kiln_any(&[x]) {
        return x.max_pool2d_with_stride(kernel, stride);
    }
    x.contiguous()?.apply_op1(pool::MaxPool { kernel, stride })
}

/// Average pooling of `x [B, C, H, W]` over `kernel x kernel` windows every `stride`
/// (no padding, floor mode).
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if !kiln_any(&[x]) {
        return x.avg_pool2d_with_stride(kernel, stride);
    }
    x.contiguous()?.apply_op1(pool::AvgPool { kernel, stride })
}

/// `softmax(row)` of one row of logits on the host (a sampler's
/// distribution), with `exp` in SIMD lanes as in [`softmax_last_dim`]; a
/// `-inf` entry gets 0. A scalar `expf` per entry cost ~150 µs per GPT-2 row
/// (50257 logits), ~3% of a 16-row rollout.
///
/// ```
/// let p = kiln_core::ops::softmax_row(&[0.0, f32::NEG_INFINITY, 0.0]);
/// assert_eq!(p, [0.5, 0.0, 0.5]);
/// ```
pub fn softmax_row(row: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; row.len()];
    vexp::softmax(&mut y, row, 1.0);
    y
}

/// `log_softmax(row)[i]` of one row of logits on the host: a sampler's
/// log-prob of the token it picked. The vocabulary-wide `exp` sum runs in
/// SIMD lanes with f64 accumulators, as in [`token_logprobs`]; a scalar f64
/// `exp` per entry took ~1 ms of each GPT-2 decode step (50257 logits).
///
/// # Panics
/// If `i` is outside the row.
pub fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    token::log_softmax_at(row, i)
}

/// `log_softmax(logits, -1)` gathered at `targets`: `logits [.., V]` (f32/f64),
/// `targets [..]` (any integer dtype) give `[..]`. Neither the forward nor the
/// backward materialises `[.., V]` log-probabilities; the backward writes
/// `grad * (onehot - softmax)` straight into the logits' gradient.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !kiln_any(&[logits]) || !targets.device().same_device(logits.device()) {
        let lp = composite::log_softmax(logits, candle_core::D::Minus1)?;
        let idx = targets
            .to_dtype(DType::U32)?
            .unsqueeze(candle_core::D::Minus1)?;
        return lp
            .gather(&idx.contiguous()?, candle_core::D::Minus1)?
            .squeeze(candle_core::D::Minus1);
    }
    let t = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(&t, token::TokenLogprobs)
}

/// Entropy of `softmax(logits, -1)` per row: `logits [.., V]` give `[..]`, with a
/// backward that needs no `[.., V]` intermediate beyond the gradient itself.
pub fn token_entropy(logits: &Tensor) -> Result<Tensor> {
    if !kiln_any(&[logits]) {
        let lp = composite::log_softmax(logits, candle_core::D::Minus1)?;
        return (lp.exp()? * &lp)?.sum(candle_core::D::Minus1)?.neg();
    }
    logits.contiguous()?.apply_op1(token::TokenEntropy)
}

/// Whether a kiln f32 kernel (CPU, or CUDA with the feature) serves these tensors.
fn kiln_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        || kiln_cuda(ts, false)
}

/// GELU, tanh approximation (GPT-2's `gelu_new`, PyTorch's
/// `gelu(approximate="tanh")`), with a one-pass backward on the CPU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !kiln_f32(&[x]) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(fused::GeluTanh)
}

/// `tanh(x)`: on the CPU in f32 a SIMD kernel (Cephes' `tanhf`, within 3e-7
/// relative of the true value) on every thread, with a one-pass backward
/// `dy (1 - y^2)`; candle's `tanh` elsewhere.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return x.tanh();
    }
    x.contiguous()?.apply_op1(fused::Tanh)
}

/// Inverted dropout: each element of `x` kept with probability `keep` and
/// scaled by `1/keep`, else zeroed, by a mask that is a pure function of
/// `seed` and the element's index (splitmix64 on a counter). On the CPU (f32
/// and f64) and on a CUDA GPU (f32) the mask is drawn inside one pass and
/// regenerated in the backward pass, never stored; elsewhere the same mask is
/// built on the CPU and multiplied, so every device drops the same elements
/// for one seed.
pub fn dropout(x: &Tensor, keep: f64, seed: u64) -> Result<Tensor> {
    if !(keep > 0.0 && keep <= 1.0) {
        candle_core::bail!("dropout: keep must be in (0, 1], got {keep}");
    }
    let mask = fused::DropoutMask::new(seed, keep);
    // the fused op: f32/f64 on the CPU, f32 on a GPU (the mask drawn there)
    let fused = (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64))
        || (x.device().is_cuda() && x.dtype() == DType::F32);
    if fused {
        return x.contiguous()?.apply_op1(fused::Dropout(mask));
    }
    let m = Tensor::from_vec(
        mask.values(x.elem_count()),
        x.shape(),
        &candle_core::Device::Cpu,
    )?
    .to_device(x.device())?
    .to_dtype(x.dtype())?;
    x * m
}

/// Softmax over the last dimension, one pass forward and one backward
/// (`y * (g - sum(g * y))`) on the CPU; the max-subtracted composite elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !kiln_f32(&[x]) {
        return composite::softmax_composite(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(fused::SoftmaxLast)
}

/// Causal attention weights from raw scores `x [.., T, S]` (`S >= T`, the
/// last `T` of `S` positions are the queries): `softmax(scale * x)` over the
/// keys each query may see (`j <= i + S - T`), exactly 0 elsewhere. On f32 CPU
/// tensors one fused pass each way (replacing a scale, a broadcast mask add
/// and a softmax, and their backward passes); elsewhere the composite with a
/// large negative bias, as transformers' GPT-2 does.
pub fn softmax_causal(x: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = x.dims();
    let (t, s) = match dims {
        [.., t, s] if s >= t && *t > 0 => (*t, *s),
        _ => candle_core::bail!(
            "softmax_causal: expected [.., T, S] scores with S >= T >= 1, got {dims:?}"
        ),
    };
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(fused::SoftmaxCausal {
            scale: scale as f32,
        });
    }
    let bias = causal_bias(t, s, x.device(), x.dtype())?;
    softmax_last_dim(&(x * scale)?.broadcast_add(&bias)?)
}

/// The causal mask as an additive bias `[T, S]` (0 where query `i` may see
/// key `j <= i + S - T`, `f32::MIN` elsewhere) on `dev`, kept per thread for
/// the last few shapes, so a GPU gets it once rather than a fresh host
/// copy for every layer of every step.
fn causal_bias(t: usize, s: usize, dev: &candle_core::Device, dtype: DType) -> Result<Tensor> {
    type Key = (usize, usize, DType);
    thread_local! {
        static BIASES: std::cell::RefCell<Vec<(Key, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// Shapes kept per thread (a decode loop's growing S cycles through them).
    const KEEP: usize = 8;
    let key = (t, s, dtype);
    let hit = BIASES.with(|b| {
        b.borrow()
            .iter()
            .find(|(k, v)| *k == key && v.device().same_device(dev))
            .map(|(_, v)| v.clone())
    });
    if let Some(bias) = hit {
        return Ok(bias);
    }
    let past = s - t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for v in &mut m[i * s + past + i + 1..(i + 1) * s] {
            *v = f32::MIN;
        }
    }
    let bias = Tensor::from_vec(m, (t, s), dev)?.to_dtype(dtype)?;
    BIASES.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() == KEEP {
            b.remove(0);
        }
        b.push((key, bias.clone()));
    });
    Ok(bias)
}

/// Causal self-attention from fused projections: `qkv [B, T, 3C]` (queries,
/// keys, values side by side, as GPT-2's `c_attn` gives them) split into
/// `heads` heads, `softmax(scale * q k^T)` over the keys at or before each
/// query, `dropout = Some((keep, seed))` applied to those weights as
/// [`dropout`] would, times `v`, heads merged: `[B, T, C]`.
///
/// On f32 CPU tensors one op each way (the tensor path's head splits, two
/// batched matmuls, softmax, dropout and head merge are about twenty graph
/// nodes, each with a gradient buffer of its own); elsewhere that tensor
/// path, with the same dropout mask for the same seed. As with the fused
/// softmax, the CPU op's gradient is first order (its own backward is not
/// differentiated again).
pub fn causal_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    if let Some((keep, _)) = dropout {
        if !(keep > 0.0 && keep <= 1.0) {
            candle_core::bail!("causal attention: dropout keep must be in (0, 1], got {keep}");
        }
    }
    let dims = qkv.dims();
    match dims {
        [_, t, c3] if *t > 0 && *c3 > 0 && heads > 0 && c3 % (3 * heads) == 0 => {}
        _ => candle_core::bail!(
            "causal attention: expected q/k/v [B, T, 3C] with T >= 1 and C > 0 a multiple of \
             {heads} heads, got {dims:?}"
        ),
    }
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        let mask = dropout.map(|(keep, seed)| fused::DropoutMask::new(seed, keep));
        return qkv.contiguous()?.apply_op1(attention::CausalAttention::new(
            heads,
            scale as f32,
            mask,
        ));
    }
    causal_attention_composite(qkv, heads, scale, dropout)
}

/// [`causal_attention`] as tensor ops (other devices and dtypes; the tests'
/// reference).
pub(crate) fn causal_attention_composite(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<(f64, u64)>,
) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let (c, d) = (c3 / 3, c3 / 3 / heads);
    let part = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * c, c)?
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let mut p = softmax_causal(&q.matmul(&k.t()?)?, scale)?;
    if let Some((keep, seed)) = drop {
        p = dropout(&p, keep, seed)?;
    }
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// Layer norm over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`,
/// with gradients to `x`, `w` and `b` in two passes on the CPU.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !kiln_f32(&[x, w, b]) {
        return composite::layer_norm_composite(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        fused::LayerNorm { eps: eps as f32 },
    )
}

/// `a [M, K] @ b [K, N]`: kiln's own f32 product (AVX2+FMA) where it beats
/// candle's `gemm`, reading transposed views in place, with the same
/// gradients as candle's `matmul`; candle's `matmul` everywhere else. Beside
/// `gemm`'s AVX2 kernels it takes products of 64+ rows and columns and 48+
/// `k` steps (8+ rows on more threads; 9-27% faster on GPT-2's training
/// shapes); beside its AVX-512 kernels, products of up to 256 rows whose `b`
/// is a transposed view, as a linear layer's `x @ w^T` (1.2-13x faster on a
/// Zen 4). The `sgemm` module gives the measurements.
///
/// ```
/// use kiln_core::{ops, Device, Tensor};
/// let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let b = Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &Device::Cpu)?;
/// let y = ops::matmul(&a, &b.t()?)?; // a @ b^T
/// assert_eq!(y.to_vec2::<f32>()?, [[17.0, 23.0], [39.0, 53.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ours = a.rank() == 2
        && b.rank() == 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu()
        && sgemm::picks(
            a.dim(0)?,
            b.dim(1)?,
            a.dim(1)?,
            rayon::current_num_threads(),
            b.stride()[1] != 1,
        );
    if !ours {
        return a.matmul(b);
    }
    a.apply_op2(b, sgemm::MatMul)
}

/// `x [m, k] @ w` as a new row-major `[m, n]`, on kiln's AVX2+FMA f32 kernel
/// (the one [`matmul`] runs), for callers that hold plain slices rather than
/// tensors: `w` is `[k, n]`, or `[n, k]` read transposed when `w_transposed`.
/// The product is split over up to `threads` tasks on [`team`] (whose
/// helpers stay awake between a decode step's loops), and each output's sum
/// runs in the same order in every split, so its bits do not depend on
/// `threads`. `None` when this CPU lacks AVX2 and FMA.
///
/// kiln-lm's few-row products send their `[N, K]` products of 24 to 64 rows
/// here on AVX2 CPUs: on a Zen 3 this kernel ran GPT-2's `[50257, 768]` LM
/// head 1.1x faster than kiln-lm's dot-product tiles at 32 rows, 1.5-1.7x at
/// 64 (median and best of 14 alternated runs).
///
/// ```
/// let (x, w) = ([1f32, 2.0, 3.0, 4.0], [5f32, 6.0, 7.0, 8.0]);
/// if let Some(y) = kiln_core::ops::matmul_f32_slices(&x, 2, 2, &w, 2, true, 2) {
///     assert_eq!(y, [17.0, 23.0, 39.0, 53.0]); // x @ w^T
/// }
/// ```
///
/// # Panics
/// If `x` or `w` is shorter than its shape says, or a size overflows.
pub fn matmul_f32_slices(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    w_transposed: bool,
    threads: usize,
) -> Option<Vec<f32>> {
    if !sgemm::kernel_runs() {
        return None;
    }
    let fits = |len: usize, a: usize, b: usize| a.checked_mul(b).is_some_and(|need| len >= need);
    assert!(
        fits(x.len(), m, k) && fits(w.len(), k, n),
        "kiln matmul_f32_slices: [{m}, {k}] x {} over slices of {} and {}",
        if w_transposed { "[n, k]" } else { "[k, n]" },
        x.len(),
        w.len()
    );
    let mut y = vec![
        0f32;
        m.checked_mul(n)
            .expect("kiln matmul_f32_slices: m * n overflows")
    ];
    let rs = if w_transposed { (1, k) } else { (n, 1) };
    sgemm::sgemm(
        (m, n, k),
        &mut y,
        n,
        false,
        x,
        (k, 1),
        w,
        rs,
        threads.max(1),
        true,
    );
    Some(y)
}

/// A linear layer, `x [.., K] @ w + bias [N]` (`w` laid out as `layout`
/// says; no bias: the product alone). f32 on the CPU is one op: the output
/// starts as the bias rows and the product (kiln's `sgemm` or `gemm`, as
/// [`matmul`] picks) is added onto them, and the backward pass forms the three
/// gradients straight from the output's, each weight gradient in its weight's
/// layout. Elsewhere it is [`matmul`] then [`add_bias_last`].
///
/// ```
/// use kiln_core::{ops, ops::WeightLayout, Device, Tensor};
/// let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &Device::Cpu)?; // [out, in]
/// let b = Tensor::new(&[0.5f32, 0.0, -3.0], &Device::Cpu)?;
/// let y = ops::linear(&x, &w, Some(&b), WeightLayout::OutIn)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[1.5, 2.0, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let fused = bias.filter(|b| {
        x.device().is_cpu()
            && [x.dtype(), w.dtype(), b.dtype()] == [DType::F32; 3]
            && w.rank() == 2
            && b.rank() == 1
    });
    let k = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    if let Some(b) = fused {
        if let Some(l) = dims.last_mut() {
            *l = b.dim(0)?;
        }
        return x
            .reshape((rows, k))?
            .apply_op3(w, b, linear::Linear(layout))?
            .reshape(dims);
    }
    let y = match (layout, x.dims()) {
        (WeightLayout::InOut, _) => {
            let y = matmul(&x.reshape((rows, k))?, w)?;
            if let Some(l) = dims.last_mut() {
                *l = y.dim(1)?;
            }
            y.reshape(dims)?
        }
        (WeightLayout::OutIn, [b1, b2, _, _]) => {
            x.broadcast_matmul(&w.t()?.broadcast_left((*b1, *b2))?)?
        }
        (WeightLayout::OutIn, [b, _, _]) => x.broadcast_matmul(&w.t()?.broadcast_left(*b)?)?,
        // y = (W x^T)^T: the same product, but autograd then forms the weight
        // gradient as grad^T x, already in W's [out, in] layout. With x W^T it
        // arrives transposed and every optimizer step pays a strided copy of
        // each weight-sized gradient (~6 ms for 512x3072 here).
        (WeightLayout::OutIn, _) => matmul(w, &x.t()?)?.t()?,
    };
    match bias {
        Some(b) => add_bias_last(&y, b),
        None => Ok(y),
    }
}

/// Column sums of `g [.., C]` (a bias gradient), outside the graph.
fn sum_rows(g: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&fused::SumRows)
}

/// `x [.., C] + bias [C]` (a linear layer's bias), with a one-pass bias
/// gradient on the CPU; candle's broadcast add elsewhere.
pub fn add_bias_last(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !kiln_f32(&[x, bias]) || bias.rank() != 1 {
        return x.broadcast_add(bias);
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, fused::AddBiasLast)
}

/// `x [B, C, H, W] + bias [C]` (a conv layer's bias), with a one-pass bias
/// gradient on the CPU (and CUDA with the `cuda` feature); candle's broadcast
/// add elsewhere.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !kiln_any(&[x, bias]) || x.rank() != 4 {
        return x.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?);
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, pool::ChannelBias)
}

/// `max(x, 0)` with a one-pass backward on the CPU (and CUDA with the `cuda`
/// feature), f32/f64; candle's `relu` elsewhere. The gradient at exactly 0 is
/// 0, as in PyTorch.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !kiln_any(&[x]) {
        return act::relu_composite(x);
    }
    x.contiguous()?.apply_op1(act::Relu { slope: 0.0 })
}

/// Leaky ReLU, `x` where positive and `slope * x` elsewhere (PyTorch's
/// `leaky_relu`), one pass each way on the CPU (and CUDA) for `slope >= 0`;
/// candle's ops otherwise.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    if !(kiln_any(&[x]) && slope >= 0.0 && slope.is_finite()) {
        let zeros = x.zeros_like()?;
        return x.maximum(&zeros)? + (x.minimum(&zeros)? * slope)?;
    }
    x.contiguous()?.apply_op1(act::Relu { slope })
}

/// `max(x + bias, 0)` for `x [B, C, H, W]`, `bias [C]` (a conv layer's bias and
/// ReLU in one pass, with one-pass gradients to both) on the CPU and CUDA;
/// candle's ops elsewhere.
pub fn add_channel_bias_relu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !kiln_any(&[x, bias]) || x.rank() != 4 {
        return act::channel_bias_relu_composite(x, bias);
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, act::ChannelBiasRelu)
}

/// Per-channel mean and biased variance of `x [B, C, S..]` over batch and space,
/// as two `[C]` tensors without gradient (what batch norm normalises with).
pub fn batch_norm_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    if !kiln_any(&[x]) {
        let (mean, var) = channel_stats_composite(x)?;
        return Ok((mean.detach(), var.detach()));
    }
    let st = x.contiguous()?.apply_op1_no_bwd(&norm::BnStats)?;
    Ok((st.get(0)?, st.get(1)?))
}

/// Batch norm of `x [B, C, S..]`: `(x - mean) / sqrt(var + eps) * weight + bias`
/// with `[C]` statistics and affine parameters. With `train`, `mean`/`var` must be
/// `x`'s own [`batch_norm_stats`] and the gradient to `x` includes their
/// dependence on it (PyTorch's training-mode backward); otherwise they are
/// constants (running statistics). On the CPU (and CUDA, f32/f64) one pass
/// forward and two backward; candle's broadcast ops elsewhere.
pub fn batch_norm(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    train: bool,
) -> Result<Tensor> {
    if !kiln_any(&[x, mean, var, weight, bias]) || x.rank() < 2 {
        return norm_composite(x, mean, var, weight, bias, eps, train);
    }
    batch_norm_op(x, [mean, var, weight, bias], eps, train, None)
}

/// kiln's batch-norm op on `x` and the rows (mean, var, weight, bias).
fn batch_norm_op(
    x: &Tensor,
    [mean, var, weight, bias]: [&Tensor; 4],
    eps: f64,
    train: bool,
    slope: Option<f64>,
) -> Result<Tensor> {
    let p = Tensor::stack(
        &[mean.detach(), var.detach(), weight.clone(), bias.clone()],
        0,
    )?;
    x.contiguous()?
        .apply_op2(&p.contiguous()?, norm::BatchNorm { eps, train, slope })
}

/// [`batch_norm`] followed by [`leaky_relu`] with `slope` (a ReLU at 0), as
/// one op on the CPU (f32/f64, `slope >= 0`): one pass forward and two
/// backward, the same bits as the two ops apart, without the activation's own
/// passes and candle's summing of its gradient (a zeroed buffer and an add,
/// on one thread): 7-10% faster on a DCGAN layer's `[64, 64, 16, 16]`.
/// Elsewhere (CUDA, other dtypes, a negative slope) the two ops run one after
/// the other.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_act(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    train: bool,
    slope: f64,
) -> Result<Tensor> {
    if !(kiln_cpu(&[x, mean, var, weight, bias])
        && x.rank() >= 2
        && slope >= 0.0
        && slope.is_finite())
    {
        return leaky_relu(&batch_norm(x, mean, var, weight, bias, eps, train)?, slope);
    }
    batch_norm_op(x, [mean, var, weight, bias], eps, train, Some(slope))
}

/// Per-channel mean and biased variance (`[C]` each) from candle's ops, with
/// gradient.
fn channel_stats_composite(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = x.dim(1)?;
    let xt = x.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
    let mean = xt.mean_keepdim(1)?;
    let var = xt.broadcast_sub(&mean)?.sqr()?.mean(1)?;
    Ok((mean.squeeze(1)?, var))
}

/// Batch norm from candle's ops (other devices and dtypes).
fn norm_composite(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    train: bool,
) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = x.dim(1)?;
    // Training recomputes the statistics with gradient, as autograd needs.
    let (mean, var) = match train {
        true => channel_stats_composite(x)?,
        false => (mean.clone(), var.clone()),
    };
    let (mean, var) = (mean.reshape(shape.clone())?, var.reshape(shape.clone())?);
    x.broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape(shape.clone())?)?
        .broadcast_add(&bias.reshape(shape)?)
}

#[cfg(test)]
mod causal_bias_tests {
    use super::causal_bias;
    use candle_core::{DType, Device};

    #[test]
    fn the_bias_masks_later_keys_and_is_kept_per_shape() {
        let dev = Device::Cpu;
        // T 2 of S 4: query 0 sees keys 0..=2, query 1 all four
        let b = causal_bias(2, 4, &dev, DType::F64).unwrap();
        let m = f64::from(f32::MIN);
        assert_eq!(
            b.to_vec2::<f64>().unwrap(),
            [[0.0, 0.0, 0.0, m], [0.0, 0.0, 0.0, 0.0]]
        );
        // the same shape again is the same tensor, not a new copy
        assert_eq!(causal_bias(2, 4, &dev, DType::F64).unwrap().id(), b.id());
        assert_ne!(causal_bias(2, 4, &dev, DType::F32).unwrap().id(), b.id());
        // more shapes than are kept: the oldest is made again, correctly
        for s in 5..15 {
            causal_bias(2, s, &dev, DType::F64).unwrap();
        }
        let again = causal_bias(2, 4, &dev, DType::F64).unwrap();
        assert_ne!(again.id(), b.id());
        assert_eq!(again.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap());
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::with_scratch;

    #[test]
    fn scratch_is_poisoned_in_tests_and_a_nested_call_gets_its_own() {
        let outer = with_scratch::<f32, _>(100, |a| {
            // debug builds hand out NaN, so a kernel that reads what it did
            // not write fails its comparison
            assert_eq!(a.len(), 100);
            if cfg!(debug_assertions) {
                assert!(a.iter().all(|v| v.is_nan()));
            }
            a.fill(1.0);
            let inner = with_scratch::<f64, _>(7, |b| {
                assert_eq!(b.len(), 7);
                b.fill(2.0);
                b.iter().sum::<f64>()
            });
            // the nested call did not touch the outer slice
            assert!(a.iter().all(|&v| v == 1.0));
            inner + a.iter().map(|&v| v as f64).sum::<f64>()
        });
        assert_eq!(outer, 114.0);
        // kept between calls: a smaller request reuses the buffer
        with_scratch::<f64, _>(3, |c| assert_eq!(c.len(), 3));
        // beyond what is kept, a fresh buffer still works
        let big = (super::SCRATCH_KEEP / 4) + 1;
        with_scratch::<f32, _>(big, |d| {
            d[big - 1] = 3.0;
            assert_eq!(d.len(), big);
        });
    }
}

#[cfg(test)]
mod slice_product_tests {
    use super::matmul_f32_slices;

    /// `x @ w` (or `x @ w^T`) summed in f64, the independent reference.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, tr: bool) -> Vec<f64> {
        let at = |p: usize, j: usize| f64::from(if tr { w[j * k + p] } else { w[p * n + j] });
        (0..m * n)
            .map(|i| {
                (0..k)
                    .map(|p| f64::from(x[(i / n) * k + p]) * at(p, i % n))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn slices_match_the_f64_product_in_both_layouts_on_any_thread_count() {
        let mut rng = crate::rng::SeededRng::new(11);
        for (m, k, n) in [(1, 1, 1), (17, 300, 37), (33, 769, 96), (64, 256, 61)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal_f32()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.normal_f32()).collect();
            for tr in [false, true] {
                let Some(one) = matmul_f32_slices(&x, m, k, &w, n, tr, 1) else {
                    assert!(!super::sgemm::kernel_runs());
                    return;
                };
                let want = reference(&x, m, k, &w, n, tr);
                for (i, (&got, &want)) in one.iter().zip(&want).enumerate() {
                    // f32 sums of k products of unit normals: error ~ k * eps * sqrt(k)
                    let tol = 4.0 * (k as f64).sqrt() * k as f64 * f64::from(f32::EPSILON);
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "{m}x{k}x{n} tr={tr} [{i}]: {got} vs {want}"
                    );
                }
                let three = matmul_f32_slices(&x, m, k, &w, n, tr, 3).unwrap();
                assert!(
                    one.iter()
                        .zip(&three)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{m}x{k}x{n} tr={tr}"
                );
            }
        }
        // nothing to sum: zeros of the right shape
        assert_eq!(
            matmul_f32_slices(&[], 2, 0, &[], 3, false, 2),
            Some(vec![0.0; 6])
        );
    }

    #[test]
    fn a_short_slice_is_a_panic_naming_the_shape() {
        if !super::sgemm::kernel_runs() {
            return;
        }
        let err =
            std::panic::catch_unwind(|| matmul_f32_slices(&[0.0; 5], 2, 3, &[0.0; 6], 2, false, 1))
                .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("[2, 3]") && msg.contains("slices of 5 and 6"),
            "{msg}"
        );
    }
}
