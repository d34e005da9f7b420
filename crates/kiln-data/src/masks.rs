//! Masks for self-supervised learning: the chapter's random square (one per
//! batch or one per image) and random patch masks with a mask ratio.
//!
//! A mask is an f32 tensor `[B, 1, H, W]` with 1 where the image is kept and 0
//! where it is hidden; it broadcasts over the channels, so
//! `masked = images * mask`.
//!
//! ```
//! use kiln_core::{rng::SeededRng, Device, Tensor};
//! use kiln_data::masks::SquareMask;
//! let images = Tensor::ones((4, 3, 32, 32), kiln_core::DType::F32, &Device::Cpu).unwrap();
//! let mut rng = SeededRng::new(0);
//! let (masked, mask) = SquareMask::chapter().apply(&images, &mut rng).unwrap();
//! // 8x8 = 64 hidden pixels per image, over all 3 channels
//! let hidden = (1.0 - mask.sum_all().unwrap().to_scalar::<f32>().unwrap() / (4.0 * 1024.0)) * 1024.0;
//! assert!((hidden - 64.0).abs() < 1e-3);
//! assert_eq!(masked.dims(), &[4, 3, 32, 32]);
//! ```

use kiln_core::ops::shape::dims4;
use kiln_core::rng::SeededRng;
use kiln_core::{Device, Tensor};

use crate::error::{DataError, Result};

fn apply_mask(images: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(images.dtype())?;
    Ok(images.broadcast_mul(&mask)?)
}

/// A square of zeros at a random position: the chapter's 8x8 mask, with
/// `top, left` uniform in `[0, H - size)` and `[0, W - size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquareMask {
    /// Side of the square in pixels.
    pub size: usize,
    /// One position per image (`true`) or one for the whole batch (`false`,
    /// as the chapter does).
    pub per_image: bool,
}

impl SquareMask {
    /// The chapter's mask: 8x8, one position per batch.
    pub fn chapter() -> Self {
        Self {
            size: 8,
            per_image: false,
        }
    }

    /// A `size x size` square; `per_image` draws a position for every image.
    pub fn new(size: usize, per_image: bool) -> Self {
        Self { size, per_image }
    }

    /// The positions `(top, left)` for a batch of `batch` images of `h x w`.
    pub fn positions(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        rng: &mut SeededRng,
    ) -> Result<Vec<(usize, usize)>> {
        if self.size == 0 || self.size >= h || self.size >= w {
            return Err(DataError::config(
                "mask size",
                format!(
                    "a {0}x{0} square needs images larger than it, found {h}x{w}",
                    self.size
                ),
            ));
        }
        let mut draw = || (rng.below(h - self.size), rng.below(w - self.size));
        if self.per_image {
            Ok((0..batch).map(|_| draw()).collect())
        } else {
            let p = draw();
            Ok(vec![p; batch])
        }
    }

    /// A keep-mask `[batch, 1, h, w]` on `device`.
    pub fn sample(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Tensor> {
        let pos = self.positions(batch, h, w, rng)?;
        let mut m = vec![1.0f32; batch * h * w];
        for (b, (top, left)) in pos.into_iter().enumerate() {
            for y in top..top + self.size {
                let row = (b * h + y) * w;
                m[row + left..row + left + self.size].fill(0.0);
            }
        }
        Ok(Tensor::from_vec(m, (batch, 1, h, w), device)?)
    }

    /// Masks `images` `[B, C, H, W]`: returns `(masked images, keep-mask [B, 1, H, W])`.
    pub fn apply(&self, images: &Tensor, rng: &mut SeededRng) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) =
            dims4(images.dims(), "mask").map_err(|e| DataError::config("images", e.to_string()))?;
        let mask = self.sample(b, h, w, rng, images.device())?;
        Ok((apply_mask(images, &mask)?, mask))
    }
}

/// Hides a random `ratio` of the `patch x patch` patches of every image
/// (masked-autoencoder style): exactly `round(ratio * patches)` per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchMask {
    /// Patch side in pixels; must divide the image height and width.
    pub patch: usize,
    /// Fraction of patches hidden, in [0, 1].
    pub ratio: f32,
}

impl PatchMask {
    /// Hide `ratio` of the `patch x patch` patches.
    pub fn new(patch: usize, ratio: f32) -> Self {
        Self { patch, ratio }
    }

    fn grid(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.patch == 0 || !h.is_multiple_of(self.patch) || !w.is_multiple_of(self.patch) {
            return Err(DataError::config(
                "patch",
                format!(
                    "patch size {} must divide the image size {h}x{w}",
                    self.patch
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(DataError::config(
                "mask ratio",
                format!("expected a value in [0, 1], found {}", self.ratio),
            ));
        }
        Ok((h / self.patch, w / self.patch))
    }

    /// Per image, whether each patch (row-major over the patch grid) is hidden.
    pub fn hidden_patches(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        rng: &mut SeededRng,
    ) -> Result<Vec<Vec<bool>>> {
        let (gh, gw) = self.grid(h, w)?;
        let n = gh * gw;
        let k = ((self.ratio * n as f32).round() as usize).min(n);
        Ok((0..batch)
            .map(|_| {
                let mut hidden = vec![false; n];
                for &i in &rng.permutation(n)[..k] {
                    hidden[i] = true;
                }
                hidden
            })
            .collect())
    }

    /// A keep-mask `[batch, 1, h, w]` on `device`.
    pub fn sample(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Tensor> {
        let hidden = self.hidden_patches(batch, h, w, rng)?;
        let gw = w / self.patch;
        let mut m = vec![1.0f32; batch * h * w];
        for (b, hid) in hidden.iter().enumerate() {
            for y in 0..h {
                for x in 0..w {
                    if hid[(y / self.patch) * gw + x / self.patch] {
                        m[(b * h + y) * w + x] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (batch, 1, h, w), device)?)
    }

    /// Masks `images` `[B, C, H, W]`: returns `(masked images, keep-mask [B, 1, H, W])`.
    pub fn apply(&self, images: &Tensor, rng: &mut SeededRng) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) =
            dims4(images.dims(), "mask").map_err(|e| DataError::config("images", e.to_string()))?;
        let mask = self.sample(b, h, w, rng, images.device())?;
        Ok((apply_mask(images, &mask)?, mask))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kiln_core::DType;

    #[test]
    fn chapter_square_is_shared_by_the_batch_and_in_range() {
        let mut rng = SeededRng::new(1);
        let m = SquareMask::chapter();
        for _ in 0..200 {
            let pos = m.positions(4, 32, 32, &mut rng).unwrap();
            assert!(pos.iter().all(|&p| p == pos[0]));
            assert!(pos[0].0 < 24 && pos[0].1 < 24);
        }
        let per = SquareMask::new(8, true);
        let pos = per.positions(16, 32, 32, &mut rng).unwrap();
        assert!(pos.iter().any(|&p| p != pos[0]));
        assert!(SquareMask::new(32, false)
            .positions(1, 32, 32, &mut rng)
            .is_err());
    }

    #[test]
    fn square_mask_zeroes_all_channels_of_the_square() {
        let images = Tensor::ones((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let mut rng = SeededRng::new(3);
        let (masked, mask) = SquareMask::new(4, true).apply(&images, &mut rng).unwrap();
        let flat: Vec<f32> = masked.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = flat.iter().filter(|&&x| x == 0.0).count();
        assert_eq!(zeros, 2 * 3 * 16);
        assert_eq!(mask.dims(), &[2, 1, 16, 16]);
    }

    #[test]
    fn patch_mask_hides_exactly_the_ratio() {
        let mut rng = SeededRng::new(9);
        let pm = PatchMask::new(4, 0.75);
        let hidden = pm.hidden_patches(3, 32, 32, &mut rng).unwrap();
        for h in &hidden {
            assert_eq!(h.iter().filter(|&&x| x).count(), 48);
        }
        assert_ne!(hidden[0], hidden[1]);
        let m = pm.sample(3, 32, 32, &mut rng, &Device::Cpu).unwrap();
        let kept: f32 = m.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(kept, 3.0 * 16.0 * 16.0);
        assert!(PatchMask::new(5, 0.5)
            .sample(1, 32, 32, &mut rng, &Device::Cpu)
            .is_err());
        assert!(PatchMask::new(4, 1.5)
            .sample(1, 32, 32, &mut rng, &Device::Cpu)
            .is_err());
    }
}
