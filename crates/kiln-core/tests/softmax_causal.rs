//! `ops::softmax_causal`: the fused f32 CPU kernel against the composite
//! (scale, broadcast mask add, softmax) evaluated in f64, forward and
//! backward, with and without past keys; masked weights are exactly 0.
#![allow(clippy::unwrap_used)]

use kiln_core::rng::SeededRng;
use kiln_core::tolerance::f32_abs_tol;
use kiln_core::{ops, DType, Device, Tensor, Var};

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Weights and the gradient of `sum(y * w)` with respect to the scores.
fn run(x: &Tensor, w: &Tensor, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let v = Var::from_tensor(x).unwrap();
    let y = ops::softmax_causal(v.as_tensor(), scale).unwrap();
    let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    (flat(&y), flat(g.get(v.as_tensor()).unwrap()))
}

#[test]
fn fused_kernel_matches_the_f64_composite_forward_and_backward() {
    let mut rng = SeededRng::new(4);
    let dev = Device::Cpu;
    for (t, s) in [(7usize, 7usize), (3, 9), (1, 5), (16, 16)] {
        let scale = 0.125;
        let x = rng.normal(&[2, 3, t, s], 0.0, 4.0, &dev).unwrap();
        let w = rng.normal(&[2, 3, t, s], 0.0, 1.0, &dev).unwrap();
        let (y32, g32) = run(&x, &w, scale);
        // f64 takes the composite path: an independent implementation.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        let (y64, g64) = run(&x64, &w64, scale);
        let past = s - t;
        // Each weight: an exp over a reduction of at most `s` positive terms
        // summing to 1; each gradient: a dot product of `s` terms of |w| <= ~4.
        let tol_y = f32_abs_tol(s, 1.0) * 4.0;
        let tol_g = f32_abs_tol(s, 4.0 * scale) * 4.0;
        for (k, ((a, b), (ga, gb))) in y32.iter().zip(&y64).zip(g32.iter().zip(&g64)).enumerate() {
            let (i, j) = ((k / s) % t, k % s);
            if j > i + past {
                assert_eq!(*a, 0.0, "masked weight at ({i},{j})");
                assert_eq!(*ga, 0.0, "masked gradient at ({i},{j})");
            }
            assert!(
                (a - b).abs() <= tol_y,
                "t {t} s {s} y[{k}]: {a} vs {b} (tol {tol_y})"
            );
            assert!(
                (ga - gb).abs() <= tol_g,
                "t {t} s {s} g[{k}]: {ga} vs {gb} (tol {tol_g})"
            );
        }
        // Rows sum to 1.
        for row in y32.chunks(s) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() <= tol_y * s as f64);
        }
    }
}

#[test]
fn first_query_attends_only_to_itself_and_shapes_are_checked() {
    let x = Tensor::new(
        &[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
        &Device::Cpu,
    )
    .unwrap();
    let y = flat(&ops::softmax_causal(&x, 1.0).unwrap());
    assert_eq!(&y[..3], &[1.0, 0.0, 0.0]);
    // Row 2 over [4, 5]: closed form 1 / (1 + e).
    let e = std::f64::consts::E;
    assert!((y[3] - 1.0 / (1.0 + e)).abs() < 1e-7 && y[5] == 0.0);
    let wide = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let err = ops::softmax_causal(&wide, 1.0).unwrap_err().to_string();
    assert!(err.contains("S >= T"), "{err}");
}
