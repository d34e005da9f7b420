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

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is bundled: a fresh CI machine may have no system fonts.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

/// Draws every `(split, field)` series of `metrics.jsonl` whose field is in
/// `fields` (all numeric fields when empty) against the step, as a PNG.
pub fn plot_metrics(
    metrics: &Path,
    out: &Path,
    title: &str,
    fields: &[&str],
) -> Result<(), FigureError> {
    use plotters::prelude::*;
    ensure_font();
    let recs = crate::run::read_metrics(metrics)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &recs {
        for (k, v) in &r.values {
            if !fields.is_empty() && !fields.contains(&k.as_str()) {
                continue;
            }
            let name = format!("{} {k}", r.split);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((r.step as f64, *v)),
                None => series.push((name, vec![(r.step as f64, *v)])),
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
    for (_, pts) in &series {
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (w, h) = (800u32, 480u32);
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
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
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
}
