//! pytorch-fid's InceptionV3 (`pytorch_fid.inception.InceptionV3` with
//! `use_fid_inception=True`, output block 3): the TensorFlow FID network's
//! blocks (`FIDInceptionA`, `C`, `E_1`, `E_2`: average pooling without the
//! padding in the count, max pooling in the last block), 2048-d features
//! after the final average pooling, inputs in `[0, 1]` resized to 299x299
//! (bilinear, `align_corners=False`; or clean-fid's PIL bicubic, [`Resize`])
//! and scaled to `2x - 1`.
//!
//! Weights come from a safetensors file with pytorch-fid's state-dict names
//! (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`, ...,
//! `fc.weight`), made from `pt_inception-2015-12-05-6726825d.pth` by
//! `scripts/gan/convert_inception.py`. A file that lacks any weight, holds
//! one of another shape or holds names the network does not have is refused
//! with the list: partly loaded weights would give a plausible-looking but
//! wrong FID.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kiln_core::ops;
use kiln_core::{DType, Device, Tensor};

use crate::error::{GanError, Result};
use crate::metrics::{Extracted, FeatureExtractor, Features};

/// Where the network's weights come from: `get(name, shape)` gives the
/// tensor called `name` (f32, that shape).
pub trait WeightSource {
    /// The tensor `name` of `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

/// Weights from a map of named tensors that must fill the network exactly.
struct MapSource<'a> {
    map: &'a HashMap<String, Tensor>,
    device: Device,
    problems: Vec<String>,
    seen: Vec<String>,
}

impl WeightSource for MapSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.seen.push(name.to_string());
        match self.map.get(name) {
            Some(t) if t.dims() == shape => Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?),
            Some(t) => {
                self.problems.push(format!(
                    "{name} has shape {:?}, expected {shape:?}",
                    t.dims()
                ));
                Ok(Tensor::zeros(shape, DType::F32, &self.device)?)
            }
            None => {
                self.problems.push(format!("{name} {shape:?} is missing"));
                Ok(Tensor::zeros(shape, DType::F32, &self.device)?)
            }
        }
    }
}

/// Conv (no bias) + batch norm (eps 0.001, running statistics) + ReLU:
/// torchvision's `BasicConv2d` at inference.
#[derive(Debug, Clone)]
struct BasicConv {
    w: Tensor,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor,
    beta: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl BasicConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        src: &mut dyn WeightSource,
        name: &str,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let g = |src: &mut dyn WeightSource, p: &str| src.get(&format!("{name}.bn.{p}"), &[cout]);
        Ok(Self {
            w: src.get(&format!("{name}.conv.weight"), &[cout, cin, k.0, k.1])?,
            gamma: g(src, "weight")?,
            beta: g(src, "bias")?,
            mean: g(src, "running_mean")?,
            var: g(src, "running_var")?,
            stride,
            pad,
        })
    }

    fn sq(
        src: &mut dyn WeightSource,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Result<Self> {
        Self::new(src, name, cin, cout, (k, k), 1, (0, 0))
    }

    fn forward(&self, x: &Tensor) -> R {
        // Square padding goes to the convolution; the 1x7 / 7x1 kernels'
        // one-sided padding is added first.
        let y = if self.pad.0 == self.pad.1 {
            ops::conv2d(x, &self.w, self.stride, self.pad.0, 1, 1)?
        } else {
            let xp = x
                .pad_with_zeros(2, self.pad.0, self.pad.0)?
                .pad_with_zeros(3, self.pad.1, self.pad.1)?;
            ops::conv2d(&xp, &self.w, self.stride, 0, 1, 1)?
        };
        let y = ops::batch_norm(
            &y,
            &self.mean,
            &self.var,
            &self.gamma,
            &self.beta,
            1e-3,
            false,
        )?;
        ops::relu(&y)
    }
}

/// The forward passes' result (candle's).
type R = kiln_core::Result<Tensor>;

/// 3x3 average pooling, stride 1, padding 1, `count_include_pad=False`
/// (what the FID blocks use instead of torchvision's counted padding).
fn avg_pool_3x3_same(x: &Tensor) -> R {
    let (_, _, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let s = ops::avg_pool2d(&xp, 3, 1)?;
    // avg_pool2d divided by 9; rescale each position by 9 / (cells inside).
    let cnt = |i: usize, n: usize| (1 + usize::from(i > 0) + usize::from(i + 1 < n)) as f32;
    let mut f = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            f.push(9.0 / (cnt(i, h) * cnt(j, w)));
        }
    }
    let f = Tensor::from_vec(f, (1, 1, h, w), x.device())?;
    s.broadcast_mul(&f)
}

/// 3x3 max pooling, stride 1, padding 1. Edge replication pads like -inf
/// here: each window already holds the edge value it would repeat.
fn max_pool_3x3_same(x: &Tensor) -> R {
    let xp = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    ops::max_pool2d(&xp, 3, 1)
}

/// One of the mixed blocks.
#[derive(Debug, Clone)]
enum Mixed {
    /// `FIDInceptionA`.
    A(Vec<BasicConv>),
    /// torchvision's `InceptionB`.
    B(Vec<BasicConv>),
    /// `FIDInceptionC`.
    C(Vec<BasicConv>),
    /// torchvision's `InceptionD`.
    D(Vec<BasicConv>),
    /// `FIDInceptionE_1` (average pool) or `_2` (max pool).
    E(Vec<BasicConv>, bool),
}

impl Mixed {
    fn a(s: &mut dyn WeightSource, n: &str, cin: usize, pool: usize) -> Result<Self> {
        let c = |s: &mut dyn WeightSource, b: &str, i, o, k, p| {
            BasicConv::new(s, &format!("{n}.{b}"), i, o, (k, k), 1, (p, p))
        };
        Ok(Mixed::A(vec![
            c(s, "branch1x1", cin, 64, 1, 0)?,
            c(s, "branch5x5_1", cin, 48, 1, 0)?,
            c(s, "branch5x5_2", 48, 64, 5, 2)?,
            c(s, "branch3x3dbl_1", cin, 64, 1, 0)?,
            c(s, "branch3x3dbl_2", 64, 96, 3, 1)?,
            c(s, "branch3x3dbl_3", 96, 96, 3, 1)?,
            c(s, "branch_pool", cin, pool, 1, 0)?,
        ]))
    }

    fn b(s: &mut dyn WeightSource, n: &str, cin: usize) -> Result<Self> {
        let f = |b: &str| format!("{n}.{b}");
        Ok(Mixed::B(vec![
            BasicConv::new(s, &f("branch3x3"), cin, 384, (3, 3), 2, (0, 0))?,
            BasicConv::sq(s, &f("branch3x3dbl_1"), cin, 64, 1)?,
            BasicConv::new(s, &f("branch3x3dbl_2"), 64, 96, (3, 3), 1, (1, 1))?,
            BasicConv::new(s, &f("branch3x3dbl_3"), 96, 96, (3, 3), 2, (0, 0))?,
        ]))
    }

    fn c(s: &mut dyn WeightSource, n: &str, cin: usize, c7: usize) -> Result<Self> {
        let f = |b: &str| format!("{n}.{b}");
        let (k17, p17, k71, p71) = ((1, 7), (0, 3), (7, 1), (3, 0));
        Ok(Mixed::C(vec![
            BasicConv::sq(s, &f("branch1x1"), cin, 192, 1)?,
            BasicConv::sq(s, &f("branch7x7_1"), cin, c7, 1)?,
            BasicConv::new(s, &f("branch7x7_2"), c7, c7, k17, 1, p17)?,
            BasicConv::new(s, &f("branch7x7_3"), c7, 192, k71, 1, p71)?,
            BasicConv::sq(s, &f("branch7x7dbl_1"), cin, c7, 1)?,
            BasicConv::new(s, &f("branch7x7dbl_2"), c7, c7, k71, 1, p71)?,
            BasicConv::new(s, &f("branch7x7dbl_3"), c7, c7, k17, 1, p17)?,
            BasicConv::new(s, &f("branch7x7dbl_4"), c7, c7, k71, 1, p71)?,
            BasicConv::new(s, &f("branch7x7dbl_5"), c7, 192, k17, 1, p17)?,
            BasicConv::sq(s, &f("branch_pool"), cin, 192, 1)?,
        ]))
    }

    fn d(s: &mut dyn WeightSource, n: &str, cin: usize) -> Result<Self> {
        let f = |b: &str| format!("{n}.{b}");
        Ok(Mixed::D(vec![
            BasicConv::sq(s, &f("branch3x3_1"), cin, 192, 1)?,
            BasicConv::new(s, &f("branch3x3_2"), 192, 320, (3, 3), 2, (0, 0))?,
            BasicConv::sq(s, &f("branch7x7x3_1"), cin, 192, 1)?,
            BasicConv::new(s, &f("branch7x7x3_2"), 192, 192, (1, 7), 1, (0, 3))?,
            BasicConv::new(s, &f("branch7x7x3_3"), 192, 192, (7, 1), 1, (3, 0))?,
            BasicConv::new(s, &f("branch7x7x3_4"), 192, 192, (3, 3), 2, (0, 0))?,
        ]))
    }

    fn e(s: &mut dyn WeightSource, n: &str, cin: usize, max_pool: bool) -> Result<Self> {
        let f = |b: &str| format!("{n}.{b}");
        Ok(Mixed::E(
            vec![
                BasicConv::sq(s, &f("branch1x1"), cin, 320, 1)?,
                BasicConv::sq(s, &f("branch3x3_1"), cin, 384, 1)?,
                BasicConv::new(s, &f("branch3x3_2a"), 384, 384, (1, 3), 1, (0, 1))?,
                BasicConv::new(s, &f("branch3x3_2b"), 384, 384, (3, 1), 1, (1, 0))?,
                BasicConv::sq(s, &f("branch3x3dbl_1"), cin, 448, 1)?,
                BasicConv::new(s, &f("branch3x3dbl_2"), 448, 384, (3, 3), 1, (1, 1))?,
                BasicConv::new(s, &f("branch3x3dbl_3a"), 384, 384, (1, 3), 1, (0, 1))?,
                BasicConv::new(s, &f("branch3x3dbl_3b"), 384, 384, (3, 1), 1, (1, 0))?,
                BasicConv::sq(s, &f("branch_pool"), cin, 192, 1)?,
            ],
            max_pool,
        ))
    }

    fn forward(&self, x: &Tensor) -> R {
        let seq = |cs: &[BasicConv], x: &Tensor| -> R {
            let mut y = x.clone();
            for c in cs {
                y = c.forward(&y)?;
            }
            Ok(y)
        };
        match self {
            Mixed::A(c) => Tensor::cat(
                &[
                    c[0].forward(x)?,
                    seq(&c[1..3], x)?,
                    seq(&c[3..6], x)?,
                    c[6].forward(&avg_pool_3x3_same(x)?)?,
                ],
                1,
            ),
            Mixed::B(c) => Tensor::cat(
                &[
                    c[0].forward(x)?,
                    seq(&c[1..4], x)?,
                    ops::max_pool2d(x, 3, 2)?,
                ],
                1,
            ),
            Mixed::C(c) => Tensor::cat(
                &[
                    c[0].forward(x)?,
                    seq(&c[1..4], x)?,
                    seq(&c[4..9], x)?,
                    c[9].forward(&avg_pool_3x3_same(x)?)?,
                ],
                1,
            ),
            Mixed::D(c) => Tensor::cat(
                &[
                    seq(&c[0..2], x)?,
                    seq(&c[2..6], x)?,
                    ops::max_pool2d(x, 3, 2)?,
                ],
                1,
            ),
            Mixed::E(c, max_pool) => {
                let b3 = c[1].forward(x)?;
                let b3 = Tensor::cat(&[c[2].forward(&b3)?, c[3].forward(&b3)?], 1)?;
                let bd = seq(&c[4..6], x)?;
                let bd = Tensor::cat(&[c[6].forward(&bd)?, c[7].forward(&bd)?], 1)?;
                let pooled = match max_pool {
                    true => max_pool_3x3_same(x)?,
                    false => avg_pool_3x3_same(x)?,
                };
                Tensor::cat(&[c[0].forward(x)?, b3, bd, c[8].forward(&pooled)?], 1)
            }
        }
    }
}

/// How images reach 299x299.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resize {
    /// pytorch-fid's `F.interpolate(mode="bilinear", align_corners=False)`
    /// (no antialiasing): the default.
    #[default]
    Bilinear,
    /// clean-fid's `mode="clean"` resize: each channel of the image in
    /// `[0, 255]` as a PIL float image (`mode="F"`) resized with
    /// `Image.BICUBIC` (antialiased when shrinking), clipped to `[0, 255]`
    /// and divided by 255 ([`resize_clean`]). clean-fid pairs it with the
    /// TensorFlow Inception graph; here it feeds pytorch-fid's network.
    Clean,
}

impl Resize {
    /// The name used in reports and on the command line: `pytorch-fid` or `clean`.
    pub fn name(self) -> &'static str {
        match self {
            Resize::Bilinear => "pytorch-fid",
            Resize::Clean => "clean",
        }
    }

    /// What the resize does, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Resize::Bilinear => "pytorch-fid resize: bilinear, align_corners=False",
            Resize::Clean => "clean-fid resize: PIL bicubic on float channels",
        }
    }

    /// `x` `[B, C, H, W]` in `[0, 1]` resized to `h x w` this way.
    pub fn apply(self, x: &Tensor, h: usize, w: usize) -> R {
        match self {
            Resize::Bilinear => resize_bilinear(x, h, w),
            Resize::Clean => resize_clean(x, h, w),
        }
    }
}

impl std::str::FromStr for Resize {
    type Err = GanError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pytorch-fid" | "bilinear" => Ok(Resize::Bilinear),
            "clean" | "clean-fid" => Ok(Resize::Clean),
            other => Err(GanError::Metric(format!(
                "resize `{other}`: expected `pytorch-fid` (bilinear, align_corners=False) \
                 or `clean` (clean-fid's PIL bicubic)"
            ))),
        }
    }
}

impl std::fmt::Display for Resize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The names of the network's parts, in order, for [`InceptionV3::forward_part`].
pub const PARTS: [&str; 14] = [
    "block0", "block1", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
    "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "pool",
];

/// pytorch-fid's FID InceptionV3 up to the 2048-d pool features, and the
/// 1008-way classifier's weight for the Inception Score.
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    block0: [BasicConv; 3],
    block1: [BasicConv; 2],
    mixed: Vec<Mixed>,
    fc: Tensor,
    hash: String,
    device: Device,
    resize: Resize,
}

impl InceptionV3 {
    /// The network with weights from `src`.
    pub fn from_source(src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        let s = src;
        let block0 = [
            BasicConv::new(s, "Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0))?,
            BasicConv::sq(s, "Conv2d_2a_3x3", 32, 32, 3)?,
            BasicConv::new(s, "Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1))?,
        ];
        let block1 = [
            BasicConv::sq(s, "Conv2d_3b_1x1", 64, 80, 1)?,
            BasicConv::sq(s, "Conv2d_4a_3x3", 80, 192, 3)?,
        ];
        let mixed = vec![
            Mixed::a(s, "Mixed_5b", 192, 32)?,
            Mixed::a(s, "Mixed_5c", 256, 64)?,
            Mixed::a(s, "Mixed_5d", 288, 64)?,
            Mixed::b(s, "Mixed_6a", 288)?,
            Mixed::c(s, "Mixed_6b", 768, 128)?,
            Mixed::c(s, "Mixed_6c", 768, 160)?,
            Mixed::c(s, "Mixed_6d", 768, 160)?,
            Mixed::c(s, "Mixed_6e", 768, 192)?,
            Mixed::d(s, "Mixed_7a", 768)?,
            Mixed::e(s, "Mixed_7b", 1280, false)?,
            Mixed::e(s, "Mixed_7c", 2048, true)?,
        ];
        let fc = s.get("fc.weight", &[1008, 2048])?;
        // pytorch-fid's state dict has the bias too; the logits for the
        // Inception Score leave it out (torch-fidelity's `logits_unbiased`,
        // which torchmetrics uses), but the file must still hold it.
        let _ = s.get("fc.bias", &[1008])?;
        let mut net = Self {
            block0,
            block1,
            mixed,
            fc: fc.t()?.contiguous()?,
            hash: String::new(),
            device: device.clone(),
            resize: Resize::Bilinear,
        };
        net.hash = net.weights_hash()?;
        Ok(net)
    }

    /// The network from named tensors, refusing any that are missing, of
    /// another shape, or unknown (`num_batches_tracked` is ignored).
    pub fn from_tensors(map: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let mut src = MapSource {
            map,
            device: device.clone(),
            problems: Vec::new(),
            seen: Vec::new(),
        };
        let net = Self::from_source(&mut src, device)?;
        let mut extra: Vec<&String> = map
            .keys()
            .filter(|k| !k.ends_with("num_batches_tracked") && !src.seen.contains(k))
            .collect();
        extra.sort();
        src.problems.extend(
            extra
                .iter()
                .map(|k| format!("{k} is not a weight of the network")),
        );
        if src.problems.is_empty() {
            return Ok(net);
        }
        let n = src.problems.len();
        let shown: Vec<&str> = src.problems.iter().take(8).map(String::as_str).collect();
        Err(GanError::Metric(format!(
            "{n} problem(s) with the InceptionV3 weights: {}{}",
            shown.join("; "),
            if n > 8 {
                format!("; and {} more", n - 8)
            } else {
                String::new()
            }
        )))
    }

    /// The network from a safetensors file made by
    /// `scripts/gan/convert_inception.py`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = kiln_core::candle::safetensors::load(path, &Device::Cpu).map_err(|e| {
            GanError::Metric(format!(
                "InceptionV3 weights {}: cannot read a safetensors file ({e})",
                path.display()
            ))
        })?;
        Self::from_tensors(&map, device).map_err(|e| match e {
            GanError::Metric(m) => GanError::Metric(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Every weight name and shape the network needs, in order.
    pub fn weight_shapes() -> Result<BTreeMap<String, Vec<usize>>> {
        struct Shapes(BTreeMap<String, Vec<usize>>);
        impl WeightSource for Shapes {
            fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
                self.0.insert(name.to_string(), shape.to_vec());
                Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?)
            }
        }
        let mut s = Shapes(BTreeMap::new());
        // The builder only records the names here; its tensors are placeholders.
        let _ = Self::from_source(&mut s, &Device::Cpu);
        Ok(s.0)
    }

    /// FNV-1a (64-bit) over every weight's bits in order: names the
    /// extractor in caches and reports.
    fn weights_hash(&self) -> Result<String> {
        let mut h = crate::eval::Fnv::default();
        let mut eat = |t: &Tensor| -> Result<()> {
            h.f32s(&t.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        };
        let convs = self
            .block0
            .iter()
            .chain(&self.block1)
            .chain(self.mixed.iter().flat_map(|m| match m {
                Mixed::A(c) | Mixed::B(c) | Mixed::C(c) | Mixed::D(c) | Mixed::E(c, _) => c.iter(),
            }));
        for c in convs {
            for t in [&c.w, &c.gamma, &c.beta, &c.mean, &c.var] {
                eat(t)?;
            }
        }
        eat(&self.fc)?;
        Ok(h.hex())
    }

    /// Runs one part ([`PARTS`]) on its input: `block0` takes the scaled
    /// 299x299 image, `pool` the last block's map.
    pub fn forward_part(&self, part: &str, x: &Tensor) -> R {
        match part {
            "block0" => {
                let mut y = x.clone();
                for c in &self.block0 {
                    y = c.forward(&y)?;
                }
                ops::max_pool2d(&y, 3, 2)
            }
            "block1" => {
                let y = self.block1[1].forward(&self.block1[0].forward(x)?)?;
                ops::max_pool2d(&y, 3, 2)
            }
            "pool" => x.mean(3)?.mean(2),
            p => match PARTS[2..13].iter().position(|q| *q == p) {
                Some(i) => self.mixed[i].forward(x),
                None => kiln_core::candle::bail!("InceptionV3 has no part {p}"),
            },
        }
    }

    /// The network resizing its inputs with `resize` (default
    /// [`Resize::Bilinear`], pytorch-fid's). The resize is part of the
    /// extractor's name and hash, so cached reference features made with
    /// one resize are never read for the other.
    pub fn with_resize(mut self, resize: Resize) -> Self {
        self.resize = resize;
        self
    }

    /// The resize in use.
    pub fn resize(&self) -> Resize {
        self.resize
    }

    /// pytorch-fid's input transform: resize to 299x299 of `[B, 3, H, W]` in
    /// `[0, 1]` (bilinear with `align_corners=False` by default, see
    /// [`InceptionV3::with_resize`]), then `2x - 1`.
    pub fn preprocess(&self, images: &Tensor) -> R {
        let x = self.resize.apply(images, 299, 299)?;
        (x * 2.0)? - 1.0
    }

    /// The 2048-d pool features `[B, 2048]` and the classifier's logits
    /// without bias `[B, 1008]` of images `[B, 3, H, W]` in `[0, 1]`.
    pub fn features(&self, images: &Tensor) -> kiln_core::Result<(Tensor, Tensor)> {
        let mut x = self.preprocess(&images.to_device(&self.device)?.to_dtype(DType::F32)?)?;
        for p in &PARTS {
            x = self.forward_part(p, &x)?;
        }
        let logits = x.matmul(&self.fc)?;
        Ok((x, logits))
    }
}

impl FeatureExtractor for InceptionV3 {
    fn name(&self) -> String {
        format!(
            "pytorch-fid InceptionV3 (pool3, 2048-d; {} to 299)",
            self.resize.describe()
        )
    }

    fn hash(&self) -> String {
        match self.resize {
            // The pytorch-fid resize keeps the hash of the weights alone, as
            // before the option existed, so existing caches stay valid.
            Resize::Bilinear => self.hash.clone(),
            Resize::Clean => {
                let mut h = crate::eval::Fnv::default();
                h.bytes(self.hash.as_bytes());
                h.bytes(b"resize=clean");
                h.hex()
            }
        }
    }

    fn dim(&self) -> usize {
        2048
    }

    fn extract(&self, images: &Tensor) -> Result<Extracted> {
        let (f, l) = self.features(images)?;
        Ok(Extracted {
            features: Features::from_tensor(&f)?,
            logits: Some(Features::from_tensor(&l)?),
        })
    }
}

/// The `[out, inp]` matrix of PyTorch's bilinear interpolation along one axis
/// with `align_corners=False`: source `(i + 0.5) * inp / out - 0.5`, clamped
/// below at 0, between its floor and the next index (clamped to the edge).
fn interp_matrix(inp: usize, out: usize) -> Vec<f32> {
    let scale = inp as f32 / out as f32;
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l1 = src - i0 as f32;
        m[i * inp + i0] += 1.0 - l1;
        m[i * inp + i1] += l1;
    }
    m
}

/// Bilinear resize of `[B, C, H, W]` to `[B, C, h, w]` as
/// `F.interpolate(mode="bilinear", align_corners=False)`, as two matrix
/// products (rows, then columns). The same size is returned unchanged, as
/// PyTorch's identity interpolation does.
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> R {
    let (b, c, hi, wi) = x.dims4()?;
    if (hi, wi) == (h, w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let rh = Tensor::from_vec(interp_matrix(hi, h), (h, hi), dev)?;
    let rw = Tensor::from_vec(interp_matrix(wi, w), (w, wi), dev)?.t()?;
    // [B*C*H, W] x [W, w] -> [B*C, H, w]; then [h, H] x each [H, w].
    let y = x
        .reshape((b * c * hi, wi))?
        .matmul(&rw)?
        .reshape((b * c, hi, w))?;
    let y = rh
        .unsqueeze(0)?
        .broadcast_as((b * c, h, hi))?
        .contiguous()?
        .matmul(&y)?;
    y.reshape((b, c, h, w))
}

/// PIL's bicubic filter (`a = -0.5`, support 2), as in Pillow's `Resample.c`.
fn pil_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One axis of Pillow's resampling (`precompute_coeffs` in `Resample.c`):
/// for each output index, the first input index and the normalised f64
/// weights. The filter's support is widened by the scale when shrinking
/// (antialiasing); the window is rounded as Pillow rounds it (`(int)(v + 0.5)`,
/// truncating) and clamped to the image.
fn pil_coeffs(inp: usize, out: usize) -> Vec<(usize, Vec<f64>)> {
    const SUPPORT: f64 = 2.0;
    let scale = inp as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; negatives clamp to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, inp as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| pil_bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            (xmin, k)
        })
        .collect()
}

/// Pillow's `Image.resize((w, h), Image.BICUBIC)` of one float (`mode="F"`)
/// plane of `ih x iw` values, row-major: the horizontal pass, then the
/// vertical one, each summing in f64 and storing f32 (Pillow's 32-bit float
/// path). A plane already of the target size is returned unchanged, as Pillow
/// does.
pub fn pil_bicubic_plane(src: &[f32], ih: usize, iw: usize, h: usize, w: usize) -> Vec<f32> {
    if (ih, iw) == (h, w) {
        return src.to_vec();
    }
    // Resamples each of `rows` contiguous lines of `inp` values to `out`.
    let pass = |src: &[f32], rows: usize, inp: usize, out: usize| {
        let k = pil_coeffs(inp, out);
        let mut dst = vec![0f32; rows * out];
        for r in 0..rows {
            let line = &src[r * inp..(r + 1) * inp];
            for (o, (start, ws)) in dst[r * out..(r + 1) * out].iter_mut().zip(&k) {
                let mut s = 0f64;
                for (v, wk) in line[*start..].iter().zip(ws) {
                    s += f64::from(*v) * wk;
                }
                *o = s as f32;
            }
        }
        dst
    };
    // Horizontal (skipped when the width already matches, as Pillow skips it).
    let hz = if iw != w {
        pass(src, ih, iw, w)
    } else {
        src.to_vec()
    };
    if ih == h {
        return hz;
    }
    // Vertical: transpose, resample rows, transpose back.
    let mut t = vec![0f32; ih * w];
    for y in 0..ih {
        for x in 0..w {
            t[x * ih + y] = hz[y * w + x];
        }
    }
    let vt = pass(&t, w, ih, h);
    let mut out = vec![0f32; h * w];
    for x in 0..w {
        for y in 0..h {
            out[y * w + x] = vt[x * h + y];
        }
    }
    out
}

/// clean-fid's `mode="clean"` resize of `[B, C, H, W]` in `[0, 1]` to
/// `[B, C, h, w]` in `[0, 1]`: each plane times 255 goes through
/// [`pil_bicubic_plane`] (clean-fid's `Image.fromarray(ch, mode="F")
/// .resize((w, h), Image.BICUBIC)`), is clipped to `[0, 255]` and divided by
/// 255 (clean-fid's `model(x / 255)`). The planes are resized on the CPU.
pub fn resize_clean(x: &Tensor, h: usize, w: usize) -> R {
    let (b, c, hi, wi) = x.dims4()?;
    let data = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = hi * wi;
    let mut out = Vec::with_capacity(b * c * h * w);
    for p in 0..b * c {
        let src: Vec<f32> = data[p * plane..(p + 1) * plane]
            .iter()
            .map(|v| v * 255.0)
            .collect();
        out.extend(
            pil_bicubic_plane(&src, hi, wi, h, w)
                .into_iter()
                .map(|v| v.clamp(0.0, 255.0) / 255.0),
        );
    }
    Tensor::from_vec(out, (b, c, h, w), x.device())
}

/// Random weights from a seed (He-uniform convolutions, batch norm near the
/// identity) for benchmarks, whose speed does not depend on the values.
/// Features from them mean nothing.
#[derive(Debug)]
pub struct RandomWeights {
    rng: kiln_core::rng::SeededRng,
    device: Device,
}

impl RandomWeights {
    /// Weights drawn from `seed` on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: kiln_core::rng::SeededRng::new(seed),
            device: device.clone(),
        }
    }
}

impl WeightSource for RandomWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (lo, hi) = if name.ends_with("conv.weight") || name == "fc.weight" {
            let b = (6.0 / shape[1..].iter().product::<usize>().max(1) as f64).sqrt();
            (-b, b)
        } else if name.ends_with("bn.weight") || name.ends_with("running_var") {
            (0.5, 1.5)
        } else {
            (-0.2, 0.2)
        };
        Ok(self
            .rng
            .uniform(shape.to_vec(), lo as f32, hi as f32, &self.device)?)
    }
}
