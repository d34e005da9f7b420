//! [`SyntheticShapes`]: procedural pictures whose class is a silhouette's
//! shape and nothing else.
//!
//! [`SyntheticFlowers`](crate::SyntheticFlowers) gives every class its own
//! colours, so even a randomly initialised encoder separates its classes by
//! colour alone. Here the class fixes only the geometry ([`SHAPE_KINDS`]: disc,
//! ring, square, triangle, cross, star, crescent, bar); the foreground colour,
//! the two background colours and the gradient direction, position, size and
//! rotation are drawn for every picture independently of its class. Colour
//! statistics therefore carry no information about the label: a
//! representation must see shape to classify these pictures. Pictures are drawn
//! on the fly (2x2 supersampled), deterministically from the seed, the split
//! and the index.

use std::f32::consts::PI;

use kiln_core::rng::SeededRng;

use crate::color::hsv_to_rgb;
use crate::dataset::{check_index, Dataset, Sample, Split};
use crate::error::{DataError, Result};
use crate::image::Image;

/// The shape of each class, in label order.
pub const SHAPE_KINDS: [&str; 8] = [
    "disc", "ring", "square", "triangle", "cross", "star", "crescent", "bar",
];

/// Options of [`SyntheticShapes`].
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticShapesConfig {
    /// Number of classes: the first `classes` of [`SHAPE_KINDS`] (1..=8). Default 8.
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

impl Default for SyntheticShapesConfig {
    fn default() -> Self {
        Self {
            classes: SHAPE_KINDS.len(),
            train: 4096,
            test: 1024,
            size: 32,
            seed: 0,
        }
    }
}

impl SyntheticShapesConfig {
    /// Rejects a class count outside 1..=8 and absurd sizes, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(1..=SHAPE_KINDS.len()).contains(&self.classes) {
            return Err(DataError::config(
                "classes",
                format!(
                    "synthetic-shapes has {} shape kinds ({}), found {}",
                    SHAPE_KINDS.len(),
                    SHAPE_KINDS.join(", "),
                    self.classes
                ),
            ));
        }
        if !(8..=4096).contains(&self.size) {
            return Err(DataError::config(
                "size",
                format!("expected 8..=4096 pixels, found {}", self.size),
            ));
        }
        Ok(())
    }
}

/// Shape pictures with class labels; see the module docs.
///
/// `SyntheticShapes::new(Default::default(), Split::Train)` gives 4096
/// pictures of 8 classes at 3x32x32; item `i` has label `i % classes`, the
/// shape [`SHAPE_KINDS`]`[label]`.
#[derive(Debug, Clone)]
pub struct SyntheticShapes {
    cfg: SyntheticShapesConfig,
    split: Split,
    len: usize,
}

/// Per-picture variation, drawn from the picture's own generator; nothing in
/// it depends on the class.
struct Look {
    cx: f32,
    cy: f32,
    radius: f32,
    cos: f32,
    sin: f32,
    fg: [f32; 3],
    bg: [[f32; 3]; 2],
    /// Unit direction of the background gradient.
    grad: (f32, f32),
    /// Foreground shading: a gentle gradient of this strength along `grad`.
    shade: f32,
}

fn random_colour(rng: &mut SeededRng) -> [f32; 3] {
    hsv_to_rgb([
        rng.uniform_f32(0.0, 1.0),
        rng.uniform_f32(0.0, 1.0),
        rng.uniform_f32(0.1, 1.0),
    ])
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt()
}

impl SyntheticShapes {
    /// The `split` of the set described by `cfg`.
    pub fn new(cfg: SyntheticShapesConfig, split: Split) -> Result<Self> {
        cfg.validate()?;
        let len = match split {
            Split::Train => cfg.train,
            Split::Val | Split::Test => cfg.test,
        };
        Ok(Self { cfg, split, len })
    }

    /// The options this set was made with.
    pub fn config(&self) -> &SyntheticShapesConfig {
        &self.cfg
    }

    /// The label of item `index` (classes are balanced: `index % classes`).
    pub fn label(&self, index: usize) -> usize {
        index % self.cfg.classes
    }

    fn look(rng: &mut SeededRng) -> Look {
        let bg = [random_colour(rng), random_colour(rng)];
        let mid = std::array::from_fn(|c| 0.5 * (bg[0][c] + bg[1][c]));
        // A foreground that stands out from the background; the rule is the
        // same for every class, so colour still says nothing about the label.
        let mut fg = random_colour(rng);
        for _ in 0..16 {
            if distance(fg, mid) > 0.35 {
                break;
            }
            fg = random_colour(rng);
        }
        let rot = rng.uniform_f32(0.0, 2.0 * PI);
        let ga = rng.uniform_f32(0.0, 2.0 * PI);
        Look {
            cx: rng.uniform_f32(0.38, 0.62),
            cy: rng.uniform_f32(0.38, 0.62),
            radius: rng.uniform_f32(0.26, 0.38),
            cos: rot.cos(),
            sin: rot.sin(),
            fg,
            bg,
            grad: (ga.cos(), ga.sin()),
            shade: rng.uniform_f32(0.0, 0.25),
        }
    }

    /// Draws one picture of shape `kind` at `size x size` from `rng`.
    fn render(kind: usize, size: usize, rng: &mut SeededRng) -> Image {
        let look = Self::look(rng);
        let n = size * size;
        let mut data = vec![0.0f32; 3 * n];
        let ss = 2usize;
        let inv = 1.0 / (ss * ss) as f32;
        for y in 0..size {
            for x in 0..size {
                let mut acc = [0.0f32; 3];
                for sy in 0..ss {
                    for sx in 0..ss {
                        let u = (x as f32 + (sx as f32 + 0.5) / ss as f32) / size as f32;
                        let v = (y as f32 + (sy as f32 + 0.5) / ss as f32) / size as f32;
                        // position along the gradient, in [0, 1]
                        let g = 0.5 + 0.5 * ((u - 0.5) * look.grad.0 + (v - 0.5) * look.grad.1);
                        let dx = (u - look.cx) / look.radius;
                        let dy = (v - look.cy) / look.radius;
                        let lx = dx * look.cos + dy * look.sin;
                        let ly = -dx * look.sin + dy * look.cos;
                        let c = if inside(kind, lx, ly) {
                            let f = 1.0 - look.shade * g;
                            look.fg.map(|c| c * f)
                        } else {
                            std::array::from_fn(|c| look.bg[0][c] * (1.0 - g) + look.bg[1][c] * g)
                        };
                        for ch in 0..3 {
                            acc[ch] += c[ch];
                        }
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

/// Whether the point `(x, y)` of a shape's own frame (unit radius, centred,
/// unrotated) is inside shape `kind` (an index into [`SHAPE_KINDS`]).
fn inside(kind: usize, x: f32, y: f32) -> bool {
    let r = (x * x + y * y).sqrt();
    match kind {
        // disc
        0 => r <= 0.8,
        // ring
        1 => (0.55..=0.95).contains(&r),
        // square
        2 => x.abs().max(y.abs()) <= 0.68,
        // triangle: circumradius 1, edges at distance 0.5 from the centre
        3 => (0..3).all(|k| {
            let a = PI / 2.0 + k as f32 * 2.0 * PI / 3.0;
            -(x * a.cos() + y * a.sin()) <= 0.5
        }),
        // cross (plus sign)
        4 => {
            let (ax, ay) = (x.abs(), y.abs());
            (ax <= 0.3 && ay <= 0.95) || (ay <= 0.3 && ax <= 0.95)
        }
        // five-pointed star: radius between 0.42 (notches) and 1 (tips)
        5 => {
            let step = 2.0 * PI / 5.0;
            let a = y.atan2(x).rem_euclid(step) / step; // 0 and 1 at tips
            let t = (2.0 * a - 1.0).abs(); // 1 at tips, 0 at notches
            r <= 0.42 + 0.58 * t
        }
        // crescent: a disc with an offset disc cut out
        6 => r <= 0.9 && ((x - 0.42).powi(2) + y * y).sqrt() > 0.72,
        // bar
        _ => x.abs() <= 0.95 && y.abs() <= 0.26,
    }
}

impl Dataset for SyntheticShapes {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize) -> Result<Sample> {
        check_index("synthetic-shapes", index, self.len)?;
        let split_key = match self.split {
            Split::Train => 1,
            Split::Val => 2,
            Split::Test => 3,
        };
        // A stream of its own (key 0x5A), apart from SyntheticFlowers' with the same seed.
        let mut rng = SeededRng::derive(self.cfg.seed, &[0x5A, split_key, index as u64]);
        let label = self.label(index);
        Ok(Sample {
            image: Self::render(label, self.cfg.size, &mut rng),
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
        format!("synthetic-shapes/{}", self.split)
    }

    fn labels(&self) -> Option<Vec<usize>> {
        Some((0..self.len).map(|i| self.label(i)).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{SyntheticFlowers, SyntheticFlowersConfig};

    fn small(train: usize, test: usize, size: usize) -> SyntheticShapesConfig {
        SyntheticShapesConfig {
            train,
            test,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn deterministic_balanced_in_range_and_seeded() {
        let ds = SyntheticShapes::new(small(64, 16, 16), Split::Train).unwrap();
        let a = ds.get(13).unwrap();
        assert_eq!(a, ds.get(13).unwrap());
        assert_eq!(a.label, 13 % 8);
        assert_eq!(a.image.shape(), [3, 16, 16]);
        assert!(a.image.data.iter().all(|v| (0.0..=1.0).contains(v)));
        let other_seed = SyntheticShapes::new(
            SyntheticShapesConfig {
                seed: 7,
                ..small(64, 16, 16)
            },
            Split::Train,
        )
        .unwrap();
        assert_ne!(other_seed.get(13).unwrap().image, a.image);
        let test = SyntheticShapes::new(small(64, 16, 16), Split::Test).unwrap();
        assert_eq!(test.len(), 16);
        assert_ne!(test.get(13).unwrap().image, a.image);
        assert!(ds.get(64).is_err());
        let counts = ds.labels().unwrap().iter().fold(vec![0; 8], |mut c, &l| {
            c[l] += 1;
            c
        });
        assert_eq!(counts, vec![8; 8]);
    }

    #[test]
    fn every_shape_is_drawn_and_they_differ() {
        // Unit-frame silhouettes on a 64x64 grid: each kind covers a sensible
        // area and no two kinds cover the same points.
        let grid = |k: usize| -> Vec<bool> {
            (0..64 * 64)
                .map(|i| {
                    let x = (i % 64) as f32 / 32.0 - 1.0 + 1.0 / 64.0;
                    let y = (i / 64) as f32 / 32.0 - 1.0 + 1.0 / 64.0;
                    inside(k, x, y)
                })
                .collect()
        };
        let masks: Vec<Vec<bool>> = (0..SHAPE_KINDS.len()).map(grid).collect();
        for (k, m) in masks.iter().enumerate() {
            let area = m.iter().filter(|&&b| b).count() as f32 / (64.0 * 64.0);
            assert!(
                (0.1..0.6).contains(&area),
                "{}: area {area}",
                SHAPE_KINDS[k]
            );
            for (j, o) in masks.iter().enumerate().skip(k + 1) {
                let diff = m.iter().zip(o).filter(|(a, b)| a != b).count();
                assert!(
                    diff > 200,
                    "{} and {} overlap too much",
                    SHAPE_KINDS[k],
                    SHAPE_KINDS[j]
                );
            }
        }
    }

    /// Per-channel mean colour of each picture.
    fn mean_colours(ds: &dyn Dataset) -> (Vec<[f32; 3]>, Vec<usize>) {
        (0..ds.len())
            .map(|i| {
                let s = ds.get(i).unwrap();
                let n = s.image.data.len() / 3;
                let m = std::array::from_fn(|c| {
                    s.image.data[c * n..(c + 1) * n].iter().sum::<f32>() / n as f32
                });
                (m, s.label)
            })
            .unzip()
    }

    /// Accuracy of a nearest-class-centroid classifier (a linear probe) and of
    /// a 15-nearest-neighbour vote on mean colour, trained on `train`.
    fn colour_probe(train: &dyn Dataset, test: &dyn Dataset, classes: usize) -> (f64, f64) {
        let (xtr, ytr) = mean_colours(train);
        let (xte, yte) = mean_colours(test);
        let mut cent = vec![[0.0f32; 3]; classes];
        let mut cnt = vec![0.0f32; classes];
        for (x, &y) in xtr.iter().zip(&ytr) {
            for c in 0..3 {
                cent[y][c] += x[c];
            }
            cnt[y] += 1.0;
        }
        for (c, n) in cent.iter_mut().zip(&cnt) {
            c.iter_mut().for_each(|v| *v /= n);
        }
        let argmin = |d: Vec<f32>| {
            d.iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap()
        };
        let mut ok_centroid = 0;
        let mut ok_knn = 0;
        for (x, &y) in xte.iter().zip(&yte) {
            if argmin(cent.iter().map(|c| distance(*c, *x)).collect()) == y {
                ok_centroid += 1;
            }
            let mut near: Vec<(f32, usize)> = xtr
                .iter()
                .zip(&ytr)
                .map(|(t, &l)| (distance(*t, *x), l))
                .collect();
            near.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut votes = vec![0usize; classes];
            near[..15].iter().for_each(|&(_, l)| votes[l] += 1);
            if argmin(votes.iter().map(|&v| -(v as f32)).collect()) == y {
                ok_knn += 1;
            }
        }
        let n = yte.len() as f64;
        (ok_centroid as f64 / n, ok_knn as f64 / n)
    }

    #[test]
    fn mean_colour_says_nothing_about_the_class() {
        let tr = SyntheticShapes::new(small(1024, 512, 12), Split::Train).unwrap();
        let te = SyntheticShapes::new(small(1024, 512, 12), Split::Test).unwrap();
        let (centroid, knn) = colour_probe(&tr, &te, 8);
        // chance is 1/8 = 0.125; 512 test pictures put 2 sd at about 0.03
        assert!(
            centroid < 0.2 && knn < 0.2,
            "mean colour predicts the shape: centroid {centroid}, kNN {knn}"
        );
        // The same probe on SyntheticFlowers, whose classes have their own colours,
        // is nearly perfect: the check can tell the difference.
        let fcfg = SyntheticFlowersConfig {
            train: 256,
            test: 128,
            size: 12,
            ..Default::default()
        };
        let ftr = SyntheticFlowers::new(fcfg.clone(), Split::Train).unwrap();
        let fte = SyntheticFlowers::new(fcfg, Split::Test).unwrap();
        let (centroid, knn) = colour_probe(&ftr, &fte, 8);
        assert!(centroid > 0.8 && knn > 0.8, "{centroid} {knn}");
    }

    #[test]
    fn bad_config_names_the_field() {
        for (cfg, field) in [
            (
                SyntheticShapesConfig {
                    classes: 9,
                    ..Default::default()
                },
                "classes",
            ),
            (
                SyntheticShapesConfig {
                    classes: 0,
                    ..Default::default()
                },
                "classes",
            ),
            (
                SyntheticShapesConfig {
                    size: 4,
                    ..Default::default()
                },
                "size",
            ),
        ] {
            let e = SyntheticShapes::new(cfg, Split::Train).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
    }
}
