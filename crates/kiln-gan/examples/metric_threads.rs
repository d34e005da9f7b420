//! KID and PRDC on 1 thread and on N threads (default 2): the speed-up,
//! and a check that the results are bit-for-bit the same.
//!
//! ```sh
//! cargo run --release -p kiln-gan --example metric_threads -- [N_IMAGES] [DIM] [SUBSETS] [THREADS]
//! ```
//!
//! Defaults: 2000 images of 2048-d features per set, 10 KID subsets of 1000
//! (KID's default is 100; the time scales with the count), 2 threads.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use kiln_gan::metrics::{kid, prdc, Features, KidOptions};

/// Features from a hash of the index (the test suite's), shifted by `shift`.
fn feat(n: usize, d: usize, seed: u64, shift: f64) -> Features {
    let mut v = Vec::with_capacity(n * d);
    for k in 0..(n * d) as u64 {
        let mut h = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(seed.wrapping_mul(1442695040888963407))
            .wrapping_add(1);
        h ^= h >> 29;
        h = h.wrapping_mul(0xbf58476d1ce4e5b9);
        h ^= h >> 32;
        v.push((h >> 11) as f64 / (1u64 << 53) as f64 + shift * (k % 3) as f64);
    }
    Features::new(d, v).unwrap()
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map(|s| s.parse().unwrap())
            .unwrap_or(default)
    };
    let (n, d, subsets, threads) = (arg(1, 2000), arg(2, 2048), arg(3, 10), arg(4, 2));
    let (real, fake) = (feat(n, d, 1, 0.0), feat(n, d, 2, 0.01));
    let opts = KidOptions {
        subsets,
        ..KidOptions::default()
    };
    let run = |t: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        pool.install(|| {
            let t0 = Instant::now();
            let k = kid(&real, &fake, opts).unwrap();
            let tk = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let p = prdc(&real, &fake, 5).unwrap();
            let tp = t0.elapsed().as_secs_f64();
            (k, p, tk, tp)
        })
    };
    let (k1, p1, tk1, tp1) = run(1);
    let (kn, pn, tkn, tpn) = run(threads);
    assert_eq!(k1, kn, "KID differs between 1 and {threads} threads");
    assert_eq!(p1, pn, "PRDC differs between 1 and {threads} threads");
    println!(
        "N = {n}, d = {d}: KID ({subsets} subsets of {}) {tk1:.2}s on 1 thread, {tkn:.2}s on \
         {threads}: x{:.2}; PRDC (k = 5) {tp1:.2}s, {tpn:.2}s: x{:.2}; results identical",
        k1.subset_size,
        tk1 / tkn,
        tp1 / tpn
    );
}
