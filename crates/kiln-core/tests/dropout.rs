//! `ops::dropout`: the mask is splitmix64 on a counter (checked against the
//! generator's published reference outputs), kept at the asked rate, the same
//! for any thread count and on the fallback path, and its gradient is the mask.
#![allow(clippy::unwrap_used)]

use kiln_core::{ops, DType, Device, Tensor, Var};

fn ones(n: usize) -> Tensor {
    Tensor::ones((n,), DType::F32, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn mask_follows_splitmix64_reference_outputs() {
    // splitmix64 from seed 1234567 (Vigna's splitmix64.c test vector) gives
    // 6457827717110365317, 3203168211198807973, 9817491932198370423,
    // 4593380528125082431, 16408922859458223821. Element 2d is kept when the
    // low 32 bits of output d are below keep * 2^32, element 2d+1 the high 32
    // bits. With keep = 0.5 (Python: [h < 2**31 for z in v for h in (z & 0xffffffff, z >> 32)]):
    let want = [
        false, true, true, true, false, false, false, true, true, false,
    ];
    let y = flat(&ops::dropout(&ones(10), 0.5, 1_234_567).unwrap());
    let got: Vec<bool> = y.iter().map(|v| *v != 0.0).collect();
    assert_eq!(got, want);
    assert!(y.iter().all(|v| *v == 0.0 || *v == 2.0), "{y:?}");
}

#[test]
fn keeps_the_asked_fraction_scaled_by_its_inverse() {
    let n = 1 << 20;
    for keep in [0.9, 0.5, 0.1] {
        let y = flat(&ops::dropout(&ones(n), keep, 42).unwrap());
        let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        // 6 binomial standard deviations.
        let sd = (keep * (1.0 - keep) / n as f64).sqrt();
        assert!((kept - keep).abs() < 6.0 * sd, "keep {keep}: kept {kept}");
        let scale = (1.0 / keep) as f32;
        assert!(y.iter().all(|v| *v == 0.0 || *v == scale));
        // The mean is preserved (inverted dropout).
        let mean = y.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 6.0 * sd / keep,
            "keep {keep}: mean {mean}"
        );
    }
    // Another seed, another mask; keep = 1 keeps everything.
    let a = flat(&ops::dropout(&ones(1000), 0.5, 1).unwrap());
    let b = flat(&ops::dropout(&ones(1000), 0.5, 2).unwrap());
    assert_ne!(a, b);
    assert_eq!(
        flat(&ops::dropout(&ones(1000), 1.0, 3).unwrap()),
        vec![1.0; 1000]
    );
    assert!(ops::dropout(&ones(4), 0.0, 3).is_err());
    assert!(ops::dropout(&ones(4), 1.5, 3).is_err());
}

#[test]
fn mask_is_the_same_for_any_thread_count_dtype_and_layout() {
    let n = 100_003; // several parallel chunks and an odd tail
    let x = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| flat(&ops::dropout(&x, 0.7, 9).unwrap()))
    };
    let one = run(1);
    assert_eq!(one, run(3));
    // f64 drops the same elements.
    let y64 = ops::dropout(&x.to_dtype(DType::F64).unwrap(), 0.7, 9)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(y64
        .iter()
        .zip(&one)
        .all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
    // The fallback path (half types here) multiplies by the same mask.
    let yb = ops::dropout(&x.to_dtype(DType::BF16).unwrap(), 0.7, 9)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert!(flat(&yb)
        .iter()
        .zip(&one)
        .all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
    // A transposed input is dropped in its logical (row-major) order.
    let m = Tensor::arange(1f32, 13.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let direct = flat(&ops::dropout(&m.t().unwrap().contiguous().unwrap(), 0.5, 5).unwrap());
    let via_view = flat(&ops::dropout(&m.t().unwrap(), 0.5, 5).unwrap());
    assert_eq!(direct, via_view);
}

#[test]
fn gradient_is_the_mask() {
    let n = 50_000;
    let x = Var::from_tensor(&(ones(n) * 3.0).unwrap()).unwrap();
    let y = ops::dropout(x.as_tensor(), 0.8, 77).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(x.as_tensor()).unwrap());
    let ys = flat(&y);
    // y = 3 * mask, so the gradient of sum(y) is y / 3, element by element.
    assert!(gx.iter().zip(&ys).all(|(g, y)| *g == *y / 3.0));
    assert!(gx.contains(&0.0) && gx.contains(&1.25));
}
