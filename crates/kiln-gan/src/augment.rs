//! DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for
//! Data-Efficient GAN Training"): the same random transforms on real and
//! generated images before the discriminator, built from differentiable
//! tensor ops so the generator's gradient passes through them. It keeps D
//! from memorising small sets such as Flowers102's 1,020 training images.
//!
//! The transforms and their ranges are the paper's (`DiffAugment_pytorch.py`):
//! brightness `x + U(-0.5, 0.5)`, saturation `(x - mean_c) * U(0, 2) + mean_c`,
//! contrast `(x - mean_chw) * U(0.5, 1.5) + mean_chw`, translation by up to
//! `round(side / 8)` pixels with zero fill, and cutout of a `round(side / 2)`
//! square (clipped at the border) per image. Draws come from the caller's
//! generator (the training RNG, saved in checkpoints).

use kiln_core::rng::SeededRng;
use kiln_core::{Result, Tensor};

use crate::config::Augment;

/// Applies `policy` in order to `x [B, C, H, W]`.
pub fn diff_augment(x: &Tensor, policy: &[Augment], rng: &mut SeededRng) -> Result<Tensor> {
    let mut x = x.clone();
    for p in policy {
        x = match p {
            Augment::Color => color(&x, rng)?,
            Augment::Translation => translation(&x, 0.125, rng)?,
            Augment::Cutout => cutout(&x, 0.5, rng)?,
        };
    }
    Ok(x)
}

/// `[B, 1, 1, 1]` uniform draws in `[0, 1)`.
fn per_image(x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
    let b = x.dim(0)?;
    rng.uniform(&[b, 1, 1, 1], 0.0, 1.0, x.device())?
        .to_dtype(x.dtype())
}

/// Random brightness, saturation and contrast, each per image.
pub fn color(x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
    let r = per_image(x, rng)?;
    let x = x.broadcast_add(&(r - 0.5)?)?;
    let r = per_image(&x, rng)?;
    let m = x.mean_keepdim(1)?;
    let x = x
        .broadcast_sub(&m)?
        .broadcast_mul(&(r * 2.0)?)?
        .broadcast_add(&m)?;
    let r = per_image(&x, rng)?;
    let m = x.mean_keepdim(1)?.mean_keepdim(2)?.mean_keepdim(3)?;
    x.broadcast_sub(&m)?
        .broadcast_mul(&(r + 0.5)?)?
        .broadcast_add(&m)
}

/// An integer in `[lo, hi)`.
fn randint(rng: &mut SeededRng, lo: i64, hi: i64) -> i64 {
    lo + rng.below((hi - lo).max(1) as usize) as i64
}

/// Shifts each image by up to `round(ratio * side)` pixels each way,
/// filling with zeros: `out[i, j] = x[i + dy, j + dx]`.
pub fn translation(x: &Tensor, ratio: f64, rng: &mut SeededRng) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let sy = (h as f64 * ratio + 0.5) as i64;
    let sx = (w as f64 * ratio + 0.5) as i64;
    let dy: Vec<i64> = (0..b).map(|_| randint(rng, -sy, sy + 1)).collect();
    let dx: Vec<i64> = (0..b).map(|_| randint(rng, -sx, sx + 1)).collect();
    let pad = x
        .pad_with_zeros(2, sy as usize, sy as usize)?
        .pad_with_zeros(3, sx as usize, sx as usize)?;
    let rows = (0..b)
        .map(|i| {
            pad.narrow(0, i, 1)?
                .narrow(2, (sy + dy[i]) as usize, h)?
                .narrow(3, (sx + dx[i]) as usize, w)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// Zeroes a `round(ratio * side)` square per image (all channels), centred
/// at a random position and clipped at the border.
pub fn cutout(x: &Tensor, ratio: f64, rng: &mut SeededRng) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let ch = (h as f64 * ratio + 0.5) as i64;
    let cw = (w as f64 * ratio + 0.5) as i64;
    let oy: Vec<i64> = (0..b)
        .map(|_| randint(rng, 0, h as i64 + (1 - ch % 2)))
        .collect();
    let ox: Vec<i64> = (0..b)
        .map(|_| randint(rng, 0, w as i64 + (1 - cw % 2)))
        .collect();
    let mut mask = vec![1f32; b * h * w];
    for i in 0..b {
        let (y0, x0) = (oy[i] - ch / 2, ox[i] - cw / 2);
        for y in y0.max(0)..(y0 + ch).min(h as i64) {
            for xx in x0.max(0)..(x0 + cw).min(w as i64) {
                mask[i * h * w + y as usize * w + xx as usize] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&mask)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::needless_range_loop)]
    use super::*;
    use kiln_core::{DType, Device, Var};

    fn image(b: usize, side: usize) -> Tensor {
        SeededRng::new(3)
            .uniform(&[b, 3, side, side], -1.0, 1.0, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    fn vec4(t: &Tensor) -> Vec<Vec<Vec<Vec<f64>>>> {
        let (b, c, h, _) = t.dims4().unwrap();
        (0..b)
            .map(|i| {
                (0..c)
                    .map(|k| {
                        (0..h)
                            .map(|y| {
                                t.get(i)
                                    .unwrap()
                                    .get(k)
                                    .unwrap()
                                    .get(y)
                                    .unwrap()
                                    .to_vec1()
                                    .unwrap()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Colour: the three transforms from the paper's formulas, per pixel in
    /// f64, with the same draws.
    #[test]
    fn color_is_the_papers_brightness_saturation_contrast() {
        let x = image(3, 5);
        let mut rng = SeededRng::new(9);
        let mut replay = SeededRng::from_state(&rng.state());
        let got = vec4(&color(&x, &mut rng).unwrap());
        let mut v = vec4(&x);
        let draw = |r: &mut SeededRng| r.uniform_vec(3, 0.0, 1.0);
        let br = draw(&mut replay);
        let sa = draw(&mut replay);
        let co = draw(&mut replay);
        for (i, img) in v.iter_mut().enumerate() {
            for ch in img.iter_mut() {
                for row in ch.iter_mut() {
                    for p in row.iter_mut() {
                        *p += br[i] as f64 - 0.5;
                    }
                }
            }
            for y in 0..5 {
                for x in 0..5 {
                    let m = (0..3).map(|k| img[k][y][x]).sum::<f64>() / 3.0;
                    for k in 0..3 {
                        img[k][y][x] = (img[k][y][x] - m) * (sa[i] as f64 * 2.0) + m;
                    }
                }
            }
            let m = img.iter().flatten().flatten().sum::<f64>() / 75.0;
            for p in img.iter_mut().flatten().flatten() {
                *p = (*p - m) * (co[i] as f64 + 0.5) + m;
            }
        }
        for (a, b) in got
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .zip(v.iter().flatten().flatten().flatten())
        {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(rng.state(), replay.state());
    }

    /// Translation moves each image by its drawn shift with zero fill, and its
    /// gradient sends each output pixel's gradient back to its source.
    #[test]
    fn translation_and_cutout_match_loops_and_pass_gradients() {
        let side = 8;
        let x = Var::from_tensor(&image(4, side)).unwrap();
        let mut rng = SeededRng::new(4);
        let mut replay = SeededRng::from_state(&rng.state());
        let out = translation(x.as_tensor(), 0.125, &mut rng).unwrap();
        let s = 1i64; // round(8 / 8)
        let dy: Vec<i64> = (0..4).map(|_| randint(&mut replay, -s, s + 1)).collect();
        let dx: Vec<i64> = (0..4).map(|_| randint(&mut replay, -s, s + 1)).collect();
        let (xin, got) = (vec4(x.as_tensor()), vec4(&out));
        let mut moved = 0;
        for i in 0..4 {
            moved += usize::from(dy[i] != 0 || dx[i] != 0);
            for k in 0..3 {
                for y in 0..side as i64 {
                    for xx in 0..side as i64 {
                        let (sy, sx) = (y + dy[i], xx + dx[i]);
                        let inside =
                            (0..side as i64).contains(&sy) && (0..side as i64).contains(&sx);
                        let want = if inside {
                            xin[i][k][sy as usize][sx as usize]
                        } else {
                            0.0
                        };
                        assert_eq!(got[i][k][y as usize][xx as usize], want);
                    }
                }
            }
        }
        assert!(
            moved > 0,
            "no image moved: the test would not see a wrong shift"
        );
        // d sum(out) / dx is 1 where a source pixel landed in the output.
        let g = out.sum_all().unwrap().backward().unwrap();
        let gx = vec4(g.get(x.as_tensor()).unwrap());
        for i in 0..4 {
            for y in 0..side as i64 {
                for xx in 0..side as i64 {
                    let (ty, tx) = (y - dy[i], xx - dx[i]);
                    let lands = (0..side as i64).contains(&ty) && (0..side as i64).contains(&tx);
                    assert_eq!(
                        gx[i][0][y as usize][xx as usize],
                        f64::from(u8::from(lands))
                    );
                }
            }
        }

        let mut rng = SeededRng::new(5);
        let mut replay = SeededRng::from_state(&rng.state());
        let got = vec4(&cutout(x.as_tensor(), 0.5, &mut rng).unwrap());
        let c = 4i64; // round(8 / 2), even: offsets in [0, 8]
        let oy: Vec<i64> = (0..4).map(|_| randint(&mut replay, 0, 9)).collect();
        let ox: Vec<i64> = (0..4).map(|_| randint(&mut replay, 0, 9)).collect();
        for i in 0..4 {
            for y in 0..side as i64 {
                for xx in 0..side as i64 {
                    let cut = (oy[i] - c / 2..oy[i] + c / 2).contains(&y)
                        && (ox[i] - c / 2..ox[i] + c / 2).contains(&xx);
                    for k in 0..3 {
                        let want = if cut {
                            0.0
                        } else {
                            xin[i][k][y as usize][xx as usize]
                        };
                        assert_eq!(got[i][k][y as usize][xx as usize], want);
                    }
                }
            }
        }
        // The whole policy keeps the shape and draws reproducibly.
        let p = [Augment::Color, Augment::Translation, Augment::Cutout];
        let a = diff_augment(x.as_tensor(), &p, &mut SeededRng::new(1)).unwrap();
        let b = diff_augment(x.as_tensor(), &p, &mut SeededRng::new(1)).unwrap();
        assert_eq!(a.dims(), x.dims());
        assert_eq!(vec4(&a), vec4(&b));
    }
}
