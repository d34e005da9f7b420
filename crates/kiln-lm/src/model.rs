//! The GPT-2 network with Hugging Face's tensor names and layouts.
//!
//! Names follow `GPT2LMHeadModel`: `transformer.wte.weight`, `transformer.wpe.weight`,
//! `transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`,
//! `transformer.ln_f.*`, and `lm_head.weight` only when the head is not tied. The
//! projections are OpenAI's `Conv1D`: weight `[in, out]`, `y = x W + b`.

use candle_core::{DType, Device, ModuleT, Tensor, D};
use candle_nn::{Init, VarBuilder};
use kiln_core::nn::{layer_norm, softmax, Dropout};
use kiln_core::vars::SharedRng;

use crate::config::Gpt2Config;
use crate::error::{LmError, Result};

pub use crate::config::Activation;

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluTanh => kiln_core::ops::gelu_tanh(x),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// `x [.., K]` times a weight (`[K, N]`, or `[N, K]` when `transposed`), giving
/// `[.., N]`: the gemv kernel for 1 to 3 rows (with the bf16 copy when there
/// is one), the f32 few-row kernels up to 64 (a prompt, a batch of rollouts),
/// candle's gemm beyond.
fn project(
    x: &Tensor,
    w: &Tensor,
    bf16: Option<&Tensor>,
    transposed: bool,
) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?;
    let y = match bf16 {
        Some(wb) if rows < crate::fewrows::MIN_ROWS && x.device().is_cpu() => {
            crate::gemv::matmul_bf16(&x2, wb, transposed)?
        }
        _ => crate::gemv::matmul(&x2, w, transposed)?,
    };
    if let Some(l) = dims.last_mut() {
        *l = y.dim(1)?;
    }
    y.reshape(dims)
}

/// OpenAI's `Conv1D`: a linear layer storing its weight as `[in, out]`.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    /// A bf16 copy of the weight for few-row (decoding) products, when enabled.
    bf16: Option<Tensor>,
}

impl Conv1D {
    fn new(n_in: usize, n_out: usize, std: f64, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(
            (n_in, n_out),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let bias = vb.get_with_hints(n_out, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            bf16: None,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        if rows > crate::fewrows::MAX_ROWS {
            // Training and long prompts: product and bias in one op.
            return kiln_core::ops::linear(
                x,
                &self.weight,
                Some(&self.bias),
                kiln_core::ops::WeightLayout::InOut,
            );
        }
        let y = project(x, &self.weight, self.bf16.as_ref(), false)?;
        kiln_core::ops::add_bias_last(&y, &self.bias)
    }
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(dim: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: Norm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: Norm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    n_head: usize,
    scale: f64,
}

/// Per-layer keys and values of the tokens seen so far, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    kv: Vec<Option<LayerKv>>,
    len: usize,
    left_pad: Vec<usize>,
}

impl KvCache {
    /// An empty cache for a model with `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Self {
            kv: vec![None; n_layer],
            len: 0,
            left_pad: Vec::new(),
        }
    }

    /// An empty cache for a left-padded batch: row `b` starts with `left_pad[b]`
    /// padding tokens, which no position attends to and which do not count
    /// towards positions (Hugging Face's convention).
    pub fn with_left_padding(n_layer: usize, left_pad: Vec<usize>) -> Self {
        Self {
            left_pad,
            ..Self::new(n_layer)
        }
    }

    /// Tokens cached (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The left padding per row.
    pub fn left_padding(&self) -> &[usize] {
        &self.left_pad
    }

    /// Keeps only rows `rows` (e.g. after some sequences of a batch finished).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let dev = self
            .kv
            .iter()
            .flatten()
            .next()
            .map(|l| l.k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
            for l in self.kv.iter_mut().flatten() {
                l.k = l.k.index_select(&idx, 0)?;
                l.v = l.v.index_select(&idx, 0)?;
            }
        }
        if !self.left_pad.is_empty() {
            self.left_pad = rows.iter().map(|&r| self.left_pad[r]).collect();
        }
        Ok(())
    }
}

/// One block's cached keys and values: `[B, H, capacity, D]` buffers whose
/// first `len` positions hold the sequence so far. A decode step writes its
/// keys in place, where concatenating would copy the whole cache every token
/// (60% of the work outside the matrix products in GPT-2 small's decode).
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Appends `k`, `v` (`[B, H, T, D]`) and returns the keys and values so far.
    /// The cache is for inference (`forward_cached` is eval mode, as
    /// transformers' `generate` runs under `no_grad`): it holds detached copies,
    /// so no gradient flows into keys and values through it.
    fn append(
        slot: &mut Option<Self>,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let l = match slot {
            Some(l) => l,
            None => {
                // Room for 64 more positions before the first reallocation.
                let (b, h, _, d) = k.dims4()?;
                slot.insert(Self {
                    k: Tensor::zeros((b, h, t + 64, d), k.dtype(), k.device())?,
                    v: Tensor::zeros((b, h, t + 64, d), v.dtype(), v.device())?,
                    len: 0,
                })
            }
        };
        let cap = l.k.dim(2)?;
        if l.len + t > cap {
            // Double the capacity (amortised O(1) copying per token).
            let grow = (l.len + t).max(2 * cap);
            let (b, h, _, d) = l.k.dims4()?;
            let nk = Tensor::zeros((b, h, grow, d), l.k.dtype(), l.k.device())?;
            let nv = Tensor::zeros((b, h, grow, d), l.v.dtype(), l.v.device())?;
            nk.slice_set(&l.k.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&l.v.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
            (l.k, l.v) = (nk, nv);
        }
        l.k.slice_set(&k.detach().contiguous()?, 2, l.len)?;
        l.v.slice_set(&v.detach().contiguous()?, 2, l.len)?;
        l.len += t;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }
}

/// The additive attention bias and position ids of one forward call.
struct Step {
    /// `[B or 1, 1, T, S]`, `None` when every key is visible (one query, no padding).
    bias: Option<Tensor>,
    /// `[B, T]` position ids, or `None` for `past..past+T` in every row.
    positions: Option<Tensor>,
    past: usize,
    /// `bias` is exactly the causal mask (no padding): the fused causal
    /// softmax can stand in for it.
    causal: bool,
    /// One query per row that sees keys `starts[b]..` (empty: all keys): the
    /// one-query attention kernel can stand in for the tensor path.
    one_query: Option<Vec<usize>>,
}

impl Block {
    fn new(cfg: &Gpt2Config, layer: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let c = cfg.n_embd;
        let std = cfg.initializer_range;
        // GPT-2's scaled init of the projections that write into the residual stream.
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let eps = cfg.layer_norm_epsilon;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (cfg.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            ln_1: Norm::new(c, eps, vb.pp("ln_1"))?,
            c_attn: Conv1D::new(c, 3 * c, std, vb.pp("attn").pp("c_attn"))?,
            attn_proj: Conv1D::new(c, c, proj_std, vb.pp("attn").pp("c_proj"))?,
            ln_2: Norm::new(c, eps, vb.pp("ln_2"))?,
            c_fc: Conv1D::new(c, cfg.inner(), std, vb.pp("mlp").pp("c_fc"))?,
            mlp_proj: Conv1D::new(cfg.inner(), c, proj_std, vb.pp("mlp").pp("c_proj"))?,
            n_head: cfg.n_head,
            scale,
        })
    }

    /// Decoding's attention: one new token per row against the cache, in one
    /// kernel call (see [`crate::attend`]).
    fn attend_one(
        &self,
        qkv: &Tensor,
        starts: &[usize],
        slot: &mut Option<LayerKv>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, c3) = qkv.dims3()?;
        let c = c3 / 3;
        let (h, d) = (self.n_head, c / self.n_head);
        let part = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, h, 1, d));
        let (k, v) = LayerKv::append(slot, part(1)?, part(2)?)?;
        let y =
            crate::attend::one_query(&qkv.reshape((b, c3))?, &k, &v, starts, self.scale as f32)?;
        self.attn_proj.forward(&y.reshape((b, 1, c))?)
    }

    fn attention(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&mut Option<LayerKv>>,
        drop: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let h = self.n_head;
        let d = c / h;
        let qkv = self.c_attn.forward(x)?;
        let one = match (&step.one_query, drop) {
            (Some(starts), None)
                if t == 1 && qkv.device().is_cpu() && qkv.dtype() == DType::F32 =>
            {
                Some(starts)
            }
            _ => None,
        };
        let cache = match (one, cache) {
            (Some(starts), Some(slot)) => return self.attend_one(&qkv, starts, slot),
            (_, cache) => cache,
        };
        if step.causal && step.past == 0 && cache.is_none() {
            // A whole sequence without a cache (training, scoring): one op
            // instead of ~20 graph nodes; the dropout seed is drawn as the
            // tensor path below draws it.
            let drop = drop.and_then(|d| d.draw(true));
            let y = kiln_core::ops::causal_attention(&qkv, h, self.scale, drop)?;
            return self.attn_proj.forward(&y);
        }
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, h, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some(slot) = cache {
            (k, v) = LayerKv::append(slot, k, v)?;
        }
        let mut p = if step.causal && q.device().is_cpu() {
            // Scale, causal mask and softmax in one pass each way.
            kiln_core::ops::softmax_causal(&q.matmul(&k.t()?)?, self.scale)?
        } else {
            // Scale whichever of q and the scores is smaller (same product).
            let mut scores = if d < k.dim(2)? {
                (q * self.scale)?.matmul(&k.t()?)?
            } else {
                (q.matmul(&k.t()?)? * self.scale)?
            };
            if let Some(bias) = &step.bias {
                scores = scores.broadcast_add(bias)?;
            }
            softmax(&scores, D::Minus1)?
        };
        if let Some(dr) = drop {
            p = dr.forward_t(&p, true)?;
        }
        let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.attn_proj.forward(&y)
    }

    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&mut Option<LayerKv>>,
        act: Activation,
        drops: Option<(&Dropout, &Dropout)>,
    ) -> candle_core::Result<Tensor> {
        let a = self.attention(&self.ln_1.forward(x)?, step, cache, drops.map(|d| d.0))?;
        let a = match drops {
            Some((_, r)) => r.forward_t(&a, true)?,
            None => a,
        };
        let x = (x + a)?;
        let m = self
            .mlp_proj
            .forward(&act.apply(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?)?;
        let m = match drops {
            Some((_, r)) => r.forward_t(&m, true)?,
            None => m,
        };
        x + m
    }
}

/// GPT-2 with its language-model head.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Option<Tensor>,
    head_bf16: Option<Tensor>,
    act: Activation,
    embd_drop: Dropout,
    attn_drop: Dropout,
    resid_drop: Dropout,
    device: Device,
}

impl Gpt2 {
    /// Builds the model from `vb` with Hugging Face names rooted at `vb` (so
    /// `transformer.wte.weight` is read as `vb.pp("transformer")...`). With a
    /// fresh [`kiln_core::vars::VarStore`] builder, weights get GPT-2's
    /// initialisation (normal with std `initializer_range`, residual
    /// projections scaled by `1/sqrt(2 n_layer)`); dropout draws from `rng`.
    pub fn new(cfg: &Gpt2Config, vb: VarBuilder<'_>, rng: SharedRng) -> Result<Self> {
        cfg.validate()?;
        let tv = vb.pp("transformer");
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let wte = tv.get_with_hints((cfg.vocab_size, cfg.n_embd), "wte.weight", init)?;
        let wpe = tv.get_with_hints((cfg.n_positions, cfg.n_embd), "wpe.weight", init)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, i, tv.pp("h").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::new(cfg.n_embd, cfg.layer_norm_epsilon, tv.pp("ln_f"))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "lm_head.weight", init)?)
        };
        let act = Activation::parse(&cfg.activation_function)
            .ok_or_else(|| LmError::config("GPT-2 config", "activation_function", "unsupported"))?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            head_bf16: None,
            act,
            embd_drop: Dropout::new(cfg.embd_pdrop, rng.clone())?,
            attn_drop: Dropout::new(cfg.attn_pdrop, rng.clone())?,
            resid_drop: Dropout::new(cfg.resid_pdrop, rng)?,
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The token embedding `[V, C]` (also the LM head when tied).
    pub fn wte(&self) -> &Tensor {
        &self.wte
    }

    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Logits `[B, T, V]` of every position of `ids [B, T]` (causal attention, no
    /// cache). `train` turns dropout on.
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.hidden_states(ids, train)?;
        Ok(self.logits(&h)?)
    }

    /// Final hidden states `[B, T, C]` (after `ln_f`) of every position: what
    /// reward and value heads read.
    pub fn hidden_states(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_len(t)?;
        let step = Step {
            bias: (t > 1)
                .then(|| causal_bias(t, 0, &self.device))
                .transpose()?,
            positions: None,
            past: 0,
            causal: t > 1,
            one_query: (t == 1).then(Vec::new),
        };
        self.run(ids, &step, None, train)
    }

    /// Logits of `hidden [.., C]`: `[.., V]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        project(hidden, self.head(), self.head_bf16.as_ref(), true)
    }

    /// Keeps bf16 copies of the projection and head weights for decoding (1 to
    /// 3 rows per product, CPU): about half the memory traffic per generated
    /// token, for logits that deviate from f32 by ~1e-2. Prompts, batches of 4
    /// or more sequences (where the f32 few-row kernels are faster), training
    /// and scoring still use the f32 weights. `false` drops the copies.
    pub fn set_bf16_decode(&mut self, on: bool) -> Result<()> {
        let copy = |w: &Tensor| -> Result<Option<Tensor>> {
            Ok(if on {
                Some(w.to_dtype(DType::BF16)?)
            } else {
                None
            })
        };
        for b in &mut self.blocks {
            for c in [
                &mut b.c_attn,
                &mut b.attn_proj,
                &mut b.c_fc,
                &mut b.mlp_proj,
            ] {
                c.bf16 = copy(&c.weight)?;
            }
        }
        self.head_bf16 = copy(self.lm_head.as_ref().unwrap_or(&self.wte))?;
        Ok(())
    }

    /// Whether decoding uses bf16 weight copies.
    pub fn bf16_decode(&self) -> bool {
        self.head_bf16.is_some()
    }

    fn check_len(&self, t: usize) -> Result<()> {
        if t > self.cfg.n_positions {
            return Err(LmError::Input(format!(
                "sequence of {t} tokens is longer than the model's n_positions {}",
                self.cfg.n_positions
            )));
        }
        Ok(())
    }

    /// Runs `ids [B, T]` after the tokens already in `cache`, appends their keys
    /// and values, and returns logits: `[B, T, V]` with `all_positions`, else
    /// `[B, V]` of the last position only (what decoding needs; skips most of the
    /// LM head's work during the prompt). Eval mode, for inference: the cache
    /// keeps detached keys and values, so gradients do not flow through them
    /// (train with [`Gpt2::forward_t`]).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        // On a pool thread, each kernel's parallel loop is a cheap local job;
        // called from outside the pool, every one of the ~200 kernel calls of
        // a decode step would hand its work over to the pool and sleep until
        // it came back.
        kiln_core::ops::on_pool(|| self.forward_cached_inner(ids, cache, all_positions))
    }

    fn forward_cached_inner(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.len;
        self.check_len(past + t)?;
        if cache.kv.len() != self.blocks.len() {
            return Err(LmError::Input(format!(
                "KV cache has {} layers, the model {}",
                cache.kv.len(),
                self.blocks.len()
            )));
        }
        let padded = cache.left_pad.iter().any(|&p| p > 0);
        if padded && cache.left_pad.len() != b {
            return Err(LmError::Input(format!(
                "KV cache has left padding for {} rows, the batch has {b}",
                cache.left_pad.len()
            )));
        }
        let step = if padded {
            padded_step(&cache.left_pad, past, t, &self.device)?
        } else {
            Step {
                bias: (t > 1)
                    .then(|| causal_bias(t, past, &self.device))
                    .transpose()?,
                positions: None,
                past,
                causal: t > 1,
                one_query: (t == 1).then(Vec::new),
            }
        };
        let h = self.run(ids, &step, Some(cache), false)?;
        cache.len += t;
        let h = if all_positions {
            h
        } else {
            h.narrow(1, t - 1, 1)?.squeeze(1)?
        };
        Ok(self.logits(&h)?)
    }

    fn run(
        &self,
        ids: &Tensor,
        step: &Step,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?;
        let tok =
            self.wte
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.n_embd))?;
        let pos = match &step.positions {
            Some(p) => {
                self.wpe
                    .index_select(&p.flatten_all()?, 0)?
                    .reshape((b, t, self.cfg.n_embd))?
            }
            None => self.wpe.narrow(0, step.past, t)?.unsqueeze(0)?,
        };
        let mut x = tok.broadcast_add(&pos)?;
        if train {
            x = self.embd_drop.forward_t(&x, true)?;
        }
        let drops = train.then_some((&self.attn_drop, &self.resid_drop));
        for (i, blk) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.kv[i]);
            x = blk.forward(&x, step, slot, self.act, drops)?;
        }
        Ok(self.ln_f.forward(&x)?)
    }
}

/// Large negative instead of -inf, so fully masked rows (padding queries) give a
/// uniform softmax rather than NaN, as in transformers.
const MASKED: f32 = f32::MIN;

fn causal_bias(t: usize, past: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let s = past + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for j in (past + i + 1)..s {
            m[i * s + j] = MASKED;
        }
    }
    Tensor::from_vec(m, (1, 1, t, s), dev)
}

fn padded_step(left_pad: &[usize], past: usize, t: usize, dev: &Device) -> Result<Step> {
    let b = left_pad.len();
    let s = past + t;
    let mut m = vec![0f32; b * t * s];
    let mut pos = vec![0u32; b * t];
    for (r, &pad) in left_pad.iter().enumerate() {
        for i in 0..t {
            let q = past + i;
            for j in 0..s {
                if j > q || j < pad {
                    m[(r * t + i) * s + j] = MASKED;
                }
            }
            // transformers: cumsum(mask) - 1, and 1 on padding.
            pos[r * t + i] = if q >= pad { (q - pad) as u32 } else { 1 };
        }
    }
    Ok(Step {
        bias: Some(Tensor::from_vec(m, (b, 1, t, s), dev)?),
        positions: Some(Tensor::from_vec(pos, (b, t), dev)?),
        past,
        causal: false,
        // A query on padding (before its row's first token) sees no key; the
        // tensor path's uniform weights cover that case.
        one_query: (t == 1 && left_pad.iter().all(|&p| p <= past)).then(|| left_pad.to_vec()),
    })
}

impl Gpt2 {
    /// Every weight under its Hugging Face name.
    pub(crate) fn weights_for_save(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("transformer.wte.weight".to_string(), self.wte.clone()),
            ("transformer.wpe.weight".to_string(), self.wpe.clone()),
            (
                "transformer.ln_f.weight".to_string(),
                self.ln_f.weight.clone(),
            ),
            ("transformer.ln_f.bias".to_string(), self.ln_f.bias.clone()),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            for (n, t) in [
                ("ln_1.weight", &b.ln_1.weight),
                ("ln_1.bias", &b.ln_1.bias),
                ("attn.c_attn.weight", &b.c_attn.weight),
                ("attn.c_attn.bias", &b.c_attn.bias),
                ("attn.c_proj.weight", &b.attn_proj.weight),
                ("attn.c_proj.bias", &b.attn_proj.bias),
                ("ln_2.weight", &b.ln_2.weight),
                ("ln_2.bias", &b.ln_2.bias),
                ("mlp.c_fc.weight", &b.c_fc.weight),
                ("mlp.c_fc.bias", &b.c_fc.bias),
                ("mlp.c_proj.weight", &b.mlp_proj.weight),
                ("mlp.c_proj.bias", &b.mlp_proj.bias),
            ] {
                v.push((format!("{p}.{n}"), t.clone()));
            }
        }
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h.clone()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place cache holds exactly what concatenation would, through its
    /// reallocations (a 3-token prompt, then 150 single tokens: capacity 67,
    /// 134, 268).
    #[test]
    fn kv_cache_appends_equal_concatenation_across_growth() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = kiln_core::rng::SeededRng::new(3);
        let mut slot = None;
        let (mut want_k, mut want_v): (Option<Tensor>, Option<Tensor>) = (None, None);
        for step in 0..151 {
            let t = if step == 0 { 3 } else { 1 };
            let k = rng
                .normal((2, 3, t, 4), 0.0, 1.0, &dev)
                .map_err(candle_core::Error::wrap)?;
            let v = rng
                .normal((2, 3, t, 4), 0.0, 1.0, &dev)
                .map_err(candle_core::Error::wrap)?;
            want_k = Some(match want_k {
                Some(w) => Tensor::cat(&[&w, &k], 2)?,
                None => k.clone(),
            });
            want_v = Some(match want_v {
                Some(w) => Tensor::cat(&[&w, &v], 2)?,
                None => v.clone(),
            });
            let (gk, gv) = LayerKv::append(&mut slot, k, v)?;
            for (g, w) in [(&gk, &want_k), (&gv, &want_v)] {
                let w = w
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("no want".into()))?;
                assert_eq!(g.dims(), w.dims());
                let d = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "step {step}");
            }
        }
        let l = slot
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("empty".into()))?;
        assert_eq!((l.len, l.k.dim(2)?), (153, 268));
        // The cache is for inference: what it returns carries no graph.
        let var = candle_core::Var::ones((2, 3, 1, 4), DType::F32, &dev)?;
        let (k, _) = LayerKv::append(&mut slot, var.as_tensor().clone(), var.as_tensor().clone())?;
        assert!(!k.track_op());
        assert_eq!(k.dim(2)?, 154);
        Ok(())
    }
}
