//! Human preference feedback for kiln-rlhf: label pairs of completions in
//! the terminal ([`tui`]) or in a browser ([`server`]), keep every answer in
//! a crash-safe append-only log ([`store`]), measure agreement
//! ([`agreement`]) and export TRL preference data ([`export`]) that
//! kiln-rlhf's reward and DPO trainers read.
//!
//! A separate crate so that users of kiln-rlhf's library do not compile a
//! web server. The commands are `cargo xtask rlhf label|serve|agreement|export`
//! (also this crate's `kiln-feedback` binary); their flags are in [`cli`].

pub mod agreement;
pub mod cli;
pub mod error;
pub mod export;
pub mod pairs;
pub mod plan;
pub mod server;
pub mod store;
pub mod tui;

pub use error::{FeedbackError, Result};
pub use pairs::{read_items, Item};
pub use store::{Answer, AnswerLog, Label, LabelDir, Ledger, Order, Record};

/// The README's examples, compiled (and run unless marked `no_run`) as doctests, so
/// they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
