//! clean-fid's "clean" resize (`Resize::Clean`) against Pillow itself.
//!
//! The fixture `fixtures/clean_resize.json` comes from
//! `scripts/gan/clean_resize_fixture.py` (Pillow 13.0.0), which runs
//! clean-fid's resizer on LCG images:
//!
//! ```python
//! img = Image.fromarray(x_np.astype(np.float32), mode='F')
//! img = img.resize(output_size, resample=Image.BICUBIC)
//! return np.asarray(img).clip(0, 255).reshape(s2, s1, 1)
//! ```
//!
//! Its output:
//!
//! ```text
//! Pillow 13.0.0: wrote 5 cases to crates/kiln-gan/tests/fixtures/clean_resize.json
//! [32, 32] -> [299, 299] channel sums [11614914.429317825, 11185327.634754539, 11416957.392435351]
//! [64, 64] -> [299, 299] channel sums [11464183.609502107, 11274349.31408185, 11481962.896266079]
//! [32, 48] -> [299, 299] channel sums [11167359.578035038, 11189922.38065639, 11438976.717488168]
//! [333, 400] -> [299, 299] channel sums [11395675.579154909, 11385003.526160762, 11408749.938378822]
//! [7, 5] -> [9, 3] channel sums [3477.0296173095703, 2842.157886505127, 3340.631649017334]
//! ```
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::{Device, Tensor};
use kiln_gan::inception::{pil_bicubic_plane, resize_clean, Resize};
use serde_json::Value;

/// The script's LCG image, `[3][h][w]` channel-major, values 0..=255.
fn lcg_image(seed: u64, h: usize, w: usize) -> Vec<f32> {
    let mut state = seed;
    (0..3 * h * w)
        .map(|_| {
            state = (state * 1_664_525 + 1_013_904_223) % (1 << 32);
            (state >> 24) as f32
        })
        .collect()
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clean_resize.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Largest difference from Pillow's sampled output, in `[0, 1]` units, of
/// `out` (`[3][oh][ow]` in [0, 255] scale).
fn max_err(case: &Value, out: &[f32], oh: usize, ow: usize) -> f64 {
    let (rows, cols) = (usizes(&case["rows"]), usizes(&case["cols"]));
    let mut worst = 0f64;
    for ch in 0..3 {
        for (ri, &r) in rows.iter().enumerate() {
            for (ci, &c) in cols.iter().enumerate() {
                let want = case["sampled"][ch][ri][ci].as_f64().unwrap();
                let got = f64::from(out[(ch * oh + r) * ow + c]);
                worst = worst.max((got - want).abs() / 255.0);
            }
        }
        let sum: f64 = out[ch * oh * ow..(ch + 1) * oh * ow]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        let want = case["channel_sums"][ch].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-6 * want.abs(),
            "channel {ch} sum {sum} vs Pillow {want}"
        );
    }
    worst
}

#[test]
fn pil_bicubic_planes_match_pillow() {
    let fx = fixture();
    let mut worst = 0f64;
    for case in fx["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let (s, o) = (usizes(&case["size"]), usizes(&case["out"]));
        let (h, w, oh, ow) = (s[0], s[1], o[0], o[1]);
        let img = lcg_image(seed, h, w);
        let mut out = Vec::new();
        for ch in 0..3 {
            let plane = pil_bicubic_plane(&img[ch * h * w..(ch + 1) * h * w], h, w, oh, ow);
            out.extend(plane.into_iter().map(|v| v.clamp(0.0, 255.0)));
        }
        let e = max_err(case, &out, oh, ow);
        eprintln!("{h}x{w} -> {oh}x{ow}: max |kiln - Pillow| = {e:.3e} (of 1)");
        worst = worst.max(e);
    }
    assert!(worst <= 1e-5, "worst error {worst}");
}

#[test]
fn clean_resize_of_unit_range_tensors_matches_pillow() {
    let fx = fixture();
    for case in fx["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let (s, o) = (usizes(&case["size"]), usizes(&case["out"]));
        let (h, w, oh, ow) = (s[0], s[1], o[0], o[1]);
        // Two images in a batch: the second is the first, so both match.
        let img: Vec<f32> = lcg_image(seed, h, w).iter().map(|v| v / 255.0).collect();
        let both: Vec<f32> = img.iter().chain(&img).copied().collect();
        let x = Tensor::from_vec(both, (2, 3, h, w), &Device::Cpu).unwrap();
        let y = Resize::Clean.apply(&x, oh, ow).unwrap();
        assert_eq!(y.dims(), &[2, 3, oh, ow]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo >= 0.0 && hi <= 1.0, "clipped to [0, 1]: {lo}..{hi}");
        for b in 0..2 {
            let n = 3 * oh * ow;
            let scaled: Vec<f32> = v[b * n..(b + 1) * n].iter().map(|x| x * 255.0).collect();
            let e = max_err(case, &scaled, oh, ow);
            assert!(e <= 1e-5, "{h}x{w} image {b}: error {e}");
        }
    }
}

#[test]
fn same_size_is_unchanged_and_names_parse() {
    let x = Tensor::rand(0f32, 1f32, (1, 3, 8, 8), &Device::Cpu).unwrap();
    let y = resize_clean(&x, 8, 8).unwrap();
    let a: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() <= 1e-6);
    }
    assert_eq!("clean".parse::<Resize>().unwrap(), Resize::Clean);
    assert_eq!("pytorch-fid".parse::<Resize>().unwrap(), Resize::Bilinear);
    assert_eq!(Resize::default(), Resize::Bilinear);
    let e = "bicubic".parse::<Resize>().unwrap_err().to_string();
    assert!(e.contains("pytorch-fid") && e.contains("clean"), "{e}");
}
