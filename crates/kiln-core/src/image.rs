//! Tensors to PNG image grids, and loss curves from `metrics.jsonl`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// Why a figure could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FigureError {
    /// The tensor has the wrong shape or values.
    #[error("image grid: {0}")]
    Input(String),
    /// Tensor error.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Encoding or drawing failed.
    #[error("{path}: {reason}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Reading metrics failed.
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
}

/// Layout of an image grid.
#[derive(Debug, Clone, Copy)]
pub struct GridOptions {
    /// Images per row (0 = roughly square).
    pub ncols: usize,
    /// Pixels between images.
    pub padding: usize,
    /// The value range mapped to 0..255 (values outside are clipped).
    pub range: (f32, f32),
    /// Integer upscaling factor (nearest), so 32x32 images are visible.
    pub scale: usize,
}

impl Default for GridOptions {
    fn default() -> Self {
        Self {
            ncols: 0,
            padding: 2,
            range: (0.0, 1.0),
            scale: 2,
        }
    }
}

/// Renders `[N, C, H, W]` (C = 1 or 3) as an RGB grid image.
pub fn image_grid(images: &Tensor, opts: &GridOptions) -> Result<image::RgbImage, FigureError> {
    let (n, c, h, w) = images.dims4().map_err(|_| {
        FigureError::Input(format!("expected [N, C, H, W], got {:?}", images.dims()))
    })?;
    if c != 1 && c != 3 {
        return Err(FigureError::Input(format!(
            "expected 1 or 3 channels, got {c}"
        )));
    }
    if n == 0 {
        return Err(FigureError::Input("no images".into()));
    }
    let ncols = if opts.ncols == 0 {
        (n as f64).sqrt().ceil() as usize
    } else {
        opts.ncols.min(n)
    };
    let nrows = n.div_ceil(ncols);
    let s = opts.scale.max(1);
    let (cw, ch) = (w * s + opts.padding, h * s + opts.padding);
    let (gw, gh) = (ncols * cw + opts.padding, nrows * ch + opts.padding);
    let data = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (lo, hi) = opts.range;
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (r, col) = (i / ncols, i % ncols);
        let (x0, y0) = (opts.padding + col * cw, opts.padding + r * ch);
        for y in 0..h * s {
            for x in 0..w * s {
                let (sy, sx) = (y / s, x / s);
                let px = |ch: usize| {
                    let v = data[((i * c + ch) * h + sy) * w + sx];
                    let v = if v.is_finite() { (v - lo) / span } else { 0.0 };
                    (v.clamp(0.0, 1.0) * 255.0).round() as u8
                };
                let rgb = if c == 3 {
                    [px(0), px(1), px(2)]
                } else {
                    [px(0); 3]
                };
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    }
    Ok(img)
}

/// Writes an image grid as PNG atomically.
pub fn save_image_grid(
    images: &Tensor,
    path: &Path,
    opts: &GridOptions,
) -> Result<(), FigureError> {
    let img = image_grid(images, opts)?;
    save_png(&img, path)
}

/// Stacks several `[N, C, H, W]` tensors as rows of one grid (e.g. the
/// chapter's images / masked / reconstructions figure).
pub fn save_image_rows(
    rows: &[&Tensor],
    path: &Path,
    opts: &GridOptions,
) -> Result<(), FigureError> {
    let first = rows
        .first()
        .ok_or_else(|| FigureError::Input("no rows".into()))?;
    let n = first.dim(0)?;
    let all = Tensor::cat(rows, 0)?;
    save_image_grid(&all, path, &GridOptions { ncols: n, ..*opts })
}

/// Encodes an RGB image as PNG and writes it atomically.
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<(), FigureError> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| FigureError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::files::write_atomic(path, &bytes).map_err(|e| FigureError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// Registers the bundled font (an ASCII subset of DejaVu Sans) as plotters'
/// `sans-serif`, once per process: call it before drawing your own plotters
/// figure, as [`plot_metrics`] does (a fresh CI machine may have no fonts).
pub fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is bundled: a fresh CI machine may have no system fonts.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

/// Series of more points than this get a smoothed line over a faint raw one.
const SMOOTH_FROM: usize = 50;
/// Series of at most this many points get a marker on each (so that one
/// evaluation at the end of a run shows as a dot, not as nothing).
const MARK_UP_TO: usize = 40;

/// TensorBoard's scalar smoothing: an exponential moving average with
/// `weight` on the past, its start-up bias divided out (so the first values
/// are not pulled towards 0, and a constant series stays constant).
pub fn smooth_ema(ys: &[f64], weight: f64) -> Vec<f64> {
    let mut last = 0.0;
    let mut debias = 1.0;
    ys.iter()
        .map(|&y| {
            last = last * weight + (1.0 - weight) * y;
            debias *= weight;
            last / (1.0 - debias)
        })
        .collect()
}

/// The smoothing weight for a series of `n` points: a window of about
/// `n / 20` points (weight 0.6 at 50 points, 0.98 at 1000, at most 0.99).
fn smoothing_weight(n: usize) -> f64 {
    (1.0 - 20.0 / n.max(1) as f64).clamp(0.6, 0.99)
}

/// Where a legend may go, in the order ties are broken: each place with
/// whether it is on the right, and its vertical place (1 upper, 0 middle,
/// -1 lower).
const PLACES: [(plotters::chart::SeriesLabelPosition, bool, i8); 6] = [
    (plotters::chart::SeriesLabelPosition::UpperRight, true, 1),
    (plotters::chart::SeriesLabelPosition::UpperLeft, false, 1),
    (plotters::chart::SeriesLabelPosition::LowerRight, true, -1),
    (plotters::chart::SeriesLabelPosition::LowerLeft, false, -1),
    (plotters::chart::SeriesLabelPosition::MiddleRight, true, 0),
    (plotters::chart::SeriesLabelPosition::MiddleLeft, false, 0),
];

/// The place (a corner, or the middle of the left or right side) where a
/// legend covering `size` (fractions of the plot's width and height) hides
/// the fewest of `points` (already scaled to the plot, 0..1 on each axis):
/// matplotlib's `loc="best"`, over six places. Ties go to the earlier of
/// upper right, upper left, lower right, lower left, middle right, middle left.
pub fn legend_place(
    points: &[(f64, f64)],
    size: (f64, f64),
) -> plotters::chart::SeriesLabelPosition {
    let (w, h) = size;
    let covered = |right: bool, vertical: i8| {
        points
            .iter()
            .filter(|&&(x, y)| {
                (if right { x >= 1.0 - w } else { x <= w })
                    && match vertical {
                        1 => y >= 1.0 - h,
                        -1 => y <= h,
                        _ => (y - 0.5).abs() <= h / 2.0,
                    }
            })
            .count()
    };
    PLACES
        .iter()
        .min_by_key(|(_, right, vertical)| covered(*right, *vertical))
        .map_or(plotters::chart::SeriesLabelPosition::UpperRight, |p| {
            p.0.clone()
        })
}

/// Draws every `(split, field)` series of `metrics.jsonl` whose field is in
/// `fields` (all numeric fields when empty) against the step, as a PNG.
/// Series of more than 50 points (per-step losses) are drawn faint, under
/// their [`smooth_ema`] line; series of up to 40 points (epoch summaries,
/// evaluations) get a dot on each point.
pub fn plot_metrics(
    metrics: &Path,
    out: &Path,
    title: &str,
    fields: &[&str],
) -> Result<(), FigureError> {
    use plotters::prelude::*;
    ensure_font();
    let recs = crate::run::read_metrics(metrics)?;
    // Each series with the index of its field: one colour per field, so a
    // loss per step and its epoch means share it.
    type Series = (String, usize, Vec<(f64, f64)>);
    let mut series: Vec<Series> = Vec::new();
    let mut field_order: Vec<&str> = Vec::new();
    for r in &recs {
        for (k, v) in &r.values {
            if !fields.is_empty() && !fields.contains(&k.as_str()) {
                continue;
            }
            let name = format!("{} {k}", r.split);
            match series.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, pts)) => pts.push((r.step as f64, *v)),
                None => {
                    let field = match field_order.iter().position(|f| f == k) {
                        Some(i) => i,
                        None => {
                            field_order.push(k);
                            field_order.len() - 1
                        }
                    };
                    series.push((name, field, vec![(r.step as f64, *v)]));
                }
            }
        }
    }
    if series.is_empty() {
        return Err(FigureError::Input(format!(
            "{}: no metrics to plot",
            metrics.display()
        )));
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (_, _, pts) in &series {
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    // A single step or a flat series: centre it rather than pin it to a
    // corner.
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 <= y0 {
        let d = (y0.abs() * 0.1).max(0.5);
        (y0, y1) = (y0 - d, y1 + d);
    }
    let pad = (y1 - y0) * 0.05;
    // Room on the right for the dot of an evaluation at the last step.
    x1 += (x1 - x0) * 0.02;
    let (w, h) = (800u32, 480u32);
    // What each series draws: its faint raw points (long series), its line
    // (smoothed when long), its legend name, and whether it gets markers.
    struct Drawn {
        raw: Option<Vec<(f64, f64)>>,
        line: Vec<(f64, f64)>,
        label: String,
        marks: bool,
        color: usize,
    }
    let drawn: Vec<Drawn> = series
        .iter()
        .map(|(name, field, pts)| {
            if pts.len() > SMOOTH_FROM {
                let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
                let smooth = smooth_ema(&ys, smoothing_weight(pts.len()));
                Drawn {
                    raw: Some(pts.clone()),
                    line: pts.iter().zip(smooth).map(|(p, y)| (p.0, y)).collect(),
                    label: format!("{name} (smoothed)"),
                    marks: false,
                    color: *field,
                }
            } else {
                Drawn {
                    raw: None,
                    line: pts.clone(),
                    label: name.clone(),
                    marks: pts.len() <= MARK_UP_TO,
                    color: *field,
                }
            }
        })
        .collect();
    let (ylo, yhi) = (y0 - pad, y1 + pad);
    let scaled: Vec<(f64, f64)> = drawn
        .iter()
        .flat_map(|d| d.raw.iter().flatten().chain(&d.line))
        .map(|&(x, y)| ((x - x0) / (x1 - x0), (y - ylo) / (yhi - ylo)))
        .collect();
    // The legend's size in pixels (14 px text, ~7.5 px a character, a 20 px
    // row per series), over the plot area's (the figure less its margins,
    // caption and label areas).
    let chars = drawn.iter().map(|d| d.label.len()).max().unwrap_or(0);
    let legend = (
        (40.0 + 7.5 * chars as f64) / f64::from(w - 100),
        (12.0 + 20.0 * drawn.len() as f64) / f64::from(h - 100),
    );
    let place = legend_place(&scaled, legend);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: String| FigureError::Write {
        path: out.to_path_buf(),
        reason: e,
    };
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, ylo..yhi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            // Steps are whole: a short run's fractional ticks get no label,
            // instead of repeating "1 1 1 2 2 2".
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{}", x.round() as i64)
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for d in drawn {
            let color = Palette99::pick(d.color).to_rgba();
            if let Some(raw) = d.raw {
                chart
                    .draw_series(LineSeries::new(raw, color.mix(0.25)))
                    .map_err(|e| err(e.to_string()))?;
            }
            if d.marks {
                chart
                    .draw_series(d.line.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(e.to_string()))?;
            }
            let marks = d.marks;
            chart
                .draw_series(LineSeries::new(d.line, color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(d.label)
                .legend(move |(x, y)| {
                    // A dot on the legend's line for series drawn with dots.
                    let dot = if marks { 3 } else { 0 };
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (18, 0)], color.stroke_width(2))
                        + Circle::new((9, 0), dot, color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(place)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| err("bad buffer size".into()))?;
    save_png(&img, out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    #[test]
    fn grid_layout_and_values() {
        // Two 1x2x2 images: black and white.
        let t = Tensor::new(&[0f32, 0., 0., 0., 1., 1., 1., 1.], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 2, 2))
            .unwrap();
        let g = image_grid(
            &t,
            &GridOptions {
                ncols: 2,
                padding: 1,
                range: (0.0, 1.0),
                scale: 1,
            },
        )
        .unwrap();
        assert_eq!(g.dimensions(), (2 * 3 + 1, 3 + 1));
        assert_eq!(g.get_pixel(1, 1).0, [0, 0, 0]);
        assert_eq!(g.get_pixel(4, 1).0, [255, 255, 255]);
        let bad = Tensor::zeros((2, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(image_grid(&bad, &GridOptions::default()).is_err());
    }

    #[test]
    fn png_and_plot_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::ones((3, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let p = dir.path().join("g.png");
        save_image_grid(&t, &p, &GridOptions::default()).unwrap();
        let back = image::open(&p).unwrap();
        assert!(back.width() > 8);
        let m = dir.path().join("metrics.jsonl");
        let mut log = crate::run::MetricsLog::open(&m).unwrap();
        for s in 1..20u64 {
            log.log(s, 0, "train", &[("loss", 10.0 / s as f64)])
                .unwrap();
        }
        let out = dir.path().join("loss.png");
        plot_metrics(&m, &out, "loss", &["loss"]).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 480));
        // Something other than white was drawn (axes, line, text).
        assert!(img.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "").unwrap();
        assert!(plot_metrics(&empty, &out, "x", &[]).is_err());
    }

    #[test]
    fn the_legend_takes_the_emptiest_place() {
        use plotters::chart::SeriesLabelPosition as P;
        let size = (0.3, 0.2);
        let at = |pts: &[(f64, f64)]| format!("{:?}", legend_place(pts, size));
        // Nothing drawn: the first corner, upper right.
        assert_eq!(at(&[]), format!("{:?}", P::UpperRight));
        // A loss falling from the upper left to the lower right.
        let falling: Vec<(f64, f64)> = (0..=100)
            .map(|i| (f64::from(i) / 100.0, 1.0 - f64::from(i) / 100.0))
            .collect();
        assert_eq!(at(&falling), format!("{:?}", P::UpperRight));
        // A rising curve (a GAN's generator loss) leaves the lower right free.
        let rising: Vec<(f64, f64)> = falling.iter().map(|&(x, y)| (x, 1.0 - y)).collect();
        let mut both = rising.clone();
        both.extend((0..=100).map(|i| (f64::from(i) / 100.0, 0.9)));
        assert_eq!(at(&both), format!("{:?}", P::LowerRight));
        // Curves near the top and the bottom (a discriminator's outputs on
        // real and fake images) leave only the middle free.
        let apart: Vec<(f64, f64)> = (0..=100)
            .flat_map(|i| [(f64::from(i) / 100.0, 0.95), (f64::from(i) / 100.0, 0.05)])
            .collect();
        assert_eq!(at(&apart), format!("{:?}", P::MiddleRight));
    }

    /// A one-step run's single point sits in the middle of the plot, not
    /// pinned to its lower left corner.
    #[test]
    fn a_single_step_is_drawn_in_the_middle() {
        use plotters::style::{Color, Palette, Palette99};
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        let mut log = crate::run::MetricsLog::open(&m).unwrap();
        log.log(1, 0, "train", &[("loss", 1.0)]).unwrap();
        let out = dir.path().join("loss.png");
        plot_metrics(&m, &out, "loss", &[]).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        let c = Palette99::pick(0).to_rgba().rgb();
        // The series' pixels left of the legend (upper right).
        let (mut n, mut sx, mut sy) = (0u32, 0u32, 0u32);
        for (x, y, p) in img.enumerate_pixels() {
            if p.0 == [c.0, c.1, c.2] && x < 600 {
                (n, sx, sy) = (n + 1, sx + x, sy + y);
            }
        }
        assert!(n > 10, "{n} pixels");
        let (cx, cy) = (sx / n, sy / n);
        assert!(
            (380..=460).contains(&cx) && (180..=300).contains(&cy),
            "dot at ({cx}, {cy})"
        );
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        // weight 0.5 on [0, 10, 4]: EMAs 0, 5, 4.5 over 1 - 0.5^k = 0.5, 0.75, 0.875.
        let s = smooth_ema(&[0.0, 10.0, 4.0], 0.5);
        let want = [0.0, 5.0 / 0.75, 4.5 / 0.875];
        assert!(
            s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{s:?}"
        );
        assert!(smooth_ema(&[3.0; 200], 0.98)
            .iter()
            .all(|v| (v - 3.0).abs() < 1e-12));
        assert_eq!(smoothing_weight(50), 0.6);
        assert!((smoothing_weight(1000) - 0.98).abs() < 1e-12);
        assert_eq!(smoothing_weight(100_000), 0.99);
    }

    /// A one-point series (an evaluation at the end of a run) shows as a dot
    /// beside a long per-step series: more pixels of its colour than its
    /// legend entry's line alone has.
    #[test]
    fn a_single_evaluation_is_drawn() {
        use plotters::style::{Color, Palette, Palette99};
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        let mut log = crate::run::MetricsLog::open(&m).unwrap();
        for s in 1..=200u64 {
            log.log(s, 0, "train", &[("loss", 10.0 / s as f64 + (s % 7) as f64)])
                .unwrap();
        }
        log.log(200, 1, "test", &[("neg_elbo", 2.0)]).unwrap();
        let out = dir.path().join("loss.png");
        plot_metrics(&m, &out, "loss", &["loss", "neg_elbo"]).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        let c = Palette99::pick(1).to_rgba().rgb();
        let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // The legend's 18 x 2 line is ~40 pixels; a radius-3 dot adds ~25,
        // in the plot and on the legend's line.
        assert!(n > 80, "{n} pixels of the test series' colour");
    }
}
