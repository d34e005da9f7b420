//! The reward-against-KL frontier as a PNG (plotters' bitmap backend with
//! kiln-core's bundled ASCII subset of DejaVu Sans: a CI machine may have
//! no fonts).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RlhfError};

/// ASCII only (the bundled font has no other glyphs): β → b, τ → tau, ≤ → <=.
fn ascii(s: &str) -> String {
    s.replace('β', "b").replace('τ', "tau").replace('≤', "<=")
}

/// One method's evaluation on the held-out prompts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    /// The method (`base`, `dpo β=0.1`, `best-of-8`, `rwft τ=0.5`).
    pub name: String,
    /// The labeller's positive rate.
    pub positive_rate: f64,
    /// The reward model's mean score.
    pub reward: f64,
    /// KL to the base model (nats per completion).
    pub kl: f64,
    /// Whether `kl` is best-of-n's analytic bound rather than a sample estimate.
    pub kl_is_bound: bool,
    /// Mean completion length (tokens).
    pub mean_length: f64,
    /// A few completions (prompt + text).
    pub samples: Vec<String>,
}

type Metric = fn(&MethodResult) -> f64;

/// Draws two panels, the reward model's score and the labeller's positive
/// rate against the KL to the base model, one point per method, named in a
/// legend placed where it hides the fewest points (names written beside the
/// points overlapped wherever methods land close together: best-of-n, PPO
/// and DPO near KL 0).
pub fn frontier(methods: &[MethodResult], out: &Path) -> Result<()> {
    use plotters::prelude::*;
    kiln_core::image::ensure_font();
    let (w, h) = (1000u32, 440u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: String| RlhfError::file(out, e);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let panels = root.split_evenly((1, 2));
        let kl_max = methods.iter().map(|m| m.kl).fold(0.0f64, f64::max).max(0.1) * 1.3;
        let series: [(&str, Metric); 2] = [
            ("reward-model score", |m| m.reward),
            ("labeller positive rate", |m| m.positive_rate),
        ];
        for (panel, (label, f)) in panels.iter().zip(series) {
            let ys: Vec<f64> = methods.iter().map(f).collect();
            let (mut y0, mut y1) = ys
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            if y1 - y0 < 1e-6 {
                y0 -= 0.5;
                y1 += 0.5;
            }
            let pad = (y1 - y0) * 0.15;
            let kl_min = methods.iter().map(|m| m.kl).fold(0.0f64, f64::min) - 0.05 * kl_max;
            let (ylo, yhi) = (y0 - pad, y1 + pad);
            let scaled: Vec<(f64, f64)> = methods
                .iter()
                .zip(&ys)
                .map(|(m, y)| ((m.kl - kl_min) / (kl_max - kl_min), (y - ylo) / (yhi - ylo)))
                .collect();
            // The legend over the plot area, in pixels: 13 px text at ~7 px a
            // character after a 30 px mark, an 18 px row per method; the
            // panel less its margins, label areas and caption.
            let chars = methods
                .iter()
                .map(|m| ascii(&m.name).len())
                .max()
                .unwrap_or(0);
            let (pw, ph) = (f64::from(w / 2 - 24 - 56), f64::from(h - 24 - 36 - 30));
            let legend = (
                (40.0 + 7.0 * chars as f64) / pw,
                (12.0 + 18.0 * methods.len() as f64) / ph,
            );
            let place = kiln_core::image::legend_place(&scaled, legend);
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{label} vs KL to base"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(kl_min..kl_max, ylo..yhi)
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc("KL to base (nats)")
                .y_desc(label)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            for (i, (m, y)) in methods.iter().zip(&ys).enumerate() {
                let c = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(std::iter::once(Circle::new((m.kl, *y), 5, c.filled())))
                    .map_err(|e| err(e.to_string()))?
                    .label(ascii(&m.name))
                    .legend(move |(x, y)| Circle::new((x + 6, y), 5, c.filled()));
            }
            chart
                .configure_series_labels()
                .position(place)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| err("bad image buffer".into()))?;
    Ok(kiln_core::image::save_png(&img, out)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use plotters::style::{Color, Palette, Palette99};

    fn method(name: &str, kl: f64, score: f64) -> MethodResult {
        MethodResult {
            name: name.into(),
            positive_rate: score / 4.0,
            reward: score,
            kl,
            kl_is_bound: false,
            mean_length: 10.0,
            samples: Vec::new(),
        }
    }

    /// Each method is a dot in both panels and in both legends, even where
    /// two methods land on almost the same point.
    #[test]
    fn every_method_is_drawn_in_both_panels_and_legends() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frontier.png");
        let methods = [
            method("base", 0.0, 1.0),
            method("dpo β=0.1", 7.0, 2.3),
            method("best-of-8", 1.2, 2.6),
            method("ppo", 6.0, 2.5),
        ];
        frontier(&methods, &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1000, 440));
        for (i, m) in methods.iter().enumerate() {
            let c = Palette99::pick(i).to_rgba().rgb();
            let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
            // Four radius-5 dots of ~80 pixels each; others may hide part of one.
            assert!(n > 200, "{}: {n} pixels", m.name);
        }
    }

    /// A method far off at high KL for a low score (an over-optimised run)
    /// is not hidden under the legend: the legend moves elsewhere.
    #[test]
    fn the_legend_does_not_hide_a_method() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frontier.png");
        let methods = [
            method("base", 0.0, 1.0),
            method("dpo β=0.1", 0.5, 1.3),
            method("best-of-8", 1.2, 1.6),
            method("ppo", 2.0, 2.5),
            method("rwft τ=0.5", 9.0, 0.9),
        ];
        frontier(&methods, &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        let c = Palette99::pick(4).to_rgba().rgb();
        let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // Two legend marks and two plotted dots, ~80 pixels each; under a
        // legend's translucent box a dot's pixels change colour.
        assert!(n > 280, "{n} pixels of the far method's colour");
    }
}
