//! Image transforms: resize (bilinear/area), crops, flips, colour jitter,
//! grayscale, gaussian blur, normalize; composable and seeded.
//!
//! A transform takes an [`Image`] and a [`SeededRng`]; the
//! [`DataLoader`](crate::DataLoader) gives every item its own generator derived
//! from the loader seed, the epoch and the index, so augmentation is the same
//! whatever the number of threads.
//!
//! ```
//! use kiln_core::rng::SeededRng;
//! use kiln_data::image::Image;
//! use kiln_data::transforms::*;
//! let t = Compose::new()
//!     .then(RandomResizedCrop::new(24, 24))
//!     .then(HorizontalFlip::new(0.5))
//!     .then(ColorJitter::new(0.4, 0.4, 0.4, 0.1));
//! let img = Image::zeros(3, 32, 32);
//! let out = t.apply(img, &mut SeededRng::new(0)).unwrap();
//! assert_eq!(out.shape(), [3, 24, 24]);
//! ```

use std::sync::Arc;

use kiln_core::rng::SeededRng;

use crate::error::{DataError, Result};
use crate::image::Image;

/// An image-to-image function, possibly random.
pub trait Transform: Send + Sync {
    /// Applies the transform, drawing any randomness from `rng`.
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image>;
}

impl<F> Transform for F
where
    F: Fn(Image, &mut SeededRng) -> Result<Image> + Send + Sync,
{
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        self(img, rng)
    }
}

impl Transform for Arc<dyn Transform> {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        (**self).apply(img, rng)
    }
}

/// Transforms applied in order.
#[derive(Default, Clone)]
pub struct Compose {
    steps: Vec<Arc<dyn Transform>>,
}

impl Compose {
    /// An empty pipeline (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a step.
    pub fn then(mut self, t: impl Transform + 'static) -> Self {
        self.steps.push(Arc::new(t));
        self
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

impl Transform for Compose {
    fn apply(&self, mut img: Image, rng: &mut SeededRng) -> Result<Image> {
        for s in &self.steps {
            img = s.apply(img, rng)?;
        }
        Ok(img)
    }
}

/// Applies `inner` with probability `p` (torchvision's `RandomApply`).
pub struct RandomApply<T> {
    inner: T,
    p: f64,
}

impl<T: Transform> RandomApply<T> {
    /// `inner` with probability `p`.
    pub fn new(inner: T, p: f64) -> Self {
        Self { inner, p }
    }
}

impl<T: Transform> Transform for RandomApply<T> {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        if rng.bernoulli(self.p) {
            self.inner.apply(img, rng)
        } else {
            Ok(img)
        }
    }
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filter {
    /// Bilinear (triangle) filter, widened when shrinking so it averages like
    /// PIL's antialiased `BILINEAR` (torchvision's `Resize` on PIL images).
    #[default]
    Bilinear,
    /// Exact area averaging (OpenCV's `INTER_AREA` when shrinking).
    Area,
}

/// One axis of a separable resampling: for each output index, the first input
/// index and the weights.
fn axis_weights(in_len: usize, out_len: usize, filter: Filter) -> Vec<(usize, Vec<f32>)> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|o| match filter {
            Filter::Area if scale >= 1.0 => {
                let lo = o as f64 * scale;
                let hi = lo + scale;
                let start = lo.floor() as usize;
                let end = (hi.ceil() as usize).min(in_len);
                let w: Vec<f32> = (start..end)
                    .map(|j| {
                        let a = (j as f64).max(lo);
                        let b = ((j + 1) as f64).min(hi);
                        ((b - a).max(0.0) / scale) as f32
                    })
                    .collect();
                (start, w)
            }
            _ => {
                // triangle filter, support widened by the scale when shrinking
                let support = scale.max(1.0);
                let center = (o as f64 + 0.5) * scale;
                let start = (center - support).floor().max(0.0) as usize;
                let end = ((center + support).ceil() as usize).min(in_len);
                let mut w: Vec<f64> = (start..end)
                    .map(|j| {
                        let d = ((j as f64 + 0.5) - center).abs() / support;
                        (1.0 - d).max(0.0)
                    })
                    .collect();
                let sum: f64 = w.iter().sum();
                if sum > 0.0 {
                    w.iter_mut().for_each(|x| *x /= sum);
                }
                (start, w.into_iter().map(|x| x as f32).collect())
            }
        })
        .collect()
}

/// Resizes `img` to `height x width`.
pub fn resize(img: &Image, height: usize, width: usize, filter: Filter) -> Result<Image> {
    if height == 0 || width == 0 {
        return Err(DataError::config(
            "resize",
            format!("target size must be positive, found {height}x{width}"),
        ));
    }
    if img.height == 0 || img.width == 0 {
        return Err(DataError::config(
            "resize",
            format!("cannot resize an empty {}x{} image", img.height, img.width),
        ));
    }
    if img.height == height && img.width == width {
        return Ok(img.clone());
    }
    let (c, ih, iw) = (img.channels, img.height, img.width);
    let wx = axis_weights(iw, width, filter);
    let wy = axis_weights(ih, height, filter);
    // horizontal pass: [C, ih, width]
    let mut tmp = vec![0.0f32; c * ih * width];
    for ch in 0..c {
        for y in 0..ih {
            let row = &img.data[(ch * ih + y) * iw..(ch * ih + y + 1) * iw];
            let out = &mut tmp[(ch * ih + y) * width..(ch * ih + y + 1) * width];
            for (o, (start, w)) in out.iter_mut().zip(&wx) {
                *o = w.iter().zip(&row[*start..]).map(|(a, b)| a * b).sum();
            }
        }
    }
    // vertical pass
    let mut data = vec![0.0f32; c * height * width];
    for ch in 0..c {
        for (oy, (start, w)) in wy.iter().enumerate() {
            let out = &mut data[(ch * height + oy) * width..(ch * height + oy + 1) * width];
            for (k, &wk) in w.iter().enumerate() {
                let src = &tmp[(ch * ih + start + k) * width..(ch * ih + start + k + 1) * width];
                for (o, s) in out.iter_mut().zip(src) {
                    *o += wk * s;
                }
            }
        }
    }
    Ok(Image {
        channels: c,
        height,
        width,
        data,
    })
}

/// Crops the rectangle at `(top, left)` of size `height x width`.
pub fn crop(img: &Image, top: usize, left: usize, height: usize, width: usize) -> Result<Image> {
    if top + height > img.height || left + width > img.width || height == 0 || width == 0 {
        return Err(DataError::config(
            "crop",
            format!(
                "rectangle {height}x{width} at ({top}, {left}) does not fit in a {}x{} image",
                img.height, img.width
            ),
        ));
    }
    let mut data = Vec::with_capacity(img.channels * height * width);
    for ch in 0..img.channels {
        for y in top..top + height {
            let s = (ch * img.height + y) * img.width + left;
            data.extend_from_slice(&img.data[s..s + width]);
        }
    }
    Ok(Image {
        channels: img.channels,
        height,
        width,
        data,
    })
}

/// Resize to a fixed size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resize {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// Filter.
    pub filter: Filter,
}

impl Resize {
    /// Bilinear resize to `height x width`.
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            filter: Filter::Bilinear,
        }
    }
    /// The same with another filter.
    pub fn with_filter(self, filter: Filter) -> Self {
        Self { filter, ..self }
    }
}

impl Transform for Resize {
    fn apply(&self, img: Image, _rng: &mut SeededRng) -> Result<Image> {
        resize(&img, self.height, self.width, self.filter)
    }
}

/// Crops the centre (padding is not supported: the image must be at least as large).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CenterCrop {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
}

impl CenterCrop {
    /// A `height x width` centre crop.
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width }
    }
}

impl Transform for CenterCrop {
    fn apply(&self, img: Image, _rng: &mut SeededRng) -> Result<Image> {
        let top = img.height.saturating_sub(self.height) / 2;
        let left = img.width.saturating_sub(self.width) / 2;
        crop(&img, top, left, self.height, self.width)
    }
}

/// torchvision's `RandomResizedCrop`: a crop of random area fraction (`scale`)
/// and aspect ratio (`ratio`, log-uniform), resized to the output size; after
/// 10 failed tries, a centre crop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCrop {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// Range of the crop's area as a fraction of the image. Default (0.08, 1).
    pub scale: (f32, f32),
    /// Range of the crop's width/height. Default (3/4, 4/3).
    pub ratio: (f32, f32),
    /// Filter of the resize.
    pub filter: Filter,
}

impl RandomResizedCrop {
    /// torchvision's defaults, output `height x width`.
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            filter: Filter::Bilinear,
        }
    }
    /// The same with another area range.
    pub fn with_scale(self, lo: f32, hi: f32) -> Self {
        Self {
            scale: (lo, hi),
            ..self
        }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        let (h, w) = (img.height as f32, img.width as f32);
        let area = h * w;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.uniform_f32(self.scale.0, self.scale.1);
            let ar = rng.uniform_f32(lr0, lr1).exp();
            let cw = (target * ar).sqrt().round() as usize;
            let ch = (target / ar).sqrt().round() as usize;
            if cw > 0 && ch > 0 && cw <= img.width && ch <= img.height {
                let top = rng.below(img.height - ch + 1);
                let left = rng.below(img.width - cw + 1);
                let c = crop(&img, top, left, ch, cw)?;
                return resize(&c, self.height, self.width, self.filter);
            }
        }
        // fallback: centre crop at the nearest allowed ratio
        let in_ratio = w / h;
        let (cw, ch) = if in_ratio < self.ratio.0 {
            (
                img.width,
                ((w / self.ratio.0).round() as usize).min(img.height),
            )
        } else if in_ratio > self.ratio.1 {
            (
                ((h * self.ratio.1).round() as usize).min(img.width),
                img.height,
            )
        } else {
            (img.width, img.height)
        };
        let c = crop(
            &img,
            (img.height - ch) / 2,
            (img.width - cw) / 2,
            ch.max(1),
            cw.max(1),
        )?;
        resize(&c, self.height, self.width, self.filter)
    }
}

/// Mirrors left-right with probability `p`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HorizontalFlip {
    /// Probability of flipping.
    pub p: f64,
}

impl HorizontalFlip {
    /// Flip with probability `p`.
    pub fn new(p: f64) -> Self {
        Self { p }
    }
}

/// Mirrors an image left-right.
pub fn hflip(mut img: Image) -> Image {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w.max(1)) {
        row.reverse();
    }
    img
}

impl Transform for HorizontalFlip {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        Ok(if rng.bernoulli(self.p) {
            hflip(img)
        } else {
            img
        })
    }
}

/// torchvision's `ColorJitter`: brightness, contrast and saturation factors
/// uniform in `[max(0, 1 - x), 1 + x]`, hue shift uniform in `[-hue, hue]`
/// (at most 0.5), applied in a random order. Needs 3 channels (brightness and
/// contrast also work on 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColorJitter {
    /// Brightness strength.
    pub brightness: f32,
    /// Contrast strength.
    pub contrast: f32,
    /// Saturation strength.
    pub saturation: f32,
    /// Hue strength (at most 0.5).
    pub hue: f32,
}

impl ColorJitter {
    /// Jitter with the given strengths.
    pub fn new(brightness: f32, contrast: f32, saturation: f32, hue: f32) -> Self {
        Self {
            brightness,
            contrast,
            saturation,
            hue: hue.clamp(0.0, 0.5),
        }
    }
}

fn blend(img: &mut Image, other: &[f32], factor: f32) {
    for (a, b) in img.data.iter_mut().zip(other.iter().cycle()) {
        *a = (factor * *a + (1.0 - factor) * b).clamp(0.0, 1.0);
    }
}

fn gray_plane(img: &Image) -> Vec<f32> {
    if img.channels == 3 {
        img.clone().to_gray().data
    } else {
        img.plane(0).to_vec()
    }
}

fn shift_hue(img: &mut Image, shift: f32) {
    if img.channels != 3 {
        return;
    }
    let n = img.height * img.width;
    for i in 0..n {
        let rgb = [img.data[i], img.data[n + i], img.data[2 * n + i]];
        let mut hsv = rgb_to_hsv(rgb);
        hsv[0] = (hsv[0] + shift).rem_euclid(1.0);
        let out = crate::color::hsv_to_rgb(hsv);
        img.data[i] = out[0];
        img.data[n + i] = out[1];
        img.data[2 * n + i] = out[2];
    }
}

fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d <= 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    let s = if max <= 0.0 { 0.0 } else { d / max };
    [h, s, max]
}

impl Transform for ColorJitter {
    fn apply(&self, mut img: Image, rng: &mut SeededRng) -> Result<Image> {
        let mut order = [0usize, 1, 2, 3];
        rng.shuffle(&mut order);
        for op in order {
            match op {
                0 if self.brightness > 0.0 => {
                    let f =
                        rng.uniform_f32((1.0 - self.brightness).max(0.0), 1.0 + self.brightness);
                    blend(&mut img, &[0.0], f);
                }
                1 if self.contrast > 0.0 => {
                    let f = rng.uniform_f32((1.0 - self.contrast).max(0.0), 1.0 + self.contrast);
                    let g = gray_plane(&img);
                    let mean = g.iter().sum::<f32>() / g.len().max(1) as f32;
                    blend(&mut img, &[mean], f);
                }
                2 if self.saturation > 0.0 && img.channels == 3 => {
                    let f =
                        rng.uniform_f32((1.0 - self.saturation).max(0.0), 1.0 + self.saturation);
                    let g = gray_plane(&img);
                    blend(&mut img, &g, f);
                }
                3 if self.hue > 0.0 => {
                    let s = rng.uniform_f32(-self.hue, self.hue);
                    shift_hue(&mut img, s);
                }
                _ => {}
            }
        }
        Ok(img)
    }
}

/// Converts to grayscale (luma), with `channels` (1 or 3) output channels,
/// with probability `p` (1 for a plain conversion).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grayscale {
    /// Output channels: 1, or 3 (luma replicated).
    pub channels: usize,
    /// Probability of converting.
    pub p: f64,
}

impl Grayscale {
    /// Always converts, to `channels` channels.
    pub fn new(channels: usize) -> Self {
        Self { channels, p: 1.0 }
    }
    /// torchvision's `RandomGrayscale(p)`: keeps the channel count.
    pub fn random(p: f64) -> Self {
        Self { channels: 0, p }
    }
}

impl Transform for Grayscale {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        if self.p < 1.0 && !rng.bernoulli(self.p) {
            return Ok(img);
        }
        let keep = img.channels;
        let g = img.to_gray();
        let out = match self.channels {
            0 if keep == 3 => g.to_rgb(),
            0 | 1 => g,
            3 => g.to_rgb(),
            c => {
                return Err(DataError::config(
                    "grayscale channels",
                    format!("expected 1 or 3, found {c}"),
                ))
            }
        };
        Ok(out)
    }
}

/// Converts 1-channel images to 3 channels (replicating); RGB passes through.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ToRgb;

impl Transform for ToRgb {
    fn apply(&self, img: Image, _rng: &mut SeededRng) -> Result<Image> {
        Ok(img.to_rgb())
    }
}

/// Gaussian blur with an odd `kernel_size` and a sigma uniform in `sigma`
/// (torchvision's `GaussianBlur`; borders reflect).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianBlur {
    /// Odd kernel size.
    pub kernel_size: usize,
    /// Range of sigma.
    pub sigma: (f32, f32),
}

impl GaussianBlur {
    /// A blur of `kernel_size` with sigma in `[lo, hi]`.
    pub fn new(kernel_size: usize, lo: f32, hi: f32) -> Self {
        Self {
            kernel_size,
            sigma: (lo, hi),
        }
    }
}

fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m >= n { period - m } else { m }) as usize
}

/// Blurs with a gaussian of standard deviation `sigma` and `kernel_size` taps.
pub fn gaussian_blur(img: &Image, kernel_size: usize, sigma: f32) -> Result<Image> {
    if kernel_size.is_multiple_of(2) || kernel_size == 0 {
        return Err(DataError::config(
            "blur kernel_size",
            format!("expected an odd positive size, found {kernel_size}"),
        ));
    }
    let r = (kernel_size / 2) as isize;
    let sigma = sigma.max(1e-3);
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|x| *x /= s);
    let (c, h, w) = (img.channels, img.height, img.width);
    let mut tmp = vec![0.0f32; img.data.len()];
    for ch in 0..c {
        for y in 0..h {
            let row = &img.data[(ch * h + y) * w..(ch * h + y + 1) * w];
            for x in 0..w {
                tmp[(ch * h + y) * w + x] = k
                    .iter()
                    .enumerate()
                    .map(|(j, kv)| kv * row[reflect(x as isize + j as isize - r, w)])
                    .sum();
            }
        }
    }
    let mut data = vec![0.0f32; img.data.len()];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                data[(ch * h + y) * w + x] = k
                    .iter()
                    .enumerate()
                    .map(|(j, kv)| {
                        kv * tmp[(ch * h + reflect(y as isize + j as isize - r, h)) * w + x]
                    })
                    .sum();
            }
        }
    }
    Ok(Image {
        channels: c,
        height: h,
        width: w,
        data,
    })
}

impl Transform for GaussianBlur {
    fn apply(&self, img: Image, rng: &mut SeededRng) -> Result<Image> {
        let s = rng.uniform_f32(self.sigma.0, self.sigma.1.max(self.sigma.0));
        gaussian_blur(&img, self.kernel_size, s)
    }
}

/// `(x - mean[c]) / std[c]` per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Normalize {
    /// Per-channel mean and std (same length as the image's channels).
    pub fn new(mean: &[f32], std: &[f32]) -> Self {
        Self {
            mean: mean.to_vec(),
            std: std.to_vec(),
        }
    }
    /// The ImageNet statistics torchvision models use.
    pub fn imagenet() -> Self {
        Self::new(&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225])
    }
}

impl Transform for Normalize {
    fn apply(&self, mut img: Image, _rng: &mut SeededRng) -> Result<Image> {
        if self.mean.len() != img.channels || self.std.len() != img.channels {
            return Err(DataError::config(
                "normalize",
                format!(
                    "mean/std have {}/{} values, expected one per channel ({})",
                    self.mean.len(),
                    self.std.len(),
                    img.channels
                ),
            ));
        }
        if let Some(s) = self.std.iter().find(|s| **s <= 0.0) {
            return Err(DataError::config(
                "normalize std",
                format!("must be positive, found {s}"),
            ));
        }
        let n = img.height * img.width;
        for c in 0..img.channels {
            let (m, s) = (self.mean[c], self.std[c]);
            for v in &mut img.data[c * n..(c + 1) * n] {
                *v = (*v - m) / s;
            }
        }
        Ok(img)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Image {
        let data = (0..c * h * w).map(|i| (i % w) as f32 / w as f32).collect();
        Image::new(c, h, w, data).unwrap()
    }

    #[test]
    fn area_resize_averages_blocks_exactly() {
        // 4x4 -> 2x2: each output is the mean of a 2x2 block
        let img = Image::new(1, 4, 4, (0..16).map(|v| v as f32).collect()).unwrap();
        let out = resize(&img, 2, 2, Filter::Area).unwrap();
        assert_eq!(out.data, vec![2.5, 4.5, 10.5, 12.5]);
        // antialiased bilinear with a 2x shrink (PIL's taps): per axis output 0
        // takes inputs 0,1,2 with weights 3/7,3/7,1/7 and output 1 takes 1,2,3
        // with 1/7,3/7,3/7, so the 1-D profile [0,1,2,3] becomes [5/7, 16/7].
        let b = resize(&img, 2, 2, Filter::Bilinear).unwrap();
        let (p0, p1) = (5.0 / 7.0, 16.0 / 7.0);
        let want = [4.0 * p0 + p0, 4.0 * p0 + p1, 4.0 * p1 + p0, 4.0 * p1 + p1];
        for (a, b) in b.data.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn bilinear_upsample_matches_closed_form_and_constant_is_preserved() {
        // 1x2 -> 1x4 (align_corners=False): [0,1] -> [0, 0.25, 0.75, 1]
        let img = Image::new(1, 1, 2, vec![0.0, 1.0]).unwrap();
        let out = resize(&img, 1, 4, Filter::Bilinear).unwrap();
        let want = [0.0, 0.25, 0.75, 1.0];
        for (a, b) in out.data.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", out.data);
        }
        let c = Image::new(3, 37, 53, vec![0.4; 3 * 37 * 53]).unwrap();
        for f in [Filter::Bilinear, Filter::Area] {
            let r = resize(&c, 32, 32, f).unwrap();
            assert!(r.data.iter().all(|v| (v - 0.4).abs() < 1e-5));
        }
    }

    #[test]
    fn crops_flip_and_normalize() {
        let img = ramp(3, 8, 8);
        let c = CenterCrop::new(4, 4)
            .apply(img.clone(), &mut SeededRng::new(0))
            .unwrap();
        assert_eq!(c.shape(), [3, 4, 4]);
        assert_eq!(c.at(0, 0, 0), 2.0 / 8.0);
        let f = hflip(img.clone());
        assert_eq!(f.at(1, 3, 0), img.at(1, 3, 7));
        let n = Normalize::new(&[0.5; 3], &[0.5; 3])
            .apply(img.clone(), &mut SeededRng::new(0))
            .unwrap();
        assert_eq!(n.at(0, 0, 0), -1.0);
        assert!(Normalize::new(&[0.5], &[0.5])
            .apply(img.clone(), &mut SeededRng::new(0))
            .is_err());
        assert!(crop(&img, 6, 6, 4, 4).is_err());
    }

    #[test]
    fn random_transforms_are_seeded() {
        let img = ramp(3, 32, 32);
        let t = Compose::new()
            .then(RandomResizedCrop::new(16, 16))
            .then(HorizontalFlip::new(0.5))
            .then(ColorJitter::new(0.4, 0.4, 0.4, 0.1))
            .then(RandomApply::new(GaussianBlur::new(3, 0.1, 2.0), 0.5))
            .then(Grayscale::random(0.2));
        let a = t.apply(img.clone(), &mut SeededRng::new(5)).unwrap();
        let b = t.apply(img.clone(), &mut SeededRng::new(5)).unwrap();
        let c = t.apply(img, &mut SeededRng::new(6)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.shape(), [3, 16, 16]);
        assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn blur_preserves_constants_and_gray_uses_luma() {
        let c = Image::new(1, 5, 5, vec![0.3; 25]).unwrap();
        let b = gaussian_blur(&c, 5, 1.0).unwrap();
        assert!(b.data.iter().all(|v| (v - 0.3).abs() < 1e-6));
        assert!(gaussian_blur(&c, 4, 1.0).is_err());
        let rgb = Image::new(3, 1, 1, vec![1.0, 0.0, 0.0]).unwrap();
        let g = Grayscale::new(1)
            .apply(rgb, &mut SeededRng::new(0))
            .unwrap();
        assert!((g.data[0] - 0.299).abs() < 1e-6);
        // hue round trip
        let hsv = rgb_to_hsv([0.2, 0.6, 0.9]);
        let back = crate::color::hsv_to_rgb(hsv);
        for (a, b) in back.iter().zip([0.2, 0.6, 0.9]) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
