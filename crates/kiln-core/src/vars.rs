//! [`VarStore`]: the trainable variables of a model, created with kiln's seeded
//! generator instead of candle's thread RNG.
//!
//! Models take a plain `candle_nn::VarBuilder` (`Model::new(&cfg, vb)`), so the
//! same model code loads pretrained safetensors or builds fresh weights; a
//! `VarStore` is the backend that builds fresh ones reproducibly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::memory;
use crate::rng::SeededRng;

/// A cloneable handle to one [`SeededRng`], shared by the parts of a model
/// that draw at run time (dropout, noise, sampling).
#[derive(Debug, Clone)]
pub struct SharedRng(Arc<Mutex<SeededRng>>);

impl SharedRng {
    /// A handle to a new generator.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(SeededRng::new(seed))))
    }

    /// Locks the generator. A poisoned lock (a panic elsewhere while drawing)
    /// still yields the generator: its state is always valid.
    pub fn lock(&self) -> MutexGuard<'_, SeededRng> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl From<SeededRng> for SharedRng {
    fn from(r: SeededRng) -> Self {
        Self(Arc::new(Mutex::new(r)))
    }
}

/// The variables of a model, keyed by dotted name (`encoder.0.weight`).
///
/// A new CPU variable that would not fit in the memory the machine has
/// available ([`crate::memory`]) is refused, before anything is allocated,
/// with an error naming it, its shape and the model's size so far.
///
/// ```
/// use kiln_core::{vars::VarStore, nn::Linear, DType, Device, Module, Tensor};
/// let vs = VarStore::new(0);
/// let vb = vs.builder(DType::F32, &Device::Cpu);
/// let lin = Linear::new(4, 2, vb.pp("fc")).unwrap();
/// let y = lin.forward(&Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
/// assert_eq!(y.dims(), &[3, 2]);
/// assert_eq!(vs.num_params(), 4 * 2 + 2);
/// ```
#[derive(Clone)]
pub struct VarStore {
    map: VarMap,
    rng: SharedRng,
}

impl std::fmt::Debug for VarStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarStore")
            .field("vars", &self.names())
            .finish()
    }
}

impl VarStore {
    /// An empty store whose new variables are drawn from `SeededRng::new(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            rng: SharedRng::new(seed),
        }
    }

    /// A `VarBuilder` that creates missing variables in this store.
    pub fn builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The generator used for initialisation.
    pub fn rng(&self) -> &SharedRng {
        &self.rng
    }

    /// The underlying candle `VarMap`.
    pub fn varmap(&self) -> &VarMap {
        &self.map
    }

    fn data(&self) -> MutexGuard<'_, HashMap<String, Var>> {
        self.map.data().lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All variables, sorted by name (a stable order for optimizers and files).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .data()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The variables whose name satisfies `keep` (e.g. to freeze an encoder).
    pub fn vars_where(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, Var)> {
        self.vars().into_iter().filter(|(n, _)| keep(n)).collect()
    }

    /// Variable names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.vars().into_iter().map(|(n, _)| n).collect()
    }

    /// One variable by name.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.data().get(name).cloned()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.data().values().map(|v| v.elem_count()).sum()
    }

    /// Current values of all variables, as `(name, tensor)` (sorted by name).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Overwrites variables with the given values. Every variable of the store
    /// must be present with the same shape; unknown names are an error too, so a
    /// checkpoint of another model is never half-loaded.
    pub fn assign(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        self.check(values)?;
        let data = self.data();
        for (name, var) in data.iter() {
            let t = &values[name];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Checks that `values` names every variable, and nothing else, with its
    /// shape: what [`VarStore::assign`] needs. Changes nothing.
    pub fn check(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        let data = self.data();
        let mut missing: Vec<&str> = data
            .keys()
            .filter(|k| !values.contains_key(*k))
            .map(String::as_str)
            .collect();
        missing.sort_unstable();
        if !missing.is_empty() {
            candle_core::bail!("missing variables: {}", missing.join(", "));
        }
        let mut unknown: Vec<&str> = values
            .keys()
            .filter(|k| !data.contains_key(*k))
            .map(String::as_str)
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            candle_core::bail!(
                "unexpected variables (not in this model): {}",
                unknown.join(", ")
            );
        }
        for (name, var) in data.iter() {
            let t = &values[name];
            if t.shape() != var.shape() {
                candle_core::bail!(
                    "variable {name}: expected shape {:?}, found {:?}",
                    var.shape(),
                    t.shape()
                );
            }
        }
        Ok(())
    }

    /// Checks, before anything is allocated, that a new CPU variable `name`
    /// of `shape` and `dtype` can be created in the memory the machine has
    /// available ([`crate::memory`]): an allocation that fails aborts the
    /// process with no word of the cause. Creating it takes its initial
    /// values (f32) and the variable's own copy at once. The variables held
    /// so far are already in memory, so they are not counted again; the
    /// refusal names them to size the model.
    fn check_memory(&self, name: &str, shape: &Shape, dtype: DType) -> Result<()> {
        let n = shape.elem_count() as u64;
        let size = dtype.size_in_bytes() as u64;
        let needed = n.saturating_mul(size.max(4) + size);
        let what = format!(
            "variable {name} of shape {:?} ({} of {})",
            shape.dims(),
            memory::format_bytes(n.saturating_mul(size)),
            dtype.as_str()
        );
        if let Err(oom) = memory::check_fits_in(&what, needed, memory::available_for_one_block()) {
            let (params, bytes) = self.data().values().fold((0u64, 0u64), |(p, b), v| {
                let n = v.elem_count() as u64;
                (p + n, b + n * v.dtype().size_in_bytes() as u64)
            });
            candle_core::bail!(
                "{oom} (creating a variable holds its initial values and the variable's copy \
                 at once); the model has {} parameters ({}) so far: use a smaller model (fewer or \
                 narrower layers, smaller images); {}",
                memory::format_count(params),
                memory::format_bytes(bytes),
                memory::SKIP_HINT
            );
        }
        Ok(())
    }

    fn init_tensor(&self, shape: &Shape, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = match init {
            Init::Const(v) => Tensor::full(v as f32, shape, dev)?,
            Init::Randn { mean, stdev } => {
                self.rng
                    .lock()
                    .normal(shape.clone(), mean as f32, stdev as f32, dev)?
            }
            Init::Uniform { lo, up } => {
                self.rng
                    .lock()
                    .uniform(shape.clone(), lo as f32, up as f32, dev)?
            }
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let (fan_in, fan_out) = fans(shape);
                let fan = match fan {
                    FanInOut::FanIn => fan_in,
                    FanInOut::FanOut => fan_out,
                };
                let gain = match non_linearity {
                    NonLinearity::ReLU => 2f64.sqrt(),
                    NonLinearity::Tanh => 5.0 / 3.0,
                    NonLinearity::Linear | NonLinearity::Sigmoid => 1.0,
                    NonLinearity::SELU => 0.75,
                    NonLinearity::ExplicitGain(g) => g,
                };
                let std = gain / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => {
                        self.rng
                            .lock()
                            .normal(shape.clone(), 0.0, std as f32, dev)?
                    }
                    NormalOrUniform::Uniform => {
                        let b = (3f64.sqrt() * std) as f32;
                        self.rng.lock().uniform(shape.clone(), -b, b, dev)?
                    }
                }
            }
        };
        t.to_dtype(dtype)
    }
}

/// PyTorch's fan-in/fan-out for a weight shape: dims `[out, in, k...]`.
pub fn fans(shape: &Shape) -> (usize, usize) {
    let d = shape.dims();
    match d.len() {
        0 => (1, 1),
        1 => (d[0], d[0]),
        _ => {
            let receptive: usize = d[2..].iter().product();
            (d[1] * receptive, d[0] * receptive)
        }
    }
}

impl SimpleBackend for VarStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(v) = self.data().get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable {name}: expected shape {s:?}, the store holds {:?}",
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        if dev.is_cpu() {
            self.check_memory(name, &s, dtype)?;
        }
        let t = self.init_tensor(&s, h, dtype, dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.data().insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.data().get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("variable {name} does not exist in the store"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.data().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_shapes_checked() {
        let build = |seed| {
            let vs = VarStore::new(seed);
            let vb = vs.builder(DType::F32, &Device::Cpu);
            vb.get_with_hints((3, 5), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)
                .unwrap();
            vb.get_with_hints(4, "b", Init::Uniform { lo: -1.0, up: 1.0 })
                .unwrap();
            vs
        };
        let (a, b, c) = (build(1), build(1), build(2));
        let ta = a.get("w").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(ta, b.get("w").unwrap().to_vec2::<f32>().unwrap());
        assert_ne!(ta, c.get("w").unwrap().to_vec2::<f32>().unwrap());
        let vb = a.builder(DType::F32, &Device::Cpu);
        let e = vb.get((5, 3), "w").unwrap_err().to_string();
        assert!(e.contains("expected shape"), "{e}");
        assert_eq!(a.names(), vec!["b".to_string(), "w".to_string()]);
    }

    #[test]
    fn assign_rejects_missing_unknown_and_misshapen() {
        let vs = VarStore::new(0);
        let vb = vs.builder(DType::F32, &Device::Cpu);
        vb.get_with_hints(2, "a", Init::Const(0.0)).unwrap();
        let mut m = HashMap::new();
        assert!(vs.assign(&m).unwrap_err().to_string().contains("missing"));
        m.insert(
            "a".to_string(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(vs.assign(&m).unwrap_err().to_string().contains("shape"));
        m.insert(
            "a".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        vs.assign(&m).unwrap();
        assert_eq!(
            vs.get("a").unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 1.0]
        );
        m.insert(
            "zzz".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(vs.assign(&m).unwrap_err().to_string().contains("zzz"));
    }

    #[test]
    fn a_variable_too_large_for_memory_is_refused_before_it_is_made() {
        use crate::memory::test_hook::with_available;
        let vs = VarStore::new(3);
        let vb = vs.builder(DType::F32, &Device::Cpu);
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        // 64 KiB available: a 16 KiB weight fits (32 KiB while it is made), a
        // 40 KiB one does not (80 KiB), nor a 1 MiB one.
        let errors = with_available(Some(64 << 10), || {
            vb.get_with_hints((64, 64), "enc.weight", kaiming).unwrap();
            let before = vs.rng().lock().state();
            let errors = [(64, 160), (512, 512)].map(|shape| {
                vb.get_with_hints(shape, "dec.weight", kaiming)
                    .unwrap_err()
                    .to_string()
            });
            // Nothing was drawn: the initialisation never ran.
            assert_eq!(vs.rng().lock().state(), before);
            errors
        });
        assert!(errors[0].contains("it needs 80.0 KiB"), "{}", errors[0]);
        let e = &errors[1];
        for part in [
            "not enough memory for variable dec.weight of shape [512, 512] (1.0 MiB of f32)",
            "it needs 2.0 MiB, and this machine has 64.0 KiB available",
            "the model has 4,096 parameters (16.0 KiB) so far",
            "use a smaller model (fewer or narrower layers, smaller images)",
            "KILN_NO_MEMORY_CHECK=1 skips this check",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
        assert_eq!(vs.names(), vec!["enc.weight".to_string()]);
        // Enough memory, or none known: made.
        with_available(Some(2 << 20), || {
            vb.get_with_hints((512, 512), "dec.weight", kaiming)
        })
        .unwrap();
        with_available(None, || vb.get_with_hints((64, 160), "dec.bias", kaiming)).unwrap();
        assert_eq!(vs.num_params(), 64 * 64 + 512 * 512 + 64 * 160);
    }

    #[test]
    fn fans_match_pytorch() {
        assert_eq!(fans(&Shape::from((512, 3072))), (3072, 512));
        assert_eq!(fans(&Shape::from((8, 3, 3, 3))), (27, 72));
    }
}
