//! Evaluation around the metrics: the feature cache (checksummed, rebuilt
//! when damaged), the report, and `train_with_eval`'s best-FID checkpoint
//! and extractor record across a resume.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use kiln_core::checkpoint::read_tensors;
use kiln_core::run::{read_metrics, RunOptions};
use kiln_core::{Device, Tensor};
use kiln_data::{Dataset, Split, SyntheticFlowers, SyntheticFlowersConfig};
use kiln_gan::eval::{dataset_features, dataset_features_cached, evaluate, CacheUse, EvalOptions};
use kiln_gan::metrics::{Extracted, FeatureExtractor, Features, KidOptions};
use kiln_gan::{
    train_with_eval, ExtractorSource, FidEval, FidRecord, ModelConfig, TrainConfig,
    BEST_FID_CHECKPOINT, FID_RECORD_FILE,
};

const DEV: Device = Device::Cpu;

/// 4x4 average-pooled pixels: a cheap stand-in extractor (48-d at 16x16).
struct Pixels;

impl FeatureExtractor for Pixels {
    fn name(&self) -> String {
        "4x4-pooled pixels".into()
    }
    fn hash(&self) -> String {
        "0123456789abcdef".into()
    }
    fn dim(&self) -> usize {
        48
    }
    fn extract(&self, images: &Tensor) -> kiln_gan::Result<Extracted> {
        let f = images.avg_pool2d(4)?.flatten_from(1)?;
        Ok(Extracted {
            features: Features::from_tensor(&f)?,
            logits: None,
        })
    }
}

fn flowers(split: Split, n: usize) -> Arc<dyn Dataset> {
    let cfg = SyntheticFlowersConfig {
        train: n,
        test: n,
        size: 16,
        ..Default::default()
    };
    Arc::new(SyntheticFlowers::new(cfg, split).unwrap())
}

#[test]
fn features_are_cached_under_the_extractor_and_the_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let ds = flowers(Split::Test, 20);
    let a = dataset_features(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
    let b = dataset_features(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.len(), a.dim()), (20, 48));
    // Other images: another file.
    dataset_features(&Pixels, ds.as_ref(), Some(10), 8, &DEV, Some(dir.path())).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn the_report_names_the_extractor_and_a_collapsed_set_has_no_recall() {
    let real = dataset_features(
        &Pixels,
        flowers(Split::Test, 40).as_ref(),
        None,
        20,
        &DEV,
        None,
    )
    .unwrap();
    let other = dataset_features(
        &Pixels,
        flowers(Split::Train, 40).as_ref(),
        None,
        20,
        &DEV,
        None,
    )
    .unwrap();
    let opts = EvalOptions {
        kid: KidOptions {
            subsets: 10,
            subset_size: 20,
            seed: 0,
        },
        ..EvalOptions::default()
    };
    let good = Extracted {
        features: other.clone(),
        logits: None,
    };
    let rep = evaluate(&Pixels, &good, &real, "flowers test", Some(&other), &opts).unwrap();
    let text = rep.to_string();
    assert!(
        text.contains("4x4-pooled pixels (hash 0123456789abcdef, 48-d)"),
        "{text}"
    );
    assert!(
        text.contains("40 generated images against 40 images of flowers test"),
        "{text}"
    );
    assert!(
        text.contains("biased upward"),
        "40 images in 48 dimensions: {text}"
    );
    assert!(rep.recall.unwrap() > 0.5, "{rep:?}");
    // The same "generator" collapsed to its first image.
    let one = Extracted {
        features: Features::new(48, other.row(0).repeat(40)).unwrap(),
        logits: None,
    };
    let col = evaluate(&Pixels, &one, &real, "flowers test", None, &opts).unwrap();
    assert_eq!(col.recall, Some(0.0));
    assert!(
        col.coverage.unwrap() < 0.2 && col.fid > 10.0 * rep.fid,
        "{col:?} vs {rep:?}"
    );
    // Memorisation: "generated" = training images themselves.
    let m = rep.memorisation.unwrap();
    assert_eq!((m.generated_median, m.near_copies), (0.0, 1.0));
}

fn opts(run: &Path, resume: bool) -> RunOptions {
    match resume {
        true => RunOptions::resume(run),
        false => RunOptions::new_run(Some(run)),
    }
    .quiet(true)
}

/// The small DCGAN every training test here uses (16x16 images).
fn tiny_model() -> ModelConfig {
    ModelConfig {
        image_size: 16,
        nz: 16,
        ngf: 8,
        ndf: 8,
        ..ModelConfig::dcgan32()
    }
}

/// Reference features for the blind extractor's FID stop runs.
fn blind_reference() -> Features {
    Features::new(2, (0..40).map(|i| (i % 5) as f64).collect()).unwrap()
}

#[test]
fn training_keeps_the_best_fid_checkpoint_across_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let model = tiny_model();
    let tc = TrainConfig {
        epochs: 3,
        batch_size: 4,
        eval_every: 1,
        ..TrainConfig::default()
    };
    let reference = dataset_features(
        &Pixels,
        flowers(Split::Test, 32).as_ref(),
        None,
        16,
        &DEV,
        None,
    )
    .unwrap();
    let ev = FidEval {
        batch: 16,
        ..FidEval::new(&Pixels, &reference, 32)
    };
    let train = flowers(Split::Train, 16);
    // Stopped inside the second epoch, then resumed to the end.
    let r = train_with_eval(
        &model,
        &tc,
        train.clone(),
        &DEV,
        &opts(&run, false),
        Some(6),
        Some(&ev),
    )
    .unwrap();
    assert!(r.interrupted && r.best_fid.is_some());
    let r = train_with_eval(&model, &tc, train, &DEV, &opts(&run, true), None, Some(&ev)).unwrap();
    let fids: Vec<f64> = read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|m| m.split == "eval")
        .map(|m| m.values.iter().find(|(k, _)| k == "fid").unwrap().1)
        .collect();
    assert_eq!(fids.len(), 3, "one evaluation per epoch");
    let best = fids.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(r.best_fid, Some(best));
    let (_, meta) = read_tensors(&run.join("checkpoints").join(BEST_FID_CHECKPOINT), &DEV).unwrap();
    assert_eq!(meta["extra.fid"].parse::<f64>().unwrap(), best);
}

/// Features that ignore the images: every evaluation gives the same FID.
struct Blind;

impl FeatureExtractor for Blind {
    fn name(&self) -> String {
        "blind".into()
    }
    fn hash(&self) -> String {
        "fedcba9876543210".into()
    }
    fn dim(&self) -> usize {
        2
    }
    fn extract(&self, images: &Tensor) -> kiln_gan::Result<Extracted> {
        let n = images.dim(0)?;
        let v = (0..2 * n).map(|i| (i % 7) as f64).collect();
        Ok(Extracted {
            features: Features::new(2, v)?,
            logits: None,
        })
    }
}

#[test]
fn a_fid_that_stays_above_the_best_stops_training_naming_the_best_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let model = tiny_model();
    let tc = TrainConfig {
        epochs: 4,
        batch_size: 4,
        eval_every: 1,
        ..TrainConfig::default()
    };
    let reference = blind_reference();
    // The blind extractor gives the same FID every time; with rise 0 every
    // FID not below the best counts, so the second and third evaluations stop
    // training.
    let ev = FidEval {
        batch: 8,
        patience: 2,
        rise: 0.0,
        ..FidEval::new(&Blind, &reference, 8)
    };
    let e = train_with_eval(
        &model,
        &tc,
        flowers(Split::Train, 8),
        &DEV,
        &opts(&run, false),
        None,
        Some(&ev),
    )
    .unwrap_err();
    let kiln_gan::GanError::Collapsed(f) = e else {
        panic!("expected a collapse, got {e}")
    };
    assert_eq!(f.step, 6, "stopped after the third epoch's evaluation");
    assert_eq!(f.checkpoint_step, Some(2));
    assert_eq!(
        f.checkpoint.unwrap(),
        run.join("checkpoints").join(BEST_FID_CHECKPOINT)
    );
    assert!(
        f.reason.contains("for 2 evaluations in a row"),
        "{}",
        f.reason
    );
}

/// The FID stop's run with the blind extractor (every FID equal, rise 0:
/// every evaluation after the first counts), stopped at `stops` in turn and
/// resumed after each: the collapse it ends with.
fn fid_stop_run(stops: &[u64]) -> (kiln_gan::Failure, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let model = tiny_model();
    let tc = TrainConfig {
        epochs: 6,
        batch_size: 4,
        eval_every: 1,
        ..TrainConfig::default()
    };
    let reference = blind_reference();
    let ev = FidEval {
        batch: 8,
        patience: 3,
        rise: 0.0,
        ..FidEval::new(&Blind, &reference, 8)
    };
    let train = flowers(Split::Train, 8);
    for (i, &stop) in stops.iter().enumerate() {
        let r = train_with_eval(
            &model,
            &tc,
            train.clone(),
            &DEV,
            &opts(&run, i > 0),
            Some(stop),
            Some(&ev),
        )
        .unwrap();
        assert!(r.interrupted, "stopped at step {stop}");
    }
    let e = train_with_eval(
        &model,
        &tc,
        train,
        &DEV,
        &opts(&run, !stops.is_empty()),
        None,
        Some(&ev),
    )
    .unwrap_err();
    let kiln_gan::GanError::Collapsed(f) = e else {
        panic!("expected a collapse, got {e}")
    };
    let fids = read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|m| m.split == "eval")
        .map(|m| m.values.iter().find(|(k, _)| k == "fid").unwrap().1)
        .collect();
    (*f, fids)
}

#[test]
fn the_fid_stop_streak_survives_a_resume() {
    // Uninterrupted: two steps an epoch; evaluations 2, 3 and 4 stay above
    // the best, so training stops after the fourth epoch (step 8).
    let (whole, fids) = fid_stop_run(&[]);
    assert_eq!((whole.step, whole.checkpoint_step), (8, Some(2)));
    assert_eq!(fids.len(), 4);
    assert!(
        whole.reason.contains("for 3 evaluations in a row"),
        "{}",
        whole.reason
    );
    // Interrupted inside epochs 2, 3 and 4 (streak 0, 1 and 2 so far), and
    // at an epoch's last batch, before its evaluation: the same stop, with
    // each evaluation in metrics.jsonl once.
    for stops in [vec![3], vec![5], vec![7], vec![4], vec![3, 5, 7]] {
        let (f, fids) = fid_stop_run(&stops);
        assert_eq!(
            (f.step, f.checkpoint_step, &f.reason),
            (whole.step, whole.checkpoint_step, &whole.reason),
            "interrupted at {stops:?}"
        );
        assert_eq!(fids.len(), 4, "interrupted at {stops:?}");
    }
}

/// The cache file of `dataset_features` in `dir` (the only one there).
fn only_file(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

#[test]
fn a_damaged_feature_cache_is_reported_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let ds = flowers(Split::Test, 20);
    let (a, used) =
        dataset_features_cached(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    let file = only_file(dir.path());
    assert_eq!(used, CacheUse::Written(file.clone()));
    let (_, used) =
        dataset_features_cached(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    assert_eq!(used, CacheUse::Read(file.clone()));
    // Bytes near the end overwritten (the review's repro): huge but finite
    // features, read silently before.
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let len = bad.len();
    bad[len - 16..len - 8].copy_from_slice(&[0x7e; 8]);
    std::fs::write(&file, &bad).unwrap();
    let (b, used) =
        dataset_features_cached(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    match &used {
        CacheUse::Rebuilt { path, reason } => {
            assert_eq!(path, &file);
            assert!(reason.contains("checksum"), "{reason}");
        }
        u => panic!("expected a rebuild, got {u:?}"),
    }
    assert_eq!(a, b);
    assert_eq!(std::fs::read(&file).unwrap(), good, "rewritten as it was");
    // Truncated, and a cache written without a checksum: rebuilt too, and
    // `dataset_features` (which warns on stderr) gives the right features.
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    let c = dataset_features(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    assert_eq!(a, c);
    let t = Tensor::from_vec(vec![1e30f32; 20 * 48], (20, 48), &DEV).unwrap();
    kiln_core::candle::safetensors::save(
        &std::collections::HashMap::from([("features".to_string(), t)]),
        &file,
    )
    .unwrap();
    let (d, used) =
        dataset_features_cached(&Pixels, ds.as_ref(), None, 8, &DEV, Some(dir.path())).unwrap();
    assert!(matches!(used, CacheUse::Rebuilt { .. }), "{used:?}");
    assert_eq!(a, d);
}

#[test]
fn a_cache_folder_that_is_a_file_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache");
    std::fs::write(&file, "not a folder").unwrap();
    let ds = flowers(Split::Test, 4);
    let e = dataset_features(&Pixels, ds.as_ref(), None, 8, &DEV, Some(&file))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a file is there") && e.contains("give a folder"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder");
}

/// A report of `generated` against `reference` with the default KID and
/// PRDC settings.
fn report(reference: &Features, generated: &Features) -> kiln_gan::eval::EvalReport {
    let g = Extracted {
        features: generated.clone(),
        logits: None,
    };
    evaluate(
        &Pixels,
        &g,
        reference,
        "test",
        None,
        &EvalOptions::default(),
    )
    .unwrap()
}

#[test]
fn the_rank_note_blames_the_image_count_only_when_it_is_too_small() {
    // 50 images of 48-d features that vary along 3 directions only: enough
    // images, degenerate features.
    let rows = |seed: usize| {
        let v: Vec<f64> = (0..50)
            .flat_map(|i| {
                let (a, b, c) = (
                    ((i * 7 + seed) % 11) as f64,
                    ((i * 3 + seed) % 5) as f64,
                    ((i * i + seed) % 13) as f64,
                );
                (0..48).map(move |j| a * (j % 2) as f64 + b * (j % 3) as f64 + c * (j % 5) as f64)
            })
            .collect();
        Features::new(48, v).unwrap()
    };
    let rep = report(&rows(0), &rows(1));
    let text = rep.to_string();
    assert!(!rep.fid_full_rank, "{text}");
    assert!(
        text.contains("degenerate") && !text.contains("biased upward"),
        "{text}"
    );
    // 20 images in 48 dimensions: the count is to blame.
    let few = report(&rows(0).head(20), &rows(1).head(20));
    let text = few.to_string();
    assert!(
        text.contains("20 reference images and 20 generated images for 48 dimensions")
            && text.contains("biased upward")
            && !text.contains("degenerate"),
        "{text}"
    );
}

#[test]
fn too_few_images_for_prdc_skip_it_and_keep_fid_and_kid() {
    let feats = |split, n| {
        dataset_features(&Pixels, flowers(split, n).as_ref(), None, 8, &DEV, None).unwrap()
    };
    let real = feats(Split::Test, 5);
    let fake = feats(Split::Train, 5);
    let rep = report(&real, &fake);
    assert!(rep.fid.is_finite() && rep.kid_mean.is_finite(), "{rep:?}");
    assert_eq!(
        (rep.precision, rep.recall, rep.density, rep.coverage),
        (None, None, None, None)
    );
    let text = rep.to_string();
    assert!(
        text.contains("skipped: k = 5 nearest neighbours need at least 6 images in each set"),
        "{text}"
    );
    let json = serde_json::to_value(&rep).unwrap();
    assert!(json["precision"].is_null(), "{json}");
    // Six images each: PRDC again.
    let real = feats(Split::Test, 6);
    let fake = feats(Split::Train, 6);
    assert!(report(&real, &fake).precision.is_some());
}

#[test]
fn kid_over_whole_sets_states_no_spread() {
    let real = dataset_features(
        &Pixels,
        flowers(Split::Test, 50).as_ref(),
        None,
        25,
        &DEV,
        None,
    )
    .unwrap();
    let fake = dataset_features(
        &Pixels,
        flowers(Split::Train, 50).as_ref(),
        None,
        25,
        &DEV,
        None,
    )
    .unwrap();
    // 50 images each, subsets of min(1000, 50): every subset is everything.
    let rep = report(&real, &fake);
    assert_eq!((rep.kid_std, rep.kid_whole_set), (None, [true, true]));
    let text = rep.to_string();
    assert!(
        text.contains("+- n/a (subsets are the whole set)"),
        "{text}"
    );
    // 40 generated against 50 reference: the reference subsets vary, the
    // generated ones are whole.
    let rep = report(&real, &fake.head(40));
    assert_eq!(rep.kid_whole_set, [false, true]);
    assert!(rep.kid_std.unwrap() > 0.0, "{rep:?}");
    let text = rep.to_string();
    assert!(
        text.contains("the generated subsets are the whole set"),
        "{text}"
    );
}

/// `Pixels` under another hash: "another extractor".
struct OtherPixels;

impl FeatureExtractor for OtherPixels {
    fn name(&self) -> String {
        "other pixels".into()
    }
    fn hash(&self) -> String {
        "aaaaaaaaaaaaaaaa".into()
    }
    fn dim(&self) -> usize {
        48
    }
    fn extract(&self, images: &Tensor) -> kiln_gan::Result<Extracted> {
        Pixels.extract(images)
    }
}

#[test]
fn a_resume_must_evaluate_with_the_extractor_the_run_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let weights = dir.path().join("weights.bin");
    std::fs::write(&weights, "weights").unwrap();
    let model = tiny_model();
    let tc = TrainConfig {
        epochs: 2,
        batch_size: 4,
        eval_every: 1,
        ..TrainConfig::default()
    };
    let reference = dataset_features(
        &Pixels,
        flowers(Split::Test, 16).as_ref(),
        None,
        16,
        &DEV,
        None,
    )
    .unwrap();
    let source = ExtractorSource {
        kind: "inception".into(),
        path: weights.clone(),
        fingerprint: kiln_core::run::fingerprint(&weights).unwrap(),
        resize: "pytorch-fid".into(),
    };
    let ev = FidEval {
        batch: 16,
        source: Some(source.clone()),
        ..FidEval::new(&Pixels, &reference, 16)
    };
    let train = flowers(Split::Train, 16);
    let r = train_with_eval(
        &model,
        &tc,
        train.clone(),
        &DEV,
        &opts(&run, false),
        Some(6),
        Some(&ev),
    )
    .unwrap();
    assert!(r.interrupted && r.best_fid.is_some());
    let rec = FidRecord::read(&run).unwrap().unwrap();
    assert_eq!(rec, FidRecord::of(&ev));
    assert_eq!(rec.source.as_ref().unwrap().path, weights);
    let config = std::fs::read(run.join("config.toml")).unwrap();
    // Another extractor, a source with other content, other image counts:
    // each refused before any training, naming the record.
    let other = FidEval {
        batch: 16,
        ..FidEval::new(&OtherPixels, &reference, 16)
    };
    let changed = FidEval {
        source: Some(ExtractorSource {
            fingerprint: "8 bytes, crc32 00000000".into(),
            ..source.clone()
        }),
        ..ev
    };
    let fewer = FidEval { n: 8, ..ev };
    let longer = TrainConfig {
        epochs: 3,
        ..tc.clone()
    };
    for (bad, want) in [
        (
            &other,
            "extractor hash 0123456789abcdef then, aaaaaaaaaaaaaaaa now",
        ),
        (&changed, "inception content 7 bytes, crc32"),
        (&fewer, "16 generated images per evaluation then, 8 now"),
    ] {
        let e = train_with_eval(
            &model,
            &longer,
            train.clone(),
            &DEV,
            &opts(&run, true),
            None,
            Some(bad),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, kiln_gan::GanError::Run { .. }), "{text}");
        assert!(
            text.contains(FID_RECORD_FILE) && text.contains(want) && text.contains("best-fid"),
            "{text}"
        );
        assert_eq!(
            std::fs::read(run.join("config.toml")).unwrap(),
            config,
            "the refused resume put the config back"
        );
    }
    assert_eq!(FidRecord::read(&run).unwrap().unwrap(), rec, "record kept");
    // The same extractor moved elsewhere: accepted, and the record follows it.
    let moved = dir.path().join("moved.bin");
    std::fs::rename(&weights, &moved).unwrap();
    let ev_moved = FidEval {
        source: Some(ExtractorSource {
            path: moved.clone(),
            ..source
        }),
        ..ev
    };
    let r = train_with_eval(
        &model,
        &tc,
        train,
        &DEV,
        &opts(&run, true),
        None,
        Some(&ev_moved),
    )
    .unwrap();
    assert!(!r.interrupted);
    let rec = FidRecord::read(&run).unwrap().unwrap();
    assert_eq!(rec.source.unwrap().path, moved);
}
