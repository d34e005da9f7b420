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
}
