//! # kiln-prompt: prompt engineering as code
//!
//! Prompts as typed, versionable specs instead of hand-edited strings, following the
//! targeted-prompting techniques: state the task and the output format explicitly, say who
//! the output is for, fix the time frame, keep the request simple, and guard against
//! hallucination with tests on the output, re-asking when they fail.
//!
//! - [`PromptSpec`]: task, output format ([`OutputFormat`]: bullets, JSON with a schema, code,
//!   prose), audience, [`TimeFrame`], [`Simplify`], context, constraints, few-shot examples;
//!   TOML/JSON in and out; rendered deterministically to text or chat messages.
//! - [`Template`]: Jinja templates with named variables; missing or unused variables are
//!   errors that list the names.
//! - [`ChatTemplate`]: a model's own chat template from `tokenizer_config.json`, rendered like
//!   transformers' `apply_chat_template`; built-in ChatML and Llama 3.1.
//! - [`fit`]: fit a prompt into a [`Budget`] with a [`TokenCounter`] (a Hugging Face
//!   `tokenizers::Tokenizer` with the default `tokenizers` feature), cutting examples, then
//!   context, and reporting each [`Cut`].
//! - [`Check`]: JSON (+ schema), regex, bullet count, length, terms, code blocks, closures;
//!   [`generate_checked`] re-asks a [`TextGenerator`] with the failures spelled out.
//! - [`evaluate`]: K prompt variants x M cases, scored by checks, as a markdown or JSON table.
//!
//! kiln-prompt does not depend on candle: `TextGenerator` is implemented by kiln-lm's models,
//! by [`RuleGenerator`] (a deterministic stand-in for tests and demos), or by your own client.
//!
//! ```
//! use kiln_prompt::{generate_checked, vars, OutputFormat, PromptSpec, RuleGenerator};
//!
//! let spec = PromptSpec::from_toml_str(r#"
//! task = "Explain what {{ topic }} are used for."
//! audience = "a business manager"
//! [output]
//! kind = "bullets"
//! count = 3
//! [[context]]
//! text = "GANs generate realistic images. They are used for data augmentation. They create art."
//! "#, "example spec")?;
//!
//! let prompt = spec.render(&vars([("topic", "GANs")]))?;
//! assert!(prompt.contains("Write for a business manager."));
//!
//! // The output format implies its own checks; re-ask up to 3 times until they pass.
//! let checks = spec.checks()?;
//! let result = generate_checked(&mut RuleGenerator::default(), prompt.as_str(), &checks, 3)?;
//! assert!(result.passed());
//! assert_eq!(result.output().unwrap_or_default().lines().count(), 3);
//! # Ok::<(), kiln_prompt::Error>(())
//! ```

mod budget;
mod builtin;
mod chat;
mod check;
mod error;
mod eval;
mod generate;
mod spec;
mod template;
mod time;

pub use budget::{fit, Budget, Cut, FitOptions, Fitted, Layout, TokenCounter, WordCounter};
pub use builtin::RuleGenerator;
pub use chat::{ChatOptions, ChatTemplate, Clock, Message, CHATML_TEMPLATE, LLAMA31_TEMPLATE};
pub use check::{compile_checks, run_checks, Check, CheckFn, CheckResult, CheckSpec};
pub use error::{BoxError, Error, Result};
pub use eval::{
    evaluate, CasesFile, CellResult, EvalCase, EvalOptions, EvalReport, EvalSuite, VariantSummary,
};
pub use generate::{
    generate_checked, generate_checked_with, reask_message, Attempt, Checked, FnGenerator,
    GenParams, PromptInput, ScriptedGenerator, TextGenerator, REASK_HEADER,
};
pub use spec::{
    BoundPrompt, Chronology, ContextItem, Example, OutputFormat, PromptSpec, ReadingLevel,
    Simplify, TimeFrame,
};
pub use template::{parse_var_assignments, vars, Template, Vars};

#[cfg(feature = "tokenizers")]
pub use tokenizers;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(all(doctest, feature = "tokenizers"))]
pub struct ReadmeDoctests;
