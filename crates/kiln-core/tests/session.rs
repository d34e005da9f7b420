//! The multi-part session and its loop: exact resume after every batch of a
//! two-part loop with several steps per batch (parameters, optimizer state,
//! RNGs, metrics and summary), gradient accumulation equal to the big batch,
//! the iteration loop, and run folders that never lose work.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::path::Path;

use kiln_core::checkpoint::read_tensors;
use kiln_core::loss::{mse, Reduction};
use kiln_core::nn::Linear;
use kiln_core::observer::ObserverConfig;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::{RunError, RunOptions};
use kiln_core::session::{LoopEnd, Record, Session, SessionError};
use kiln_core::tolerance::f32_abs_tol;
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, Tensor};

const QUIET: ObserverConfig = ObserverConfig {
    quiet: true,
    silent: true,
    log_every: 0,
};
const DEV: Device = Device::Cpu;
const EPOCHS: u64 = 2;
const BATCHES: u64 = 4;

fn cfg() -> serde_json::Value {
    serde_json::json!({"epochs": EPOCHS, "lr": 0.01})
}

/// A toy GAN-shaped loop: a generator `g` and a critic `d`, two critic
/// steps and one generator step per batch, noise from the session RNG, a
/// validation line after each epoch. Returns the parameters at the end.
fn two_part(run: &Path, resume: bool, stop_at: Option<u64>) -> (LoopEnd, Vec<f32>) {
    let (gv, dv) = (VarStore::new(1), VarStore::new(2));
    let g = Linear::new(3, 4, gv.builder(DType::F32, &DEV).pp("g")).unwrap();
    let d = Linear::new(4, 1, dv.builder(DType::F32, &DEV).pp("d")).unwrap();
    let gopt = Optimizer::single(OptimKind::adam(), gv.vars(), 1e-2, 0.0).unwrap();
    let dopt = Optimizer::single(OptimKind::adamw(), dv.vars(), 2e-2, 0.01).unwrap();
    let opts = if resume {
        RunOptions::resume(run)
    } else {
        RunOptions::new_run(Some(run))
    }
    .quiet(true);
    let r = opts.open("toy", "toy-gan", &cfg(), &[]).unwrap();
    let mut b = Session::builder(r, 7)
        .part("g", &gv, gopt)
        .part("d", &dv, dopt)
        .clip_grad_norm(5.0)
        .epochs(EPOCHS, BATCHES)
        .observer(QUIET);
    if let Some(n) = stop_at {
        b = b.stop_at(n);
    }
    let mut s = b.start().unwrap();
    let real = |epoch: u64, i: usize| {
        SeededRng::derive(3, &[epoch, i as u64])
            .normal(&[8, 4], 1.0, 0.5, &DEV)
            .unwrap()
    };
    let end = s
        .run_epochs(
            |epoch, start| {
                (start..BATCHES as usize).map(move |i| Ok::<_, SessionError>((epoch, i)))
            },
            |s, (epoch, i)| {
                // Steps run on the kernels' pool (no hand-off per op).
                assert!(rayon::current_thread_index().is_some());
                let x = real(epoch, i);
                let mut rec = Record::new(8);
                for k in 0..2 {
                    let z = s.rng.normal(&[8, 3], 0.0, 1.0, &DEV)?;
                    let fake = g.forward(&z)?.detach();
                    let loss = (d.forward(&fake)?.mean_all()? - d.forward(&x)?.mean_all()?)?;
                    let v = s.backward("d", &loss)?;
                    let norm = s.step("d")?.unwrap();
                    rec.push(format!("d_loss_{k}"), v);
                    rec.push(format!("d_norm_{k}"), norm);
                }
                let z = s.rng.normal(&[8, 3], 0.0, 1.0, &DEV)?;
                let gl = d.forward(&g.forward(&z)?)?.mean_all()?.neg()?;
                rec.push("g_loss", s.train_step("g", &gl)?);
                Ok(rec)
            },
            |s| {
                let z = SeededRng::new(9).normal(&[16, 3], 0.0, 1.0, &DEV)?;
                let v = d.forward(&g.forward(&z)?)?.mean_all()?.to_scalar::<f32>()?;
                s.record("val", &[("critic_fake", v as f64)])
            },
        )
        .unwrap();
    if end.completed() {
        let fields = serde_json::json!({
            "g_loss": s.last_epoch("g_loss"),
            "epochs": s.epoch(),
        });
        s.finish(fields).unwrap();
    }
    let params = gv
        .tensors()
        .into_iter()
        .chain(dv.tensors())
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (end, params)
}

/// A checkpoint's tensors (as bytes, by name) and metadata.
type Contents = (Vec<(String, Vec<u8>)>, HashMap<String, String>);

/// The checkpoint's tensors (as bytes) and metadata.
fn checkpoint_contents(run: &Path) -> Contents {
    let (ts, meta) = read_tensors(&run.join("checkpoints/last.safetensors"), &DEV).unwrap();
    let mut ts: Vec<(String, Vec<u8>)> = ts
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let bytes = v
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (n, bytes)
        })
        .collect();
    ts.sort();
    (ts, meta)
}

fn summary_without_timing(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_two_part_loop_resumes_exactly_after_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref");
    let (end, want) = two_part(&reference, false, None);
    assert!(end.completed());
    // Every parameter of both parts moved.
    let (_, init) = {
        let (gv, dv) = (VarStore::new(1), VarStore::new(2));
        let _ = Linear::new(3, 4, gv.builder(DType::F32, &DEV).pp("g")).unwrap();
        let _ = Linear::new(4, 1, dv.builder(DType::F32, &DEV).pp("d")).unwrap();
        let v: Vec<f32> = gv
            .tensors()
            .into_iter()
            .chain(dv.tensors())
            .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        ((), v)
    };
    assert_eq!(init.len(), want.len());
    for (i, (a, b)) in init.iter().zip(&want).enumerate() {
        assert_ne!(a, b, "parameter element {i} never moved");
    }
    let want_ck = checkpoint_contents(&reference);
    let want_metrics = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
    let want_summary = summary_without_timing(&reference);
    assert_eq!(
        want_metrics.lines().count() as u64,
        EPOCHS * BATCHES + EPOCHS * 2,
        "one line per batch, plus a train_epoch and a val line per epoch"
    );
    for k in 1..=EPOCHS * BATCHES {
        let run = dir.path().join(format!("stop{k}"));
        let (end, _) = two_part(&run, false, Some(k));
        assert_eq!(end, LoopEnd::Interrupted, "stop at {k}");
        assert!(!run.join("summary.json").exists());
        let (end, got) = two_part(&run, true, None);
        assert!(end.completed());
        assert_eq!(got, want, "parameters after stopping at batch {k}");
        assert_eq!(
            checkpoint_contents(&run),
            want_ck,
            "checkpoint (parameters, optimizer state, RNGs, position) after stopping at batch {k}"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
            want_metrics,
            "metrics.jsonl after stopping at batch {k}"
        );
        assert_eq!(
            summary_without_timing(&run),
            want_summary,
            "summary, stop {k}"
        );
    }
}

#[test]
fn resuming_a_finished_run_changes_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    two_part(&run, false, None);
    let before = (
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        std::fs::read(run.join("checkpoints/last.safetensors")).unwrap(),
        std::fs::read(run.join("summary.json")).unwrap(),
        std::fs::read(run.join("config.toml")).unwrap(),
    );
    let vs = VarStore::new(0);
    let _ = Linear::new(3, 4, vs.builder(DType::F32, &DEV).pp("g")).unwrap();
    let dv = VarStore::new(0);
    let _ = Linear::new(4, 1, dv.builder(DType::F32, &DEV).pp("d")).unwrap();
    // As asked, and with a smaller `epochs` the run lets change: open
    // rewrites config.toml, and the refused start puts it back.
    let smaller = serde_json::json!({"epochs": 1, "lr": 0.01});
    let mut errors = Vec::new();
    for (c, epochs) in [(cfg(), EPOCHS), (smaller, 1)] {
        let r = RunOptions::resume(&run)
            .open("toy", "toy-gan", &c, &["epochs"])
            .unwrap();
        errors.push(
            Session::builder(r, 7)
                .part(
                    "g",
                    &vs,
                    Optimizer::single(OptimKind::adam(), vs.vars(), 1e-2, 0.0).unwrap(),
                )
                .part(
                    "d",
                    &dv,
                    Optimizer::single(OptimKind::adamw(), dv.vars(), 2e-2, 0.01).unwrap(),
                )
                .epochs(epochs, BATCHES)
                .observer(QUIET)
                .start()
                .unwrap_err(),
        );
        assert_eq!(
            std::fs::read(run.join("config.toml")).unwrap(),
            before.3,
            "config.toml after a refused resume with epochs {epochs}"
        );
    }
    let e = errors.remove(0);
    assert!(matches!(e, SessionError::Finished { .. }), "{e}");
    assert!(
        errors[0]
            .to_string()
            .contains("already finished (2 of 1 epochs)"),
        "{}",
        errors[0]
    );
    let msg = e.to_string();
    assert!(
        msg.contains("already finished (2 of 2 epochs)") && msg.contains("nothing was changed"),
        "{msg}"
    );
    let after = (
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        std::fs::read(run.join("checkpoints/last.safetensors")).unwrap(),
        std::fs::read(run.join("summary.json")).unwrap(),
        std::fs::read(run.join("config.toml")).unwrap(),
    );
    assert!(before == after, "a finished run was modified");
}

/// One linear model trained one step on 8 examples: as one batch (mean loss),
/// or as `k` micro-batches whose losses are normalised by the global count.
fn accumulated(k: usize, clip: Option<f64>) -> (Vec<f32>, Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(4);
    let fc = Linear::new(5, 3, vs.builder(DType::F32, &DEV).pp("fc")).unwrap();
    let opt = Optimizer::single(OptimKind::sgd(0.9, false), vs.vars(), 0.1, 0.0).unwrap();
    let r = RunOptions::new_run(Some(&dir.path().join("r")))
        .open("acc", "acc", &serde_json::json!({}), &[])
        .unwrap();
    let mut b = Session::builder(r, 0)
        .part("fc", &vs, opt)
        .epochs(1, 1)
        .observer(QUIET);
    if let Some(c) = clip {
        b = b.clip_grad_norm(c);
    }
    let mut s = b.start().unwrap();
    let mut rng = SeededRng::new(11);
    let x = rng.normal(&[8, 5], 0.0, 1.0, &DEV).unwrap();
    let y = rng.normal(&[8, 3], 0.0, 1.0, &DEV).unwrap();
    let per = 8 / k;
    for i in 0..k {
        let (xi, yi) = (
            x.narrow(0, i * per, per).unwrap(),
            y.narrow(0, i * per, per).unwrap(),
        );
        // Sum over the micro-batch, divided by the global element count.
        let l =
            (mse(&fc.forward(&xi).unwrap(), &yi, Reduction::Sum).unwrap() / (8.0 * 3.0)).unwrap();
        s.backward("fc", &l).unwrap();
    }
    let norm = s.step("fc").unwrap();
    let p = vs
        .tensors()
        .into_iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (p, norm)
}

#[test]
fn accumulating_micro_batches_equals_one_batch_k_times_the_size() {
    for clip in [None, Some(0.05)] {
        let (big, n1) = accumulated(1, clip);
        for k in [2, 4, 8] {
            let (acc, nk) = accumulated(k, clip);
            for (i, (a, b)) in big.iter().zip(&acc).enumerate() {
                // Both sum 8 * 3 squared errors per gradient element in f32, in
                // another order: the bound for that reduction, on the
                // parameter's scale (one SGD step of lr 0.1 moves it by < 1).
                let tol = f32_abs_tol(24, 1.0);
                assert!(
                    (a - b).abs() as f64 <= tol,
                    "k={k} clip={clip:?} element {i}: {a} vs {b}"
                );
            }
            if let (Some(a), Some(b)) = (n1, nk) {
                assert!((a - b).abs() <= f32_abs_tol(24, a), "norms {a} vs {b}");
                assert!(a > 0.05, "the clip must bite for this check: norm {a}");
            }
        }
    }
}

#[test]
fn the_iteration_loop_keeps_its_counter_and_cursor_across_resume() {
    let dir = tempfile::tempdir().unwrap();
    let go = |name: &str, resume: bool, stop: Option<u64>| -> (LoopEnd, Vec<f32>, u64) {
        let run = dir.path().join(name);
        let vs = VarStore::new(5);
        let fc = Linear::new(2, 1, vs.builder(DType::F32, &DEV).pp("policy")).unwrap();
        let opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-2, 0.0).unwrap();
        let opts = if resume {
            RunOptions::resume(&run)
        } else {
            RunOptions::new_run(Some(&run))
        };
        let r = opts.open("it", "it", &serde_json::json!({}), &[]).unwrap();
        let prompts: Vec<f32> = (0..7).map(|i| i as f32 * 0.3).collect();
        let mut b = Session::builder(r, 1)
            .part("policy", &vs, opt)
            .iterations(6)
            .checkpoint_every(2)
            .observer(QUIET);
        if let Some(n) = stop {
            b = b.stop_at(n);
        }
        let mut s = b.start().unwrap();
        let end = s
            .run_iterations(|s| {
                // Three prompts per iteration, wrapping around the set.
                let xs: Vec<f32> = (0..3)
                    .flat_map(|j| {
                        let p = prompts[(s.cursor as usize + j) % prompts.len()];
                        [p, 1.0 - p]
                    })
                    .collect();
                s.cursor += 3;
                let x = Tensor::from_vec(xs, (3, 2), &DEV)?;
                let noise = s.rng.normal(&[3, 1], 0.0, 0.1, &DEV)?;
                let l = (fc.forward(&x)? - noise)?.sqr()?.mean_all()?;
                let v = s.train_step("policy", &l)?;
                Ok::<_, SessionError>(Record::new(3).with("loss", v))
            })
            .unwrap();
        let cursor = s.cursor;
        let p = vs
            .tensors()
            .into_iter()
            .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (end, p, cursor)
    };
    let (end, want, cursor) = go("a", false, None);
    assert!(end.completed());
    assert_eq!(cursor, 18);
    let (end, _, _) = go("b", false, Some(3));
    assert_eq!(end, LoopEnd::Interrupted);
    let (end, got, cursor) = go("b", true, None);
    assert!(end.completed());
    assert_eq!((got, cursor), (want, 18));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a/metrics.jsonl")).unwrap(),
        std::fs::read_to_string(dir.path().join("b/metrics.jsonl")).unwrap()
    );
}

fn toy_run(path: &Path) {
    two_part(path, false, Some(1));
}

#[test]
fn out_on_an_existing_run_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let e = RunOptions::new_run(Some(&run))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("--resume")
            && msg.contains("--overwrite")
            && msg.contains("already holds a run"),
        "{msg}"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    // A folder with other files is not a run and is never cleared.
    let other = dir.path().join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("todo.txt"), "keep me").unwrap();
    for overwrite in [false, true] {
        let mut o = RunOptions::new_run(Some(&other));
        o.overwrite = overwrite;
        let e = o.open("toy", "toy-gan", &cfg(), &[]).unwrap_err();
        assert!(matches!(e, RunError::NotEmpty { .. }), "{e}");
    }
    assert!(other.join("todo.txt").exists());
    // --overwrite replaces the run.
    let mut o = RunOptions::new_run(Some(&run));
    o.overwrite = true;
    let r = o.open("toy", "toy-gan", &cfg(), &[]).unwrap();
    assert!(!r.resumed());
    assert!(
        !run.join("metrics.jsonl").exists() && !run.join("checkpoints/last.safetensors").exists()
    );
    assert!(run.join("config.toml").exists());
}

/// A start refused after its folder was made (a model too large for memory,
/// a loader that failed) leaves a run that never began: its `config.toml`,
/// the inputs' fingerprints, the lock. The next attempt into the same
/// `--out` takes its place, without `--overwrite`; a folder that holds more
/// than that, or is still held, is refused as before, with nothing deleted.
#[test]
fn a_run_that_never_began_does_not_block_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let input = dir.path().join("prefs.jsonl");
    std::fs::write(&input, "one\n").unwrap();
    let refused_start = |config: &serde_json::Value| {
        let r = RunOptions::new_run(Some(&run))
            .open("toy", "toy-gan", config, &[])
            .unwrap();
        r.check_inputs(&[&input]).unwrap();
        // The trainer's model does not fit: the run is dropped, nothing trained.
    };
    refused_start(&serde_json::json!({"image_size": 1024}));
    assert!(run.join("config.toml").exists() && run.join("inputs.json").exists());
    // The same command again, or a smaller model, starts afresh.
    let r = RunOptions::new_run(Some(&run))
        .open(
            "toy",
            "toy-gan",
            &serde_json::json!({"image_size": 64}),
            &[],
        )
        .unwrap();
    assert!(!r.resumed());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("image_size = 64"), "{config}");
    assert!(
        !run.join("inputs.json").exists(),
        "the old inputs are cleared"
    );
    // While a process holds it, the folder is not taken.
    let e = RunOptions::new_run(Some(&run))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Locked { .. }), "{e}");
    drop(r);
    assert!(std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .contains("image_size = 64"));
    // A user's file beside it: refused as a run (kept, nothing deleted).
    std::fs::write(run.join("notes.md"), "keep me").unwrap();
    let e = RunOptions::new_run(Some(&run))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    assert!(run.join("notes.md").exists() && run.join("config.toml").exists());
    std::fs::remove_file(run.join("notes.md")).unwrap();
    // The new run's own input inside it: refused, the input kept.
    std::fs::write(run.join("tokenizer.json"), "{}").unwrap();
    let with_input = serde_json::json!({"tokenizer": run.join("tokenizer.json")});
    let e = RunOptions::new_run(Some(&run))
        .open("toy", "toy-gan", &with_input, &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    assert!(run.join("tokenizer.json").exists());
    // A run that began (its session started: metrics.jsonl) is kept.
    std::fs::write(run.join("metrics.jsonl"), "").unwrap();
    let e = RunOptions::new_run(Some(&run))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    assert!(run.join("metrics.jsonl").exists());
    // A trained run too.
    let trained = dir.path().join("t");
    toy_run(&trained);
    std::fs::remove_file(trained.join("metrics.jsonl")).unwrap();
    let e = RunOptions::new_run(Some(&trained))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    assert!(trained.join("checkpoints/last.safetensors").exists());
    // A user's own `config.toml` with a `kind` (no `.lock`: kiln did not
    // make the folder) is never taken for a run that never began.
    let users = dir.path().join("sweep");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("config.toml"), "kind = \"sweep\"\nlr = [0.1]\n").unwrap();
    let e = RunOptions::new_run(Some(&users))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Exists { .. }), "{e}");
    assert!(std::fs::read_to_string(users.join("config.toml"))
        .unwrap()
        .contains("sweep"));
    // A new folder a file browser has shown (only its view file) is empty.
    let shown = dir.path().join("shown");
    std::fs::create_dir_all(&shown).unwrap();
    std::fs::write(shown.join(".DS_Store"), "view").unwrap();
    RunOptions::new_run(Some(&shown))
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap();
}

/// `--overwrite` on a folder holding the new run's own input (`rlhf dpo
/// --model X --out X`, a data file kept beside a run) refuses, deleting
/// nothing; an input elsewhere does not stop it.
#[test]
fn overwrite_refuses_a_folder_holding_the_runs_input() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct WithInputs {
        model: String,
        data: Data,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Data {
        sources: Vec<String>,
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    std::fs::write(run.join("model.safetensors"), b"base weights").unwrap();
    std::fs::write(dir.path().join("prefs.jsonl"), b"{}").unwrap();
    let elsewhere = dir.path().join("prefs.jsonl").display().to_string();
    let open = |model: &Path, sources: Vec<String>| {
        let mut o = RunOptions::new_run(Some(&run));
        o.overwrite = true;
        let c = WithInputs {
            model: model.display().to_string(),
            data: Data { sources },
        };
        o.open("toy", "toy-gan", &c, &[]).map(drop)
    };
    // The base model is the run folder itself, or a file in it behind a
    // `scheme:` prefix inside a list.
    let in_run = format!("lines:{}", run.join("model.safetensors").display());
    for (model, sources, field) in [
        (run.clone(), vec![elsewhere.clone()], "model"),
        (
            dir.path().to_path_buf(),
            vec![elsewhere.clone(), in_run],
            "data.sources.1",
        ),
    ] {
        let e = open(&model, sources).unwrap_err();
        assert!(matches!(e, RunError::InputInside { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(field) && msg.contains("--overwrite would delete"),
            "{msg}"
        );
        assert!(run.join("model.safetensors").exists() && run.join("metrics.jsonl").exists());
    }
    // Inputs outside the folder: the user's file, which no kiln run writes,
    // still stops --overwrite; moved out, the run is replaced.
    let e = open(dir.path(), vec![elsewhere.clone()]).unwrap_err();
    assert!(matches!(e, RunError::ForeignFiles { .. }), "{e}");
    assert!(run.join("model.safetensors").exists() && run.join("metrics.jsonl").exists());
    std::fs::rename(
        run.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    open(dir.path(), vec![elsewhere]).unwrap();
    assert!(!run.join("metrics.jsonl").exists());
}

/// Every file and folder under `root` (relative paths; folders and links
/// marked), with file contents and link targets: to show that a refused
/// `--overwrite` left a folder exactly as it was.
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let t = e.file_type().unwrap();
            if t.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.push((
                    format!("{rel} ->"),
                    target.display().to_string().into_bytes(),
                ));
            } else if t.is_dir() {
                out.push((format!("{rel}/"), Vec::new()));
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// What the trainers and `cargo xtask` write in a run folder beside the
/// session's own files: figures, grids, samples, eval results, a model,
/// extra checkpoints and the temporary files of an interrupted write.
const KILN_EXTRAS: &[&str] = &[
    "loss.png",
    "samples.png",
    "samples-ema.png",
    "reconstructions.png",
    "interpolation.png",
    "d_outputs.png",
    "figure_14_2.png",
    "samples-7.png",
    "samples-0-ema.png",
    "eval-last-test-n10000-seed0-0123abcd.json",
    "eval-best-fid-ema-val-n50-ntrain0-seed3-collapse-0123abcd.json",
    "fid-extractor.json",
    "tokenizer.json",
    "samples.txt",
    "ref_logps.safetensors",
    "inputs.json",
    "samples/epoch-001.png",
    "samples/epoch-001-ema.png",
    "checkpoints/healthy.safetensors",
    "checkpoints/best-fid.safetensors",
    "checkpoints/.last.safetensors.tmp-4000000001",
    "model/config.json",
    "model/generation_config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "model/tokenizer_config.json",
    "model/chat_template.jinja",
    "model/.model.safetensors.tmp-4000000002",
    ".summary.json.tmp-4000000003",
];

/// `--overwrite` deletes what kiln runs write and nothing else: a folder
/// that also holds a user's files (beside the run, in a folder of their own,
/// or among the checkpoints) is refused and left exactly as it was; once
/// they are moved out, every file kiln wrote is cleared.
#[test]
fn overwrite_deletes_only_what_kiln_runs_write() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    for f in KILN_EXTRAS {
        let p = run.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"kiln wrote this").unwrap();
        assert!(
            kiln_core::run::is_run_file(Path::new(f)),
            "{f} is not in kiln_core::run::RUN_FILES"
        );
    }
    let mine = [
        "notes.md",
        "my-plots/loss-by-hand.png",
        "checkpoints/epoch10-good.safetensors",
    ];
    for f in mine {
        let p = run.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"the user's").unwrap();
    }
    let overwrite = || {
        let mut o = RunOptions::new_run(Some(&run));
        o.overwrite = true;
        o.open("toy", "toy-gan", &cfg(), &[]).map(drop)
    };
    // A folder copied without its lock file gets none from a refused command.
    std::fs::remove_file(run.join(".lock")).unwrap();
    let before = tree(&run);
    let e = overwrite().unwrap_err();
    assert!(matches!(e, RunError::ForeignFiles { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "--overwrite: {} holds checkpoints/epoch10-good.safetensors, my-plots/ and notes.md, \
             which no kiln run writes, so nothing was deleted; move them out of the folder or \
             choose another --out (--overwrite deletes only the files kiln runs write)",
            run.display()
        )
    );
    assert_eq!(
        tree(&run),
        before,
        "a refused --overwrite changed the folder"
    );

    // One left: named alone.
    std::fs::remove_file(run.join("checkpoints/epoch10-good.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("my-plots")).unwrap();
    let before = tree(&run);
    let msg = overwrite().unwrap_err().to_string();
    assert!(
        msg.contains(" holds notes.md, which no kiln run writes")
            && msg.contains("move it out of the folder"),
        "{msg}"
    );
    assert_eq!(tree(&run), before);

    // Moved out: everything kiln wrote is cleared, the new run starts, with
    // what file browsers left there (Finder's, Explorer's) as they describe
    // only the view of the folder.
    std::fs::rename(run.join("notes.md"), dir.path().join("notes.md")).unwrap();
    for f in [
        ".DS_Store",
        "._loss.png",
        "Thumbs.db",
        "checkpoints/desktop.ini",
    ] {
        std::fs::write(run.join(f), b"a file browser's").unwrap();
    }
    overwrite().unwrap();
    let left: Vec<String> = tree(&run).into_iter().map(|(p, _)| p).collect();
    assert_eq!(left, [".lock", "checkpoints/", "config.toml"], "{left:?}");
}

/// `--overwrite` leaves alone a folder that is not a kiln run's: a
/// `config.toml` without kiln's `kind`, or a link where kiln writes a
/// folder (the link's target is never looked into nor deleted).
#[test]
fn overwrite_refuses_a_folder_that_is_not_kilns() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(theirs.join("checkpoints")).unwrap();
    std::fs::write(theirs.join("config.toml"), "name = \"my project\"\n").unwrap();
    std::fs::write(theirs.join("metrics.jsonl"), "{}\n").unwrap();
    let before = tree(&theirs);
    let mut o = RunOptions::new_run(Some(&theirs));
    o.overwrite = true;
    let e = o.open("toy", "toy-gan", &cfg(), &[]).unwrap_err();
    assert!(matches!(e, RunError::Invalid { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("config.toml: not a kiln run's config (no string `kind` key)")
            && msg.contains("--overwrite deleted nothing")
            && msg.contains("choose another --out"),
        "{msg}"
    );
    assert_eq!(tree(&theirs), before);

    #[cfg(unix)]
    {
        let run = dir.path().join("r");
        toy_run(&run);
        let elsewhere = dir.path().join("my-model");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("config.json"), "{}").unwrap();
        std::os::unix::fs::symlink(&elsewhere, run.join("model")).unwrap();
        let before = tree(&run);
        let mut o = RunOptions::new_run(Some(&run));
        o.overwrite = true;
        let e = o.open("toy", "toy-gan", &cfg(), &[]).unwrap_err();
        assert!(
            matches!(e, RunError::ForeignFiles { ref entries, .. } if entries == &["model"]),
            "{e}"
        );
        assert_eq!(tree(&run), before);
        assert!(elsewhere.join("config.json").is_file());
    }
}

/// The names `--overwrite` takes for kiln's: patterns match whole names,
/// `#` only digits, temporary files only where kiln writes.
#[test]
fn run_files_match_kilns_names_only() {
    use kiln_core::run::is_run_file;
    for kiln in [
        "config.toml",
        "samples-12.png",
        "samples/epoch-010-ema.png",
        ".config.toml.tmp-77",
        "checkpoints/.best-fid.safetensors.tmp-5",
    ] {
        assert!(is_run_file(Path::new(kiln)), "{kiln}");
    }
    for other in [
        "notes.md",
        "config.toml.bak",
        "samples-best.png",
        "samples/epoch-1-mine.png",
        "checkpoints/last.safetensors.old",
        "checkpoints/mine.safetensors",
        "my-plots/.x.tmp-3",
        "model/notes.md",
        "eval-notes.json",
        "eval-x/y-seed1-z.json",
        "sub/config.toml",
    ] {
        assert!(!is_run_file(Path::new(other)), "{other}");
    }
}

#[test]
fn one_process_at_a_time_holds_a_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    let held = RunOptions::resume(&run)
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap();
    let e = RunOptions::resume(&run)
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::Locked { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("in use by another kiln process")
            && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    let mut o = RunOptions::new_run(Some(&run));
    o.overwrite = true;
    assert!(matches!(
        o.open("toy", "toy-gan", &cfg(), &[]).unwrap_err(),
        RunError::Locked { .. }
    ));
    drop(held);
    RunOptions::resume(&run)
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap();
}

#[test]
fn stale_temporary_files_are_removed_when_a_run_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    // What `kill -9` during a checkpoint write leaves (no pid reaches 4e9).
    let stale = [
        run.join("checkpoints/.last.safetensors.tmp-4000000001"),
        run.join(".summary.json.tmp-4000000002"),
    ];
    for p in &stale {
        std::fs::write(p, b"half a checkpoint").unwrap();
    }
    let _r = RunOptions::resume(&run)
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap();
    for p in &stale {
        assert!(!p.exists(), "{} was left", p.display());
    }
}

#[test]
fn resume_refuses_another_kind_and_changed_settings_but_allows_listed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    let e = RunOptions::resume(&run)
        .open("vae", "vae", &cfg(), &[])
        .unwrap_err();
    assert!(matches!(e, RunError::WrongKind { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("is a \"toy-gan\" run, not a \"vae\" run"),
        "{e}"
    );
    let changed = serde_json::json!({"epochs": 5, "lr": 0.5, "extra": true});
    let e = RunOptions::resume(&run)
        .open("toy", "toy-gan", &changed, &["epochs"])
        .unwrap_err();
    let RunError::ConfigChanged { changes, .. } = &e else {
        panic!("{e}");
    };
    let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["extra", "lr"]);
    let msg = e.to_string();
    assert!(
        msg.contains("lr is 0.01 in the run, 0.5 now")
            && msg.contains("extra is absent in the run, true now")
            && msg.contains("except epochs"),
        "{msg}"
    );
    // An allowed change goes through and is written to config.toml.
    let longer = serde_json::json!({"epochs": 5, "lr": 0.01});
    drop(
        RunOptions::resume(&run)
            .open("toy", "toy-gan", &longer, &["epochs"])
            .unwrap(),
    );
    let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(text.contains("epochs = 5"), "{text}");
}

/// A run that stopped before its first checkpoint (a NaN at step 2, a
/// crash) resumes from the beginning, dropping the metrics it had logged,
/// and ends exactly as an uninterrupted run.
#[test]
fn a_run_without_a_checkpoint_resumes_from_the_beginning() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, crashed) = (dir.path().join("whole"), dir.path().join("crashed"));
    let (_, want) = two_part(&whole, false, None);
    two_part(&crashed, false, Some(1));
    std::fs::remove_file(crashed.join("checkpoints/last.safetensors")).unwrap();
    let (end, got) = two_part(&crashed, true, None);
    assert!(end.completed());
    assert_eq!(got, want);
    assert_eq!(
        std::fs::read(crashed.join("metrics.jsonl")).unwrap(),
        std::fs::read(whole.join("metrics.jsonl")).unwrap()
    );
}

/// A damaged line in metrics.jsonl is found when the run resumes, before
/// any training (it failed the run's summary only at the end, each time),
/// and `--out` on a file names the file.
#[test]
fn a_damaged_log_is_found_before_training_and_a_file_is_not_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    let log = run.join("metrics.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[..5].copy_from_slice(b"#####");
    std::fs::write(&log, &bytes).unwrap();
    let before = checkpoint_contents(&run);
    let r = RunOptions::resume(&run)
        .quiet(true)
        .open("toy", "toy-gan", &cfg(), &[])
        .unwrap();
    let (gv, dv) = (VarStore::new(1), VarStore::new(2));
    let _ = Linear::new(3, 4, gv.builder(DType::F32, &DEV).pp("g")).unwrap();
    let _ = Linear::new(4, 1, dv.builder(DType::F32, &DEV).pp("d")).unwrap();
    let gopt = Optimizer::single(OptimKind::adam(), gv.vars(), 1e-2, 0.0).unwrap();
    let dopt = Optimizer::single(OptimKind::adamw(), dv.vars(), 2e-2, 0.01).unwrap();
    let e = Session::builder(r, 7)
        .part("g", &gv, gopt)
        .part("d", &dv, dopt)
        .clip_grad_norm(5.0)
        .epochs(EPOCHS, BATCHES)
        .observer(QUIET)
        .start()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("metrics.jsonl: line 1:") && e.contains("the checkpoint is intact"),
        "{e}"
    );
    assert_eq!(checkpoint_contents(&run), before);

    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    for out in [file.clone(), file.join("run")] {
        let e = RunOptions::new_run(Some(&out))
            .open("toy", "toy-gan", &cfg(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{} is a file, not a folder", file.display())),
            "{e}"
        );
    }
}

/// A resumed run refuses inputs that changed since it began (a corpus
/// rewritten, a file added to a folder); unchanged ones pass.
#[test]
fn a_changed_input_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let (file, folder) = (dir.path().join("prefs.jsonl"), dir.path().join("imgs"));
    std::fs::write(&file, "one\n").unwrap();
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.txt"), "a").unwrap();
    let open = |resume: bool| {
        let o = if resume {
            RunOptions::resume(&run)
        } else {
            RunOptions::new_run(Some(&run))
        };
        o.open("toy", "toy-gan", &cfg(), &[]).unwrap()
    };
    open(false).check_inputs(&[&file, &folder]).unwrap();
    open(true).check_inputs(&[&file, &folder]).unwrap();
    std::fs::write(&file, "two\n").unwrap();
    let e = open(true)
        .check_inputs(&[&file, &folder])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prefs.jsonl: changed since the run began (then 4 bytes, crc32"),
        "{e}"
    );
    std::fs::write(&file, "one\n").unwrap();
    std::fs::write(folder.join("b.txt"), "b").unwrap();
    let e = open(true)
        .check_inputs(&[&file, &folder])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("then 1 files") && e.contains("now 2 files"),
        "{e}"
    );
    std::fs::remove_file(folder.join("b.txt")).unwrap();
    // What a file browser leaves in a folder it shows is not data.
    std::fs::write(folder.join("Thumbs.db"), "thumbnails").unwrap();
    std::fs::write(folder.join(".DS_Store"), "view").unwrap();
    open(true).check_inputs(&[&file, &folder]).unwrap();
    // The same data at another path (a dataset root moved) resumes, and the
    // record follows it; other data at another path is refused, naming both.
    let moved = dir.path().join("moved.jsonl");
    std::fs::write(&moved, "one\n").unwrap();
    open(true).check_inputs(&[&moved, &folder]).unwrap();
    let saved = std::fs::read_to_string(run.join(kiln_core::run::INPUTS_FILE)).unwrap();
    assert!(
        saved.contains("moved.jsonl") && !saved.contains("prefs.jsonl"),
        "{saved}"
    );
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, "three\n").unwrap();
    let e = open(true)
        .check_inputs(&[&other, &folder])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other.jsonl: not the data the run began with: it read")
            && e.contains("moved.jsonl (4 bytes, crc32")
            && e.contains("and this is 6 bytes, crc32"),
        "{e}"
    );
    // An input beside every recorded one is recorded, not refused.
    open(true).check_inputs(&[&moved, &folder, &other]).unwrap();
    open(true).check_inputs(&[&moved, &folder, &other]).unwrap();
}

/// A field added to a config type after a run began (with a serde default
/// for old runs) does not block its resume, as long as the default is what
/// the resumed run asks for; asking for another value is still refused.
#[test]
fn a_field_added_since_the_run_began_takes_its_default_on_resume() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Cfg {
        epochs: u64,
        lr: f64,
        #[serde(default)]
        clip: f64,
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    toy_run(&run);
    let same = Cfg {
        epochs: EPOCHS,
        lr: 0.01,
        clip: 0.0,
    };
    drop(
        RunOptions::resume(&run)
            .open("toy", "toy-gan", &same, &[])
            .unwrap(),
    );
    let other = Cfg { clip: 1.0, ..same };
    let e = RunOptions::resume(&run)
        .open("toy", "toy-gan", &other, &[])
        .unwrap_err();
    assert!(
        e.to_string().contains("clip is 0.0 in the run, 1.0 now"),
        "{e}"
    );
}

#[test]
fn a_non_finite_loss_stops_before_the_update_and_names_the_part() {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(0);
    let fc = Linear::new(2, 1, vs.builder(DType::F32, &DEV).pp("fc")).unwrap();
    let opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-2, 0.0).unwrap();
    let r = RunOptions::new_run(Some(&dir.path().join("r")))
        .open("nan", "nan", &serde_json::json!({}), &[])
        .unwrap();
    let mut s = Session::builder(r, 0)
        .part("critic", &vs, opt)
        .epochs(1, 1)
        .observer(QUIET)
        .start()
        .unwrap();
    let before = vs.tensors();
    let x = Tensor::new(&[[f32::NAN, 1.0]], &DEV).unwrap();
    let l = fc.forward(&x).unwrap().sum_all().unwrap();
    let e = s.train_step("critic", &l).unwrap_err().to_string();
    assert!(e.contains("critic loss is NaN at step 1"), "{e}");
    for ((_, a), (_, b)) in before.iter().zip(vs.tensors()) {
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let e = s.train_step("generator", &l).unwrap_err().to_string();
    assert!(
        e.contains("no trained part \"generator\" (trained parts: critic)"),
        "{e}"
    );
    let e = s.step("critic").unwrap_err().to_string();
    assert!(e.contains("without a backward"), "{e}");
}

#[test]
fn a_bad_session_is_refused_with_its_mistakes_listed() {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(0);
    let _ = Linear::new(2, 1, vs.builder(DType::F32, &DEV).pp("fc")).unwrap();
    let r = RunOptions::new_run(Some(&dir.path().join("r")))
        .open("bad", "bad", &serde_json::json!({}), &[])
        .unwrap();
    let opt = || Optimizer::single(OptimKind::adam(), vs.vars(), 1e-2, 0.0).unwrap();
    let e = Session::builder(r, 0)
        .part("a.b", &vs, opt())
        .part("a.b", &vs, opt())
        .frozen("ref", &vs)
        .clip_grad_norm(1.0)
        .epochs(1, 1)
        .start()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("part name \"a.b\"")
            && e.contains("given twice")
            && e.contains("must follow a trained part"),
        "{e}"
    );
}
