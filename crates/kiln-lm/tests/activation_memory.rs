//! `Gpt2Config::training_bytes_per_sequence` against what a training step
//! really allocates, counted by a global allocator. The test binary holds
//! this one test, so no other test's allocations are counted.
#![allow(clippy::unwrap_used)]

use kiln_core::memory::{compare_estimate, CountingAllocator};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Tensor};
use kiln_lm::train::next_token_loss;
use kiln_lm::{Gpt2, Gpt2Config};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Peak bytes of one AdamW training step on `batch` sequences of `t`
/// tokens, above what was live before it (the model and the optimizer's
/// moments, made by a first step). `lm_head`: next-token loss on logits,
/// else a loss on the hidden states alone (as a reward model's).
fn step_peak(cfg: &Gpt2Config, batch: usize, t: usize, lm_head: bool) -> u64 {
    let vs = VarStore::new(1);
    let m = Gpt2::new(cfg, vs.builder(DType::F32, &Device::Cpu), vs.rng().clone()).unwrap();
    let mut opt = Optimizer::single(OptimKind::adamw(), vs.vars(), 1e-3, 0.0).unwrap();
    let ids: Vec<u32> = (0..batch * t)
        .map(|i| (i * 7 % cfg.vocab_size) as u32)
        .collect();
    let x = Tensor::from_vec(ids, (batch, t), &Device::Cpu).unwrap();
    let step = |opt: &mut Optimizer| {
        let loss = if lm_head {
            next_token_loss(&m, &x, &x, None, true).unwrap()
        } else {
            m.hidden_states(&x, true)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        opt.backward_step(&loss).unwrap();
    };
    step(&mut opt);
    ALLOC.reset_peak();
    let before = ALLOC.current();
    step(&mut opt);
    ALLOC.peak() - before
}

#[test]
fn the_activation_estimate_follows_what_a_training_step_allocates() {
    // (blocks, width, heads, vocabulary, tokens): one whose peak is at the
    // head, one in the blocks' backward pass, and one between, with sizes
    // the estimate's weights were not measured on.
    for (n_layer, n_embd, n_head, vocab, t, lm_head) in [
        (2, 64, 2, 8192, 64, true),
        (4, 128, 4, 512, 128, true),
        (3, 96, 3, 3000, 96, true),
        (3, 96, 3, 3000, 96, false),
    ] {
        let cfg = Gpt2Config {
            n_layer,
            n_embd,
            n_head,
            ..Gpt2Config::tiny(vocab, t)
        };
        // Per sequence: the difference of two batch sizes, so that what
        // does not grow with the batch cancels.
        let per_seq =
            (step_peak(&cfg, 6, t, lm_head) - step_peak(&cfg, 2, t, lm_head)) as f64 / 4.0;
        let estimate = cfg.training_bytes_per_sequence(t, lm_head) as f64;
        let what =
            format!("{n_layer} blocks x {n_embd}, vocab {vocab}, head {lm_head}, {t} tokens");
        println!("{}", compare_estimate(&what, estimate, per_seq).unwrap());
    }
}
