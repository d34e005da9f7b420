//! [`SyntheticFlowers`]: procedural flower pictures, the download-free default.
//!
//! Every class is a kind of flower with its own petal count, petal shape,
//! colours, centre and background; every picture varies position, size,
//! rotation, colour, petal lengths and background texture. Pictures are drawn
//! on the fly (2x2 supersampled), deterministically from the seed, the split and
//! the index, so the set needs no storage and no download.

use std::f32::consts::PI;

use kiln_core::rng::SeededRng;

use crate::color::hsv_to_rgb;
use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{DataError, Result};
use crate::image::Image;

/// Options of [`SyntheticFlowers`].
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticFlowersConfig {
    /// Number of classes (kinds of flower). Default 8.
    pub classes: usize,
    /// Images in the train split. Default 4096.
    pub train: usize,
    /// Images in the test split (the val split has as many). Default 1024.
    pub test: usize,
    /// Side of the square pictures in pixels. Default 32.
    pub size: usize,
    /// Seed of the per-picture variation. Default 0.
    pub seed: u64,
}

impl Default for SyntheticFlowersConfig {
    fn default() -> Self {
        Self {
            classes: 8,
            train: 4096,
            test: 1024,
            size: 32,
            seed: 0,
        }
    }
}

impl SyntheticFlowersConfig {
    /// Rejects zero sizes and absurd values, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.classes == 0 {
            return Err(DataError::config("classes", "must be at least 1"));
        }
        if !(4..=4096).contains(&self.size) {
            return Err(DataError::config(
                "size",
                format!("expected 4..=4096 pixels, found {}", self.size),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PetalShape {
    /// Rounded ellipse.
    Ellipse,
    /// Lance-like, pointed tip.
    Pointed,
    /// Narrow base, wide rounded tip.
    Spoon,
    /// Ellipse with a notch at the tip.
    Notched,
}

/// The fixed look of one class.
#[derive(Debug, Clone)]
struct Species {
    petals: usize,
    shape: PetalShape,
    /// Petal length as a fraction of the picture side.
    length: f32,
    /// Petal width relative to the spacing between petals (1 = touching).
    width: f32,
    /// Petal colour, HSV.
    petal_hsv: [f32; 3],
    /// Second (inner) layer of petals.
    inner_layer: bool,
    /// Centre radius as a fraction of the petal length.
    center: f32,
    center_rgb: [f32; 3],
    bg_top: [f32; 3],
    bg_bottom: [f32; 3],
    stem: bool,
}

fn species(class: usize) -> Species {
    use PetalShape::*;
    let s = |petals,
             shape,
             length,
             width,
             petal_hsv,
             inner_layer,
             center,
             center_rgb,
             bg_top,
             bg_bottom,
             stem| Species {
        petals,
        shape,
        length,
        width,
        petal_hsv,
        inner_layer,
        center,
        center_rgb,
        bg_top,
        bg_bottom,
        stem,
    };
    match class {
        // sunflower: many pointed yellow petals, big brown centre, sky
        0 => s(
            16,
            Pointed,
            0.40,
            0.9,
            [0.13, 0.9, 0.97],
            false,
            0.45,
            [0.35, 0.2, 0.08],
            [0.45, 0.7, 0.95],
            [0.7, 0.85, 0.98],
            true,
        ),
        // pink cosmos: 8 notched petals, small yellow centre, dark foliage
        1 => s(
            8,
            Notched,
            0.40,
            1.0,
            [0.93, 0.45, 0.97],
            false,
            0.22,
            [0.95, 0.8, 0.15],
            [0.08, 0.25, 0.1],
            [0.15, 0.35, 0.12],
            false,
        ),
        // purple aster: 12 thin petals in two layers, yellow centre, light green
        2 => s(
            12,
            Ellipse,
            0.38,
            0.75,
            [0.76, 0.6, 0.8],
            true,
            0.25,
            [0.95, 0.75, 0.1],
            [0.55, 0.75, 0.4],
            [0.35, 0.55, 0.25],
            false,
        ),
        // daisy: 20 very narrow white petals, yellow centre, grass
        3 => s(
            20,
            Ellipse,
            0.39,
            0.6,
            [0.1, 0.04, 0.98],
            false,
            0.28,
            [0.95, 0.72, 0.08],
            [0.25, 0.55, 0.15],
            [0.2, 0.45, 0.1],
            true,
        ),
        // red poppy: 4 wide round petals, black centre, pale olive field
        4 => s(
            4,
            Spoon,
            0.40,
            1.25,
            [0.0, 0.9, 0.88],
            false,
            0.2,
            [0.08, 0.06, 0.08],
            [0.75, 0.78, 0.5],
            [0.5, 0.6, 0.25],
            true,
        ),
        // orange lily: 6 pointed petals in two layers, dark centre, brown earth
        5 => s(
            6,
            Pointed,
            0.42,
            0.8,
            [0.07, 0.9, 0.97],
            true,
            0.15,
            [0.5, 0.15, 0.05],
            [0.45, 0.33, 0.2],
            [0.3, 0.2, 0.12],
            false,
        ),
        // blue forget-me-not: 5 round petals, pale yellow centre, dark teal
        6 => s(
            5,
            Spoon,
            0.36,
            1.1,
            [0.6, 0.65, 0.9],
            false,
            0.3,
            [0.98, 0.92, 0.5],
            [0.05, 0.2, 0.25],
            [0.1, 0.3, 0.3],
            false,
        ),
        // magenta dahlia: 10 ellipse petals, two layers, pale centre, grey-blue
        7 => s(
            10,
            Ellipse,
            0.40,
            1.0,
            [0.86, 0.8, 0.82],
            true,
            0.18,
            [0.95, 0.85, 0.6],
            [0.6, 0.65, 0.75],
            [0.4, 0.45, 0.55],
            false,
        ),
        _ => {
            let mut r = SeededRng::derive(0x5eed_f10e, &[class as u64]);
            let shapes = [Ellipse, Pointed, Spoon, Notched];
            let hue = r.uniform_f32(0.0, 1.0);
            let bg_h = r.uniform_f32(0.2, 0.6);
            let bg = hsv_to_rgb([bg_h, r.uniform_f32(0.3, 0.7), r.uniform_f32(0.2, 0.8)]);
            let bg2 = hsv_to_rgb([bg_h, r.uniform_f32(0.3, 0.7), r.uniform_f32(0.2, 0.8)]);
            s(
                4 + r.below(15),
                shapes[r.below(4)],
                r.uniform_f32(0.34, 0.42),
                r.uniform_f32(0.6, 1.2),
                [hue, r.uniform_f32(0.3, 0.95), r.uniform_f32(0.7, 1.0)],
                r.bernoulli(0.4),
                r.uniform_f32(0.12, 0.4),
                hsv_to_rgb([
                    r.uniform_f32(0.0, 0.2),
                    r.uniform_f32(0.5, 1.0),
                    r.uniform_f32(0.1, 1.0),
                ]),
                bg,
                bg2,
                r.bernoulli(0.4),
            )
        }
    }
}

/// Per-picture variation, drawn from the picture's own generator.
struct Instance {
    cx: f32,
    cy: f32,
    len: f32,
    rot: f32,
    petal_rgb: [f32; 3],
    inner_rgb: [f32; 3],
    center_rgb: [f32; 3],
    bg_gain: f32,
    bg_phase: [f32; 4],
    petal_len: Vec<f32>,
    stem_bend: f32,
}

/// Procedural flower pictures with class labels; see the module docs.
///
/// `SyntheticFlowers::new(Default::default(), Split::Train)` gives 4096
/// pictures of 8 classes at 3x32x32; item `i` has label `i % classes`.
#[derive(Debug, Clone)]
pub struct SyntheticFlowers {
    cfg: SyntheticFlowersConfig,
    split: Split,
    len: usize,
    species: Vec<Species>,
}

impl SyntheticFlowers {
    /// The `split` of the set described by `cfg`.
    pub fn new(cfg: SyntheticFlowersConfig, split: Split) -> Result<Self> {
        cfg.validate()?;
        let len = match split {
            Split::Train => cfg.train,
            Split::Val | Split::Test => cfg.test,
        };
        let species = (0..cfg.classes).map(species).collect();
        Ok(Self {
            cfg,
            split,
            len,
            species,
        })
    }

    /// The options this set was made with.
    pub fn config(&self) -> &SyntheticFlowersConfig {
        &self.cfg
    }

    /// The label of item `index` (classes are balanced: `index % classes`).
    pub fn label(&self, index: usize) -> usize {
        index % self.cfg.classes
    }

    fn instance(&self, sp: &Species, rng: &mut SeededRng) -> Instance {
        let jitter_hsv = |rng: &mut SeededRng, hsv: [f32; 3]| {
            [
                (hsv[0] + rng.uniform_f32(-0.025, 0.025)).rem_euclid(1.0),
                (hsv[1] * rng.uniform_f32(0.85, 1.1)).clamp(0.0, 1.0),
                (hsv[2] * rng.uniform_f32(0.85, 1.05)).clamp(0.0, 1.0),
            ]
        };
        let phsv = jitter_hsv(rng, sp.petal_hsv);
        let mut ihsv = phsv;
        ihsv[2] *= 0.8;
        ihsv[1] = (ihsv[1] * 1.15).min(1.0);
        let c = sp.center_rgb;
        let cg = rng.uniform_f32(0.85, 1.15);
        Instance {
            cx: 0.5 + rng.uniform_f32(-0.08, 0.08),
            cy: 0.5 + rng.uniform_f32(-0.08, 0.08),
            len: sp.length * rng.uniform_f32(0.82, 1.1),
            rot: rng.uniform_f32(0.0, 2.0 * PI),
            petal_rgb: hsv_to_rgb(phsv),
            inner_rgb: hsv_to_rgb(ihsv),
            center_rgb: [
                (c[0] * cg).min(1.0),
                (c[1] * cg).min(1.0),
                (c[2] * cg).min(1.0),
            ],
            bg_gain: rng.uniform_f32(0.8, 1.15),
            bg_phase: [
                rng.uniform_f32(0.0, 2.0 * PI),
                rng.uniform_f32(0.0, 2.0 * PI),
                rng.uniform_f32(0.0, 2.0 * PI),
                rng.uniform_f32(0.0, 2.0 * PI),
            ],
            petal_len: (0..sp.petals).map(|_| rng.uniform_f32(0.9, 1.07)).collect(),
            stem_bend: rng.uniform_f32(-0.15, 0.15),
        }
    }

    /// Draws one picture of class `class` at `size x size` from `rng`.
    fn render(&self, class: usize, size: usize, rng: &mut SeededRng) -> Image {
        let sp = &self.species[class];
        let inst = self.instance(sp, rng);
        let n = size * size;
        let mut data = vec![0.0f32; 3 * n];
        let ss = if size >= 96 { 1 } else { 2 };
        let inv = 1.0 / (ss * ss) as f32;
        for y in 0..size {
            for x in 0..size {
                let mut acc = [0.0f32; 3];
                let mut bg_hits = 0usize;
                for sy in 0..ss {
                    for sx in 0..ss {
                        let u = (x as f32 + (sx as f32 + 0.5) / ss as f32) / size as f32;
                        let v = (y as f32 + (sy as f32 + 0.5) / ss as f32) / size as f32;
                        match foreground(sp, &inst, u, v) {
                            Some(c) => {
                                acc[0] += c[0];
                                acc[1] += c[1];
                                acc[2] += c[2];
                            }
                            None => bg_hits += 1,
                        }
                    }
                }
                if bg_hits > 0 {
                    // the background is smooth: one evaluation at the pixel centre
                    let u = (x as f32 + 0.5) / size as f32;
                    let v = (y as f32 + 0.5) / size as f32;
                    let c = background(sp, &inst, u, v);
                    for ch in 0..3 {
                        acc[ch] += c[ch] * bg_hits as f32;
                    }
                }
                let i = y * size + x;
                for ch in 0..3 {
                    data[ch * n + i] = (acc[ch] * inv).clamp(0.0, 1.0);
                }
            }
        }
        Image {
            channels: 3,
            height: size,
            width: size,
            data,
        }
    }
}

/// Whether a point at position `t` in [0, 1] along a petal and `v_rel` across
/// it (relative to the petal's maximum half-width) is inside the petal.
fn petal_profile(shape: PetalShape, t: f32, v_rel: f32) -> bool {
    if !(0.0..=1.0).contains(&t) {
        return false;
    }
    let hw = match shape {
        PetalShape::Ellipse => (1.0 - (2.0 * t - 1.0).powi(2)).max(0.0).sqrt(),
        PetalShape::Pointed => (PI * t).sin() * (1.0 - 0.3 * t),
        PetalShape::Spoon => {
            let base = (t / 0.6).min(1.0).powf(0.7);
            let tip = if t > 0.6 {
                (1.0 - ((t - 0.6) / 0.4).powi(2)).max(0.0).sqrt()
            } else {
                1.0
            };
            base * tip
        }
        PetalShape::Notched => {
            let e = (1.0 - (2.0 * t - 1.0).powi(2)).max(0.0).sqrt();
            if t > 0.82 && v_rel.abs() < 0.35 * (t - 0.82) / 0.18 {
                return false;
            }
            e
        }
    };
    v_rel.abs() <= hw
}

/// The flower's colour at picture coordinates `(u, v)` in [0, 1]^2, or
/// `None` where the background shows.
fn foreground(sp: &Species, inst: &Instance, u: f32, v: f32) -> Option<[f32; 3]> {
    let dx = u - inst.cx;
    let dy = v - inst.cy;
    let r = (dx * dx + dy * dy).sqrt();
    let len = inst.len;
    // beyond the longest petal: only the stem can be there
    if r > len * 1.08 {
        return stem(sp, inst, u, dy);
    }
    let theta = dy.atan2(dx);

    // centre disc, with a dotted texture and a darker rim
    let rc = sp.center * len;
    if r < rc {
        let rim = if r > 0.8 * rc { 0.75 } else { 1.0 };
        let dots = if ((u * 97.0).sin() * (v * 89.0).sin()) > 0.55 {
            0.82
        } else {
            1.0
        };
        return Some(inst.center_rgb.map(|c| c * rim * dots));
    }

    // petals: inner layer over outer layer
    let layers: &[(f32, f32, bool)] = if sp.inner_layer {
        &[(0.62, 0.5, true), (1.0, 0.0, false)]
    } else {
        &[(1.0, 0.0, false)]
    };
    let step = 2.0 * PI / sp.petals as f32;
    for &(scale, offset, inner) in layers {
        let a = theta - inst.rot - offset * step;
        let k = (a / step).round();
        let delta = a - k * step;
        let idx = (k as i64).rem_euclid(sp.petals as i64) as usize;
        let plen = len * scale * inst.petal_len[idx];
        let along = r * delta.cos();
        let across = r * delta.sin();
        let t = along / plen;
        // maximum half-width: a fraction of the arc between petal axes at mid-length
        let max_hw = (sp.width * 0.5 * step * plen * 0.55).min(plen * 0.45);
        let v_rel = across / max_hw;
        if petal_profile(sp.shape, t, v_rel) {
            let base = if inner {
                inst.inner_rgb
            } else {
                inst.petal_rgb
            };
            let light = 0.62 + 0.38 * t.min(1.0).sqrt();
            let edge = 1.0 - 0.28 * v_rel.abs().powi(3).min(1.0);
            let rib = if v_rel.abs() < 0.08 && t < 0.85 {
                0.9
            } else {
                1.0
            };
            let f = light * edge * rib;
            return Some(base.map(|c| (c * f).min(1.0)));
        }
    }

    stem(sp, inst, u, dy)
}

/// The stem below the flower, if any, at `u` and `dy` below the centre.
fn stem(sp: &Species, inst: &Instance, u: f32, dy: f32) -> Option<[f32; 3]> {
    if sp.stem && dy > 0.0 {
        let sx = inst.cx + inst.stem_bend * dy * dy * 2.0;
        if (u - sx).abs() < 0.025 {
            return Some([0.18, 0.5, 0.15]);
        }
    }
    None
}

/// The background: a vertical gradient with soft, out-of-focus blotches.
fn background(sp: &Species, inst: &Instance, u: f32, v: f32) -> [f32; 3] {
    let g = v;
    let p = inst.bg_phase;
    let blotch = 0.5 * ((u * 7.0 + p[0]).sin() * (v * 5.0 + p[1]).sin())
        + 0.5 * ((u * 11.0 + v * 4.0 + p[2]).sin() * (v * 9.0 - u * 3.0 + p[3]).cos());
    let gain = inst.bg_gain * (1.0 + 0.18 * blotch);
    std::array::from_fn(|c| {
        ((sp.bg_top[c] * (1.0 - g) + sp.bg_bottom[c] * g) * gain).clamp(0.0, 1.0)
    })
}

impl Dataset for SyntheticFlowers {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize) -> Result<Sample> {
        check_index("synthetic-flowers", index, self.len)?;
        let split_key = match self.split {
            Split::Train => 1,
            Split::Val => 2,
            Split::Test => 3,
        };
        let mut rng = SeededRng::derive(self.cfg.seed, &[split_key, index as u64]);
        let label = self.label(index);
        Ok(Sample {
            image: self.render(label, self.cfg.size, &mut rng),
            label,
        })
    }

    fn num_classes(&self) -> usize {
        self.cfg.classes
    }

    fn channels(&self) -> usize {
        3
    }

    fn image_size(&self) -> Option<(usize, usize)> {
        Some((self.cfg.size, self.cfg.size))
    }

    fn name(&self) -> String {
        format!("synthetic-flowers/{}", self.split)
    }

    fn labels(&self) -> Option<Vec<usize>> {
        Some((0..self.len).map(|i| self.label(i)).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_in_range() {
        let ds = SyntheticFlowers::new(Default::default(), Split::Train).unwrap();
        let a = ds.get(17).unwrap();
        let b = ds.get(17).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.label, 17 % 8);
        assert!(a.image.data.iter().all(|v| (0.0..=1.0).contains(v)));
        let test = SyntheticFlowers::new(Default::default(), Split::Test).unwrap();
        assert_eq!(test.len(), 1024);
        assert_ne!(test.get(17).unwrap().image, a.image);
        assert!(ds.get(4096).is_err());
        let counts = ds.labels().unwrap().iter().fold(vec![0; 8], |mut c, &l| {
            c[l] += 1;
            c
        });
        assert!(counts.iter().all(|&c| c == 512));
    }

    #[test]
    fn classes_differ_more_than_samples_within_a_class() {
        let ds = SyntheticFlowers::new(Default::default(), Split::Train).unwrap();
        let mean = |label: usize| {
            let mut m = vec![0.0f32; 3 * 32 * 32];
            for k in 0..16 {
                let s = ds.get(label + 8 * k).unwrap();
                for (a, b) in m.iter_mut().zip(&s.image.data) {
                    *a += b / 16.0;
                }
            }
            m
        };
        let means: Vec<Vec<f32>> = (0..8).map(mean).collect();
        for i in 0..8 {
            for j in i + 1..8 {
                let d: f32 = means[i]
                    .iter()
                    .zip(&means[j])
                    .map(|(a, b)| (a - b).powi(2))
                    .sum();
                assert!(d > 5.0, "classes {i} and {j} look alike ({d})");
            }
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let cfg = SyntheticFlowersConfig {
            classes: 0,
            ..Default::default()
        };
        let e = SyntheticFlowers::new(cfg, Split::Train).unwrap_err();
        assert!(e.to_string().contains("classes"), "{e}");
    }
}
