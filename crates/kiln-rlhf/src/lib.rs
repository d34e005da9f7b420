//! RLHF on kiln, on Hugging Face TRL's formats and metric names: preference
//! data in TRL's forms ([`prefs`]), GPT-2 reward models saved and loaded in
//! transformers' `GPT2ForSequenceClassification` layout ([`reward`]), DPO and
//! its family with TRL's `loss_type` list ([`loss`]) on completion
//! log-probabilities computed without a `[B, T, V]` log-softmax ([`logps`]),
//! and their trainers ([`dpo`], [`reward_train`], sharing [`train`]);
//! sampling, best-of-n and reward-weighted fine-tuning ([`sample`]); and an
//! offline experiment ([`experiment`]) with a simulated labeller
//! ([`labeller`]) whose reward-against-KL frontier [`plot`] draws.
//!
//! Online RL on one rollout engine ([`rollout`]: batched KV-cached sampling
//! with per-token log-probs at the sampling temperature): reward functions
//! combined with weights ([`rewards`]), the policy-gradient pieces checked
//! against TRL's code ([`pg`]), and GRPO ([`grpo`]), RLOO ([`rloo`]) and
//! PPO ([`ppo`]) sharing [`online`]; [`arith`] is a verifiable-reward task.
//!
//! The reference chapter's RLHF is a toy (`loss = lm_loss * reward`); its
//! three stages (pretrain an LM, fit a reward model on human preferences,
//! optimise the LM against it with a pull towards a frozen reference) are
//! what this crate implements, with the trainers on kiln-core's
//! [`Session`](kiln_core::session::Session): the policy is a trained part,
//! the reference a frozen one.
//!
//! A policy equal to its reference has DPO loss ln 2 and zero rewards:
//!
//! ```
//! use kiln_rlhf::loss::{dpo_loss, DpoLossConfig, LossScale, SequenceLogps};
//! use kiln_core::{Device, Tensor};
//!
//! let dev = Device::Cpu;
//! let logps = SequenceLogps {
//!     chosen: Tensor::new(&[-12.0f32, -7.5], &dev)?,
//!     rejected: Tensor::new(&[-14.0f32, -9.0], &dev)?,
//!     chosen_tokens: Tensor::new(&[6f32, 4.0], &dev)?,
//!     rejected_tokens: Tensor::new(&[7f32, 5.0], &dev)?,
//! };
//! let cfg = DpoLossConfig::default(); // sigmoid, beta 0.1
//! let scale = LossScale::of_batch(&logps)?;
//! let out = dpo_loss(&cfg, &logps, &logps.chosen, &logps.rejected, &scale)?;
//! let loss = out.loss.to_scalar::<f32>()?;
//! assert!((loss - std::f32::consts::LN_2).abs() < 1e-6);
//! assert_eq!(out.chosen_rewards.to_vec1::<f32>()?, vec![0.0, 0.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod arith;
pub mod dpo;
pub mod error;
pub mod experiment;
pub mod grpo;
pub mod labeller;
pub mod logps;
pub mod loss;
pub mod models;
pub mod online;
pub mod pg;
pub mod plot;
pub mod ppo;
pub mod prefs;
pub mod reward;
pub mod reward_train;
pub mod rewards;
pub mod rloo;
pub mod rollout;
pub mod sample;
pub mod train;

pub use dpo::{train_dpo, DpoConfig, DpoReport};
pub use error::{Result, RlhfError};
pub use loss::{dpo_loss, reward_loss, DpoLossConfig, DpoLossType, LossScale, SequenceLogps};
pub use prefs::{EncodedPair, PairEncoder, PreferenceData};
pub use reward::RewardModel;
pub use reward_train::{train_reward, RewardConfig, RewardReport};
pub use train::TrainingArgs;

/// The README's example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
