//! The shape and geometry rules of kiln's ops, written once for the CPU ops,
//! their CUDA launchers and `cargo xtask export-gpu-refs`: what input shapes
//! an op takes (with an error naming the op and the shape it got) and what
//! output sizes follow from them.
//!
//! ```
//! use kiln_core::ops::shape;
//! assert_eq!(shape::dims4(&[2, 3, 9, 11], "pool")?, (2, 3, 9, 11));
//! assert_eq!(shape::pool_out(9, 11, 3, 2, "pool")?, (4, 5));
//! assert_eq!(shape::conv_out(7, 3, &shape::ConvParams { stride: 2, padding: 1, dilation: 1, groups: 1 }), Some(4));
//! assert_eq!(shape::vocab_rows(&[3, 4, 50257], "logits")?, (vec![3, 4], 50257));
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result};

/// `[B, C, H, W]`: the four sizes of an image batch.
pub fn dims4(dims: &[usize], what: &str) -> Result<(usize, usize, usize, usize)> {
    match *dims {
        [b, c, h, w] => Ok((b, c, h, w)),
        ref d => bail!("{what}: expected [B, C, H, W], got {d:?}"),
    }
}

/// `[B, C, S..]`: batch, channels and the product of the spatial sizes (batch norm).
pub fn batch_channels(dims: &[usize], what: &str) -> Result<(usize, usize, usize)> {
    match dims {
        [b, c, rest @ ..] => Ok((*b, *c, rest.iter().product())),
        d => bail!("{what}: expected [B, C, ..], got {d:?}"),
    }
}

/// Batch norm's packed parameters must be `[4, C]` (weight, bias, running mean, running variance).
pub fn check_bn_params(dims: &[usize], c: usize, what: &str) -> Result<()> {
    if dims != [4, c] {
        bail!("{what}: parameters {dims:?}, expected [4, {c}]")
    }
    Ok(())
}

/// Output size `(ho, wo)` of a square `kernel` pooling window moved by
/// `stride` over an `h x w` plane (no padding, floor mode, as torch's default).
pub fn pool_out(
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    what: &str,
) -> Result<(usize, usize)> {
    if kernel == 0 || stride == 0 || kernel > h || kernel > w {
        bail!("{what}: kernel {kernel} stride {stride} does not fit input {h}x{w}")
    }
    Ok(((h - kernel) / stride + 1, (w - kernel) / stride + 1))
}

/// `[.., V]` logits: the leading sizes and the vocabulary size `V` (not 0).
pub fn vocab_rows(dims: &[usize], what: &str) -> Result<(Vec<usize>, usize)> {
    let Some((&v, lead)) = dims.split_last() else {
        bail!("{what}: logits need a vocabulary dimension")
    };
    if v == 0 {
        bail!("{what}: empty vocabulary")
    }
    Ok((lead.to_vec(), v))
}

/// Number of rows and row length of a `[.., C]` tensor (row ops: softmax, layer norm).
pub fn last_rows(dims: &[usize], what: &str) -> Result<(usize, usize)> {
    let Some(&c) = dims.last() else {
        bail!("{what}: row op on a scalar")
    };
    Ok((dims.iter().product::<usize>() / c.max(1), c))
}

/// Stride, padding, dilation and groups of a 2-D convolution (the same along
/// both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Step between windows.
    pub stride: usize,
    /// Zeros added on each side.
    pub padding: usize,
    /// Spacing between kernel taps (1: adjacent).
    pub dilation: usize,
    /// Channel groups (1: every output sees every input channel).
    pub groups: usize,
}

/// Output size of a convolution along one axis of `input` pixels with a
/// kernel of `k` taps: `(input + 2 padding - dilation (k - 1) - 1) / stride + 1`,
/// or `None` when the kernel does not fit the padded input (or `k` or the
/// stride is 0).
pub fn conv_out(input: usize, k: usize, p: &ConvParams) -> Option<usize> {
    if k == 0 || p.stride == 0 {
        return None;
    }
    let span = p.dilation * (k - 1) + 1;
    let padded = input + 2 * p.padding;
    if padded < span {
        return None;
    }
    Some((padded - span) / p.stride + 1)
}

/// Every size of one 2-D convolution, in conv2d terms: `x [b, c_in, h, w]`,
/// `w [c_out, c_in/groups, kh, kw]`, `y [b, c_out, ho, wo]`. The CPU and
/// CUDA convolutions add their own methods beside their kernels.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeom {
    /// Images.
    pub b: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
    /// Stride, padding, dilation, groups.
    pub p: ConvParams,
}

impl ConvGeom {
    /// The geometry of `x` (dims `[B, C, H, W]`) convolved with `w` (dims
    /// `[O, C/groups, kh, kw]`), or an error naming `what` when the shapes,
    /// the groups or the window do not fit.
    pub fn new(x: &[usize], w: &[usize], p: ConvParams, what: &str) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, cin_g, kh, kw]) = (x, w) else {
            bail!(
                "{what}: expected x [B, C, H, W] and w [O, C/groups, kh, kw], got {x:?} and {w:?}"
            )
        };
        if p.groups == 0
            || c_in % p.groups != 0
            || c_out % p.groups != 0
            || cin_g * p.groups != c_in
        {
            bail!(
                "{what}: x {x:?} and weight {w:?} do not fit groups {}",
                p.groups
            )
        }
        let (Some(ho), Some(wo)) = (conv_out(h, kh, &p), conv_out(wd, kw, &p)) else {
            bail!(
                "{what}: kernel {kh}x{kw} (stride {}, padding {}, dilation {}) does not fit input {h}x{wd}",
                p.stride,
                p.padding,
                p.dilation
            )
        };
        Ok(Self {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            ho,
            wo,
            p,
        })
    }
    /// Channel groups.
    pub fn groups(&self) -> usize {
        self.p.groups
    }
    /// Input channels per group.
    pub fn cin_g(&self) -> usize {
        self.c_in / self.p.groups
    }
    /// Output channels per group.
    pub fn cout_g(&self) -> usize {
        self.c_out / self.p.groups
    }
    /// Rows of one group's column matrix (`cin_g * kh * kw`).
    pub fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    /// Output pixels per image (columns of one image's column matrix).
    pub fn n(&self) -> usize {
        self.ho * self.wo
    }
    /// Elements of one input image.
    pub fn x_item(&self) -> usize {
        self.c_in * self.h * self.w
    }
    /// Elements of one output image.
    pub fn y_item(&self) -> usize {
        self.c_out * self.n()
    }
    /// A 1x1, stride-1, unpadded convolution: an image already is its column matrix.
    pub fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == 1 && self.p.padding == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_torch_and_bad_shapes_name_the_op() {
        // torch.nn.functional.max_pool2d(torch.zeros(1, 1, 9, 11), 3, 2).shape[-2:] == (4, 5)
        assert_eq!(pool_out(9, 11, 3, 2, "p").unwrap(), (4, 5));
        assert!(pool_out(2, 11, 3, 2, "p")
            .unwrap_err()
            .to_string()
            .contains("p: kernel 3 stride 2 does not fit input 2x11"));
        // torch.nn.Conv2d(1, 1, 3, stride=2, padding=0, dilation=2)(torch.zeros(1, 1, 11, 9)).shape[-2:] == (4, 3)
        let p = ConvParams {
            stride: 2,
            padding: 0,
            dilation: 2,
            groups: 1,
        };
        assert_eq!(
            (conv_out(11, 3, &p), conv_out(9, 3, &p)),
            (Some(4), Some(3))
        );
        assert_eq!(conv_out(3, 3, &p), None);
        assert!(dims4(&[1, 2, 3], "x")
            .unwrap_err()
            .to_string()
            .contains("x: expected [B, C, H, W], got [1, 2, 3]"));
        assert_eq!(batch_channels(&[2, 3, 4, 5], "bn").unwrap(), (2, 3, 20));
        assert!(check_bn_params(&[4, 3], 3, "bn").is_ok());
        assert!(check_bn_params(&[3, 3], 3, "bn").is_err());
        assert!(vocab_rows(&[2, 0], "t").is_err());
        assert!(vocab_rows(&[], "t").is_err());
        assert_eq!(last_rows(&[2, 3, 5], "r").unwrap(), (6, 5));
    }
}
