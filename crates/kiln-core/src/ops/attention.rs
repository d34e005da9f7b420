//! Causal self-attention of a training forward pass in one op (CPU, f32):
//! fused `q/k/v [B, T, 3C]` in, heads merged `[B, T, C]` out, the causal
//! softmax and attention dropout inside.
//!
//! The tensor path builds about twenty graph nodes per layer (three head
//! splits, each a narrow, reshape, transpose and copy; two batched matmuls;
//! the softmax; dropout; the head merge). In the backward pass every node
//! costs candle a zeroed gradient buffer and an add, and each narrow a
//! zero-padded concatenation of the full `[B, T, 3C]` width. On GPT-2 small
//! (batch 8 x 128) that was about 0.45 s of a 6.5 s train step for 15 GFLOP of
//! attention. Here each `(batch, head)` is one task with single-threaded gemm
//! calls on strided views of `q/k/v` (no head copies), and only the causal
//! half of the scores is computed. The softmax output is kept for the
//! backward pass, as the tensor path keeps it; the dropout mask is
//! regenerated from its seed. Every task's sums run in a fixed order, so the
//! bits do not depend on the thread count.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use super::conv::mm;
use super::fused::{softmax_grad_row, softmax_row, DropoutMask};

/// Query rows per gemm call: a block of rows needs the keys up to its last
/// row only, so the masked half of the scores is mostly skipped.
const ROWS: usize = 32;

/// `[B, T, 3C]` geometry split into heads.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    d: usize,
}

impl Geom {
    fn of(dims: &[usize], heads: usize) -> Result<Self> {
        let &[b, t, c3] = dims else {
            bail!("causal attention: expected q/k/v as [B, T, 3C], got {dims:?}");
        };
        if heads == 0 || c3 % 3 != 0 || (c3 / 3) % heads != 0 {
            bail!(
                "causal attention: the last dimension ({c3}) must be 3 x heads ({heads}) x head size"
            );
        }
        let c = c3 / 3;
        Ok(Self {
            b,
            t,
            c,
            heads,
            d: c / heads,
        })
    }

    /// Offset of task `task`'s part `part` (0 q, 1 k, 2 v) in `[B, T, 3C]`.
    fn at(&self, task: usize, part: usize) -> usize {
        let (bi, hi) = (task / self.heads, task % self.heads);
        bi * self.t * 3 * self.c + part * self.c + hi * self.d
    }

    /// Offset of task `task`'s columns in the merged `[B, T, C]`.
    fn merged(&self, task: usize) -> usize {
        let (bi, hi) = (task / self.heads, task % self.heads);
        bi * self.t * self.c + hi * self.d
    }

    fn tasks(&self) -> usize {
        self.b * self.heads
    }
}

/// Row blocks `[r0, r1)` of `t` query rows.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(ROWS).map(move |r0| (r0, (r0 + ROWS).min(t)))
}

/// `[T, T]` products `a_i . b_j` of rows `a_i` and `b_j` (`[T, D]` each,
/// row strides `a_rs`, `b_rs`) for the keys `j` up to each query block's
/// end: causal scores `q k^T`, or `dY v^T` in the backward pass. Entries past
/// the diagonal within a block are computed and left for the caller to mask.
fn causal_products(
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    (t, d): (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0f32; t * t];
    for (r0, r1) in blocks(t) {
        let dst = &mut out[r0 * t..];
        mm(
            (r1 - r0, r1, d),
            dst,
            t,
            false,
            &a[r0 * a_rs..],
            (a_rs, 1),
            b,
            (1, b_rs),
            Parallelism::None,
        );
    }
    out
}

/// `W R` for causal weights `W [T, T]` (0 past the diagonal) and rows `R`
/// (`[T, D]`, row stride `r_rs`): `P' v` forward, `dS k` backward. With
/// `transposed`, `W^T R`, whose row `j` sums over the queries `i >= j` that
/// see key `j`: `dV = P'^T dY`, `dK = dS^T q`.
fn weighted(
    w: &[f32],
    r: &[f32],
    r_rs: usize,
    (t, d): (usize, usize),
    transposed: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; t * d];
    for (i0, i1) in blocks(t) {
        // Rows i0..i1 of the product need the weights' columns (or, when
        // transposed, rows) below i1 (or from i0) only.
        let (k0, k1) = if transposed { (i0, t) } else { (0, i1) };
        let (wv, ws) = if transposed {
            (&w[i0 * t + i0..], (1, t))
        } else {
            (&w[i0 * t..], (t, 1))
        };
        let dst = &mut out[i0 * d..];
        let rows = &r[k0 * r_rs..];
        mm(
            (i1 - i0, d, k1 - k0),
            dst,
            d,
            false,
            wv,
            ws,
            rows,
            (r_rs, 1),
            Parallelism::None,
        );
    }
    out
}

/// `probs` (causal, `[T, T]`, task `task`) with the dropout factors applied
/// in place, elements past the diagonal left 0. The mask index is the
/// element's place in the `[B, H, T, T]` probabilities, as
/// [`super::dropout`] on the tensor path draws it.
fn apply_mask(p: &mut [f32], t: usize, task: usize, mask: &DropoutMask) {
    for i in 0..t {
        let start = (task * t + i) * t;
        mask.scale_run(start, &mut p[i * t..i * t + i + 1]);
    }
}

/// The op: `softmax(scale * q k^T, causal)` (dropout applied) times `v`, per
/// head, heads merged.
pub(crate) struct CausalAttention {
    pub(crate) heads: usize,
    pub(crate) scale: f32,
    pub(crate) mask: Option<DropoutMask>,
    /// The softmax output `[B, H, T, T]` of the forward pass, for `bwd`.
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CausalAttention {
    pub(crate) fn new(heads: usize, scale: f32, mask: Option<DropoutMask>) -> Self {
        Self {
            heads,
            scale,
            mask,
            probs: Mutex::new(None),
        }
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "kiln-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::f32_slice(s, l, "causal attention")?;
        let g = Geom::of(l.dims(), self.heads)?;
        let (t, c3, d) = (g.t, 3 * g.c, g.d);
        // Each task writes its probabilities straight into the saved
        // `[B, H, T, T]` buffer; its output columns are merged afterwards.
        let mut saved = vec![0f32; g.tasks() * t * t];
        let ys: Vec<Vec<f32>> = saved
            .par_chunks_mut((t * t).max(1))
            .enumerate()
            .map(|(task, probs)| {
                let (q, k, v) = (
                    &x[g.at(task, 0)..],
                    &x[g.at(task, 1)..],
                    &x[g.at(task, 2)..],
                );
                let mut scores = causal_products(q, c3, k, c3, (t, d));
                for i in 0..t {
                    let row = i * t..i * t + i + 1;
                    softmax_row(&mut probs[row.clone()], &scores[row], self.scale);
                }
                // With dropout, `scores` becomes the weights that multiply v
                // (`probs` is 0 past the diagonal, and so are they).
                let used: &[f32] = match self.mask {
                    Some(ref m) => {
                        scores.copy_from_slice(probs);
                        apply_mask(&mut scores, t, task, m);
                        &scores
                    }
                    None => probs,
                };
                weighted(used, v, c3, (t, d), false)
            })
            .collect();
        let mut out = vec![0f32; g.b * t * g.c];
        for (task, y) in ys.iter().enumerate() {
            let o = g.merged(task);
            for (i, row) in y.chunks_exact(d.max(1)).enumerate().take(t) {
                out[o + i * g.c..o + i * g.c + d].copy_from_slice(row);
            }
        }
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(saved));
        Ok((CpuStorage::F32(out), Shape::from((g.b, t, g.c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let probs = self.probs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(probs) = probs else {
            bail!("causal attention: backward pass before the forward pass ran on the CPU");
        };
        let op = CausalAttentionGrad {
            heads: self.heads,
            scale: self.scale,
            mask: self.mask,
            probs,
        };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// The gradient of [`CausalAttention`] with respect to `q/k/v`, from the
/// output gradient `[B, T, C]` and the saved probabilities.
struct CausalAttentionGrad {
    heads: usize,
    scale: f32,
    mask: Option<DropoutMask>,
    probs: Arc<Vec<f32>>,
}

impl CustomOp2 for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "kiln-causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::f32_slice(s1, l1, "causal attention grad")?;
        let gy = super::fused::f32_slice(s2, l2, "causal attention grad")?;
        let g = Geom::of(l1.dims(), self.heads)?;
        let (t, c, c3, d) = (g.t, g.c, 3 * g.c, g.d);
        if l2.dims() != [g.b, t, c] || self.probs.len() != g.tasks() * t * t {
            bail!(
                "causal attention grad: output gradient {:?} does not match q/k/v {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let per_task: Vec<[Vec<f32>; 3]> = (0..g.tasks())
            .into_par_iter()
            .map(|task| {
                let (q, k, v) = (
                    &x[g.at(task, 0)..],
                    &x[g.at(task, 1)..],
                    &x[g.at(task, 2)..],
                );
                let dy = &gy[g.merged(task)..];
                let probs = &self.probs[task * t * t..(task + 1) * t * t];
                // The dropout factors (drawn once, used twice) and the
                // probabilities after dropout.
                let (mut factors, mut dropped) = (Vec::new(), Vec::new());
                if let Some(ref m) = self.mask {
                    factors = vec![1f32; t * t];
                    apply_mask(&mut factors, t, task, m);
                    dropped = probs.iter().zip(&factors).map(|(p, f)| p * f).collect();
                }
                let used: &[f32] = if self.mask.is_some() { &dropped } else { probs };
                let dv = weighted(used, dy, c, (t, d), true);
                // dP' = dY v^T over the visible keys, then through the mask
                // and the softmax: dS = scale * P (dP - sum(dP P)).
                let mut dp = causal_products(dy, c, v, c3, (t, d));
                if self.mask.is_some() {
                    dp.iter_mut().zip(&factors).for_each(|(g, f)| *g *= f);
                }
                let mut ds = vec![0f32; t * t];
                for i in 0..t {
                    let row = i * t..i * t + i + 1;
                    softmax_grad_row(
                        &mut ds[row.clone()],
                        &probs[row.clone()],
                        &dp[row],
                        self.scale,
                    );
                }
                let dq = weighted(&ds, k, c3, (t, d), false);
                let dk = weighted(&ds, q, c3, (t, d), true);
                [dq, dk, dv]
            })
            .collect();
        let mut out = vec![0f32; g.b * t * c3];
        for (task, parts) in per_task.iter().enumerate() {
            for (part, vals) in parts.iter().enumerate() {
                let o = g.at(task, part);
                for (i, row) in vals.chunks_exact(d.max(1)).enumerate().take(t) {
                    out[o + i * c3..o + i * c3 + d].copy_from_slice(row);
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{causal_attention, causal_attention_composite};
    use crate::rng::SeededRng;
    use candle_core::{Device, Result, Tensor, Var};

    /// Output and q/k/v gradient of `f` on a seeded `[b, t, 3 * heads * d]`
    /// input, through a loss `sum(y * r)` with a seeded `r`.
    fn run(
        (b, t, heads, d): (usize, usize, usize, usize),
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut rng = SeededRng::new(3);
        let c = heads * d;
        let x = Var::from_tensor(&rng.uniform(&[b, t, 3 * c], -1.5, 1.5, &Device::Cpu)?)?;
        let r = rng.uniform(&[b, t, c], -1.0, 1.0, &Device::Cpu)?;
        let y = f(x.as_tensor())?;
        let g = (&y * &r)?.sum_all()?.backward()?;
        let gx = g
            .get(x.as_tensor())
            .expect("q/k/v gradient")
            .flatten_all()?;
        Ok((y.flatten_all()?.to_vec1()?, gx.to_vec1()?))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_the_tensor_path_with_and_without_dropout() -> Result<()> {
        // Odd sizes, one head and several, T across the 32-row blocks.
        for geom in [(2, 5, 2, 3), (1, 70, 3, 8), (2, 33, 1, 5), (3, 1, 2, 4)] {
            for drop in [None, Some((0.7, 11)), Some((0.25, 5))] {
                let (heads, scale) = (geom.2, 0.3);
                let (y, gx) = run(geom, |x| causal_attention(x, heads, scale, drop))?;
                let (y0, gx0) = run(geom, |x| causal_attention_composite(x, heads, scale, drop))?;
                let (dy, dg) = (max_diff(&y, &y0), max_diff(&gx, &gx0));
                assert!(
                    dy < 2e-6 && dg < 2e-5,
                    "{geom:?} {drop:?}: y {dy}, grad {dg}"
                );
                // Without dropout every query, key and value gets a gradient
                // (T = 1: the query and key gradients are 0, see below).
                if geom.1 > 1 && drop.is_none() {
                    let zeros = gx.iter().filter(|v| **v == 0.0).count();
                    assert!(
                        zeros < gx.len() / 10,
                        "{geom:?} {drop:?}: {zeros} zero grads"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn one_position_returns_its_value_exactly() -> Result<()> {
        // softmax over one key is 1: y = v (times the dropout factor), dV = dY,
        // and the scores carry no gradient.
        let (b, heads, d) = (2, 2, 3);
        let c = heads * d;
        let (y, gx) = run((b, 1, heads, d), |x| causal_attention(x, heads, 0.5, None))?;
        let x = SeededRng::new(3).uniform(&[b, 1, 3 * c], -1.5, 1.5, &Device::Cpu)?;
        let v = x.narrow(2, 2 * c, c)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, v);
        let mut rng = SeededRng::new(3);
        let _ = rng.uniform(&[b, 1, 3 * c], -1.5, 1.5, &Device::Cpu)?;
        let r = rng
            .uniform(&[b, 1, c], -1.0, 1.0, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for bi in 0..b {
            let g = &gx[bi * 3 * c..(bi + 1) * 3 * c];
            assert!(g[..2 * c].iter().all(|v| *v == 0.0));
            assert_eq!(&g[2 * c..], &r[bi * c..(bi + 1) * c]);
        }
        Ok(())
    }

    #[test]
    fn bits_do_not_depend_on_the_thread_count() -> Result<()> {
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                run((3, 40, 4, 6), |x| {
                    causal_attention(x, 4, 0.4, Some((0.9, 2)))
                })
            })
        };
        let (one, three) = (on(1)?, on(3)?);
        assert_eq!(one.0, three.0);
        assert_eq!(one.1, three.1);
        Ok(())
    }

    #[test]
    fn bad_shapes_and_keep_are_errors() -> Result<()> {
        let x = Tensor::zeros((2, 4, 18), candle_core::DType::F32, &Device::Cpu)?;
        let e = causal_attention(&x, 4, 1.0, None).unwrap_err().to_string();
        assert!(e.contains("4 heads") && e.contains("[2, 4, 18]"), "{e}");
        let e = causal_attention(&x.reshape((8, 18))?, 2, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[B, T, 3C]"), "{e}");
        let e = causal_attention(&x, 2, 1.0, Some((0.0, 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep must be in (0, 1]"), "{e}");
        Ok(())
    }
}
