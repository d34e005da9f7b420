//! `Gpt2Config::training_bytes_per_rollout` against what a policy step of
//! the online trainers (log-probabilities at the completion's tokens,
//! optionally at a sampling temperature, with the entropy) allocates,
//! counted by a global allocator. The test binary holds this one test, so
//! no other test's allocations are counted.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::memory::{compare_estimate, CountingAllocator};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use kiln_lm::{Gpt2, Gpt2Config};
use kiln_rlhf::rollout::{token_logps, TokenBatch};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Peak bytes of one AdamW step on `rows` rows of `prompt + completion`
/// tokens, above what was live before it (a first step makes the moments).
fn peak(cfg: &Gpt2Config, rows: usize, prompt: usize, completion: usize, temp: f64) -> u64 {
    let vs = VarStore::new(1);
    let m = Gpt2::new(cfg, vs.builder(DType::F32, &Device::Cpu), vs.rng().clone()).unwrap();
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-3, 0.0).unwrap();
    let p: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..prompt)
                .map(|i| ((i + r) * 7 % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let c: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..completion)
                .map(|i| ((i * 3 + r) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let rows_ref: Vec<(&[u32], &[u32])> = p
        .iter()
        .zip(&c)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let mut step = || {
        let tb = TokenBatch::new(&rows_ref, 0, &Device::Cpu).unwrap();
        let tl = token_logps(&m, &tb, temp, false, true).unwrap();
        let loss = tl.logps.mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    };
    step();
    ALLOC.reset_peak();
    let before = ALLOC.current();
    step();
    ALLOC.peak() - before
}

#[test]
fn the_rollout_estimate_follows_what_a_policy_step_allocates() {
    // (blocks, width, heads, vocabulary, prompt, completion, temperature):
    // head-dominated rows with and without a temperature, a long prompt,
    // and block-dominated rows.
    for (n_layer, n_embd, n_head, vocab, prompt, completion, temp) in [
        (2, 64, 2, 8192, 4, 60, 0.7),
        (2, 64, 2, 8192, 4, 60, 1.0),
        (2, 64, 2, 8192, 32, 32, 0.7),
        (4, 128, 4, 512, 16, 112, 0.7),
    ] {
        let t = prompt + completion;
        let cfg = Gpt2Config {
            n_layer,
            n_embd,
            n_head,
            ..Gpt2Config::tiny(vocab, t)
        };
        // Per row: the difference of two batch sizes, so that what does
        // not grow with the batch cancels.
        let per_row = (peak(&cfg, 6, prompt, completion, temp)
            - peak(&cfg, 2, prompt, completion, temp)) as f64
            / 4.0;
        let estimate = cfg.training_bytes_per_rollout(t, completion, temp != 1.0) as f64;
        let what = format!(
            "{n_layer} blocks x {n_embd}, vocab {vocab}, {prompt} + {completion} tokens, temperature {temp}"
        );
        println!("{}", compare_estimate(&what, estimate, per_row).unwrap());
    }
}
