//! Token budgets: fit a prompt into a context window by cutting its lowest-priority parts
//! (few-shot examples first, then context) and report what was cut.

use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::spec::BoundPrompt;

/// Counts and truncates tokens.
pub trait TokenCounter {
    /// How many tokens `text` is.
    fn count(&self, text: &str) -> Result<usize>;
    /// The longest prefix of `text` that is at most `max_tokens` tokens.
    fn truncate(&self, text: &str, max_tokens: usize) -> Result<String>;
    /// What one unit is called in reports ("tokens", "words").
    fn unit(&self) -> &'static str {
        "tokens"
    }
}

/// Counts whitespace-separated words: a model-free approximation (English text runs about
/// 1.3 GPT-2 tokens per word).
#[derive(Debug, Clone, Copy, Default)]
pub struct WordCounter;

impl TokenCounter for WordCounter {
    fn unit(&self) -> &'static str {
        "words"
    }
    fn count(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }
    fn truncate(&self, text: &str, max_tokens: usize) -> Result<String> {
        let mut seen = 0;
        let mut in_word = false;
        for (i, c) in text.char_indices() {
            if c.is_whitespace() {
                in_word = false;
            } else if !in_word {
                in_word = true;
                seen += 1;
                if seen > max_tokens {
                    return Ok(text[..i].trim_end().to_string());
                }
            }
        }
        Ok(text.to_string())
    }
}

#[cfg(feature = "tokenizers")]
impl TokenCounter for tokenizers::Tokenizer {
    fn count(&self, text: &str) -> Result<usize> {
        let enc = self
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.len())
    }
    fn truncate(&self, text: &str, max_tokens: usize) -> Result<String> {
        let enc = self
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if enc.len() <= max_tokens {
            return Ok(text.to_string());
        }
        if max_tokens == 0 {
            return Ok(String::new());
        }
        let mut end = enc.get_offsets()[max_tokens - 1].1.min(text.len());
        while end > 0 && !text.is_char_boundary(end) {
            end -= 1;
        }
        Ok(text[..end].to_string())
    }
}

/// A context window split between the prompt and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The model's context size in tokens.
    pub context_size: usize,
    /// Tokens kept free for the answer.
    pub reserve_for_output: usize,
}

impl Budget {
    /// A budget of `context_size` tokens with `reserve_for_output` kept for the answer.
    pub fn new(context_size: usize, reserve_for_output: usize) -> Self {
        Budget {
            context_size,
            reserve_for_output,
        }
    }
    /// Tokens available for the prompt.
    pub fn available(&self) -> usize {
        self.context_size.saturating_sub(self.reserve_for_output)
    }
}

/// One cut made to fit the budget. Indices refer to the spec's original lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cut", rename_all = "snake_case")]
pub enum Cut {
    /// A few-shot example was removed.
    DroppedExample {
        /// Its index in `examples`.
        index: usize,
        /// Its tokens (input + output).
        tokens: usize,
    },
    /// A context item was shortened.
    TruncatedContext {
        /// Its index in `context`.
        index: usize,
        /// Its tokens before.
        from_tokens: usize,
        /// Its tokens after.
        to_tokens: usize,
    },
    /// A context item was removed.
    DroppedContext {
        /// Its index in `context`.
        index: usize,
        /// Its tokens.
        tokens: usize,
    },
}

/// How the prompt is measured: its plain text, or its chat rendering.
#[derive(Debug, Clone, Copy)]
pub enum Layout<'a> {
    /// [`BoundPrompt::text`].
    Text,
    /// [`BoundPrompt::chat_text`] with this template.
    Chat(&'a ChatTemplate),
}

/// A prompt that fits.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// What remains of the prompt.
    pub prompt: BoundPrompt,
    /// The rendered text (plain or chat, as measured).
    pub text: String,
    /// Its tokens.
    pub tokens: usize,
    /// What was cut, in order.
    pub cuts: Vec<Cut>,
}

/// Options for [`fit`].
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Appended to a truncated context item so the model knows it is partial.
    pub truncation_marker: String,
    /// A context item that would keep fewer tokens than this is dropped instead.
    pub min_context_tokens: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            truncation_marker: " [...]".into(),
            min_context_tokens: 8,
        }
    }
}

fn lowest<T>(items: &[(usize, T)], prio: impl Fn(&T) -> i32) -> Option<usize> {
    // Lowest priority; among equals, the last listed.
    items
        .iter()
        .enumerate()
        .min_by(|(ia, a), (ib, b)| prio(&a.1).cmp(&prio(&b.1)).then(ib.cmp(ia)))
        .map(|(i, _)| i)
}

/// Fits `prompt` into `budget`: drops examples (lowest priority first; among equal
/// priorities the last one first), then truncates or drops context items the same way,
/// re-measuring after every cut. Fails with [`Error::BudgetExceeded`] if the task,
/// constraints, format and input alone do not fit.
///
/// ```
/// use kiln_prompt::{fit, vars, Budget, ContextItem, FitOptions, Layout, PromptSpec, WordCounter};
/// let mut spec = PromptSpec::new("Summarise the notes.");
/// spec.context.push(ContextItem { title: None, text: "word ".repeat(100), priority: 0 });
/// let bound = spec.bind(&vars::<&str, &str>([]))?;
/// let fitted = fit(&bound, &WordCounter, Budget::new(60, 10), Layout::Text, &FitOptions::default())?;
/// assert!(fitted.tokens <= 50);
/// assert_eq!(fitted.cuts.len(), 1);
/// # Ok::<(), kiln_prompt::Error>(())
/// ```
pub fn fit(
    prompt: &BoundPrompt,
    counter: &dyn TokenCounter,
    budget: Budget,
    layout: Layout<'_>,
    opts: &FitOptions,
) -> Result<Fitted> {
    let avail = budget.available();
    let mut examples: Vec<(usize, crate::spec::Example)> =
        prompt.spec.examples.iter().cloned().enumerate().collect();
    let mut context: Vec<(usize, crate::spec::ContextItem)> =
        prompt.spec.context.iter().cloned().enumerate().collect();
    let mut cuts: Vec<Cut> = Vec::new();
    let measure = |examples: &[(usize, crate::spec::Example)],
                   context: &[(usize, crate::spec::ContextItem)]|
     -> Result<(BoundPrompt, String, usize)> {
        let mut p = prompt.clone();
        p.spec.examples = examples.iter().map(|(_, e)| e.clone()).collect();
        p.spec.context = context.iter().map(|(_, c)| c.clone()).collect();
        let text = match layout {
            Layout::Text => p.text(),
            Layout::Chat(t) => p.chat_text(t)?,
        };
        let n = counter.count(&text)?;
        Ok((p, text, n))
    };
    // Tokens of each context item as first given (for reports).
    let original_ctx: Vec<usize> = prompt
        .spec
        .context
        .iter()
        .map(|c| counter.count(&c.text))
        .collect::<Result<_>>()?;
    loop {
        let (p, text, n) = measure(&examples, &context)?;
        if n <= avail {
            return Ok(Fitted {
                prompt: p,
                text,
                tokens: n,
                cuts,
            });
        }
        let over = n - avail;
        if let Some(i) = lowest(&examples, |e| e.priority) {
            let (index, e) = examples.remove(i);
            let tokens = counter.count(&e.input)? + counter.count(&e.output)?;
            cuts.push(Cut::DroppedExample { index, tokens });
            continue;
        }
        if let Some(i) = lowest(&context, |c| c.priority) {
            let (index, item) = &context[i];
            let index = *index;
            let marker = &opts.truncation_marker;
            let body = item
                .text
                .strip_suffix(marker.as_str())
                .unwrap_or(&item.text)
                .to_string();
            let have = counter.count(&body)?;
            let keep = have.saturating_sub(over);
            if keep >= opts.min_context_tokens.max(1) && keep < have {
                let cut = counter.truncate(&body, keep)?;
                context[i].1.text = format!("{}{marker}", cut.trim_end());
                let to_tokens = counter.count(&cut)?;
                match cuts.last_mut() {
                    Some(Cut::TruncatedContext {
                        index: j,
                        to_tokens: t,
                        ..
                    }) if *j == index => *t = to_tokens,
                    _ => cuts.push(Cut::TruncatedContext {
                        index,
                        from_tokens: original_ctx.get(index).copied().unwrap_or(have),
                        to_tokens,
                    }),
                }
            } else {
                context.remove(i);
                if let Some(Cut::TruncatedContext { index: j, .. }) = cuts.last() {
                    if *j == index {
                        cuts.pop();
                    }
                }
                cuts.push(Cut::DroppedContext {
                    index,
                    tokens: original_ctx.get(index).copied().unwrap_or(have),
                });
            }
            continue;
        }
        return Err(Error::BudgetExceeded {
            needed: n,
            available: avail,
            context_size: budget.context_size,
            reserved: budget.reserve_for_output,
            cuts: cuts.len(),
        });
    }
}
