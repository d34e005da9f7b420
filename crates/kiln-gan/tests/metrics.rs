//! The metrics against pytorch-fid 0.3.0, `prdc` 0.2, torchmetrics 1.9.0 and
//! numpy on fixed feature sets. The sets come from a hash of the index that
//! the Python snippet computes the same way:
//!
//! ```python
//! import numpy as np, torch
//! from pytorch_fid.fid_score import calculate_frechet_distance
//! from prdc import compute_prdc
//! M = 2**64 - 1
//! def feat(n, d, seed, shift):
//!     out = np.zeros((n, d))
//!     for i in range(n):
//!         for j in range(d):
//!             k = i * d + j
//!             h = (k * 6364136223846793005 + seed * 1442695040888963407 + 1) & M
//!             h ^= h >> 29; h = (h * 0xbf58476d1ce4e5b9) & M; h ^= h >> 32
//!             out[i, j] = (h >> 11) / 2.0**53 + shift * (j % 3)
//!     return out
//! def fid(a, b):
//!     return calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
//! def mmd(x, y):  # clean-fid's kernel_distance for one subset
//!     m, d = len(x), x.shape[1]
//!     a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
//!     b = (x @ y.T / d + 1) ** 3
//!     return (a.sum() - np.diag(a).sum()) / (m - 1) / m - b.sum() * 2 / m / m
//! a, b = feat(50, 8, 1, 0.0), feat(60, 8, 2, 0.3)
//! print("full rank fid", repr(fid(a, b)), np.linalg.matrix_rank(np.cov(a, rowvar=False)))
//! c, e = feat(10, 16, 3, 0.0), feat(12, 16, 4, 0.2)
//! print("low rank fid", repr(fid(c, e)), np.linalg.matrix_rank(np.cov(c, rowvar=False)), np.linalg.matrix_rank(np.cov(e, rowvar=False)))
//! x, y = feat(40, 8, 5, 0.0), feat(40, 8, 6, 0.1)
//! print("mmd", repr(mmd(x, y)))
//! r, f = feat(30, 4, 7, 0.0), feat(25, 4, 8, 0.15)
//! print("prdc", compute_prdc(r, f, nearest_k=5))
//! from torchmetrics.image.inception import InceptionScore
//! class Id(torch.nn.Module):
//!     def forward(self, x): return x
//! lg = torch.tensor(feat(23, 6, 9, 0.0) * 4.0, dtype=torch.float64)
//! m = InceptionScore(feature=Id(), splits=4)
//! m.update(lg)
//! torch.manual_seed(0); s = m.compute()
//! torch.manual_seed(0); perm = torch.randperm(23)  # the shuffle inside compute()
//! print("is", repr(s[0].item()), repr(s[1].item()), perm.tolist())
//! ```
//! prints
//! ```text
//! full rank fid np.float64(1.0255269024759164) 8
//! low rank fid np.float64(2.3431207692433578) 9 11
//! mmd np.float64(0.15753355198049146)
//! prdc {'precision': np.float64(1.0), 'recall': np.float64(0.9333333333333333), 'density': np.float64(0.944), 'coverage': np.float64(0.9)}
//! is 1.350691000253875 0.027528343941729556 [19, 8, 16, 3, 15, 20, 22, 14, 4, 7, 6, 13, 9, 10, 1, 12, 5, 17, 11, 2, 18, 0, 21]
//! ```
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_gan::metrics::{
    frechet_distance, inception_score, kid, kid_mmd, memorisation, nearest_distances, prdc,
    Features, GaussianStats, KidOptions,
};

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
        v.push((h >> 11) as f64 / 2f64.powi(53) + shift * ((k as usize % d) % 3) as f64);
    }
    Features::new(d, v).unwrap()
}

/// Streaming statistics fed in uneven batches.
fn stats(f: &Features) -> GaussianStats {
    let mut s = GaussianStats::new(f.dim());
    let n = f.len();
    for (lo, hi) in [(0, 3), (3, n / 2), (n / 2, n)] {
        s.update(&f.select(&(lo..hi).collect::<Vec<_>>())).unwrap();
    }
    s
}

fn close(got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "got {got:e}, want {want:e}"
    );
}

#[test]
fn fid_matches_pytorch_fid_at_full_rank() {
    let (a, b) = (feat(50, 8, 1, 0.0), feat(60, 8, 2, 0.3));
    let f = frechet_distance(&stats(&a), &stats(&b)).unwrap();
    close(f.value, 1.0255269024759164, 1e-10);
    assert!(f.full_rank());
    assert_eq!((f.rank, f.count), ([8, 8], [50, 60]));
}

#[test]
fn fid_matches_pytorch_fid_with_fewer_images_than_dimensions() {
    let (c, e) = (feat(10, 16, 3, 0.0), feat(12, 16, 4, 0.2));
    let f = frechet_distance(&stats(&c), &stats(&e)).unwrap();
    // scipy's Schur route turns eigenvalues that rounding left just below
    // zero into imaginary parts; the two agree to 2.6e-9 relative here.
    close(f.value, 2.3431207692433578, 1e-8);
    assert!(!f.full_rank());
    assert_eq!(f.rank, [9, 11]);
}

#[test]
fn rank_sees_through_a_large_mean() {
    // 12 images in 16 dimensions, shifted far from the origin: the
    // covariance has rank 11 whatever the sums' rounding.
    let c = feat(12, 16, 3, 0.0);
    let far = Features::new(16, c.as_slice().iter().map(|v| v + 1e4).collect()).unwrap();
    let f = frechet_distance(&stats(&far), &stats(&far)).unwrap();
    assert_eq!(f.rank, [11, 11]);
    assert!(f.value.abs() < 1e-6, "{}", f.value);
}

#[test]
fn fid_of_a_set_with_itself_is_zero_and_stats_survive_tensors() {
    let a = feat(30, 6, 11, 0.0);
    let s = stats(&a);
    let t = s.to_tensors().unwrap();
    let back = GaussianStats::from_tensors(&t[0].1, &t[1].1, &t[2].1).unwrap();
    let f = frechet_distance(&s, &back).unwrap();
    assert!(f.value.abs() < 1e-12, "{}", f.value);
    assert!(frechet_distance(&GaussianStats::of(&a.head(1)).unwrap(), &s).is_err());
}

#[test]
fn kid_matches_clean_fid_per_subset_and_over_whole_subsets() {
    let (x, y) = (feat(40, 8, 5, 0.0), feat(40, 8, 6, 0.1));
    close(kid_mmd(&x, &y).unwrap(), 0.15753355198049146, 1e-12);
    // Subsets as large as the sets are permutations of them: every subset
    // gives the same MMD, so the std is zero.
    let opts = KidOptions {
        subsets: 5,
        subset_size: 1000,
        seed: 3,
    };
    let k = kid(&x, &y, opts).unwrap();
    assert_eq!(k.subset_size, 40);
    close(k.mean, 0.15753355198049146, 1e-12);
    assert!(k.std < 1e-12);
    // Smaller subsets vary.
    let k = kid(
        &x,
        &y,
        KidOptions {
            subset_size: 10,
            ..opts
        },
    )
    .unwrap();
    assert!(k.std > 0.0 && k.std.is_finite());
}

#[test]
fn prdc_matches_the_prdc_package() {
    let (r, f) = (feat(30, 4, 7, 0.0), feat(25, 4, 8, 0.15));
    let p = prdc(&r, &f, 5).unwrap();
    close(p.precision, 1.0, 1e-12);
    close(p.recall, 0.9333333333333333, 1e-12);
    close(p.density, 0.944, 1e-12);
    close(p.coverage, 0.9, 1e-12);
    assert!(prdc(&r.head(5), &f, 5).is_err());
}

#[test]
fn inception_score_matches_torchmetrics() {
    let lg = feat(23, 6, 9, 0.0);
    let lg = Features::new(6, lg.as_slice().iter().map(|v| v * 4.0).collect()).unwrap();
    let perm = [
        19, 8, 16, 3, 15, 20, 22, 14, 4, 7, 6, 13, 9, 10, 1, 12, 5, 17, 11, 2, 18, 0, 21,
    ];
    let s = inception_score(&lg.select(&perm), 4).unwrap();
    close(s.mean, 1.350691000253875, 1e-12);
    close(s.std, 0.027528343941729556, 1e-10);
    assert_eq!(s.splits, 4);
}

#[test]
fn memorisation_flags_copies_of_training_images() {
    let train = feat(40, 5, 12, 0.0);
    let held_out = feat(40, 5, 13, 0.0);
    let fresh = feat(40, 5, 14, 0.0);
    let m = memorisation(&fresh, &train, &held_out).unwrap();
    assert!(m.ratio > 0.6 && m.near_copies < 0.2, "{m:?}");
    // Copies: training rows themselves.
    let copies = train.head(20);
    let m = memorisation(&copies, &train, &held_out).unwrap();
    assert_eq!((m.generated_median, m.near_copies), (0.0, 1.0));
}

#[test]
fn bad_features_are_refused_with_their_position() {
    let e = Features::new(3, vec![0.0, 1.0, f64::NAN, 0.0, 0.0, 0.0]).unwrap_err();
    assert!(e.to_string().contains("row 0 column 2"), "{e}");
    assert!(Features::new(4, vec![0.0; 6]).is_err());
}

/// Runs `f` on a rayon pool of `threads` threads.
fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn kid_prdc_and_nearest_distances_do_not_depend_on_the_threads() {
    // More than one 512-row distance chunk, and KID subsets enough to share.
    let (real, fake) = (feat(1100, 12, 7, 0.0), feat(1300, 12, 8, 0.05));
    let opts = KidOptions {
        subsets: 12,
        subset_size: 200,
        seed: 3,
    };
    let all = |threads| {
        on_threads(threads, || {
            (
                kid(&real, &fake, opts).unwrap(),
                prdc(&real, &fake, 5).unwrap(),
                nearest_distances(&fake, &real).unwrap(),
            )
        })
    };
    let one = all(1);
    for threads in [2, 3, 4] {
        let many = all(threads);
        // Bit for bit: f64's == on every field.
        assert_eq!(one.0, many.0, "KID on {threads} threads");
        assert_eq!(one.1, many.1, "PRDC on {threads} threads");
        assert_eq!(one.2, many.2, "nearest distances on {threads} threads");
    }
    // The parallel KID is the mean of the same subsets drawn in the same
    // order as one after another: subset i's MMD alone, from the seed.
    let mut rng = kiln_core::rng::SeededRng::new(opts.seed);
    let scores: Vec<f64> = (0..opts.subsets)
        .map(|_| {
            let ir = rng.permutation(real.len())[..200].to_vec();
            let jf = rng.permutation(fake.len())[..200].to_vec();
            kid_mmd(&real.select(&ir), &fake.select(&jf)).unwrap()
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    assert_eq!(one.0.mean, mean);
}
