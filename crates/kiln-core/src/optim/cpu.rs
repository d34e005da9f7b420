//! The fused Adam/AdamW update's CPU loop.
//!
//! The loop is one pass over parameter, gradient and both moments, with a
//! square root and two divisions per element. Built for plain x86-64 it runs
//! one element at a time (`sqrtss`, `divss`), and on a 3.3M-parameter model
//! that cost as much as the step's matrix products. The same source compiled
//! with AVX2 enabled runs eight lanes at a time; IEEE square root and
//! division round the same in every lane and Rust never fuses a multiply and
//! an add on its own, so both builds give the same bits (tested below).

use super::AdamScalars;

/// How weight decay enters, fixed per call so the loop has no branch.
#[derive(Clone, Copy)]
enum Decay {
    /// AdamW: the parameter is scaled by `1 - lr * wd` first.
    Decoupled,
    /// Adam with L2 decay: `wd * p` is added to the gradient.
    L2,
    /// Adam without decay.
    None,
}

#[inline(always)]
fn body<const D: u8>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], a: &AdamScalars) {
    let n = p.len();
    // Equal lengths up front, so the loop carries no bounds checks and
    // vectorises.
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let AdamScalars {
        step_size,
        bc2_sqrt,
        eps,
        wd,
        decay,
        w1,
        b2,
        w2,
        ..
    } = *a;
    for i in 0..n {
        let mut gi = g[i];
        let mut pi = p[i];
        if D == Decay::Decoupled as u8 {
            pi *= decay;
        } else if D == Decay::L2 as u8 {
            gi += wd * pi;
        }
        // torch: exp_avg.lerp_(grad, 1 - beta1)
        let mi = m[i] + w1 * (gi - m[i]);
        // torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let vi = v[i] * b2 + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        // torch: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = vi.sqrt() / bc2_sqrt + eps;
        p[i] = pi - step_size * (mi / denom);
    }
}

#[inline(always)]
fn dispatch(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], a: &AdamScalars) {
    match decay(a) {
        Decay::Decoupled => body::<{ Decay::Decoupled as u8 }>(p, g, m, v, a),
        Decay::L2 => body::<{ Decay::L2 as u8 }>(p, g, m, v, a),
        Decay::None => body::<{ Decay::None as u8 }>(p, g, m, v, a),
    }
}

fn decay(a: &AdamScalars) -> Decay {
    if a.decoupled {
        Decay::Decoupled
    } else if a.wd != 0.0 {
        Decay::L2
    } else {
        Decay::None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dispatch_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], a: &AdamScalars) {
    dispatch(p, g, m, v, a)
}

/// One Adam/AdamW step over a chunk, in place. `g`, `m` and `v` must be at
/// least as long as `p` (the caller chunks all four alike).
pub(super) fn adam_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], a: &AdamScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { dispatch_avx2(p, g, m, v, a) };
    }
    dispatch(p, g, m, v, a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    fn scalars(decoupled: bool, wd: f32) -> AdamScalars {
        AdamScalars {
            step_size: 1.7e-3,
            bc2_sqrt: 0.031,
            eps: 1e-8,
            wd,
            decay: 1.0 - 1e-3 * wd,
            w1: 0.1,
            b2: 0.999,
            w2: 1e-3,
            decoupled,
        }
    }

    /// The scalar reference, written out once more without the const
    /// generic, so a slip in either shows.
    fn reference(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], a: &AdamScalars) {
        for i in 0..p.len() {
            let mut gi = g[i];
            let mut pi = p[i];
            if a.decoupled {
                pi *= a.decay;
            } else if a.wd != 0.0 {
                gi += a.wd * pi;
            }
            m[i] += a.w1 * (gi - m[i]);
            v[i] = v[i] * a.b2 + a.w2 * gi * gi;
            p[i] = pi - a.step_size * (m[i] / (v[i].sqrt() / a.bc2_sqrt + a.eps));
        }
    }

    #[test]
    fn every_build_gives_the_scalar_bits() {
        let mut rng = SeededRng::new(7);
        // Lengths around the vector widths (8, 16) and unrolled loops.
        for n in [1usize, 7, 8, 9, 31, 33, 64, 129, 1000] {
            let p0 = rng.uniform_vec(n, -2.0, 2.0);
            let g = rng.uniform_vec(n, -1e-2, 1e-2);
            let m0 = rng.uniform_vec(n, -1e-3, 1e-3);
            // Second moments are never negative.
            let v0 = rng.uniform_vec(n, 0.0, 1e-4);
            for a in [
                scalars(true, 0.01),
                scalars(false, 0.01),
                scalars(false, 0.0),
            ] {
                let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
                reference(&mut p1, &g, &mut m1, &mut v1, &a);
                let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
                adam_chunk(&mut p2, &g, &mut m2, &mut v2, &a);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p1), bits(&p2), "p, n={n}, decoupled={}", a.decoupled);
                assert_eq!(bits(&m1), bits(&m2), "m, n={n}");
                assert_eq!(bits(&v1), bits(&v2), "v, n={n}");
                // The step was not skipped: parameters moved and every
                // second moment took in its gradient.
                assert_ne!(p2, p0, "n={n}");
                assert!(v2.iter().zip(&v0).all(|(a, b)| a != b), "n={n}");
                // The plain build, too.
                let (mut p3, mut m3, mut v3) = (p0.clone(), m0.clone(), v0.clone());
                dispatch(&mut p3, &g, &mut m3, &mut v3, &a);
                assert_eq!(bits(&p1), bits(&p3), "plain p, n={n}");
            }
        }
    }
}
