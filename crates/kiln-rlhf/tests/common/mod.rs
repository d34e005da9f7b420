//! Helpers shared by kiln-rlhf's test binaries.

use kiln_rlhf::arith::ArithConfig;

/// The arithmetic task at toy size (sums of 0..=3, a 1-layer 32-wide LM,
/// `epochs` of pretraining, 20 GRPO prompts): seconds, not minutes.
pub fn toy_arith(epochs: u64) -> ArithConfig {
    let d = ArithConfig::quick();
    ArithConfig {
        max_operand: 3,
        train_problems: 200,
        lm: kiln_lm::train::TrainConfig {
            epochs,
            n_embd: 32,
            n_layer: 1,
            ..d.lm.clone()
        },
        rl_prompts: 20,
        ..d
    }
}
