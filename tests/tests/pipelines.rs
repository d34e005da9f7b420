//! Whole pipelines across crates: data -> model -> run folder -> reload ->
//! evaluate/sample, as `cargo xtask` runs them.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use kiln_core::rng::SeededRng;
use kiln_core::run::read_metrics;
use kiln_core::run::RunOptions;
use kiln_core::Device;
use kiln_data::{open, Dataset, DatasetSpec, Split};
use kiln_vae::{evaluate, from_run, train, TrainConfig, VaeConfig};

/// synthetic-flowers, opened by name as the CLI does, trains the chapter's VAE
/// architecture (smaller), and the run folder reloads into a model that
/// evaluates and samples the same as the one that was trained.
#[test]
fn vae_pipeline_from_dataset_name_to_reloaded_samples() {
    let spec: DatasetSpec = "synthetic-flowers".parse().unwrap();
    let tr: Arc<dyn Dataset> = Arc::from(open(&spec, "data".as_ref(), Split::Train, 16).unwrap());
    let te: Arc<dyn Dataset> = Arc::from(open(&spec, "data".as_ref(), Split::Test, 16).unwrap());
    let small_tr: Arc<dyn Dataset> = Arc::new(kiln_data::Subset::first(tr, 256));
    let small_te: Arc<dyn Dataset> = Arc::new(kiln_data::Subset::first(te, 64));
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaeConfig {
        image_size: 16,
        hidden: vec![128, 64],
        latent: 8,
        ..VaeConfig::mlp_chapter()
    };
    let rep = train(
        &cfg,
        &TrainConfig {
            epochs: 2,
            seed: 5,
            ..Default::default()
        },
        small_tr,
        Some(small_te.clone()),
        &Device::Cpu,
        &RunOptions::new_run(Some(&dir.path().join("run"))).quiet(true),
    )
    .unwrap();
    let recs = read_metrics(&dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(recs.iter().filter(|r| r.split == "train").count(), 2 * 8);
    assert!(recs.iter().any(|r| r.split == "test"));
    let (model, rc) = from_run(&dir.path().join("run"), &Device::Cpu).unwrap();
    assert_eq!(rc.train.dataset, "synthetic-flowers");
    let again = evaluate(&model, small_te, &Device::Cpu, 64, 0, 5).unwrap();
    assert!((again.neg_elbo_nats - rep.test.unwrap().neg_elbo_nats).abs() < 1e-3);
    let s = model
        .sample(4, None, &mut SeededRng::new(0), &Device::Cpu)
        .unwrap();
    assert_eq!(s.dims(), &[4, 3, 16, 16]);
    let png = image::open(dir.path().join("run/samples.png")).unwrap();
    assert!(png.width() > 16 * 8);
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["seed"], 5);
    assert!(summary["metrics"]["final_train_loss"].as_f64().unwrap() > 0.0);
}

/// kiln-ssl's probes take any model's features: probe the VAE encoder's
/// posterior means with the linear probe and kNN (no crate cycle needed).
#[test]
fn vae_features_can_be_probed_by_kiln_ssl() {
    let spec: DatasetSpec = "synthetic-flowers".parse().unwrap();
    let tr = open(&spec, "data".as_ref(), Split::Train, 16).unwrap();
    let te = open(&spec, "data".as_ref(), Split::Test, 16).unwrap();
    let cfg = VaeConfig {
        image_size: 16,
        hidden: vec![64],
        latent: 8,
        ..VaeConfig::mlp_chapter()
    };
    let vs = kiln_core::vars::VarStore::new(0);
    let vae = kiln_vae::Vae::new(&cfg, vs.builder(kiln_core::DType::F32, &Device::Cpu)).unwrap();
    let feats = |ds: &dyn Dataset, n: usize| {
        let (x, y) = kiln_vae::train::first_images(ds, n, &Device::Cpu).unwrap();
        (
            vae.encode(&x, None).unwrap().mean,
            y.to_vec1::<u32>().unwrap(),
        )
    };
    let (ftr, ytr) = feats(tr.as_ref(), 256);
    let (fte, yte) = feats(te.as_ref(), 128);
    let r = kiln_ssl::probe_all(
        &ftr,
        &ytr,
        &fte,
        &yte,
        &kiln_ssl::LinearProbeConfig {
            epochs: 20,
            ..Default::default()
        },
    )
    .unwrap();
    // 8 classes: chance is 12.5%; even random encoder features beat it on colour-coded flowers.
    assert!(r.linear > 0.3 && r.knn20 > 0.3, "{r:?}");
}

/// kiln-prompt stands alone: a spec renders and checked generation runs with
/// the deterministic generator.
#[test]
fn prompt_spec_and_checked_generation() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/kiln-prompt/examples/eval");
    assert!(
        dir.is_dir(),
        "the example eval suite ships with kiln-prompt"
    );
    let suite = kiln_prompt::EvalSuite::load(&dir).unwrap();
    let mut generator = kiln_prompt::RuleGenerator::default();
    let report = kiln_prompt::evaluate(
        &suite,
        &mut generator,
        &kiln_prompt::WordCounter,
        &kiln_prompt::EvalOptions::default(),
    )
    .unwrap();
    assert_eq!(report.variants.len(), suite.variants.len());
    assert_eq!(
        report.cells.len(),
        suite.variants.len() * suite.cases.cases.len()
    );
}
