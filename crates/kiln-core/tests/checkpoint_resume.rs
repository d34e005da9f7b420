//! Checkpoints: bit-exact resume, rejection of damaged files, seeded
//! reproducibility.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

use kiln_core::checkpoint::{self, TrainState};
use kiln_core::nn::{Dropout, Linear};
use kiln_core::observer::ObserverConfig;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use kiln_core::session::{Record, Session, SessionError};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, ModuleT, Tensor};

const QUIET: ObserverConfig = ObserverConfig {
    quiet: true,
    silent: true,
    log_every: 0,
};

struct Net {
    a: Linear,
    drop: Dropout,
    b: Linear,
}

fn build(seed: u64) -> (VarStore, Net) {
    let vs = VarStore::new(seed);
    let vb = vs.builder(DType::F32, &Device::Cpu);
    let net = Net {
        a: Linear::new(6, 16, vb.pp("a")).unwrap(),
        drop: Dropout::new(0.2, vs.rng().clone()).unwrap(),
        b: Linear::new(16, 1, vb.pp("b")).unwrap(),
    };
    (vs, net)
}

fn data() -> (Tensor, Tensor) {
    let mut r = SeededRng::new(99);
    let x = r.normal(&[32, 6], 0.0, 1.0, &Device::Cpu).unwrap();
    let y = x.sum_keepdim(1).unwrap().sin().unwrap();
    (x, y)
}

/// Trains until `stop_at` total steps (or the end), epoch data order from
/// (seed, epoch), input noise from the session RNG, dropout from the model RNG.
fn train(run: &Path, seed: u64, resume: bool, stop_at: Option<u64>) -> Vec<f32> {
    let (vs, net) = build(seed);
    let opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-2, 0.01).unwrap();
    let opts = if resume {
        RunOptions::resume(run)
    } else {
        RunOptions::new_run(Some(run))
    }
    .quiet(true);
    let rd = opts
        .open("t", "test-net", &serde_json::json!({"seed": seed}), &[])
        .unwrap();
    let (x, y) = data();
    let mut b = Session::builder(rd, seed)
        .part("model", &vs, opt)
        .epochs(3, 8)
        .observer(QUIET);
    if let Some(n) = stop_at {
        b = b.stop_at(n);
    }
    let mut s = b.start().unwrap();
    let end = s
        .run_epochs(
            |epoch, start| {
                let order = SeededRng::derive(seed, &[epoch]).permutation(32);
                let chunks: Vec<Vec<usize>> =
                    order.chunks(4).skip(start).map(<[usize]>::to_vec).collect();
                chunks.into_iter().map(Ok::<_, SessionError>)
            },
            |s, chunk| {
                let idx = Tensor::new(
                    chunk.iter().map(|&j| j as u32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )?;
                let xb = x.index_select(&idx, 0)?;
                let noise = s.rng.normal(&[4, 6], 0.0, 0.05, &Device::Cpu)?;
                let h = net.a.forward(&(xb + noise)?)?.relu()?;
                let h = net.drop.forward_t(&h, true)?;
                let pred = net.b.forward(&h)?;
                let loss = kiln_core::loss::mse(
                    &pred,
                    &y.index_select(&idx, 0)?,
                    kiln_core::loss::Reduction::Mean,
                )?;
                let v = s.train_step("model", &loss)?;
                Ok(Record::new(4).with("loss", v))
            },
            |_| Ok(()),
        )
        .unwrap();
    if !end.completed() {
        return vec![];
    }
    s.finish(serde_json::json!({})).unwrap();
    vs.tensors()
        .into_iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn resume_mid_epoch_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let reference = train(&dir.path().join("a"), 4, false, None);
    // Interrupt mid-epoch (step 13 of 24: epoch 1, batch 5), resume, interrupt
    // again at an epoch boundary (step 16), resume to the end.
    let _ = train(&dir.path().join("c"), 4, false, Some(13));
    let _ = train(&dir.path().join("c"), 4, true, Some(16));
    let resumed = train(&dir.path().join("c"), 4, true, None);
    assert_eq!(reference.len(), 6 * 16 + 16 + 16 + 1);
    assert_eq!(
        resumed, reference,
        "resumed parameters differ from the uninterrupted run"
    );
    // metrics.jsonl has exactly one line per step even though the run restarted.
    let recs = kiln_core::run::read_metrics(&dir.path().join("c/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = recs
        .iter()
        .filter(|r| r.split == "train")
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>());
}

#[test]
fn same_seed_same_run_different_seed_different_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(&dir.path().join("a"), 1, false, None);
    let b = train(&dir.path().join("b"), 1, false, None);
    let c = train(&dir.path().join("c"), 2, false, None);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

fn saved(dir: &Path) -> (VarStore, std::path::PathBuf) {
    let (vs, _) = build(0);
    let path = dir.join("ck.safetensors");
    let opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    let st = TrainState {
        step: 5,
        epoch: 1,
        rng: Some(SeededRng::new(1).state()),
        model_rng: None,
        extra: Default::default(),
    };
    checkpoint::save(&path, &vs, Some(&opt), &st).unwrap();
    (vs, path)
}

#[test]
fn damaged_checkpoints_are_rejected_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, path) = saved(dir.path());
    let good = std::fs::read(&path).unwrap();
    // No temp file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let st = checkpoint::load(&path, &vs, None).unwrap();
    assert_eq!((st.step, st.epoch), (5, 1));

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 10].to_vec()),
        ("header only", good[..40].to_vec()),
        ("garbage", b"this is not a checkpoint at all".to_vec()),
        ("empty", vec![]),
        ("flipped byte", {
            let mut b = good.clone();
            let n = b.len();
            b[n - 3] ^= 0x55;
            b
        }),
    ];
    let (other, _) = build(0);
    let before: Vec<Vec<f32>> = other
        .tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    for (what, bytes) in cases {
        let p = dir
            .path()
            .join(format!("{}.safetensors", what.replace(' ', "_")));
        std::fs::write(&p, bytes).unwrap();
        let e = checkpoint::load(&p, &other, None).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("not a valid"),
            "{what}: {e}"
        );
    }
    // A run's missing last checkpoint says the run has none yet, and how to
    // continue it (it was a bare "No such file or directory").
    let run = dir.path().join("r");
    let e = checkpoint::load(&run.join("checkpoints/last.safetensors"), &other, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not exist")
            && e.contains("has no checkpoint yet")
            && e.contains(&format!("--resume {}", run.display())),
        "{e}"
    );
    let e = checkpoint::load(&dir.path().join("x.safetensors"), &other, None)
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("x.safetensors does not exist"), "{e}");
    let after: Vec<Vec<f32>> = other
        .tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    assert_eq!(
        before, after,
        "a rejected checkpoint must not change the model"
    );
    let e = checkpoint::load(&dir.path().join("missing.safetensors"), &vs, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn checkpoint_of_another_model_is_a_mismatch_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path());
    let vs = VarStore::new(0);
    let vb = vs.builder(DType::F32, &Device::Cpu);
    let _ = Linear::new(6, 8, vb.pp("a")).unwrap();
    let _ = Linear::new(8, 1, vb.pp("b")).unwrap();
    let before = vs.tensors()[0]
        .1
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = checkpoint::load(&path, &vs, None).unwrap_err().to_string();
    assert!(e.contains("does not match") && e.contains("shape"), "{e}");
    assert_eq!(
        vs.tensors()[0]
            .1
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        before
    );
}
