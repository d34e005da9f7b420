//! Text generators and checked generation: ask, test the answer, re-ask with the failures
//! spelled out, and keep every attempt.

use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message};
use crate::check::{Check, CheckResult};
use crate::error::{BoxError, Error, Result};

/// Sampling parameters passed to a [`TextGenerator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenParams {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f32,
    /// Random seed (the same prompt, parameters and seed give the same text).
    pub seed: u64,
    /// Stop when one of these strings is produced (not included in the output).
    pub stop: Vec<String>,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Anything that continues a prompt with text: a language model (kiln-lm implements this),
/// a remote API client, or a test double.
pub trait TextGenerator {
    /// A short name for reports.
    fn name(&self) -> String {
        "generator".into()
    }

    /// Generates the continuation of `prompt`.
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
    ) -> std::result::Result<String, BoxError>;
}

impl<G: TextGenerator + ?Sized> TextGenerator for &mut G {
    fn name(&self) -> String {
        (**self).name()
    }
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
    ) -> std::result::Result<String, BoxError> {
        (**self).generate(prompt, params)
    }
}

impl<G: TextGenerator + ?Sized> TextGenerator for Box<G> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
    ) -> std::result::Result<String, BoxError> {
        (**self).generate(prompt, params)
    }
}

/// Replies with fixed outputs in order (for tests); fails when they run out.
#[derive(Debug, Clone, Default)]
pub struct ScriptedGenerator {
    replies: Vec<String>,
    next: usize,
    /// Every prompt received, in order.
    pub prompts: Vec<String>,
}

impl ScriptedGenerator {
    /// Replies with `replies`, one per call.
    pub fn new<S: Into<String>>(replies: impl IntoIterator<Item = S>) -> Self {
        ScriptedGenerator {
            replies: replies.into_iter().map(Into::into).collect(),
            next: 0,
            prompts: Vec::new(),
        }
    }
}

impl TextGenerator for ScriptedGenerator {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn generate(&mut self, prompt: &str, _: &GenParams) -> std::result::Result<String, BoxError> {
        self.prompts.push(prompt.to_string());
        let r =
            self.replies.get(self.next).cloned().ok_or_else(|| {
                format!("scripted generator has only {} replies", self.replies.len())
            })?;
        self.next += 1;
        Ok(r)
    }
}

/// Wraps a closure as a generator.
pub struct FnGenerator<F> {
    name: String,
    f: F,
}

impl<F> FnGenerator<F>
where
    F: FnMut(&str, &GenParams) -> std::result::Result<String, BoxError>,
{
    /// A generator named `name` calling `f`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnGenerator {
            name: name.into(),
            f,
        }
    }
}

impl<F> TextGenerator for FnGenerator<F>
where
    F: FnMut(&str, &GenParams) -> std::result::Result<String, BoxError>,
{
    fn name(&self) -> String {
        self.name.clone()
    }
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
    ) -> std::result::Result<String, BoxError> {
        (self.f)(prompt, params)
    }
}

/// What is sent to the generator: plain text, or a conversation rendered with a chat template.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// A completion prompt.
    Text(String),
    /// A conversation; re-asks append the answer and a user message with the failures.
    Chat {
        /// The template that turns the messages into text.
        template: ChatTemplate,
        /// The conversation so far.
        messages: Vec<Message>,
    },
}

impl From<&str> for PromptInput {
    fn from(s: &str) -> Self {
        PromptInput::Text(s.to_string())
    }
}

impl From<String> for PromptInput {
    fn from(s: String) -> Self {
        PromptInput::Text(s)
    }
}

impl From<&String> for PromptInput {
    fn from(s: &String) -> Self {
        PromptInput::Text(s.clone())
    }
}

/// One try: the exact prompt text sent, the output and each check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based attempt number.
    pub number: usize,
    /// The text sent to the generator.
    pub prompt: String,
    /// What came back.
    pub output: String,
    /// Each check's result, in the order the checks were given.
    pub checks: Vec<CheckResult>,
    /// Whether every check passed.
    pub passed: bool,
}

/// Every attempt of a checked generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// The generator's name.
    pub generator: String,
    /// All attempts, in order; the last one passed if any did.
    pub attempts: Vec<Attempt>,
}

impl Checked {
    /// Whether some attempt passed every check.
    pub fn passed(&self) -> bool {
        self.attempts.last().is_some_and(|a| a.passed)
    }

    /// The passing output, if any.
    pub fn output(&self) -> Option<&str> {
        self.attempts
            .last()
            .filter(|a| a.passed)
            .map(|a| a.output.as_str())
    }

    /// The last output, passing or not.
    pub fn last_output(&self) -> Option<&str> {
        self.attempts.last().map(|a| a.output.as_str())
    }
}

/// The first line of every re-ask message (the built-in generator looks for it).
pub const REASK_HEADER: &str = "Your previous answer did not pass these checks:";

/// The re-ask message: the failed checks with what was found, and the request to answer again.
pub fn reask_message(failed: &[&CheckResult]) -> String {
    let mut s = format!("{REASK_HEADER}\n");
    for r in failed {
        match &r.detail {
            Some(d) => s.push_str(&format!("- {} ({d}).\n", r.check.trim_end_matches('.'))),
            None => s.push_str(&format!("- {}.\n", r.check.trim_end_matches('.'))),
        }
    }
    s.push_str("Answer the original request again, fixing every problem listed. Reply with the corrected answer only.");
    s
}

/// Generates, runs `checks`, and re-asks with the failed checks spelled out until an attempt
/// passes or `max_attempts` have been made. Stops at the first passing attempt; returns every
/// attempt either way (check [`Checked::passed`]).
///
/// ```
/// use kiln_prompt::{generate_checked, Check, ScriptedGenerator};
/// let mut gen = ScriptedGenerator::new(["Sure! - a - b", "- a\n- b"]);
/// let out = generate_checked(&mut gen, "List two things.", &[Check::bullets(2)], 3)?;
/// assert_eq!(out.attempts.len(), 2);
/// assert_eq!(out.output(), Some("- a\n- b"));
/// assert!(gen.prompts[1].contains("did not pass these checks"));
/// # Ok::<(), kiln_prompt::Error>(())
/// ```
pub fn generate_checked<G: TextGenerator + ?Sized>(
    generator: &mut G,
    prompt: impl Into<PromptInput>,
    checks: &[Check],
    max_attempts: usize,
) -> Result<Checked> {
    generate_checked_with(
        generator,
        prompt,
        checks,
        max_attempts,
        &GenParams::default(),
    )
}

/// [`generate_checked`] with explicit sampling parameters. Each attempt uses
/// `params.seed + attempt - 1` so re-asks are not forced to repeat a sampled answer.
pub fn generate_checked_with<G: TextGenerator + ?Sized>(
    generator: &mut G,
    prompt: impl Into<PromptInput>,
    checks: &[Check],
    max_attempts: usize,
    params: &GenParams,
) -> Result<Checked> {
    if max_attempts == 0 {
        return Err(Error::invalid("max_attempts", "must be at least 1"));
    }
    let mut input = prompt.into();
    let original_text = match &input {
        PromptInput::Text(t) => t.clone(),
        PromptInput::Chat { .. } => String::new(),
    };
    let name = generator.name();
    let mut attempts = Vec::new();
    for number in 1..=max_attempts {
        let text = match &input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Chat { template, messages } => template.render(messages, true)?,
        };
        let p = GenParams {
            seed: params.seed.wrapping_add(number as u64 - 1),
            ..params.clone()
        };
        let output = generator
            .generate(&text, &p)
            .map_err(|source| Error::Generator {
                generator: name.clone(),
                attempt: number,
                source,
            })?;
        let results: Vec<CheckResult> = checks.iter().map(|c| c.run(&output)).collect();
        let passed = results.iter().all(|r| r.passed);
        let failed: Vec<&CheckResult> = results.iter().filter(|r| !r.passed).collect();
        let feedback = reask_message(&failed);
        attempts.push(Attempt {
            number,
            prompt: text,
            output: output.clone(),
            checks: results,
            passed,
        });
        if passed {
            break;
        }
        match &mut input {
            PromptInput::Text(t) => {
                *t = format!(
                    "{}\n\n## Previous answer\n{}\n\n## Feedback\n{feedback}\n",
                    original_text.trim_end(),
                    output.trim_end()
                );
            }
            PromptInput::Chat { messages, .. } => {
                messages.push(Message::assistant(output));
                messages.push(Message::user(feedback));
            }
        }
    }
    Ok(Checked {
        generator: name,
        attempts,
    })
}
