//! [`Image`]: a planar `[C, H, W]` f32 picture with values in [0, 1], and
//! decoding/encoding helpers on top of the `image` crate.

use std::path::Path;

use crate::error::{DataError, Result};

/// A planar image: `channels` planes of `height x width` f32 values, row-major
/// (the layout of one item of a `[B, C, H, W]` batch). Values are in [0, 1]
/// unless a normalize transform has been applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Number of channels (1 for grayscale, 3 for RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// `channels * height * width` values, channel-major.
    pub data: Vec<f32>,
}

/// Which channels a decoder should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorMode {
    /// Always three channels (grayscale is replicated).
    #[default]
    Rgb,
    /// One luma channel.
    Gray,
    /// One channel for grayscale files, three otherwise.
    Native,
}

impl Image {
    /// An image from planar data; errors if the length does not match.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != channels * height * width {
            return Err(DataError::config(
                "image data",
                format!(
                    "expected {channels}x{height}x{width} = {} values, found {}",
                    channels * height * width,
                    data.len()
                ),
            ));
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// An all-zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// The value at channel `c`, row `y`, column `x`.
    #[inline]
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    /// One channel plane.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// An image from interleaved 8-bit pixels (`HWC`), scaled to [0, 1].
    pub fn from_interleaved_u8(
        channels: usize,
        height: usize,
        width: usize,
        pixels: &[u8],
    ) -> Result<Self> {
        if pixels.len() != channels * height * width {
            return Err(DataError::config(
                "image pixels",
                format!(
                    "expected {} bytes for {channels}x{height}x{width}, found {}",
                    channels * height * width,
                    pixels.len()
                ),
            ));
        }
        let n = height * width;
        let mut data = vec![0.0f32; channels * n];
        for (i, px) in pixels.chunks_exact(channels).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                data[c * n + i] = f32::from(v) / 255.0;
            }
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// An image from planar 8-bit pixels (`CHW`, as in CIFAR/MNIST), scaled to [0, 1].
    pub fn from_planar_u8(channels: usize, height: usize, width: usize, pixels: &[u8]) -> Self {
        Self {
            channels,
            height,
            width,
            data: pixels.iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Decodes a PNG or JPEG held in memory; `origin` names it in errors.
    ///
    /// A truncated JPEG is refused ([`DataError::Decode`]): the `image`
    /// crate's decoder fills the missing part with grey and reports success,
    /// so the file's structure is checked up to its end-of-image marker first.
    pub fn decode(bytes: &[u8], mode: ColorMode, origin: &Path) -> Result<Self> {
        let err = |msg: String| DataError::Decode {
            path: origin.to_path_buf(),
            msg,
        };
        if bytes.starts_with(&[0xff, 0xd8]) {
            check_jpeg_complete(bytes).map_err(err)?;
        }
        // A few hundred bytes can declare a picture of hundreds of megapixels
        // (found by the `image` fuzz target: 374 bytes of JPEG, 288.7 MP), so
        // the header's size is checked before anything is decoded.
        let dims = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok());
        if let Some((w, h)) = dims {
            let pixels = u64::from(w) * u64::from(h);
            if pixels > MAX_PIXELS {
                return Err(err(format!(
                    "the image is {w} x {h} = {pixels} pixels, over the limit of {MAX_PIXELS} \
                     (Pillow's MAX_IMAGE_PIXELS): a decompression bomb, or a picture too large \
                     to train on; resize it"
                )));
            }
        }
        // Decoders are third-party code fed untrusted bytes: a panic inside
        // one (zune-jpeg 0.5.15 overflows on some corrupt JPEGs when built with
        // overflow checks, zune-image issue 382) becomes this file's error.
        let img = std::panic::catch_unwind(|| image::load_from_memory(bytes))
            .map_err(|p| {
                err(format!(
                    "the decoder failed on corrupt data ({})",
                    panic_text(&p)
                ))
            })?
            .map_err(|e| err(e.to_string()))?;
        Ok(Self::from_dynamic(&img, mode))
    }

    /// Reads and decodes a PNG or JPEG file.
    pub fn open(path: &Path, mode: ColorMode) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::decode(&bytes, mode, path)
    }

    /// Converts a decoded `image` crate picture.
    pub fn from_dynamic(img: &image::DynamicImage, mode: ColorMode) -> Self {
        let gray = matches!(mode, ColorMode::Gray)
            || (matches!(mode, ColorMode::Native) && !img.color().has_color());
        let (w, h) = (img.width() as usize, img.height() as usize);
        if gray {
            let l = img.to_luma8();
            Self::from_planar_u8(1, h, w, l.as_raw())
        } else {
            let rgb = img.to_rgb8();
            // Sizes come from the decoder, so this cannot mismatch.
            Self::from_interleaved_u8(3, h, w, rgb.as_raw())
                .unwrap_or_else(|_| Self::zeros(3, h, w))
        }
    }

    /// Interleaved 8-bit pixels (`HWC`), values clamped to [0, 1] first.
    pub fn to_interleaved_u8(&self) -> Vec<u8> {
        let n = self.height * self.width;
        let mut out = vec![0u8; self.channels * n];
        for c in 0..self.channels {
            for i in 0..n {
                out[i * self.channels + c] = to_u8(self.data[c * n + i]);
            }
        }
        out
    }

    /// Three channels: grayscale is replicated, RGB returned as is.
    pub fn to_rgb(self) -> Self {
        if self.channels == 1 {
            let mut data = Vec::with_capacity(3 * self.data.len());
            for _ in 0..3 {
                data.extend_from_slice(&self.data);
            }
            Self {
                channels: 3,
                data,
                ..self
            }
        } else {
            self
        }
    }

    /// One luma channel (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B, as PIL).
    pub fn to_gray(self) -> Self {
        if self.channels != 3 {
            return self;
        }
        let n = self.height * self.width;
        let (r, rest) = self.data.split_at(n);
        let (g, b) = rest.split_at(n);
        let data = (0..n)
            .map(|i| 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i])
            .collect();
        Self {
            channels: 1,
            data,
            ..self
        }
    }

    /// Encodes as PNG bytes (1 or 3 channels).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        encode(self, image::ImageFormat::Png)
    }

    /// Encodes as JPEG bytes (1 or 3 channels, quality 90).
    pub fn to_jpeg(&self) -> Result<Vec<u8>> {
        encode(self, image::ImageFormat::Jpeg)
    }

    /// Writes a PNG (through a temporary file renamed into place).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, &self.to_png()?)
    }
}

/// Checks that a JPEG's marker structure runs to its end-of-image marker
/// (`FF D9`): every segment's length fits in the data, and each scan's
/// entropy-coded data is followed by another marker. Returns what is wrong
/// otherwise (a truncated file, as a cut download or copy leaves it).
pub fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let n = bytes.len();
    let cut = |at: usize, what: &str| {
        Err(format!(
            "truncated JPEG: the data ends at byte {n} inside {what} starting at byte {at}, \
             before the end-of-image marker"
        ))
    };
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return Err("not a JPEG: it does not start with the start-of-image marker FF D8".into());
    }
    let mut i = 2;
    loop {
        // a marker: FF, optional FF fill bytes, then the code
        if i >= n {
            return cut(i, "the next marker");
        }
        if bytes[i] != 0xff {
            // extraneous bytes before a marker: skipped, as libjpeg does
            match bytes[i..].iter().position(|&b| b == 0xff) {
                Some(k) => i += k,
                None => return cut(i, "bytes before the next marker"),
            }
        }
        let at = i;
        while i < n && bytes[i] == 0xff {
            i += 1;
        }
        if i >= n {
            return cut(at, "a marker");
        }
        let code = bytes[i];
        i += 1;
        match code {
            0xd9 => return Ok(()),
            // standalone markers: restart, TEM
            0xd0..=0xd7 | 0x01 => continue,
            _ => {}
        }
        if i + 2 > n {
            return cut(at, "a segment header");
        }
        let len = usize::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        if len < 2 {
            return Err(format!(
                "damaged JPEG: segment at byte {at} has length {len}, below the minimum of 2"
            ));
        }
        if i + len > n {
            return cut(at, &format!("a {len}-byte segment"));
        }
        i += len;
        if code == 0xda {
            // entropy-coded data: runs to the next marker that is not a
            // stuffed byte (FF 00), a restart marker or fill
            let scan = i;
            loop {
                if i + 1 >= n {
                    return cut(scan, "the image data of a scan");
                }
                if bytes[i] == 0xff {
                    let next = bytes[i + 1];
                    if next == 0x00 || (0xd0..=0xd7).contains(&next) {
                        i += 2;
                        continue;
                    }
                    if next == 0xff {
                        i += 1;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
        }
    }
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

fn encode(img: &Image, format: image::ImageFormat) -> Result<Vec<u8>> {
    let color = match img.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => {
            return Err(DataError::config(
                "image channels",
                format!("can only encode 1 or 3 channels, found {c}"),
            ))
        }
    };
    let mut out = std::io::Cursor::new(Vec::new());
    let px = img.to_interleaved_u8();
    let res = match format {
        image::ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, 90,
        )
        .encode(&px, img.width as u32, img.height as u32, color),
        _ => image::write_buffer_with_format(
            &mut out,
            &px,
            img.width as u32,
            img.height as u32,
            color,
            format,
        ),
    };
    res.map_err(|e| DataError::config("image encoding", e.to_string()))?;
    Ok(out.into_inner())
}

/// Tiles equally sized images into one grid image, `cols` per row, with a
/// `pad`-pixel white border between them.
pub fn grid(images: &[Image], cols: usize, pad: usize) -> Result<Image> {
    let Some(first) = images.first() else {
        return Err(DataError::config("grid", "no images"));
    };
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols);
    let c = images.iter().map(|i| i.channels).max().unwrap_or(1);
    let (h, w) = (first.height, first.width);
    let gh = rows * h + (rows + 1) * pad;
    let gw = cols * w + (cols + 1) * pad;
    let mut out = Image {
        channels: c,
        height: gh,
        width: gw,
        data: vec![1.0; c * gh * gw],
    };
    for (k, img) in images.iter().enumerate() {
        if img.height != h || img.width != w {
            return Err(DataError::Shape {
                index: k,
                expected: first.shape().to_vec(),
                found: img.shape().to_vec(),
            });
        }
        let img = if img.channels < c {
            img.clone().to_rgb()
        } else {
            img.clone()
        };
        let (oy, ox) = (pad + (k / cols) * (h + pad), pad + (k % cols) * (w + pad));
        for ch in 0..c {
            for y in 0..h {
                let src = &img.data[(ch * h + y) * w..(ch * h + y + 1) * w];
                let d = (ch * gh + oy + y) * gw + ox;
                out.data[d..d + w].copy_from_slice(src);
            }
        }
    }
    Ok(out)
}

/// The most pixels (width x height) a decoded image may have: Pillow's
/// `Image.MAX_IMAGE_PIXELS` (89,478,485, about 9459 x 9459). Pillow warns
/// above it and refuses twice as many; kiln refuses anything above it, since
/// no dataset it trains on needs more.
pub const MAX_PIXELS: u64 = 89_478_485;

/// A caught panic's message, for error text.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
