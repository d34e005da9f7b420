//! # kiln-core
//!
//! The shared tensor core of kiln, on top of candle 0.11: device selection, a
//! seeded random generator, layers whose kernels kiln controls, numerically
//! stable losses, fused optimizers with savable state, checkpoints, run
//! folders, a training observer and image/plot output.
//!
//! ```
//! use kiln_core::{loss, nn::Linear, optim::{OptimKind, Optimizer}, vars::VarStore};
//! use kiln_core::{DType, Device, Module};
//!
//! let dev = kiln_core::device::device("cpu")?;
//! let vs = VarStore::new(0); // seeded: same weights every run
//! let fc = Linear::new(4, 1, vs.builder(DType::F32, &dev).pp("fc"))?;
//! let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-2, 0.0)?;
//! let mut rng = kiln_core::rng::SeededRng::new(1);
//! let x = rng.normal(&[16, 4], 0.0, 1.0, &dev)?;
//! let y = x.sum_keepdim(1)?;
//! let first = loss::mse(&fc.forward(&x)?, &y, loss::Reduction::Mean)?.to_scalar::<f32>()?;
//! for _ in 0..100 {
//!     let l = loss::mse(&fc.forward(&x)?, &y, loss::Reduction::Mean)?;
//!     opt.backward_step(&l)?;
//! }
//! let last = loss::mse(&fc.forward(&x)?, &y, loss::Reduction::Mean)?.to_scalar::<f32>()?;
//! assert!(last < first / 10.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod checkpoint;
pub mod device;
pub mod files;
pub mod image;
pub mod loss;
pub mod memory;
pub mod nn;
pub mod observer;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod run;
pub mod session;
pub mod tolerance;
pub mod vars;

pub use candle_core::{
    self as candle, DType, Device, Module, ModuleT, Result, Shape, Tensor, Var, D,
};
pub use candle_nn;
pub use candle_nn::VarBuilder;

/// The README's examples, compiled (and run unless marked `no_run`) as doctests, so
/// they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
