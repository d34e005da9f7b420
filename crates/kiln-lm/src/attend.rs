//! One-query attention for decoding: each sequence's new token attends to the
//! keys and values in its KV cache in one pass per head. The tensor path spends
//! about a dozen small ops per layer on this (head splits, a batched matmul
//! each way, a softmax, a head merge); at one token per step their fixed costs,
//! not the arithmetic, were a tenth of a GPT-2 small decode step.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Multiply-adds below which one thread does the whole product.
const SERIAL_MACS: usize = 1 << 16;

/// `y [B, C]`: for each row `b` and head `h`, the query `qkv[b, h*D..(h+1)*D]`
/// (the first third of the fused q/k/v projection) attends to keys
/// `k[b, h, j]` and values `v[b, h, j]` for `j` in `starts[b]..S`
/// (`starts` empty: from 0), with scores `(scale * q) . k` and a
/// max-subtracted softmax. `k`, `v` are `[B, H, S, D]` views with unit stride
/// in `D` (the cache's narrowed buffers). CPU f32 only; inference only (its
/// backward is an error, as `forward_cached` keeps no graph through the cache).
pub(crate) fn one_query(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &[usize],
    scale: f32,
) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op3(
        k,
        v,
        OneQuery {
            starts: starts.to_vec(),
            scale,
        },
    )
}

struct OneQuery {
    starts: Vec<usize>,
    scale: f32,
}

/// Where `[B, H, S, D]` element `(b, h, j, 0)` sits, from a layout with unit
/// stride in `D`.
struct View {
    off: usize,
    sb: usize,
    sh: usize,
    sj: usize,
}

impl View {
    fn new(l: &Layout, dims: &[usize], name: &str) -> candle_core::Result<Self> {
        let st = l.stride();
        if l.dims() != dims || st.len() != 4 || (dims[3] > 1 && st[3] != 1) {
            candle_core::bail!(
                "kiln one-query attention: {name} must be [B, H, S, D] = {dims:?} with unit stride in D, got {:?} strides {st:?}",
                l.dims()
            );
        }
        Ok(Self {
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            sj: st[2],
        })
    }

    #[inline]
    fn at(&self, b: usize, h: usize, j: usize) -> usize {
        self.off + b * self.sb + h * self.sh + j * self.sj
    }
}

impl CustomOp3 for OneQuery {
    fn name(&self) -> &'static str {
        "kiln-one-query-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(qkv), CpuStorage::F32(ks), CpuStorage::F32(vs)) = (s1, s2, s3) else {
            candle_core::bail!("kiln one-query attention: f32 tensors only");
        };
        let Some((qa, qb)) = l1.contiguous_offsets() else {
            candle_core::bail!("kiln one-query attention: qkv must be contiguous");
        };
        let qkv = &qkv[qa..qb];
        let (b, c3) = l1.shape().dims2()?;
        let kd = l2.dims().to_vec();
        let [kb, h, s, d] = kd[..] else {
            candle_core::bail!("kiln one-query attention: keys must be [B, H, S, D], got {kd:?}");
        };
        if kb != b || h * d * 3 != c3 {
            candle_core::bail!(
                "kiln one-query attention: qkv [{b}, {c3}] does not match keys {kd:?} (expected [B, 3*H*D])"
            );
        }
        if !self.starts.is_empty()
            && (self.starts.len() != b || self.starts.iter().any(|&p| p >= s))
        {
            candle_core::bail!(
                "kiln one-query attention: starts {:?} must give each of {b} rows a visible key in 0..{s}",
                self.starts
            );
        }
        let (kv, vv) = (View::new(l2, &kd, "keys")?, View::new(l3, &kd, "values")?);
        let c = h * d;
        let task = |bh: usize, out: &mut [f32], scores: &mut Vec<f32>| {
            let (bi, hi) = (bh / h, bh % h);
            let j0 = self.starts.get(bi).copied().unwrap_or(0);
            // Scale the query first, as the tensor path does.
            let q: Vec<f32> = qkv[bi * c3 + hi * d..bi * c3 + (hi + 1) * d]
                .iter()
                .map(|&x| x * self.scale)
                .collect();
            scores.clear();
            scores.extend((j0..s).map(|j| {
                let at = kv.at(bi, hi, j);
                crate::gemv::dot(&q, &ks[at..at + d])
            }));
            let m = scores.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let mut z = 0f32;
            for x in scores.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            let inv = 1.0 / z;
            // `out` is a fresh zeroed row of `y`.
            for (j, &p) in (j0..s).zip(scores.iter()) {
                let at = vv.at(bi, hi, j);
                crate::gemv::axpy(p * inv, &vs[at..at + d], out);
            }
        };
        let mut y = vec![0f32; b * c];
        if b * h * s * d < SERIAL_MACS || d == 0 {
            let mut scores = Vec::with_capacity(s);
            for (bh, out) in y.chunks_mut(d.max(1)).enumerate() {
                task(bh, out, &mut scores);
            }
        } else {
            kiln_core::ops::team::chunks_mut(&mut y, d, |bh, out| {
                task(bh, out, &mut Vec::with_capacity(s))
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((b, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};
    use kiln_core::tolerance::layers_abs_tol;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = kiln_core::rng::SeededRng::new(seed);
        r.normal(shape, 0.0, 1.0, &Device::Cpu).unwrap()
    }

    /// The tensor path: scores, additive mask, softmax, weighted values.
    fn reference(qkv: &Tensor, k: &Tensor, v: &Tensor, starts: &[usize], scale: f64) -> Tensor {
        let (b, h, s, d) = k.dims4().unwrap();
        let q = qkv
            .narrow(1, 0, h * d)
            .unwrap()
            .reshape((b, h, 1, d))
            .unwrap();
        let scores = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
        let mut mask = vec![0f32; b * s];
        for (r, &p) in starts.iter().enumerate() {
            mask[r * s..r * s + p].fill(f32::MIN);
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &Device::Cpu).unwrap();
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        p.matmul(v).unwrap().reshape((b, h * d)).unwrap()
    }

    #[test]
    fn one_query_matches_the_tensor_path_on_cache_views_with_and_without_starts() {
        // (B, H, S, D, cap): the small cases run serially, the last in parallel;
        // the keys are narrowed views of a longer buffer, as the cache hands them.
        for &(b, h, s, d, cap) in &[(1, 2, 1, 4, 8), (3, 4, 9, 16, 16), (2, 12, 200, 64, 256)] {
            let qkv = rand(&[b, 3 * h * d], 1);
            let kbuf = rand(&[b, h, cap, d], 2);
            let vbuf = rand(&[b, h, cap, d], 3);
            let k = kbuf.narrow(2, 0, s).unwrap();
            let v = vbuf.narrow(2, 0, s).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            for starts in [vec![], (0..b).map(|r| (r * 3) % s).collect::<Vec<_>>()] {
                let got = one_query(&qkv, &k, &v, &starts, scale as f32).unwrap();
                let full = if starts.is_empty() {
                    vec![0; b]
                } else {
                    starts.clone()
                };
                let want = reference(
                    &qkv,
                    &k.contiguous().unwrap(),
                    &v.contiguous().unwrap(),
                    &full,
                    scale,
                );
                let diff = max_abs(&(got - want).unwrap());
                // Scores reduce over D, the softmax and the weighted sum over S;
                // the values bound every output.
                let tol = layers_abs_tol(&[d, s, s], max_abs(&vbuf) as f64);
                assert!(
                    (diff as f64) <= tol,
                    "B{b} H{h} S{s} D{d} starts {starts:?}: {diff} > {tol}"
                );
            }
        }
    }

    #[test]
    fn one_query_refuses_mismatched_shapes_and_starts_past_the_keys() {
        let qkv = rand(&[2, 3 * 8], 1);
        let k = rand(&[2, 2, 5, 4], 2);
        let e = one_query(&qkv, &k, &k, &[0, 5], 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("visible key"), "{e}");
        let bad = rand(&[2, 3 * 9], 1);
        let e = one_query(&bad, &k, &k, &[], 1.0).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        let e = one_query(&qkv.to_dtype(DType::F64).unwrap(), &k, &k, &[], 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32"), "{e}");
    }
}
