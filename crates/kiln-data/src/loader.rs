//! [`DataLoader`]: batches of `[B, C, H, W]` f32 tensors and labels, with a
//! seeded shuffle, drop_last, parallel decode/transform and prefetch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_core::rng::SeededRng;
use kiln_core::{Device, Tensor};
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::image::Image;
use crate::transforms::Transform;

/// Options of a [`DataLoader`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch. Default 32.
    pub batch_size: usize,
    /// Shuffle every epoch (a permutation drawn from `seed` and the epoch). Default true.
    pub shuffle: bool,
    /// Drop the last, smaller batch. Default false.
    pub drop_last: bool,
    /// Seed of the shuffle and of per-item augmentation. Default 0.
    pub seed: u64,
    /// Threads decoding and transforming items; 0 uses rayon's global pool. Default 0.
    pub threads: usize,
    /// Batches prepared ahead on a background thread; 0 prepares them on the
    /// caller's thread when asked. Default 2.
    pub prefetch: usize,
    /// Skip items whose image cannot be decoded (they are counted, see
    /// [`DataLoader::skipped`]) instead of failing. Default false.
    pub skip_corrupt: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            shuffle: true,
            drop_last: false,
            seed: 0,
            threads: 0,
            prefetch: 2,
            skip_corrupt: false,
        }
    }
}

impl LoaderConfig {
    /// The defaults with another batch size.
    pub fn batch(batch_size: usize) -> Self {
        Self {
            batch_size,
            ..Self::default()
        }
    }
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` f32, in [0, 1] unless a normalize transform was added.
    pub images: Tensor,
    /// `[B]` u32 class labels.
    pub labels: Tensor,
    /// The same labels as integers.
    pub label_ids: Vec<usize>,
    /// The dataset indices of the items.
    pub indices: Vec<usize>,
    /// All augmented views `[B, C, H, W]` when the loader was made with
    /// [`DataLoader::with_views`] (`views[0]` is `images`); else just `[images]`.
    pub views: Vec<Tensor>,
}

impl Batch {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// A batch assembled on the CPU, before it becomes tensors.
struct RawBatch {
    /// One buffer per view.
    data: Vec<Vec<f32>>,
    shape: [usize; 4],
    labels: Vec<usize>,
    indices: Vec<usize>,
}

struct Inner {
    dataset: Arc<dyn Dataset>,
    transform: Option<Arc<dyn Transform>>,
    views: usize,
    cfg: LoaderConfig,
    pool: Option<rayon::ThreadPool>,
    skipped: AtomicUsize,
}

/// Batches from a [`Dataset`].
///
/// ```
/// use std::sync::Arc;
/// use kiln_core::Device;
/// use kiln_data::{DataLoader, LoaderConfig, Split, SyntheticFlowers, SyntheticFlowersConfig};
/// let cfg = SyntheticFlowersConfig { train: 40, ..Default::default() };
/// let ds = SyntheticFlowers::new(cfg, Split::Train).unwrap();
/// let loader = DataLoader::new(Arc::new(ds), LoaderConfig::batch(16), &Device::Cpu).unwrap();
/// assert_eq!(loader.len(), 3);
/// for batch in loader.epoch(0) {
///     let batch = batch.unwrap();
///     assert_eq!(batch.images.dims()[1..], [3, 32, 32]);
/// }
/// ```
#[derive(Clone)]
pub struct DataLoader {
    inner: Arc<Inner>,
    device: Device,
}

impl DataLoader {
    /// A loader over `dataset` producing tensors on `device`.
    pub fn new(dataset: Arc<dyn Dataset>, cfg: LoaderConfig, device: &Device) -> Result<Self> {
        Self::build(dataset, None, 1, cfg, device)
    }

    fn build(
        dataset: Arc<dyn Dataset>,
        transform: Option<Arc<dyn Transform>>,
        views: usize,
        cfg: LoaderConfig,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .thread_name(|i| format!("kiln-data-{i}"))
                    .build()
                    .map_err(|e| DataError::config("threads", e.to_string()))?,
            )
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dataset,
                transform,
                views: views.max(1),
                cfg,
                pool,
                skipped: AtomicUsize::new(0),
            }),
            device: device.clone(),
        })
    }

    /// The same loader with a transform applied to every item (with a
    /// generator derived from the seed, the epoch and the item's index).
    pub fn with_transform(self, t: impl Transform + 'static) -> Result<Self> {
        self.with_views(t, 1)
    }

    /// The same loader producing `views` independently augmented views of
    /// every item (contrastive learning: SimCLR uses 2), in
    /// [`Batch::views`]; view `v` of item `i` in epoch `e` draws from a
    /// generator derived from `(seed, e, i, v)`.
    pub fn with_views(self, t: impl Transform + 'static, views: usize) -> Result<Self> {
        if views == 0 {
            return Err(DataError::config("views", "must be at least 1"));
        }
        Self::build(
            self.inner.dataset.clone(),
            Some(Arc::new(t)),
            views,
            self.inner.cfg.clone(),
            &self.device,
        )
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.inner.dataset
    }

    /// The options.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let (n, b) = (self.inner.dataset.len(), self.inner.cfg.batch_size);
        if self.inner.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items skipped so far because their image could not be decoded
    /// (only with `skip_corrupt`).
    pub fn skipped(&self) -> usize {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// The dataset order of epoch `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.inner.dataset.len();
        if self.inner.cfg.shuffle {
            SeededRng::derive(self.inner.cfg.seed, &[SHUFFLE_KEY, epoch]).permutation(n)
        } else {
            (0..n).collect()
        }
    }

    /// The batches of epoch `epoch` (the shuffle and augmentation depend on it).
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` from batch index `start` on: the same
    /// batches [`DataLoader::epoch`] gives after skipping `start`, without
    /// loading, decoding or augmenting the skipped ones (a resumed run).
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch {
        let order = self.order(epoch);
        let b = self.inner.cfg.batch_size;
        let mut chunks: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.inner.cfg.drop_last && chunks.last().is_some_and(|c| c.len() < b) {
            chunks.pop();
        }
        chunks.drain(..start.min(chunks.len()));
        let state = if self.inner.cfg.prefetch > 0 && chunks.len() > 1 {
            let (tx, rx) = sync_channel(self.inner.cfg.prefetch);
            let inner = self.inner.clone();
            let handle = std::thread::Builder::new()
                .name("kiln-data-prefetch".into())
                .spawn(move || {
                    for c in chunks {
                        let r = inner.assemble(&c, epoch);
                        let stop = r.is_err();
                        if tx.send(r).is_err() || stop {
                            break;
                        }
                    }
                });
            match handle {
                Ok(h) => EpochState::Prefetch {
                    rx: Some(rx),
                    handle: Some(h),
                },
                Err(e) => EpochState::Failed(Some(DataError::config(
                    "prefetch",
                    format!("cannot start the prefetch thread: {e}"),
                ))),
            }
        } else {
            EpochState::Inline {
                chunks: chunks.into_iter(),
                epoch,
            }
        };
        Epoch {
            loader: self.clone(),
            state,
            done: false,
        }
    }

    /// Epoch 0.
    pub fn iter(&self) -> Epoch {
        self.epoch(0)
    }

    fn to_batch(&self, raw: RawBatch) -> Result<Batch> {
        let views = raw
            .data
            .into_iter()
            .map(|d| Tensor::from_vec(d, raw.shape.to_vec(), &self.device))
            .collect::<kiln_core::Result<Vec<_>>>()?;
        let l: Vec<u32> = raw.labels.iter().map(|&l| l as u32).collect();
        let labels = Tensor::from_vec(l, raw.labels.len(), &self.device)?;
        let images = views
            .first()
            .cloned()
            .ok_or_else(|| DataError::config("views", "a batch without images"))?;
        Ok(Batch {
            images,
            labels,
            label_ids: raw.labels,
            indices: raw.indices,
            views,
        })
    }
}

/// The stream key of the shuffle (so it differs from augmentation streams).
const SHUFFLE_KEY: u64 = 0x5348_5546;

impl Inner {
    fn load_one(&self, index: usize, epoch: u64) -> Result<Option<(Vec<Image>, usize)>> {
        let s = match self.dataset.get(index) {
            Ok(s) => s,
            Err(e) if self.cfg.skip_corrupt && e.is_corrupt_image() => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let images = match &self.transform {
            Some(t) => {
                let mut out = Vec::with_capacity(self.views);
                for v in 0..self.views {
                    let mut rng = if v == 0 {
                        SeededRng::derive(self.cfg.seed, &[epoch, index as u64])
                    } else {
                        SeededRng::derive(self.cfg.seed, &[epoch, index as u64, v as u64])
                    };
                    out.push(t.apply(s.image.clone(), &mut rng)?);
                }
                out
            }
            None => vec![s.image],
        };
        Ok(Some((images, s.label)))
    }

    fn assemble(&self, indices: &[usize], epoch: u64) -> Result<RawBatch> {
        let work = || {
            indices
                .par_iter()
                .map(|&i| self.load_one(i, epoch).map(|s| s.map(|s| (i, s))))
                .collect::<Result<Vec<_>>>()
        };
        let items = match &self.pool {
            Some(p) => p.install(work)?,
            None => work()?,
        };
        let items: Vec<_> = items.into_iter().flatten().collect();
        let Some((_, (first, _))) = items.first() else {
            return Ok(RawBatch {
                data: vec![Vec::new()],
                shape: [0, self.dataset.channels(), 0, 0],
                labels: Vec::new(),
                indices: Vec::new(),
            });
        };
        let shape = first[0].shape();
        let per = shape.iter().product::<usize>();
        let mut data: Vec<Vec<f32>> = (0..first.len())
            .map(|_| Vec::with_capacity(per * items.len()))
            .collect();
        let mut labels = Vec::with_capacity(items.len());
        let mut idx = Vec::with_capacity(items.len());
        for (i, (views, label)) in &items {
            for (buf, img) in data.iter_mut().zip(views) {
                if img.shape() != shape {
                    return Err(DataError::Shape {
                        index: *i,
                        expected: shape.to_vec(),
                        found: img.shape().to_vec(),
                    });
                }
                buf.extend_from_slice(&img.data);
            }
            labels.push(*label);
            idx.push(*i);
        }
        Ok(RawBatch {
            data,
            shape: [items.len(), shape[0], shape[1], shape[2]],
            labels,
            indices: idx,
        })
    }
}

enum EpochState {
    Inline {
        chunks: std::vec::IntoIter<Vec<usize>>,
        epoch: u64,
    },
    Prefetch {
        rx: Option<Receiver<Result<RawBatch>>>,
        handle: Option<JoinHandle<()>>,
    },
    Failed(Option<DataError>),
}

/// The batches of one epoch; stops after the first error.
pub struct Epoch {
    loader: DataLoader,
    state: EpochState,
    done: bool,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let raw = match &mut self.state {
                EpochState::Inline { chunks, epoch } => {
                    let c = chunks.next()?;
                    self.loader.inner.assemble(&c, *epoch)
                }
                EpochState::Prefetch { rx, .. } => match rx.as_ref()?.recv() {
                    Ok(r) => r,
                    Err(_) => return None,
                },
                EpochState::Failed(e) => {
                    self.done = true;
                    return e.take().map(Err);
                }
            };
            match raw {
                // every item of the batch was skipped as corrupt
                Ok(r) if r.indices.is_empty() => continue,
                Ok(r) => return Some(self.loader.to_batch(r)),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        if let EpochState::Prefetch { rx, handle } = &mut self.state {
            // dropping the receiver makes the producer's next send fail
            drop(rx.take());
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataset::Sample;
    use crate::image::Image;

    /// Item i is a 1x2x2 image filled with i, label i % 3; item 5 is corrupt.
    struct Toy(usize);
    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, i: usize) -> Result<Sample> {
            if i == 5 {
                return Err(DataError::Decode {
                    path: "toy/5.jpg".into(),
                    msg: "bad".into(),
                });
            }
            Ok(Sample {
                image: Image::new(1, 2, 2, vec![i as f32; 4])?,
                label: i % 3,
            })
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn channels(&self) -> usize {
            1
        }
        fn image_size(&self) -> Option<(usize, usize)> {
            Some((2, 2))
        }
        fn name(&self) -> String {
            "toy".into()
        }
    }

    fn collect(l: &DataLoader, epoch: u64) -> Result<Vec<Vec<usize>>> {
        l.epoch(epoch).map(|b| b.map(|b| b.indices)).collect()
    }

    #[test]
    fn shuffle_is_seeded_and_independent_of_threads_and_prefetch() {
        let mk = |threads, prefetch| {
            let cfg = LoaderConfig {
                batch_size: 4,
                threads,
                prefetch,
                skip_corrupt: true,
                seed: 11,
                ..Default::default()
            };
            DataLoader::new(Arc::new(Toy(23)), cfg, &Device::Cpu).unwrap()
        };
        let a = collect(&mk(1, 0), 0).unwrap();
        let b = collect(&mk(2, 3), 0).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, collect(&mk(1, 0), 1).unwrap());
        let mut all: Vec<usize> = a.concat();
        all.sort_unstable();
        assert_eq!(all, (0..23).filter(|&i| i != 5).collect::<Vec<_>>());
    }

    #[test]
    fn augmentation_does_not_depend_on_threads() {
        use crate::transforms::{Compose, HorizontalFlip, RandomResizedCrop};
        let ds: Arc<dyn Dataset> = Arc::new(
            crate::SyntheticFlowers::new(
                crate::SyntheticFlowersConfig {
                    train: 24,
                    ..Default::default()
                },
                crate::Split::Train,
            )
            .unwrap(),
        );
        let run = |threads| {
            let cfg = LoaderConfig {
                batch_size: 8,
                threads,
                seed: 3,
                ..Default::default()
            };
            let t = Compose::new()
                .then(RandomResizedCrop::new(16, 16))
                .then(HorizontalFlip::new(0.5));
            let l = DataLoader::new(ds.clone(), cfg, &Device::Cpu)
                .unwrap()
                .with_transform(t)
                .unwrap();
            l.epoch(2)
                .map(|b| {
                    b.unwrap()
                        .images
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(2));
        // two views per item differ from each other but not between runs
        let cfg = LoaderConfig {
            batch_size: 8,
            seed: 3,
            ..Default::default()
        };
        let l = DataLoader::new(ds.clone(), cfg, &Device::Cpu)
            .unwrap()
            .with_views(RandomResizedCrop::new(16, 16), 2)
            .unwrap();
        let b = l.epoch(0).next().unwrap().unwrap();
        assert_eq!(b.views.len(), 2);
        let v0: Vec<f32> = b.views[0].flatten_all().unwrap().to_vec1().unwrap();
        let v1: Vec<f32> = b.views[1].flatten_all().unwrap().to_vec1().unwrap();
        let im: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v0, im);
        assert_ne!(v0, v1);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].len(), 8 * 3 * 16 * 16);
    }

    #[test]
    fn batches_hold_the_right_pixels_and_labels() {
        let cfg = LoaderConfig {
            batch_size: 4,
            shuffle: false,
            drop_last: true,
            skip_corrupt: true,
            ..Default::default()
        };
        let l = DataLoader::new(Arc::new(Toy(10)), cfg, &Device::Cpu).unwrap();
        assert_eq!(l.len(), 2);
        let batches: Vec<Batch> = l.iter().collect::<Result<_>>().unwrap();
        assert_eq!(batches.len(), 2);
        let b = &batches[0];
        assert_eq!(b.images.dims(), &[4, 1, 2, 2]);
        let v: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&v[4..8], &[1.0; 4]);
        assert_eq!(b.labels.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 0]);
        // the second batch lost item 5 (corrupt)
        assert_eq!(batches[1].indices, vec![4, 6, 7]);
        assert_eq!(l.skipped(), 1);
    }

    #[test]
    fn corrupt_items_fail_by_default_and_early_drop_is_clean() {
        let cfg = LoaderConfig {
            batch_size: 2,
            shuffle: false,
            ..Default::default()
        };
        let l = DataLoader::new(Arc::new(Toy(10)), cfg, &Device::Cpu).unwrap();
        let r: Result<Vec<Batch>> = l.iter().collect();
        let e = r.unwrap_err();
        assert!(e.to_string().contains("toy/5.jpg"), "{e}");
        let mut it = l.epoch(0);
        assert!(it.next().is_some());
        drop(it);
        assert!(DataLoader::new(Arc::new(Toy(1)), LoaderConfig::batch(0), &Device::Cpu).is_err());
    }
}
