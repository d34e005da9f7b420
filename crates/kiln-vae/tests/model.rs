//! VAE behaviour: shapes and ranges, the family's variants, training that
//! lowers the negative ELBO and reaches every parameter, exact resume.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use kiln_core::tolerance::{f32_abs_tol_tight, layers_abs_tol};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_data::{Dataset, Split, SyntheticFlowers, SyntheticFlowersConfig};
use kiln_vae::{elbo_loss, evaluate, from_run, train, Likelihood, TrainConfig, Vae, VaeConfig};

fn tiny(arch_conv: bool) -> VaeConfig {
    if arch_conv {
        VaeConfig {
            image_size: 16,
            hidden: vec![8, 16],
            latent: 6,
            ..VaeConfig::conv()
        }
    } else {
        VaeConfig {
            image_size: 16,
            hidden: vec![64, 32],
            latent: 6,
            ..VaeConfig::mlp_chapter()
        }
    }
}

fn flowers(split: Split, n: usize, size: usize) -> Arc<dyn Dataset> {
    let cfg = SyntheticFlowersConfig {
        train: n,
        test: n,
        size,
        ..Default::default()
    };
    Arc::new(SyntheticFlowers::new(cfg, split).unwrap())
}

fn in_unit(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| (0.0..=1.0).contains(v))
}

#[test]
fn sample_reconstruct_interpolate_shapes_and_ranges() {
    for conv in [false, true] {
        let cfg = tiny(conv);
        let vs = VarStore::new(0);
        let vae = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
        let mut rng = SeededRng::new(0);
        let s = vae.sample(5, None, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(s.dims(), &[5, 3, 16, 16]);
        assert!(in_unit(&s));
        let x = rng
            .uniform(&[4, 3, 16, 16], 0.0, 1.0, &Device::Cpu)
            .unwrap();
        let r = vae.reconstruct(&x, None).unwrap();
        assert_eq!(r.dims(), x.dims());
        assert!(in_unit(&r));
        let p = vae.encode(&x, None).unwrap();
        assert_eq!(p.mean.dims(), &[4, 6]);
        let path = vae
            .interpolate(&x.get(0).unwrap(), &x.get(1).unwrap(), 7, None)
            .unwrap();
        assert_eq!(path.dims(), &[7, 3, 16, 16]);
        // The ends of the path decode the two posterior means.
        let ends = vae.decode(&p.mean.narrow(0, 0, 2).unwrap(), None).unwrap();
        let d0 = (path.get(0).unwrap() - ends.get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d1 = (path.get(6).unwrap() - ends.get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // The same decoder on 7 rows and on 2 (gemm may block them
        // differently): the decoder's chain, latent 6 then 32 and 64 (MLP) or
        // 16·2·2 and 8·2·2 (transposed 4x4 convolutions, stride 2), with
        // logits of order 1 at initialisation, whose errors reach the
        // sigmoid's output scaled by at most 1/4.
        let chain: &[usize] = if conv { &[6, 64, 32] } else { &[6, 32, 64] };
        let tol = layers_abs_tol(chain, 1.0) as f32;
        assert!(d0 <= tol && d1 <= tol, "{d0} {d1} (tolerance {tol:e})");
        assert!(vae
            .interpolate(&x.get(0).unwrap(), &x.get(1).unwrap(), 1, None)
            .is_err());
    }
}

#[test]
fn conditional_gaussian_and_beta_variants() {
    let cfg = VaeConfig {
        num_classes: Some(3),
        likelihood: Likelihood::Gaussian {
            learned: true,
            logvar: -2.0,
        },
        beta: 4.0,
        ..tiny(true)
    };
    let vs = VarStore::new(1);
    let vae = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    assert!(vs.names().contains(&"logvar_x".to_string()));
    let mut rng = SeededRng::new(2);
    let x = rng
        .uniform(&[3, 3, 16, 16], 0.0, 1.0, &Device::Cpu)
        .unwrap();
    let y = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    assert!(vae
        .encode(&x, None)
        .unwrap_err()
        .to_string()
        .contains("pass labels"));
    let bad = Tensor::new(&[0u32, 3, 1], &Device::Cpu).unwrap();
    assert!(vae
        .encode(&x, Some(&bad))
        .unwrap_err()
        .to_string()
        .contains("outside 0..3"));
    let out = vae.forward(&x, Some(&y), &mut rng).unwrap();
    let t = elbo_loss(&out, &x, cfg.likelihood, vae.logvar_x(), cfg.beta).unwrap();
    let (loss, rec, kl) = (
        t.loss.to_scalar::<f32>().unwrap(),
        t.rec.to_scalar::<f32>().unwrap(),
        t.kl.to_scalar::<f32>().unwrap(),
    );
    // loss = rec + 4 kl in f32: a product and a sum, 2 roundings.
    let tol = f32_abs_tol_tight(3, f64::from(rec.abs() + 4.0 * kl.abs())) as f32;
    assert!(
        (loss - (rec + 4.0 * kl)).abs() <= tol,
        "{loss} vs {rec} + 4 {kl}"
    );
    let g = t.loss.backward().unwrap();
    for (name, v) in vs.vars() {
        let n = g
            .get(v.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0);
        assert!(n > 0.0, "no gradient reaches {name}");
    }
    // Different labels decode different images from the same z.
    let z = Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap();
    let a = vae
        .decode(&z, Some(&Tensor::new(&[0u32], &Device::Cpu).unwrap()))
        .unwrap();
    let b = vae
        .decode(&z, Some(&Tensor::new(&[2u32], &Device::Cpu).unwrap()))
        .unwrap();
    assert!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    // A Gaussian reconstruction NLL is a proper density: check one pixel by hand.
    let one = kiln_vae::loss::reconstruction_nll(
        &Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::full(0.7f32, (1, 1, 1, 1), &Device::Cpu).unwrap(),
        Likelihood::Gaussian {
            learned: false,
            logvar: 0.0,
        },
        Some(&Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()),
    )
    .unwrap()
    .to_vec1::<f32>()
    .unwrap()[0];
    let want = 0.5 * ((0.7f32 - 0.5).powi(2) + (2.0 * std::f32::consts::PI).ln());
    assert!((one - want).abs() < 1e-6, "{one} vs {want}");
}

#[test]
fn bad_configs_are_rejected_naming_the_field() {
    let vs = VarStore::new(0);
    let cfg = VaeConfig {
        latent: 0,
        ..tiny(false)
    };
    let e = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("latent"), "{e}");
    // A dataset whose images do not fit the model.
    let dir = tempfile::tempdir().unwrap();
    let e = train(
        &tiny(false),
        &TrainConfig {
            epochs: 1,
            ..Default::default()
        },
        flowers(Split::Train, 8, 32),
        None,
        &Device::Cpu,
        &RunOptions::new_run(Some(&dir.path().join("r"))).quiet(true),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("[3, 16, 16]") && e.contains("[3, 32, 32]"),
        "{e}"
    );
}

/// `--image-size 3` passed the CLI and the dataset refused it later; a run
/// whose dataset cannot be drawn at the model's side (eval and sample reopen
/// it there) is refused before its folder is made, naming the field, the
/// value and the dataset's range.
#[test]
fn an_image_size_the_dataset_cannot_draw_is_refused_before_the_run_folder() {
    for (dataset, side, range) in [
        ("synthetic-flowers", 3, "4..=4096"),
        ("synthetic-shapes", 4, "8..=4096"),
        ("synthetic-shapes", 7, "8..=4096"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r");
        let e = train(
            &VaeConfig {
                image_size: side,
                ..tiny(false)
            },
            &TrainConfig {
                epochs: 1,
                dataset: dataset.into(),
                ..Default::default()
            },
            flowers(Split::Train, 8, 4),
            None,
            &Device::Cpu,
            &RunOptions::new_run(Some(&out)).quiet(true),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`image_size`")
                && e.contains(dataset)
                && e.contains(range)
                && e.contains(&format!("found {side}")),
            "{e}"
        );
        assert!(!out.exists(), "{dataset} {side}: a run folder was made");
    }
    // Sides the datasets take, and datasets that are resized to any side.
    for (dataset, side) in [
        ("synthetic-flowers", 4),
        ("synthetic-shapes", 8),
        ("cifar10", 1),
        ("mnist", 2),
        ("folder:pictures", 3),
    ] {
        kiln_vae::RunConfig {
            model: VaeConfig {
                image_size: side,
                ..tiny(false)
            },
            train: TrainConfig {
                dataset: dataset.into(),
                ..Default::default()
            },
        }
        .validate()
        .unwrap();
    }
}

/// Training on SyntheticFlowers lowers the test negative ELBO substantially and
/// every parameter changes; the run folder has its figures; the run loads back.
#[test]
fn training_lowers_the_negative_elbo_and_writes_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(false);
    let (tr, te) = (flowers(Split::Train, 256, 16), flowers(Split::Test, 64, 16));
    let vs = VarStore::new(3);
    let fresh = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    let before = evaluate(&fresh, te.clone(), &Device::Cpu, 64, 0, 3).unwrap();
    let tc = TrainConfig {
        epochs: 6,
        seed: 3,
        lr: 2e-3,
        ..Default::default()
    };
    let rep = train(
        &cfg,
        &tc,
        tr,
        Some(te.clone()),
        &Device::Cpu,
        &RunOptions::new_run(Some(&dir.path().join("r"))).quiet(true),
    )
    .unwrap();
    let after = rep.test.clone().unwrap();
    // BCE on continuous pixels cannot go below the pixels' own binary entropy:
    // measure progress as the excess over that floor.
    let floor = entropy_floor(te.as_ref());
    let (b, a) = (before.neg_elbo_nats - floor, after.neg_elbo_nats - floor);
    assert!(
        a < 0.75 * b,
        "negative ELBO above the {floor:.1}-nat floor: {b:.1} -> {a:.1} nats/image"
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/last.safetensors",
        "loss.png",
        "samples.png",
        "reconstructions.png",
        "interpolation.png",
        "summary.json",
    ] {
        assert!(dir.path().join("r").join(f).exists(), "{f} missing");
    }
    let (loaded, rc) = from_run(&dir.path().join("r"), &Device::Cpu).unwrap();
    assert_eq!(rc.model, cfg);
    let again = evaluate(&loaded, te, &Device::Cpu, 64, 0, 3).unwrap();
    assert!(
        (again.neg_elbo_nats - after.neg_elbo_nats).abs() < 1e-3,
        "{again:?} vs {after:?}"
    );
    let iw = evaluate(
        &loaded,
        flowers(Split::Test, 16, 16),
        &Device::Cpu,
        16,
        8,
        3,
    )
    .unwrap();
    let (iwae, elbo) = (iw.iwae_nats.unwrap(), iw.neg_elbo_nats);
    assert!(
        iwae.is_finite() && iwae < elbo + 1.0,
        "IWAE bound {iwae} should be at most about the ELBO {elbo}"
    );
    assert!((iw.neg_elbo_bpd - elbo / (768.0 * std::f64::consts::LN_2)).abs() < 1e-9);
}

/// Mean over images of sum over pixels of the binary entropy of the pixel value.
fn entropy_floor(ds: &dyn Dataset) -> f64 {
    let mut total = 0.0;
    for i in 0..ds.len() {
        for &p in &ds.get(i).unwrap().image.data {
            let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
            total -= p * p.ln() + (1.0 - p) * (1.0 - p).ln();
        }
    }
    total / ds.len() as f64
}

#[test]
fn every_parameter_gets_a_gradient_and_changes() {
    let cfg = tiny(true);
    let vs = VarStore::new(4);
    let vae = Vae::new(&cfg, vs.builder(DType::F32, &Device::Cpu)).unwrap();
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let before: Vec<Vec<f32>> = vs
        .tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let mut rng = SeededRng::new(0);
    let x = rng
        .uniform(&[4, 3, 16, 16], 0.0, 1.0, &Device::Cpu)
        .unwrap();
    let out = vae.forward(&x, None, &mut rng).unwrap();
    let t = elbo_loss(&out, &x, cfg.likelihood, None, 1.0).unwrap();
    opt.backward_step(&t.loss).unwrap();
    for ((name, t), b) in vs.tensors().iter().zip(&before) {
        assert_ne!(
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b,
            "{name} did not change"
        );
    }
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(false);
    let tr = flowers(Split::Train, 64, 16);
    let go = |name: &str, epochs: u64, resume: bool| {
        let path = dir.path().join(name);
        let opts = if resume {
            RunOptions::resume(&path)
        } else {
            RunOptions::new_run(Some(&path))
        }
        .quiet(true);
        let tc = TrainConfig {
            epochs,
            seed: 9,
            ..Default::default()
        };
        train(&cfg, &tc, tr.clone(), None, &Device::Cpu, &opts).unwrap();
        let (m, _) = from_run(&path, &Device::Cpu).unwrap();
        let z = Tensor::ones((1, 6), DType::F32, &Device::Cpu).unwrap();
        m.decode(&z, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let straight = go("a", 3, false);
    let _ = go("b", 1, false);
    let resumed = go("b", 3, true);
    assert_eq!(straight, resumed);
}

/// The tiny flowers the old-run fixtures were made on (fixtures/old_runs/README.md).
fn fixture_flowers(split: Split) -> Arc<dyn Dataset> {
    let cfg = SyntheticFlowersConfig {
        train: 12,
        test: 4,
        size: 8,
        ..Default::default()
    };
    Arc::new(SyntheticFlowers::new(cfg, split).unwrap())
}

/// A run written before sessions had named parts (checkpoint format 1,
/// interrupted after its first batch) resumes with today's code and
/// finishes: every remaining batch once, epoch lines, a test line, figures
/// and a summary; the finished run loads for evaluation.
#[test]
fn a_run_written_in_the_first_checkpoint_format_resumes_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vae");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old_runs/vae");
    kiln_core::files::copy_dir(&fixture, &run).unwrap();
    let (_, rc): (String, kiln_vae::RunConfig) = kiln_core::run::RunDir::open(&run)
        .unwrap()
        .read_config()
        .unwrap();
    let rep = train(
        &rc.model,
        &rc.train,
        fixture_flowers(Split::Train),
        Some(fixture_flowers(Split::Test)),
        &Device::Cpu,
        &RunOptions::resume(&run).quiet(true),
    )
    .unwrap();
    assert!(!rep.interrupted && rep.epochs == 2);
    assert!(rep.final_train_loss.is_finite());
    let recs = kiln_core::run::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps = |split: &str| -> Vec<u64> {
        recs.iter()
            .filter(|r| r.split == split)
            .map(|r| r.step)
            .collect()
    };
    assert_eq!(steps("train"), (1..=6).collect::<Vec<_>>());
    assert_eq!(steps("train_epoch"), [3, 6]);
    assert_eq!(steps("test"), [6]);
    assert!(run.join("summary.json").is_file() && run.join("samples.png").is_file());
    from_run(&run, &Device::Cpu).unwrap();
}

/// The trainer checks the run kind itself, not only the CLI.
#[test]
fn resuming_a_run_of_another_kind_is_refused_by_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("config.toml"), "kind = \"inpaint\"\nepochs = 2\n").unwrap();
    let e = train(
        &tiny(false),
        &TrainConfig {
            epochs: 1,
            ..Default::default()
        },
        flowers(Split::Train, 8, 16),
        None,
        &Device::Cpu,
        &RunOptions::resume(&run).quiet(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is a \"inpaint\" run, not a \"vae\" run"), "{e}");
    // A bad setting is found before any folder is made.
    let fresh = dir.path().join("never");
    let e = train(
        &tiny(false),
        &TrainConfig {
            epochs: 0,
            ..Default::default()
        },
        flowers(Split::Train, 8, 16),
        None,
        &Device::Cpu,
        &RunOptions::new_run(Some(&fresh)).quiet(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("epochs") && e.contains("at least 1"), "{e}");
    assert!(!fresh.exists());
}

/// `eval vae --run <an inpaint run>`: the kind is checked before the config's
/// fields, so the message names the run's kind instead of serde's "unknown field".
#[test]
fn loading_a_run_of_another_kind_names_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("inpaint-run");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(
        run.join("config.toml"),
        "kind = \"inpaint\"\nepochs = 2\nbatch_size = 4\nmask_size = 2\nhole_weight = 1.0\n",
    )
    .unwrap();
    let e = from_run(&run, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("inpaint-run")
            && e.contains("is a \"inpaint\" run, not a VAE run")
            && !e.contains("unknown field"),
        "{e}"
    );
}

/// `root/<split>/c<k>/<i>.png`: `n` synthetic flowers (16x16) per split in
/// two classes, an image folder on disk with train/ and test/ splits.
fn image_folder(root: &std::path::Path, n: usize) {
    for split in [Split::Train, Split::Test] {
        let ds = flowers(split, n, 16);
        for i in 0..n {
            let class = root.join(split.as_str()).join(format!("c{}", i % 2));
            std::fs::create_dir_all(&class).unwrap();
            let png = class.join(format!("{i}.png"));
            ds.get(i).unwrap().image.save_png(&png).unwrap();
        }
    }
}

/// A resumed run reads the data it began on: after a picture of the train
/// or test split changed, `--resume` is refused naming that split's folder
/// (and leaves the config as it was); with the data put back it resumes.
#[test]
fn a_resume_after_the_dataset_changed_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pics");
    image_folder(&data, 8);
    let spec = kiln_data::DatasetSpec::Folder(data.clone());
    let run = dir.path().join("run");
    let go = |epochs: u64, resume: bool| {
        let open = |split| -> Arc<dyn Dataset> {
            kiln_data::open(&spec, dir.path(), split, 16)
                .unwrap()
                .into()
        };
        let opts = if resume {
            RunOptions::resume(&run)
        } else {
            RunOptions::new_run(Some(&run))
        };
        let tc = TrainConfig {
            epochs,
            batch_size: 4,
            dataset: spec.to_string(),
            ..Default::default()
        };
        let (tr, te) = (open(Split::Train), open(Split::Test));
        train(
            &tiny(false),
            &tc,
            tr,
            Some(te),
            &Device::Cpu,
            &opts.quiet(true),
        )
    };
    go(1, false).unwrap();
    let inputs = std::fs::read_to_string(run.join(kiln_core::run::INPUTS_FILE)).unwrap();
    for split in ["train", "test"] {
        let p = data.join(split).display().to_string();
        assert!(
            inputs.contains(&serde_json::to_string(&p).unwrap()),
            "{inputs}"
        );
    }
    let epochs = || {
        let (_, rc): (String, kiln_vae::RunConfig) = kiln_core::run::RunDir::open(&run)
            .unwrap()
            .read_config()
            .unwrap();
        rc.train.epochs
    };
    for split in ["train", "test"] {
        let png = data.join(split).join("c0").join("0.png");
        let before = std::fs::read(&png).unwrap();
        // Another picture in its place.
        std::fs::copy(data.join(split).join("c1").join("1.png"), &png).unwrap();
        let e = go(2, true).unwrap_err().to_string();
        let folder = data.join(split).display().to_string();
        assert!(
            e.contains(&format!("{folder}: changed since the run began")),
            "{split}: {e}"
        );
        assert_eq!(epochs(), 1, "a refused resume rewrote the config");
        std::fs::write(&png, before).unwrap();
    }
    let rep = go(2, true).unwrap();
    assert_eq!((rep.epochs, rep.interrupted), (2, false));
    assert_eq!(epochs(), 2);
}
