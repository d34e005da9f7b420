//! Ctrl-C in the middle of a task of several runs: the task stops after the
//! interrupted run, with its checkpoint kept, instead of going on to read a
//! model that run never saved. Its own test binary, since the stop flag is
//! process-wide and would stop other tests' training loops.

mod common;

use kiln_core::Device;
use kiln_rlhf::arith::run_arithmetic;

#[test]
fn an_interrupted_base_lm_ends_the_arithmetic_task_with_its_checkpoint_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("arith");
    let cfg = common::toy_arith(3);
    // As if Ctrl-C had been pressed: the pretraining stops after its first step.
    kiln_core::observer::request_stop(true);
    let err = run_arithmetic(&cfg, &Device::Cpu, &out, false, true)
        .expect_err("the task stops after the interrupted run");
    kiln_core::observer::request_stop(false);
    let msg = err.to_string();
    assert!(
        msg.contains("rlhf arithmetic: interrupted in") && msg.contains("arith/lm"),
        "{msg}"
    );
    assert!(out.join("lm/checkpoints/last.safetensors").is_file());
    assert!(!out.join("grpo").exists(), "GRPO did not start");
}
