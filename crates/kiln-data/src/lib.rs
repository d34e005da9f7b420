//! # kiln-data
//!
//! Data for kiln's models: a [`Dataset`] trait and a [`DataLoader`] that yields
//! `[B, C, H, W]` f32 candle tensors (values in [0, 1]) with labels, using a
//! seeded shuffle, parallel decode/transform and prefetch; seeded
//! [`transforms`]; [`masks`] for self-supervised learning; readers for
//! Oxford Flowers102 (the real `.mat` files), CIFAR-10 (binary), MNIST (IDX,
//! raw or gzipped) and image folders; [`SyntheticFlowers`], a procedural,
//! download-free flower set that demos and tests use; [`SyntheticShapes`],
//! whose classes differ only in shape (colours carry no label information);
//! verified, resumable downloads; and text corpora and preference pairs.
//!
//! Features (both on by default): `download` ([`download`]: ureq with TLS, md5,
//! tar) and `text` (`text`: tokenizers, and kiln-prompt's chat [`text::Message`]).
//! Image-only users can turn them off: the readers, loader, transforms and
//! synthetic sets need neither.
//!
//! ```
//! use kiln_core::{rng::SeededRng, Device};
//! use kiln_data::{masks::SquareMask, open, DataLoader, DatasetSpec, LoaderConfig, Split};
//!
//! # fn main() -> kiln_data::Result<()> {
//! let spec: DatasetSpec = "synthetic-flowers".parse()?;
//! let train = open(&spec, "data".as_ref(), Split::Train, 32)?;
//! let loader = DataLoader::new(train.into(), LoaderConfig::batch(32), &Device::Cpu)?;
//! let mut rng = SeededRng::new(0);
//! for batch in loader.epoch(0).take(2) {
//!     let batch = batch?;
//!     assert_eq!(batch.images.dims(), &[32, 3, 32, 32]);
//!     // the chapter's inpainting input: an 8x8 hole shared by the batch
//!     let (masked, _mask) = SquareMask::chapter().apply(&batch.images, &mut rng)?;
//!     assert_eq!(masked.dims(), batch.images.dims());
//! }
//! # Ok(())
//! # }
//! ```

pub mod cifar;
mod color;
pub mod dataset;
#[cfg(feature = "download")]
pub mod download;
pub mod error;
pub mod flowers;
pub mod folder;
pub mod image;
pub mod loader;
pub mod masks;
mod mat;
pub mod mnist;
pub mod shapes;
mod sizes;
pub mod spec;
pub mod synthetic;
#[cfg(feature = "text")]
pub mod text;
pub mod transforms;
mod util;

pub use cifar::Cifar10;
pub use dataset::{input_paths_of, Cached, Dataset, Mapped, Sample, Split, Subset};
pub use error::{DataError, Result};
pub use flowers::Flowers102;
pub use folder::{FolderOptions, ImageFolder};
pub use image::{ColorMode, Image};
pub use loader::{Batch, DataLoader, Epoch, LoaderConfig};
pub use mnist::Mnist;
pub use shapes::{SyntheticShapes, SyntheticShapesConfig, SHAPE_KINDS};
pub use spec::{open, open_with, DatasetSpec, OpenOptions, DATASET_NAMES};
pub use synthetic::{SyntheticFlowers, SyntheticFlowersConfig};
#[cfg(feature = "text")]
pub use text::TextSource;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
