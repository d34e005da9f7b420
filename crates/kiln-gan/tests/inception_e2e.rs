//! Opt-in end-to-end parity with pytorch-fid: the whole random-weight network,
//! 32x32 images resized to 299, 2048-d features. Run
//! `python scripts/gan/inception_parity.py --out DIR` first (it needs torch and
//! pytorch-fid), then
//! `KILN_INCEPTION_PARITY=DIR cargo test --release -p kiln-gan --test inception_e2e -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::Device;
use kiln_gan::inception::InceptionV3;

#[test]
#[ignore = "needs scripts/gan/inception_parity.py's output in KILN_INCEPTION_PARITY"]
fn features_match_pytorch_fid_end_to_end() {
    let dir = std::path::PathBuf::from(
        std::env::var("KILN_INCEPTION_PARITY")
            .expect("set KILN_INCEPTION_PARITY to the script's --out"),
    );
    let net = InceptionV3::load(&dir.join("inception.safetensors"), &Device::Cpu).unwrap();
    let want =
        kiln_core::candle::safetensors::load(dir.join("parity.safetensors"), &Device::Cpu).unwrap();
    let t = std::time::Instant::now();
    let (f, l) = net.features(&want["images"]).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let max_abs = |t: kiln_core::Tensor| -> f32 {
        let t = t.abs().unwrap().flatten_all().unwrap();
        t.max(0).unwrap().to_scalar().unwrap()
    };
    let diff = |a: &kiln_core::Tensor, b: &kiln_core::Tensor| {
        (max_abs((a - b).unwrap()), max_abs(b.clone()))
    };
    let (df, mf) = diff(&f, &want["features"]);
    let (dl, ml) = diff(&l, &want["logits"]);
    println!(
        "{} images: features max |diff| {df:e} (max |f| {mf}), logits max |diff| {dl:e} (max |l| {ml}), {secs:.2} s, hash {}",
        f.dim(0).unwrap(),
        kiln_gan::metrics::FeatureExtractor::hash(&net)
    );
    assert!(df <= 1e-4 && dl <= 1e-4);
}
