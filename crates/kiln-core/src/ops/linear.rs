//! A linear layer's product and bias in one op (f32, CPU): `x @ w + b`.
//!
//! As a product followed by a bias add, training paid for the bias twice
//! over: a pass that reads and writes the whole product to add the bias, and,
//! in the backward pass, candle's gradient store zeroing and summing a product-
//! sized buffer for the extra graph node. Here the output starts as the bias
//! rows and the product is accumulated onto them; the backward pass forms the
//! three gradients straight from the output's gradient.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Which way round a linear layer keeps its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`: `x @ w` (OpenAI's `Conv1D`, GPT-2's checkpoints).
    InOut,
    /// `[out, in]`: `x @ w^T` (PyTorch's `nn.Linear`).
    OutIn,
}

/// `x [M, K] @ w + b [N]` for f32 CPU tensors, `w` laid out as `layout` says;
/// operands are read through their strides.
pub(super) struct Linear(pub(super) WeightLayout);

impl Linear {
    /// `(k, n)` of the weight, and its strides as a `[K, N]` matrix.
    fn weight_dims(&self, l: &Layout) -> Result<((usize, usize), (usize, usize))> {
        let (r, c) = l.shape().dims2()?;
        let s = l.stride();
        Ok(match self.0 {
            WeightLayout::InOut => ((r, c), (s[0], s[1])),
            WeightLayout::OutIn => ((c, r), (s[1], s[0])),
        })
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) else {
            candle_core::bail!("kiln-linear: f32 inputs only");
        };
        let (m, k) = l1.shape().dims2()?;
        let ((k2, n), ws) = self.weight_dims(l2)?;
        if k != k2 {
            candle_core::bail!(
                "kiln-linear: inputs [{m}, {k}] and a {:?} weight ({:?}) do not multiply",
                l2.dims(),
                self.0
            );
        }
        if l3.dims() != [n] {
            candle_core::bail!("kiln-linear: bias {:?} for {n} outputs", l3.dims());
        }
        let bias: Vec<f32> = match l3.contiguous_offsets() {
            Some((a, z)) => b[a..z].to_vec(),
            None => (0..n)
                .map(|i| b[l3.start_offset() + i * l3.stride()[0]])
                .collect(),
        };
        let mut out = Vec::with_capacity(m * n);
        for _ in 0..m {
            out.extend_from_slice(&bias);
        }
        if m > 0 && n > 0 && k > 0 {
            // The product is added onto the bias rows.
            super::conv::mm(
                (m, n, k),
                &mut out,
                n,
                true,
                &x[l1.start_offset()..],
                (l1.stride()[0], l1.stride()[1]),
                &w[l2.start_offset()..],
                ws,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::matmul;
        // As the matmul's backward: no gradient for an input outside the graph.
        let dx = match (x.track_op(), self.0) {
            (false, _) => None,
            (true, WeightLayout::InOut) => Some(matmul(grad, &w.t()?)?),
            (true, WeightLayout::OutIn) => Some(matmul(grad, w)?),
        };
        // Each weight gradient is formed in its weight's own layout, so the
        // optimizer reads it without a strided copy.
        let dw = match (w.track_op(), self.0) {
            (false, _) => None,
            (true, WeightLayout::InOut) => Some(matmul(&x.t()?, grad)?),
            (true, WeightLayout::OutIn) => Some(matmul(&grad.t()?, x)?),
        };
        let db = if b.track_op() {
            Some(super::sum_rows(grad)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
