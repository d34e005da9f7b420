//! `exp` over rows of f32 in SIMD lanes, for the vocabulary-wide softmax
//! sums of the token kernels.
//!
//! glibc's `expf` is a scalar call, and the f64 sums of `exp(x - max)` were one
//! dependent add per element: GPT-2 small's per-token log-probs (1016 rows of
//! 50257 logits, three passes per train step) took ~4% of the step. Here
//! `exp` is Cephes' `expf` (round `x log2 e`, a two-part `ln 2` reduction, a
//! degree-6 polynomial, `2^n` from the exponent bits; ~2 ulp), written with
//! plain arithmetic so the compiler vectorises it, and the sums run in 8
//! independent f64 lanes, added in a fixed order (the bits do not depend on
//! the thread count or the CPU's SIMD level). Compiled once for AVX2+FMA
//! (chosen at run time) and once for the baseline.
//!
//! The same `exp` serves GELU's `tanh` (`tanh u = (1 - e) / (1 + e)` with
//! `e = exp(-2|u|) <= 1`, the sign put back) and the softmax of attention
//! rows: glibc's scalar `expf` behind them took ~7% of GPT-2 small's prompt
//! pass (its 12 GELUs over `[32, 3072]`) and ~4% of a training step's CPU time.

const LANES: usize = 8;
/// Below this `e^x` is under f32's smallest normal: the result is 0.
const LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `1.5 * 2^23`: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for `x <= 0` (a softmax's shifted logits): 0 below [`LO`], NaN for
/// NaN. Larger inputs are not supported (`2^n` overflows past `x` = 88).
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    let xc = if x < LO { LO } else { x };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // `t`'s low mantissa bits hold the integer `n` (one unit per bit at
    // 1.5 * 2^23), so `2^n` comes from integer adds and a shift that
    // vectorise, where `n as i32` (a saturating cast) does not. NaN stays NaN
    // through `p`.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let y = p * f32::from_bits(ni.wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn sums_body(row: &[f32], m: f32) -> (f64, f64) {
    let (mut s0, mut s1) = ([0f64; LANES], [0f64; LANES]);
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let z = c[i] - m;
            let e = exp_nonpos(z);
            s0[i] += e as f64;
            s1[i] += (e * z) as f64;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        let z = v - m;
        let e = exp_nonpos(z);
        s0[i] += e as f64;
        s1[i] += (e * z) as f64;
    }
    (s0.iter().sum(), s1.iter().sum())
}

#[inline(always)]
fn scaled_body(out: &mut [f32], row: &[f32], (m, ls, g): (f32, f32, f32)) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = g * exp_nonpos((x - m) - ls);
    }
}

/// `tanh(u)` from [`exp_nonpos`]: within ~1e-7 of the true value (absolute;
/// relative for `|u|` above ~0.1), +-1 past `|u|` ~ 9, NaN for NaN.
#[inline(always)]
fn tanh_v(u: f32) -> f32 {
    let e = exp_nonpos(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// `tanh(u)` to f32's precision everywhere (Cephes' `tanhf`, ~2 ulp): below
/// `|u|` = 0.625, where `(1 - e)` of [`tanh_v`] loses bits to cancellation,
/// an odd polynomial; [`tanh_v`] above. Both are computed and one is picked,
/// so the loop stays branch-free and vectorises.
#[inline(always)]
fn tanh_f(u: f32) -> f32 {
    let s = u * u;
    let p = ((((-5.704_988_7e-3 * s + 2.063_908_9e-2) * s - 5.373_971_6e-2) * s + 0.133_314_42)
        * s
        - 0.333_332_82)
        * s
        * u
        + u;
    // The sign put back, for -0 (the polynomial gives +0 there).
    let p = p.copysign(u);
    let t = tanh_v(u);
    if u.abs() < 0.625 {
        p
    } else {
        t
    }
}

#[inline(always)]
fn tanh_body(y: &mut [f32], x: &[f32]) {
    for (y, &v) in y.iter_mut().zip(x) {
        *y = tanh_f(v);
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// GELU's `tanh` argument and its `tanh`.
#[inline(always)]
fn gelu_t(v: f32) -> f32 {
    tanh_v(SQRT_2_OVER_PI * (v + GELU_C * v * v * v))
}

#[inline(always)]
fn gelu_body(y: &mut [f32], x: &[f32]) {
    for (y, &v) in y.iter_mut().zip(x) {
        *y = 0.5 * v * (1.0 + gelu_t(v));
    }
}

#[inline(always)]
fn gelu_grad_body(o: &mut [f32], x: &[f32], g: &[f32]) {
    for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
        let t = gelu_t(v);
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
        *o = gv * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
}

/// `y = softmax(scale * x)`, max-subtracted; the maximum and the sum are taken
/// in [`LANES`] lanes combined in a fixed order.
#[inline(always)]
fn softmax_body(y: &mut [f32], x: &[f32], scale: f32) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            mx[i] = mx[i].max(c[i] * scale);
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        mx[i] = mx[i].max(v * scale);
    }
    let m = fold_lanes(mx, f32::max);
    let mut z = [0f32; LANES];
    let n = x.len() / LANES * LANES;
    for (yc, xc) in y[..n].chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            let e = exp_nonpos(xc[i] * scale - m);
            yc[i] = e;
            z[i] += e;
        }
    }
    for (i, (y, &v)) in y[n..].iter_mut().zip(&x[n..]).enumerate() {
        let e = exp_nonpos(v * scale - m);
        *y = e;
        z[i] += e;
    }
    let inv = 1.0 / fold_lanes(z, |a, b| a + b);
    y.iter_mut().for_each(|v| *v *= inv);
}

/// The lanes combined pairwise, in a fixed order.
#[inline(always)]
fn fold_lanes(mut v: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] = f(v[l], v[l + w]);
        }
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sums(row: &[f32], m: f32) -> (f64, f64) {
        super::sums_body(row, m)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scaled(out: &mut [f32], row: &[f32], k: (f32, f32, f32)) {
        super::scaled_body(out, row, k)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(y: &mut [f32], x: &[f32]) {
        super::gelu_body(y, x)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu_grad(o: &mut [f32], x: &[f32], g: &[f32]) {
        super::gelu_grad_body(o, x, g)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax(y: &mut [f32], x: &[f32], scale: f32) {
        super::softmax_body(y, x, scale)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tanh(y: &mut [f32], x: &[f32]) {
        super::tanh_body(y, x)
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `(sum e^z, sum e^z z)` with `z = x - m` over a row whose maximum is `m`,
/// summed in f64.
pub(super) fn exp_sums(row: &[f32], m: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::sums(row, m) };
    }
    sums_body(row, m)
}

/// `out[j] = g * e^((row[j] - m) - ls)`, for `ls >= 0` and `m` the row's
/// maximum (every exponent is at most 0).
pub(super) fn scaled_exp(out: &mut [f32], row: &[f32], m: f32, ls: f32, g: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::scaled(out, row, (m, ls, g)) };
    }
    scaled_body(out, row, (m, ls, g))
}

/// GELU (tanh form) of `x` into `y` (the shorter length of the two).
pub(super) fn gelu_tanh(y: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::gelu(y, x) };
    }
    gelu_body(y, x)
}

/// GELU's gradient: `o = g * d gelu(x) / dx`.
pub(super) fn gelu_tanh_grad(o: &mut [f32], x: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::gelu_grad(o, x, g) };
    }
    gelu_grad_body(o, x, g)
}

/// `y = tanh(x)` element-wise (the shorter length of the two), ~2 ulp.
pub(super) fn tanh(y: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::tanh(y, x) };
    }
    tanh_body(y, x)
}

/// `y = softmax(scale * x)` of one row (`y` as long as `x`).
pub(super) fn softmax(y: &mut [f32], x: &[f32], scale: f32) {
    assert_eq!(y.len(), x.len(), "softmax row: output and input lengths");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::softmax(y, x, scale) };
    }
    softmax_body(y, x, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's `exp`, in units of f32's epsilon.
    fn ulps(x: f32) -> f64 {
        let want = (x as f64).exp();
        ((exp_nonpos(x) as f64 - want) / want).abs() / f32::EPSILON as f64
    }

    #[test]
    fn within_two_ulp_of_exp_over_the_whole_range() {
        let worst = (0..=2_000_000)
            .map(|i| -87.3 * i as f32 / 2_000_000.0)
            .map(ulps)
            .fold(0.0, f64::max);
        assert!(worst < 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn edges_are_exact() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos(f32::NAN).is_nan());
        // The smallest normal's neighbourhood stays normal and accurate.
        assert!(ulps(-87.3) < 2.0);
    }

    #[test]
    fn sums_match_f64_and_every_simd_level() {
        let row: Vec<f32> = (0..50_257)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 20.0)
            .collect();
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let (s0, s1) = exp_sums(&row, m);
        let (w0, w1) = row.iter().fold((0f64, 0f64), |(a, b), &v| {
            let z = (v - m) as f64;
            (a + z.exp(), b + z.exp() * z)
        });
        assert!(((s0 - w0) / w0).abs() < 1e-6, "{s0} {w0}");
        assert!(((s1 - w1) / w1).abs() < 1e-6, "{s1} {w1}");
        // The baseline and the AVX2 build agree to the bit.
        assert_eq!(sums_body(&row, m), (s0, s1));
        let (mut a, mut b) = (vec![0f32; row.len()], vec![0f32; row.len()]);
        scaled_exp(&mut a, &row, m, 3.0, -0.5);
        scaled_body(&mut b, &row, (m, 3.0, -0.5));
        assert_eq!(a, b);
        assert!(a.iter().zip(&row).all(|(o, &v)| {
            let want = -0.5 * (((v - m) - 3.0) as f64).exp();
            (*o as f64 - want).abs() <= want.abs() * 3e-7
        }));
    }

    #[test]
    fn tanh_is_within_2e7_of_f64_and_exact_at_the_edges() {
        let worst = (-2_000_000..=2_000_000)
            .map(|i| 12.0 * i as f32 / 2_000_000.0)
            .map(|u| (tanh_v(u) as f64 - (u as f64).tanh()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 2e-7, "worst absolute error {worst}");
        // Relative accuracy where GELU's backward multiplies by (1 - t^2).
        for u in [0.1f32, 0.5, 1.0, 3.0, -2.0] {
            let want = (u as f64).tanh();
            assert!(((tanh_v(u) as f64 - want) / want).abs() < 1e-6, "{u}");
        }
        assert_eq!(tanh_v(0.0), 0.0);
        assert_eq!(tanh_v(10.0), 1.0);
        assert_eq!(tanh_v(-10.0), -1.0);
        assert_eq!(tanh_v(f32::INFINITY), 1.0);
        assert_eq!(tanh_v(f32::NEG_INFINITY), -1.0);
        assert!(tanh_v(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_within_3e7_relative_of_f64_and_the_baselines_bits() {
        // 4M points over [-12, 12], plus tiny and huge magnitudes.
        let mut x: Vec<f32> = (-2_000_000..=2_000_000)
            .map(|i| 12.0 * i as f32 / 2_000_000.0)
            .collect();
        x.extend([
            1e-30f32,
            -3e-8,
            1e-4,
            0.624_999_9,
            0.625,
            0.625_000_1,
            1e30,
            -1e30,
        ]);
        let mut y = vec![0f32; x.len()];
        tanh(&mut y, &x);
        let worst = x
            .iter()
            .zip(&y)
            .filter(|(u, _)| **u != 0.0)
            .map(|(&u, &t)| {
                let want = (u as f64).tanh();
                (t as f64 - want).abs() / want.abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 3e-7, "worst relative error {worst}");
        let mut b = vec![0f32; x.len()];
        tanh_body(&mut b, &x);
        assert!(y.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let one = |u: f32| {
            let mut o = [0f32];
            tanh(&mut o, &[u]);
            o[0]
        };
        assert_eq!(one(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(one(-0.0).to_bits(), (-0f32).to_bits());
        assert_eq!(one(f32::INFINITY), 1.0);
        assert_eq!(one(f32::NEG_INFINITY), -1.0);
        assert!(one(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_softmax_give_the_baselines_bits_and_match_f64() {
        // 1003 values: whole lanes and a remainder.
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 2000) as f32 / 150.0 - 6.5)
            .collect();
        let g: Vec<f32> = (0..1003)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let gelu64 = |v: f64| {
            0.5 * v * (1.0 + (0.797_884_560_802_865_4 * (v + 0.044715 * v.powi(3))).tanh())
        };
        gelu_tanh(&mut a, &x);
        gelu_body(&mut b, &x);
        assert_eq!(a, b);
        assert!(a
            .iter()
            .zip(&x)
            .all(|(y, &v)| (*y as f64 - gelu64(v as f64)).abs() < 1e-6));
        gelu_tanh_grad(&mut a, &x, &g);
        gelu_grad_body(&mut b, &x, &g);
        assert_eq!(a, b);
        // The gradient against a central difference of the f64 GELU.
        let h = 1e-5;
        assert!(a.iter().zip(&x).zip(&g).all(|((o, &v), &gv)| {
            let d = (gelu64(v as f64 + h) - gelu64(v as f64 - h)) / (2.0 * h);
            (*o as f64 - gv as f64 * d).abs() < 1e-5
        }));
        softmax(&mut a, &x, 0.7);
        softmax_body(&mut b, &x, 0.7);
        assert_eq!(a, b);
        let m = x.iter().map(|&v| v as f64 * 0.7).fold(f64::MIN, f64::max);
        let z: f64 = x.iter().map(|&v| (v as f64 * 0.7 - m).exp()).sum();
        assert!(a
            .iter()
            .zip(&x)
            .all(|(y, &v)| (*y as f64 - (v as f64 * 0.7 - m).exp() / z).abs() < 1e-7));
    }
}
