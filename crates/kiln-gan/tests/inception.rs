//! pytorch-fid's InceptionV3, part by part, against pytorch-fid 0.3.0's own
//! modules (torch 2.15) with hash-generated weights and inputs.
//! `scripts/gan/inception_fixtures.py` (with `inception_common.py`) wrote the
//! fixture; the weights and inputs are regenerated here the same way, so the
//! fixture holds only the outputs.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::OnceLock;

use kiln_core::tolerance::layers_abs_tol;
use kiln_core::{DType, Device, Tensor};
use kiln_gan::inception::{resize_bilinear, InceptionV3};
use kiln_gan::metrics::FeatureExtractor;

/// `inception_common.uniform`: n values in [0, 1) from a hash of (name, index).
fn uniform(name: &str, n: usize) -> Vec<f64> {
    let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        seed ^= u64::from(b);
        seed = seed.wrapping_mul(0x0100_0000_01b3);
    }
    (0..n as u64)
        .map(|k| {
            let mut h = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed)
                .wrapping_add(1);
            h ^= h >> 29;
            h = h.wrapping_mul(0xbf58476d1ce4e5b9);
            h ^= h >> 32;
            (h >> 11) as f64 / 2f64.powi(53)
        })
        .collect()
}

/// `inception_common.hashed_weight`.
fn hashed_weight(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let u = uniform(name, n);
    let v: Vec<f32> = if name.ends_with(".conv.weight") || name == "fc.weight" {
        let bound = (6.0 / shape[1..].iter().product::<usize>() as f64).sqrt();
        u.iter().map(|u| ((2.0 * u - 1.0) * bound) as f32).collect()
    } else if name.ends_with(".bn.weight") || name.ends_with(".bn.running_var") {
        u.iter().map(|u| (0.5 + u) as f32).collect()
    } else {
        u.iter().map(|u| ((2.0 * u - 1.0) * 0.2) as f32).collect()
    };
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn hashed_input(name: &str, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = uniform(name, shape.iter().product())
        .iter()
        .map(|&u| u as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn weights() -> &'static HashMap<String, Tensor> {
    static W: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    W.get_or_init(|| {
        InceptionV3::weight_shapes()
            .unwrap()
            .into_iter()
            .map(|(k, s)| {
                let t = hashed_weight(&k, &s);
                (k, t)
            })
            .collect()
    })
}

fn net() -> &'static InceptionV3 {
    static N: OnceLock<InceptionV3> = OnceLock::new();
    N.get_or_init(|| InceptionV3::from_tensors(weights(), &Device::Cpu).unwrap())
}

fn fixture() -> &'static HashMap<String, Tensor> {
    static F: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    F.get_or_init(|| {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/inception_parts.safetensors"
        );
        kiln_core::candle::safetensors::load(p, &Device::Cpu).unwrap()
    })
}

fn max_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The reductions on a part's longest path (a convolution's `c_in k_h k_w`,
/// batch norm folded into it; a pool's window), from pytorch-fid's
/// architecture: block0 3·9, 32·9, 32·9; block1 64, 80·9; InceptionA's
/// double 3x3 branch c_in, 64·9, 96·9; InceptionB's 3x3 288·9; InceptionC's
/// double 7x7 branch c_in + 4 c7·7; InceptionD's 7x7x3 branch 768, 192·7
/// twice, 192·9; InceptionE's double 3x3 branch c_in, 448·9, 384·3; the pool
/// averages `pool` positions.
fn chain(part: &str, pool: usize) -> Vec<usize> {
    match part {
        "block0" => vec![27, 288, 288, 9],
        "block1" => vec![64, 720, 9],
        "Mixed_5b" => vec![192, 576, 864],
        "Mixed_5c" => vec![256, 576, 864],
        "Mixed_5d" => vec![288, 576, 864],
        "Mixed_6a" => vec![2592],
        "Mixed_6b" => vec![768, 896, 896, 896, 896],
        "Mixed_6c" | "Mixed_6d" => vec![768, 1120, 1120, 1120, 1120],
        "Mixed_6e" => vec![768, 1344, 1344, 1344, 1344],
        "Mixed_7a" => vec![768, 1344, 1344, 1728],
        "Mixed_7b" => vec![1280, 4032, 1152],
        "Mixed_7c" => vec![2048, 4032, 1152],
        "pool" => vec![pool],
        _ => panic!("no part {part}"),
    }
}

/// The largest |value| of a tensor.
fn max_abs(t: &Tensor) -> f64 {
    let m: f32 = t
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    m.into()
}

/// pytorch-fid's output of a part within f32's bound for the part's chain
/// ([`layers_abs_tol`]): a transposed kernel, a wrong padding or a missing
/// bias moves outputs by a good part of their magnitude, far more.
fn check_part(part: &str, shape: &[usize]) {
    let y = net()
        .forward_part(part, &hashed_input(&format!("input.{part}"), shape))
        .unwrap();
    let want = &fixture()[part];
    let d = f64::from(max_diff(&y, want));
    let tol = layers_abs_tol(&chain(part, 1), max_abs(want));
    eprintln!("{part}: max |kiln - pytorch-fid| = {d:e} (tolerance {tol:e})");
    assert!(
        d <= tol,
        "{part}: max |kiln - pytorch-fid| = {d:e} > {tol:e}"
    );
}

#[test]
fn stem_blocks_match_pytorch_fid() {
    check_part("block0", &[1, 3, 21, 21]);
    check_part("block1", &[1, 64, 11, 11]);
}

#[test]
fn fid_inception_a_and_b_match_pytorch_fid() {
    check_part("Mixed_5b", &[1, 192, 5, 5]);
    check_part("Mixed_6a", &[1, 288, 7, 7]);
}

#[test]
fn fid_inception_c_and_d_match_pytorch_fid() {
    check_part("Mixed_6b", &[1, 768, 5, 5]);
    check_part("Mixed_7a", &[1, 768, 7, 7]);
}

#[test]
fn fid_inception_e1_and_e2_match_pytorch_fid() {
    check_part("Mixed_7b", &[1, 1280, 3, 3]);
    check_part("Mixed_7c", &[2, 2048, 3, 3]);
}

#[test]
fn the_whole_network_matches_pytorch_fid_at_75x75() {
    let mut x = ((hashed_input("input.whole", &[2, 3, 75, 75]) * 2.0).unwrap() - 1.0).unwrap();
    for p in kiln_gan::inception::PARTS {
        x = net().forward_part(p, &x).unwrap();
    }
    let want = &fixture()["whole"];
    let d = f64::from(max_diff(&x, want));
    // Every part's chain in turn; at 75x75 the pool averages 1 position.
    let all: Vec<usize> = kiln_gan::inception::PARTS
        .iter()
        .flat_map(|p| chain(p, 1))
        .collect();
    let tol = layers_abs_tol(&all, max_abs(want));
    eprintln!("whole network: max |kiln - pytorch-fid| = {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "whole network: max diff {d:e} > {tol:e}");
}

#[test]
fn resize_matches_torch_interpolate_bilinear() {
    let y = resize_bilinear(&hashed_input("input.resize", &[1, 2, 32, 32]), 299, 299).unwrap();
    let idx = Tensor::arange_step(0u32, 299, 13, &Device::Cpu).unwrap();
    let y = y
        .index_select(&idx, 2)
        .unwrap()
        .index_select(&idx, 3)
        .unwrap();
    assert!(max_diff(&y, &fixture()["resize299"]) <= 1e-6);
    let y = resize_bilinear(&hashed_input("input.resize_odd", &[1, 1, 7, 5]), 11, 13).unwrap();
    assert!(max_diff(&y, &fixture()["resize_odd"]) <= 1e-6);
}

#[test]
fn incomplete_or_foreign_weights_are_refused_by_name() {
    let mut w = weights().clone();
    w.remove("Mixed_6c.branch7x7dbl_3.bn.running_var");
    let e = InceptionV3::from_tensors(&w, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Mixed_6c.branch7x7dbl_3.bn.running_var [160] is missing"),
        "{e}"
    );
    let mut w = weights().clone();
    w.insert(
        "fc.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    w.insert(
        "AuxLogits.fc.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = InceptionV3::from_tensors(&w, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fc.bias has shape [1000], expected [1008]"),
        "{e}"
    );
    assert!(
        e.contains("AuxLogits.fc.weight is not a weight of the network"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("inception.safetensors");
    std::fs::write(&p, b"not safetensors").unwrap();
    let e = InceptionV3::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("inception.safetensors") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn the_extractor_names_itself_and_hashes_its_weights() {
    let n = net();
    assert!(n.name().contains("InceptionV3") && n.hash().len() == 16);
    assert_eq!(n.dim(), 2048);
    let mut w = weights().clone();
    w.insert("fc.weight".into(), (&w["fc.weight"] * 2.0).unwrap());
    let other = InceptionV3::from_tensors(&w, &Device::Cpu).unwrap();
    assert_ne!(other.hash(), n.hash());
}
