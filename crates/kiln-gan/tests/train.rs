//! The GAN trainer: exact resume after every batch (parameters, optimizer
//! state, EMA, spectral-norm vectors, RNGs, metrics, grids), losses that go
//! down and parameters that all move, the collapse check firing on a
//! deliberately collapsed generator, divergence, and sampling from a run.
#![allow(clippy::unwrap_used, clippy::needless_range_loop, missing_docs)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_core::checkpoint::read_tensors;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{read_metrics, RunOptions};
use kiln_core::session::SessionError;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use kiln_data::{
    DataLoader, Dataset, LoaderConfig, Split, SyntheticFlowers, SyntheticFlowersConfig,
};
use kiln_gan::loss::{d_loss, g_loss};
use kiln_gan::{
    is_trainable, load_generator, train, train_until, Augment, Discriminator, EmaConfig, GanError,
    Generator, LossKind, ModelConfig, Norm, PenaltyKind, TrainConfig, Which,
};

const DEV: Device = Device::Cpu;

fn flowers(n: usize) -> Arc<dyn Dataset> {
    let cfg = SyntheticFlowersConfig {
        train: n,
        size: 16,
        ..Default::default()
    };
    Arc::new(SyntheticFlowers::new(cfg, Split::Train).unwrap())
}

fn small() -> ModelConfig {
    ModelConfig {
        image_size: 16,
        nz: 16,
        ngf: 8,
        ndf: 8,
        ..ModelConfig::dcgan32()
    }
}

fn opts(run: &Path, resume: bool) -> RunOptions {
    if resume {
        RunOptions::resume(run)
    } else {
        RunOptions::new_run(Some(run))
    }
    .quiet(true)
}

/// A checkpoint's tensors (as bytes) by name, and its metadata, sorted.
type Contents = (Vec<(String, Vec<u8>)>, Vec<(String, String)>);

/// A checkpoint's contents.
fn contents(path: &Path) -> Contents {
    let (ts, meta) = read_tensors(path, &DEV).unwrap();
    let mut ts: Vec<(String, Vec<u8>)> = ts
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let b = v
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (n, b)
        })
        .collect();
    ts.sort();
    let mut meta: Vec<(String, String)> = meta.into_iter().collect();
    meta.sort();
    (ts, meta)
}

/// `summary.json` without the throughput (timing).
fn summary(run: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    v["metrics"].as_object_mut().unwrap().remove("images_per_s");
    v
}

struct Setup {
    name: &'static str,
    model: ModelConfig,
    train: TrainConfig,
    images: usize,
}

fn setups() -> Vec<Setup> {
    vec![
        Setup {
            name: "batch norm, n_critic 2, EMA from step 2, DiffAugment",
            model: small(),
            train: TrainConfig {
                epochs: 2,
                batch_size: 4,
                n_critic: 2,
                ema: Some(EmaConfig {
                    decay: 0.9,
                    start: 2,
                }),
                augment: vec![Augment::Color, Augment::Translation, Augment::Cutout],
                ..TrainConfig::default()
            },
            images: 24,
        },
        Setup {
            name: "spectral norm, R1, conditional, hinge",
            model: ModelConfig {
                spectral_norm: true,
                d_norm: Norm::Layer,
                num_classes: Some(8),
                ..small()
            },
            train: TrainConfig {
                epochs: 2,
                batch_size: 4,
                loss: LossKind::Hinge,
                penalty: PenaltyKind::R1,
                penalty_weight: 1.0,
                ..TrainConfig::default()
            },
            images: 12,
        },
        Setup {
            name: "Wasserstein with clipping, WGAN-GP, no norm",
            model: ModelConfig {
                d_norm: Norm::None,
                ..small()
            },
            train: TrainConfig {
                epochs: 2,
                batch_size: 4,
                n_critic: 3,
                loss: LossKind::Wasserstein,
                penalty: PenaltyKind::WganGp,
                ..TrainConfig::default()
            },
            images: 24,
        },
    ]
}

#[test]
fn training_resumes_exactly_after_every_batch() {
    for st in setups() {
        let dir = tempfile::tempdir().unwrap();
        let ds = flowers(st.images);
        let reference = dir.path().join("ref");
        let rep = train(
            &st.model,
            &st.train,
            ds.clone(),
            &DEV,
            &opts(&reference, false),
        )
        .unwrap();
        assert!(!rep.interrupted && rep.epochs == 2, "{}", st.name);
        let batches = st.images / (st.train.batch_size * st.train.n_critic);
        let lines = read_metrics(&reference.join("metrics.jsonl")).unwrap();
        assert_eq!(
            lines.iter().filter(|r| r.split == "train").count(),
            2 * batches,
            "{}",
            st.name
        );
        let want_ck = contents(&reference.join("checkpoints/last.safetensors"));
        let want_healthy = contents(&reference.join("checkpoints/healthy.safetensors"));
        let want_metrics = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
        let want_grid = std::fs::read(reference.join("samples/epoch-002.png")).unwrap();
        let want_interp = std::fs::read(reference.join("interpolation.png")).unwrap();
        for k in 1..2 * batches as u64 {
            let run = dir.path().join(format!("stop{k}"));
            let rep = train_until(
                &st.model,
                &st.train,
                ds.clone(),
                &DEV,
                &opts(&run, false),
                Some(k),
            )
            .unwrap();
            assert!(rep.interrupted, "{}: stop at {k}", st.name);
            let rep = train(&st.model, &st.train, ds.clone(), &DEV, &opts(&run, true)).unwrap();
            assert!(!rep.interrupted);
            let ck = contents(&run.join("checkpoints/last.safetensors"));
            assert!(
                ck == want_ck,
                "{}: checkpoint (G, D, EMA, optimizers, u/v, RNGs) after stopping at {k}",
                st.name
            );
            assert!(contents(&run.join("checkpoints/healthy.safetensors")) == want_healthy);
            assert_eq!(
                std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
                want_metrics,
                "{}: metrics after stopping at {k}",
                st.name
            );
            assert_eq!(
                summary(&run),
                summary(&reference),
                "{}: summary, stop {k}",
                st.name
            );
            assert!(std::fs::read(run.join("samples/epoch-002.png")).unwrap() == want_grid);
            assert!(std::fs::read(run.join("interpolation.png")).unwrap() == want_interp);
        }
        // Resuming the finished run changes nothing and says so.
        let e = train(&st.model, &st.train, ds, &DEV, &opts(&reference, true)).unwrap_err();
        assert!(
            matches!(e, GanError::Session(SessionError::Finished { .. })),
            "{e}"
        );
    }
}

#[test]
fn run_folder_holds_grids_metrics_and_curves() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let st = &setups()[0];
    train(&st.model, &st.train, flowers(24), &DEV, &opts(&run, false)).unwrap();
    for f in [
        "config.toml",
        "summary.json",
        "samples/epoch-001.png",
        "samples/epoch-001-ema.png",
        "samples/epoch-002.png",
        "samples/epoch-002-ema.png",
        "samples.png",
        "samples-ema.png",
        "interpolation.png",
        "loss.png",
        "d_outputs.png",
        "checkpoints/last.safetensors",
        "checkpoints/healthy.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let recs = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let first = recs.iter().find(|r| r.split == "train").unwrap();
    let mut keys: Vec<&str> = first.values.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "d_fake_after",
            "d_fake_before",
            "d_loss",
            "d_real_after",
            "d_real_before",
            "g_loss"
        ]
    );
    // Sampling from the run: G and the EMA copy, last and healthy checkpoints.
    for (which, ck) in [
        (Which::Generator, None),
        (Which::Ema, None),
        (Which::Ema, Some("healthy")),
    ] {
        let (g, rc) = load_generator(&run, which, ck, &DEV).unwrap();
        assert_eq!(rc.model, st.model);
        let x = g.sample(5, None, &mut SeededRng::new(1)).unwrap();
        assert_eq!(x.dims(), &[5, 3, 16, 16]);
    }
    // A run without an EMA copy says so.
    let run2 = dir.path().join("r2");
    let tc = TrainConfig {
        ema: None,
        epochs: 1,
        ..st.train.clone()
    };
    train(&st.model, &tc, flowers(24), &DEV, &opts(&run2, false)).unwrap();
    let e = load_generator(&run2, Which::Ema, None, &DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no EMA copy"), "{e}");
    // A checkpoint that is not there: a typed path is named as typed, a
    // name lists the run's checkpoints.
    let e = load_generator(&run2, Which::Generator, Some("/nonexistent"), &DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint /nonexistent: no such file"), "{e}");
    let e = load_generator(&run2, Which::Generator, Some("best"), &DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(it has: ") && e.contains("last"), "{e}");
    // A bad setting is refused before any folder is made.
    let run3 = dir.path().join("r3");
    let bad = TrainConfig {
        penalty: PenaltyKind::R1,
        ..st.train.clone()
    };
    let e = train(&st.model, &bad, flowers(24), &DEV, &opts(&run3, false)).unwrap_err();
    assert!(e.to_string().contains("model.d_norm"), "{e}");
    assert!(!run3.exists());
    // A batch larger than the data set is refused as such, not with a
    // memory figure: 65,536 dcgan32 images would need about 90 GiB.
    let run4 = dir.path().join("r4");
    let flowers32 = Arc::new(
        SyntheticFlowers::new(
            SyntheticFlowersConfig {
                train: 24,
                size: 32,
                ..Default::default()
            },
            Split::Train,
        )
        .unwrap(),
    );
    let huge = TrainConfig {
        batch_size: 65536,
        ..st.train.clone()
    };
    let e = train(
        &ModelConfig::dcgan32(),
        &huge,
        flowers32,
        &DEV,
        &opts(&run4, false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("24 images do not fill one batch"), "{e}");
    assert!(!run4.exists());
}

/// The losses each network minimises go down when only that network trains
/// (on a fixed batch), and one step of each moves every trainable parameter
/// of that network.
#[test]
fn each_network_reduces_its_loss_and_every_parameter_moves() {
    let cfg = small();
    let (gv, dv) = (VarStore::new(1), VarStore::new(2));
    let g = Generator::new(&cfg, gv.builder(DType::F32, &DEV)).unwrap();
    let d = Discriminator::new(&cfg, dv.builder(DType::F32, &DEV)).unwrap();
    let adam = OptimKind::Adam {
        betas: (0.5, 0.999),
        eps: 1e-8,
    };
    let mut og = Optimizer::single(adam, gv.vars_where(is_trainable), 2e-3, 0.0).unwrap();
    let mut od = Optimizer::single(adam, dv.vars_where(is_trainable), 2e-3, 0.0).unwrap();
    let loader = DataLoader::new(flowers(16), LoaderConfig::batch(16), &DEV).unwrap();
    let real = loader
        .epoch(0)
        .next()
        .unwrap()
        .unwrap()
        .images
        .affine(2.0, -1.0)
        .unwrap();
    let z = g.noise(16, &mut SeededRng::new(3)).unwrap();
    let snapshot = |vs: &VarStore| -> Vec<(String, Vec<f32>)> {
        vs.vars_where(is_trainable)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let moved_all = |before: &[(String, Vec<f32>)], vs: &VarStore| {
        for ((n, a), (_, b)) in before.iter().zip(snapshot(vs)) {
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            assert_eq!(same, 0, "{n}: {same} of {} elements did not move", a.len());
        }
    };
    let d_value = |g: &Generator| -> f32 {
        let fake = g.forward_t(&z, None, true).unwrap().detach();
        let l = d_loss(
            LossKind::NonSaturating,
            &d.forward_t(&real, None, true).unwrap(),
            &d.forward_t(&fake, None, true).unwrap(),
        )
        .unwrap();
        l.to_scalar::<f32>().unwrap()
    };
    // D alone.
    let before = snapshot(&dv);
    let d0 = d_value(&g);
    for i in 0..30 {
        let fake = g.forward_t(&z, None, true).unwrap().detach();
        let l = d_loss(
            LossKind::NonSaturating,
            &d.forward_t(&real, None, true).unwrap(),
            &d.forward_t(&fake, None, true).unwrap(),
        )
        .unwrap();
        od.backward_step(&l).unwrap();
        if i == 0 {
            moved_all(&before, &dv);
        }
    }
    let d1 = d_value(&g);
    assert!(d1 < 0.5 * d0, "D loss {d0} -> {d1}");
    // G alone, against the trained D.
    let before = snapshot(&gv);
    let g_value = || -> f32 {
        g_loss(
            LossKind::NonSaturating,
            &d.forward_t(&g.forward_t(&z, None, true).unwrap(), None, true)
                .unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
    };
    let g0 = g_value();
    for i in 0..30 {
        let l = g_loss(
            LossKind::NonSaturating,
            &d.forward_t(&g.forward_t(&z, None, true).unwrap(), None, true)
                .unwrap(),
        )
        .unwrap();
        og.backward_step(&l).unwrap();
        if i == 0 {
            moved_all(&before, &gv);
        }
    }
    let g1 = g_value();
    assert!(g1 < 0.5 * g0, "G loss {g0} -> {g1}");
}

/// A generator that cannot learn (learning rate 1e-12) against a
/// discriminator that learns fast: D(x) -> 1 and D(G(z)) -> 0, and the
/// collapse check stops training, naming the healthy checkpoint.
#[test]
fn a_collapsed_generator_stops_training_with_the_checkpoint_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("collapse");
    let tc = TrainConfig {
        epochs: 50,
        batch_size: 8,
        lr_g: 1e-12,
        lr_d: 1e-3,
        collapse_window: 20,
        ..TrainConfig::default()
    };
    let e = train(&small(), &tc, flowers(48), &DEV, &opts(&run, false)).unwrap_err();
    let GanError::Collapsed(f) = &e else {
        panic!("expected a collapse, got {e}");
    };
    let msg = e.to_string();
    assert!(msg.contains("for 20 steps in a row"), "{msg}");
    let recs = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let train_recs: Vec<_> = recs.iter().filter(|r| r.split == "train").collect();
    // The 20 steps before the stop (the last is not logged) were all certain wins.
    let get = |r: &kiln_core::run::MetricRecord, k: &str| {
        r.values.iter().find(|(n, _)| n == k).unwrap().1
    };
    let tail = &train_recs[train_recs.len() - 19..];
    assert!(tail
        .iter()
        .all(|r| get(r, "d_real_after") > 0.99 && get(r, "d_fake_after") < 0.01));
    assert_eq!(f.step, train_recs.len() as u64 + 1);
    let ck = f
        .checkpoint
        .as_ref()
        .expect("a healthy checkpoint predates the collapse");
    assert!(
        msg.contains("healthy.safetensors") && msg.contains("--checkpoint healthy"),
        "{msg}"
    );
    let at = f.checkpoint_step.unwrap();
    assert!(
        at < f.step - 20,
        "healthy checkpoint at {at}, collapse window ends at {}",
        f.step
    );
    assert!(ck.is_file());
    load_generator(&run, Which::Generator, Some("healthy"), &DEV).unwrap();
    // No summary: the run did not finish.
    assert!(!run.join("summary.json").exists());
}

/// Images that turn to NaN once the first epoch has been read (a broken
/// decoder or a bad normalisation): the discriminator's loss becomes NaN in
/// the second epoch.
struct PoisonedAfter {
    inner: Arc<dyn Dataset>,
    reads: AtomicUsize,
    after: usize,
}

impl Dataset for PoisonedAfter {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> kiln_data::Result<kiln_data::Sample> {
        let mut s = self.inner.get(index)?;
        if self.reads.fetch_add(1, Ordering::SeqCst) >= self.after {
            s.image.data.fill(f32::NAN);
        }
        Ok(s)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn image_size(&self) -> Option<(usize, usize)> {
        self.inner.image_size()
    }
    fn name(&self) -> String {
        "poisoned".into()
    }
}

/// NaN inputs in the second epoch: training stops with a divergence error
/// before any NaN update, naming the checkpoint of the first epoch's end.
#[test]
fn divergence_stops_training_and_names_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("diverge");
    let tc = TrainConfig {
        epochs: 3,
        batch_size: 8,
        ..TrainConfig::default()
    };
    // One read for the shape check, then 48 for the first epoch.
    let ds = Arc::new(PoisonedAfter {
        inner: flowers(48),
        reads: AtomicUsize::new(0),
        after: 49,
    });
    let e = train(&small(), &tc, ds, &DEV, &opts(&run, false)).unwrap_err();
    let GanError::Diverged(f) = &e else {
        panic!("expected a divergence, got {e}");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("stopped at step 7") && msg.contains("NaN"),
        "{msg}"
    );
    assert_eq!(f.checkpoint_step, Some(6), "{msg}");
    assert!(msg.contains("--checkpoint healthy"), "{msg}");
    // The parameters in the last checkpoint are finite: the NaN step was refused.
    let (ts, _) = read_tensors(&run.join("checkpoints/last.safetensors"), &DEV).unwrap();
    for (n, t) in ts {
        let v = t
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{n}");
    }
}

/// A resumed run reads the data it began on: after one picture of its image
/// folder changed, `--resume` is refused naming the folder (and leaves the
/// config as it was); with the picture put back it resumes to the end.
#[test]
fn a_resume_after_the_dataset_changed_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pics");
    let src = flowers(8);
    for i in 0..8 {
        let class = data.join(format!("c{}", i % 2));
        std::fs::create_dir_all(&class).unwrap();
        let png = class.join(format!("{i}.png"));
        src.get(i).unwrap().image.save_png(&png).unwrap();
    }
    let spec = kiln_data::DatasetSpec::Folder(data.clone());
    let run = dir.path().join("run");
    let go = |epochs: u64, resume: bool| {
        let ds: Arc<dyn Dataset> = kiln_data::open(&spec, dir.path(), Split::Train, 16)
            .unwrap()
            .into();
        let tc = TrainConfig {
            epochs,
            batch_size: 4,
            ..TrainConfig::default()
        };
        train(&small(), &tc, ds, &DEV, &opts(&run, resume))
    };
    go(1, false).unwrap();
    let inputs = std::fs::read_to_string(run.join(kiln_core::run::INPUTS_FILE)).unwrap();
    let folder = data.display().to_string();
    assert!(
        inputs.contains(&serde_json::to_string(&folder).unwrap()),
        "{inputs}"
    );
    let png = data.join("c0").join("0.png");
    let before = std::fs::read(&png).unwrap();
    std::fs::copy(data.join("c1").join("1.png"), &png).unwrap();
    let e = go(2, true).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{folder}: changed since the run began")),
        "{e}"
    );
    let (_, rc): (String, kiln_gan::RunConfig) = kiln_core::run::RunDir::open(&run)
        .unwrap()
        .read_config()
        .unwrap();
    assert_eq!(rc.train.epochs, 1, "a refused resume rewrote the config");
    std::fs::write(&png, before).unwrap();
    let rep = go(2, true).unwrap();
    assert_eq!(rep.epochs, 2);
}
