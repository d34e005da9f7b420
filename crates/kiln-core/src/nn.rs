//! Layers that model crates use instead of candle-nn's, so faster kernels can
//! drop in underneath without edits to model code. Parameter names and weight
//! layouts follow PyTorch (`weight`, `bias`; Linear `[out, in]`, Conv2d
//! `[out, in/groups, k, k]`, ConvTranspose2d `[in, out/groups, k, k]`), and fresh
//! weights use PyTorch's default initialisation, drawn from kiln's seeded RNG.
//!
//! Every layer here carries gradients through every parameter; candle's own
//! LayerNorm and fused softmax silently do not.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::vars::SharedRng;

/// PyTorch's default `kaiming_uniform_(a=sqrt(5))` bound, which is also its bias bound:
/// `1/sqrt(fan_in)`.
fn torch_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}

fn uniform(bound: f64) -> Init {
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

pub use crate::ops::composite::{log_softmax, softmax};

thread_local! {
    static FROZEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Restores the previous [`frozen`] state, also when `f` panics.
struct FrozenGuard(bool);

impl Drop for FrozenGuard {
    fn drop(&mut self) {
        FROZEN.with(|c| c.set(self.0));
    }
}

/// Runs `f` with every parameter of the layers in this module detached
/// (through [`param`]): gradients still reach the layers' inputs, but no
/// weight gradient is formed. PyTorch users get this with
/// `requires_grad_(False)` on the discriminator during a GAN's generator
/// step; without it, that step pays for weight gradients nobody reads (a
/// transposed convolution's worth per layer). Per thread, nestable.
pub fn frozen<R>(f: impl FnOnce() -> R) -> R {
    let _restore = FrozenGuard(FROZEN.with(|c| c.replace(true)));
    f()
}

/// Runs `f` with this thread's [`frozen`] state set to `state`, restoring
/// the previous one after. [`crate::ops::on_pool`] carries its caller's state
/// into the job this way: the job may run on a pool thread that is itself
/// inside `frozen` (waiting in a parallel loop, it takes other jobs), whose
/// state would otherwise leak into an unrelated training step.
pub(crate) fn with_frozen<R>(state: bool, f: impl FnOnce() -> R) -> R {
    let _restore = FrozenGuard(FROZEN.with(|c| c.replace(state)));
    f()
}

/// Whether this thread is inside [`frozen`].
pub fn is_frozen() -> bool {
    FROZEN.with(|c| c.get())
}

/// A parameter as a layer should use it: itself, or detached inside [`frozen`].
/// Model code that uses a weight directly (e.g. a spectral norm) goes through
/// this too.
pub fn param(t: &Tensor) -> Tensor {
    if is_frozen() {
        t.detach()
    } else {
        t.clone()
    }
}

/// A fully connected layer: `y = x W^T + b`, `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer with bias, variables `weight` and `bias` under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Self::with_bias(in_dim, out_dim, true, vb)
    }

    /// A layer with or without bias.
    pub fn with_bias(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let init = uniform(torch_bound(in_dim));
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", init)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A layer from existing tensors.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(param);
        crate::ops::linear(
            x,
            &param(&self.weight),
            b.as_ref(),
            crate::ops::WeightLayout::OutIn,
        )
    }
}

/// Hyper-parameters of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvConfig {
    /// Zero padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups (input and output channels must divide by it).
    pub groups: usize,
    /// Extra rows/columns on one side of a transposed convolution's output.
    pub output_padding: usize,
    /// Whether the layer has a bias (PyTorch's `bias=True`, the default).
    pub bias: bool,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
            output_padding: 0,
            bias: true,
        }
    }
}

impl ConvConfig {
    /// Padding `p`, stride 1.
    pub fn padding(p: usize) -> Self {
        Self {
            padding: p,
            ..Self::default()
        }
    }

    /// Stride `s`, no padding.
    pub fn stride(s: usize) -> Self {
        Self {
            stride: s,
            ..Self::default()
        }
    }

    /// The same settings without a bias (`bias=False`, as before a batch norm).
    pub fn no_bias(self) -> Self {
        Self {
            bias: false,
            ..self
        }
    }
}

/// A 2-D convolution over `[B, C, H, W]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: ConvConfig,
}

impl Conv2d {
    /// `Conv2d(in, out, k)` with PyTorch's initialisation; variables `weight`, `bias`.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        cfg: ConvConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if cfg.groups == 0
            || !in_ch.is_multiple_of(cfg.groups)
            || !out_ch.is_multiple_of(cfg.groups)
        {
            candle_core::bail!(
                "Conv2d: in_channels {in_ch} and out_channels {out_ch} must divide by groups {}",
                cfg.groups
            );
        }
        let fan_in = in_ch / cfg.groups * kernel * kernel;
        let init = uniform(torch_bound(fan_in));
        let weight =
            vb.get_with_hints((out_ch, in_ch / cfg.groups, kernel, kernel), "weight", init)?;
        let bias = match cfg.bias {
            true => Some(vb.get_with_hints(out_ch, "bias", init)?),
            false => None,
        };
        Ok(Self { weight, bias, cfg })
    }

    /// The weight, `[out, in/groups, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Conv2d {
    fn conv(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        crate::ops::conv2d(
            x,
            &param(&self.weight),
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )
    }

    /// `relu(self.forward(x))` with the bias and ReLU fused into one pass each
    /// way (same values and gradients, fewer passes and tensors).
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        bias_relu(&self.conv(x)?, self.bias.as_ref().map(param).as_ref())
    }
}

/// Adds a conv layer's optional bias, then ReLU, through the fused ops.
fn bias_relu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => crate::ops::add_channel_bias_relu(y, b),
        None => crate::ops::relu(y),
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv(x)?;
        match &self.bias {
            Some(b) => crate::ops::add_channel_bias(&y, &param(b)),
            None => Ok(y),
        }
    }
}

/// A 2-D transposed convolution over `[B, C, H, W]`.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: ConvConfig,
}

impl ConvTranspose2d {
    /// `ConvTranspose2d(in, out, k)` with PyTorch's initialisation.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        cfg: ConvConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if cfg.groups != 1 {
            candle_core::bail!("ConvTranspose2d: groups > 1 is not supported yet");
        }
        // PyTorch computes fan-in from weight dim 1 (out channels) for transposed convs.
        let fan_in = out_ch * kernel * kernel;
        let init = uniform(torch_bound(fan_in));
        let weight = vb.get_with_hints((in_ch, out_ch, kernel, kernel), "weight", init)?;
        let bias = match cfg.bias {
            true => Some(vb.get_with_hints(out_ch, "bias", init)?),
            false => None,
        };
        Ok(Self { weight, bias, cfg })
    }

    /// The weight, `[in, out, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl ConvTranspose2d {
    fn conv(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        crate::ops::conv_transpose2d(
            x,
            &param(&self.weight),
            c.stride,
            c.padding,
            c.output_padding,
            c.dilation,
        )
    }

    /// `relu(self.forward(x))` with the bias and ReLU fused into one pass each way.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        bias_relu(&self.conv(x)?, self.bias.as_ref().map(param).as_ref())
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv(x)?;
        match &self.bias {
            Some(b) => crate::ops::add_channel_bias(&y, &param(b)),
            None => Ok(y),
        }
    }
}

/// Max pooling with a square window.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    /// Window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
}

impl MaxPool2d {
    /// `MaxPool2d(k)` (stride = k, as PyTorch's default).
    pub fn new(kernel: usize) -> Self {
        Self {
            kernel,
            stride: kernel,
        }
    }
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::max_pool2d(x, self.kernel, self.stride)
    }
}

/// Average pooling with a square window.
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2d {
    /// Window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
}

impl AvgPool2d {
    /// `AvgPool2d(k)` (stride = k).
    pub fn new(kernel: usize) -> Self {
        Self {
            kernel,
            stride: kernel,
        }
    }
}

impl Module for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::avg_pool2d(x, self.kernel, self.stride)
    }
}

/// Layer normalisation over the last dimension, with gradients to input,
/// weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `LayerNorm(dim)`, weight 1, bias 0, eps 1e-5 (PyTorch's defaults).
    pub fn new(dim: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

/// The layer-norm function (last dimension), gradient-carrying (a fused kernel
/// for f32 CPU tensors).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::ops::layer_norm(x, weight, bias, eps)
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &param(&self.weight), &param(&self.bias), self.eps)
    }
}

/// A lookup table `[num, dim]`, initialised N(0, 1) as in PyTorch.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// `Embedding(num, dim)`; variable `weight`.
    pub fn new(num: usize, dim: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(
            (num, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self { weight })
    }

    /// The table, `[num, dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(self.weight.dim(1)?);
        let flat = ids.flatten_all()?;
        param(&self.weight)
            .index_select(&flat, 0)?
            .reshape(out_dims)
    }
}

/// Inverted dropout drawing its masks from a seeded generator.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: SharedRng,
}

impl Dropout {
    /// Drops each element with probability `p` in training mode.
    pub fn new(p: f64, rng: SharedRng) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("Dropout: p must be in [0, 1), got {p}");
        }
        Ok(Self { p, rng })
    }

    /// The keep probability and mask seed of one training-mode call, drawn
    /// as [`ModuleT::forward_t`] draws them (`None` in eval mode or with
    /// `p = 0`, which draw nothing): for fused ops that apply the mask
    /// themselves, such as [`crate::ops::causal_attention`].
    pub fn draw(&self, train: bool) -> Option<(f64, u64)> {
        if !train || self.p == 0.0 {
            return None;
        }
        // One draw per call seeds a counter-based mask (see `ops::dropout`):
        // generated in parallel, regenerated for the backward pass.
        Some((1.0 - self.p, rand::RngCore::next_u64(&mut *self.rng.lock())))
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.draw(train) {
            Some((keep, seed)) => crate::ops::dropout(x, keep, seed),
            None => Ok(x.clone()),
        }
    }
}

/// Batch normalisation over the channels of `[B, C, ...]`, with running
/// statistics (`running_mean`, `running_var`, PyTorch's names) kept as
/// variables so checkpoints carry them. They never receive gradients, so
/// optimizers leave them alone.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    momentum: f64,
    eps: f64,
}

impl BatchNorm {
    /// `BatchNorm2d(channels)` (momentum 0.1, eps 1e-5).
    pub fn new(channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let rm = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let rv = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        // Running stats are updated in place; wrapping the same storage as a Var
        // lets `set` write through to the store's copy.
        Ok(Self {
            weight,
            bias,
            running_mean: candle_core::Var::from_tensor(&rm)?,
            running_var: candle_core::Var::from_tensor(&rv)?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// The statistics to normalise with: the batch's own in training (and the
    /// running ones updated from them), the running ones otherwise.
    fn stats(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        if x.rank() < 2 {
            candle_core::bail!("BatchNorm: expected [B, C, ...], got {:?}", x.dims());
        }
        if !train {
            return Ok((
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
            ));
        }
        let (mean, var) = crate::ops::batch_norm_stats(x)?;
        let n = x.elem_count() / x.dim(1)?.max(1);
        let unbiased = (&var * (n as f64 / (n.max(2) - 1) as f64))?;
        let m = self.momentum;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (&mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok((mean, var))
    }

    /// `forward_t` followed by a leaky ReLU of `slope` (a ReLU at 0) in one
    /// op ([`crate::ops::batch_norm_act`]): the same values as
    /// `ops::leaky_relu(&bn.forward_t(x, train)?, slope)`, with fewer passes.
    ///
    /// ```
    /// use kiln_core::{nn::BatchNorm, rng::SeededRng, vars::VarStore, DType, Device, ModuleT};
    ///
    /// let vs = VarStore::new(0);
    /// let bn = BatchNorm::new(3, vs.builder(DType::F32, &Device::Cpu).pp("bn"))?;
    /// let x = SeededRng::new(1).normal(&[4, 3, 5, 5], 0.0, 1.0, &Device::Cpu)?;
    /// let fused = bn.forward_act_t(&x, false, 0.2)?;
    /// let apart = kiln_core::ops::leaky_relu(&bn.forward_t(&x, false)?, 0.2)?;
    /// let bits = |t: &kiln_core::Tensor| t.flatten_all()?.to_vec1::<f32>();
    /// assert_eq!(bits(&fused)?, bits(&apart)?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_act_t(&self, x: &Tensor, train: bool, slope: f64) -> Result<Tensor> {
        let (mean, var) = self.stats(x, train)?;
        let (w, b) = (param(&self.weight), param(&self.bias));
        crate::ops::batch_norm_act(x, &mean, &var, &w, &b, self.eps, train, slope)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (mean, var) = self.stats(x, train)?;
        let (w, b) = (param(&self.weight), param(&self.bias));
        crate::ops::batch_norm(x, &mean, &var, &w, &b, self.eps, train)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::vars::VarStore;
    use candle_core::{DType, Device, Var};

    /// A step run on the pool ([`crate::ops::on_pool`], as every `Session`
    /// step is) keeps its caller's `frozen` state, whichever pool thread runs
    /// it: from a thread outside the pool, `frozen` was lost (the job ran
    /// unfrozen), and a pool thread inside another step's `frozen` that took
    /// the job froze it (two GAN trainings in one process: one's generator
    /// step left the other's discriminator without weight gradients).
    #[test]
    fn a_job_on_the_pool_keeps_its_callers_frozen_state() {
        assert!(frozen(|| crate::ops::on_pool(is_frozen)));
        assert!(!crate::ops::on_pool(is_frozen));
        // Nested on a pool thread inside `frozen`, it stays frozen.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let seen = pool.install(|| frozen(|| pool.install(|| crate::ops::on_pool(is_frozen))));
        assert!(seen);
        assert!(!is_frozen());
    }

    /// Inside `frozen` a layer's weights get no gradient while its input
    /// still does (with the same values as outside); the state nests and is
    /// restored, also after a panic.
    #[test]
    fn frozen_layers_pass_gradients_through_but_form_none_of_their_own() {
        let dev = Device::Cpu;
        let vs = VarStore::new(0);
        let vb = vs.builder(DType::F32, &dev);
        let conv = Conv2d::new(2, 3, 3, ConvConfig::default(), vb.pp("c")).unwrap();
        let bn = BatchNorm::new(3, vb.pp("bn")).unwrap();
        let x = Var::from_tensor(
            &crate::rng::SeededRng::new(1)
                .normal((2, 2, 5, 5), 0.0, 1.0, &dev)
                .unwrap(),
        )
        .unwrap();
        let run = || {
            let y = bn
                .forward_t(&conv.forward(x.as_tensor()).unwrap(), true)
                .unwrap();
            (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap()
        };
        let plain = run();
        let frozen_grads = frozen(|| {
            assert!(frozen(is_frozen) && is_frozen());
            run()
        });
        assert!(!is_frozen());
        let gx = |g: &candle_core::backprop::GradStore| {
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(gx(&plain), gx(&frozen_grads));
        for (name, v) in vs.vars() {
            if name.contains("running") {
                continue;
            }
            assert!(plain.get(v.as_tensor()).is_some(), "{name}");
            assert!(frozen_grads.get(v.as_tensor()).is_none(), "{name}");
        }
        let caught = std::panic::catch_unwind(|| frozen(|| panic!("inside")));
        assert!(caught.is_err() && !is_frozen());
    }
}
