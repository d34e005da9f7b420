//! Typed prompt specs: the targeted-prompting techniques as fields.
//!
//! A [`PromptSpec`] states the task explicitly, the output format, who the output is for,
//! the time frame, how simple to keep things, context, constraints and few-shot examples.
//! Every text field is a [`Template`](crate::Template) over the spec's variables. Specs load
//! from and save to TOML or JSON; unknown fields are errors.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message};
use crate::check::{Check, CheckSpec};
use crate::error::{json_error, toml_error, Error, Result};
use crate::template::{Template, Vars};

/// A prompt, described by what it asks for rather than by its wording.
///
/// ```
/// use kiln_prompt::{vars, OutputFormat, PromptSpec};
/// let spec = PromptSpec {
///     task: "List the main risks of deploying {{ system }}.".into(),
///     audience: Some("a business manager".into()),
///     output: Some(OutputFormat::Bullets { count: Some(3), min: None, max: None }),
///     ..PromptSpec::default()
/// };
/// let text = spec.render(&vars([("system", "a chatbot")]))?;
/// assert!(text.starts_with("## Task\nList the main risks of deploying a chatbot.\n"));
/// assert!(text.contains("exactly 3 bullet points"));
/// # Ok::<(), kiln_prompt::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// A short identifier (used in evaluation tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What this variant is meant to test (not rendered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who the model should be ("You are ..."); the system message in chat form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The task, stated explicitly (an email? a business plan? a summary?).
    pub task: String,
    /// Who the output is for (an ML engineer, a business manager, a developer, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The time frame the answer must respect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_frame: Option<TimeFrame>,
    /// How simple to keep the answer, and the task broken into steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simplify: Option<Simplify>,
    /// Background material, cut first-lowest-priority when a token budget is tight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ContextItem>,
    /// Rules the answer must follow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// Few-shot examples, dropped first when a token budget is tight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
    /// The output format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputFormat>,
    /// The material or question of this particular request, placed last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Default values for variables (a variable given at render time overrides it).
    #[serde(default, skip_serializing_if = "Vars::is_empty")]
    pub defaults: Vars,
}

/// The time frame of the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeFrame {
    /// Answer as of this date ("2024-07-23", "July 2024").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
    /// Only cover events from this date on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Only cover events up to this date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Order events in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Chronology>,
    /// Give the date of each event (release date, first announcement).
    #[serde(default, skip_serializing_if = "is_false")]
    pub dates: bool,
    /// Describe how things changed over time.
    #[serde(default, skip_serializing_if = "is_false")]
    pub changes: bool,
}

/// The order of events in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Chronology {
    /// Oldest first.
    Chronological,
    /// Newest first.
    ReverseChronological,
}

/// Keeping the request (and the answer) simple.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Simplify {
    /// The reading level of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<ReadingLevel>,
    /// The task broken into small steps, done in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
}

/// How technical the answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadingLevel {
    /// Technical terms without explanation.
    Expert,
    /// Plain language for a general reader.
    Plain,
    /// Short sentences; every technical term explained.
    Beginner,
    /// As simply as for a ten-year-old.
    Child,
}

/// A piece of background material.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextItem {
    /// A heading for the material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The material.
    pub text: String,
    /// Higher is kept longer when the budget is tight (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

/// A few-shot example: an input and the output wanted for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// The example's input.
    pub input: String,
    /// The output wanted for it.
    pub output: String,
    /// Higher is kept longer when the budget is tight (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

/// The shape of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputFormat {
    /// A bulleted list: exactly `count` bullets, or between `min` and `max`.
    Bullets {
        /// Exactly this many bullets.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<usize>,
        /// At least this many.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<usize>,
        /// At most this many.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<usize>,
    },
    /// One JSON value, validating against `schema` when given.
    Json {
        /// A JSON Schema (draft 2020-12 unless `$schema` says otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<serde_json::Value>,
    },
    /// Code in one fenced block.
    Code {
        /// The language (`rust`, `python`, ...), also the fence's info string.
        language: String,
    },
    /// Prose, optionally bounded.
    Prose {
        /// At most this many words.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_words: Option<usize>,
        /// Exactly this many paragraphs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paragraphs: Option<usize>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// A spec's fields after variable substitution: plain text, ready to lay out. Produced by
/// [`PromptSpec::bind`]; budgets cut its examples and context.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundPrompt {
    /// The substituted spec (its strings are final text, never re-templated).
    pub spec: PromptSpec,
}

impl PromptSpec {
    /// A spec with just a task.
    pub fn new(task: impl Into<String>) -> Self {
        PromptSpec {
            task: task.into(),
            ..PromptSpec::default()
        }
    }

    /// Parses TOML; `place` names the source in errors.
    pub fn from_toml_str(text: &str, place: &str) -> Result<Self> {
        let spec: PromptSpec = toml::from_str(text).map_err(|e| toml_error(place, text, &e))?;
        spec.validate(place)?;
        Ok(spec)
    }

    /// Parses JSON; `place` names the source in errors.
    pub fn from_json_str(text: &str, place: &str) -> Result<Self> {
        let spec: PromptSpec = serde_json::from_str(text).map_err(|e| json_error(place, &e))?;
        spec.validate(place)?;
        Ok(spec)
    }

    /// Loads a `.toml` or `.json` spec file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        let place = path.display().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml_str(&text, &place),
            Some("json") => Self::from_json_str(&text, &place),
            _ => Err(Error::invalid(place, "expected a .toml or .json spec file")),
        }
    }

    /// Serializes to TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::invalid("spec", format!("cannot write TOML: {e}")))
    }

    /// Serializes to pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("spec", format!("cannot write JSON: {e}")))
    }

    /// Saves as `.toml` or `.json` (by the path's extension).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => self.to_toml()?,
            Some("json") => self.to_json()? + "\n",
            _ => {
                return Err(Error::invalid(
                    path.display().to_string(),
                    "expected a .toml or .json spec file",
                ))
            }
        };
        std::fs::write(path, text).map_err(|e| Error::io(path, "write", e))
    }

    /// Checks values and compiles every template; errors name `place` and the field.
    pub fn validate(&self, place: &str) -> Result<()> {
        if self.task.trim().is_empty() {
            return Err(Error::invalid(
                format!("{place}: task"),
                "must not be empty: state the task explicitly",
            ));
        }
        if let Some(OutputFormat::Bullets { count, min, max }) = &self.output {
            if count.is_some() && (min.is_some() || max.is_some()) {
                return Err(Error::invalid(
                    format!("{place}: output"),
                    "give either `count` or `min`/`max`, not both",
                ));
            }
            if *count == Some(0) || *max == Some(0) {
                return Err(Error::invalid(
                    format!("{place}: output.count"),
                    "must be at least 1",
                ));
            }
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    return Err(Error::invalid(
                        format!("{place}: output.min"),
                        format!("min {lo} is greater than max {hi}"),
                    ));
                }
            }
        }
        if let Some(OutputFormat::Code { language }) = &self.output {
            if language.trim().is_empty() || language.contains(char::is_whitespace) {
                return Err(Error::invalid(
                    format!("{place}: output.language"),
                    "expected a language name such as `rust` or `python`",
                ));
            }
        }
        if let Some(OutputFormat::Prose {
            max_words,
            paragraphs,
        }) = &self.output
        {
            if *max_words == Some(0) || *paragraphs == Some(0) {
                return Err(Error::invalid(
                    format!("{place}: output"),
                    "max_words and paragraphs must be at least 1",
                ));
            }
        }
        // Compiles the schema (and any other check) so a bad schema fails at load time.
        for c in self.derived_check_specs() {
            Check::from_spec(&c, &format!("{place}: output"))?;
        }
        let mut used = BTreeSet::new();
        for (field, text) in self.template_fields() {
            used.extend(
                Template::new(format!("{place}: {field}"), text)?
                    .variables()
                    .iter()
                    .cloned(),
            );
        }
        if let Some(k) = self.defaults.keys().find(|k| !used.contains(*k)) {
            return Err(Error::invalid(
                format!("{place}: defaults.{k}"),
                format!(
                    "no template uses `{k}`; the spec uses {}",
                    if used.is_empty() {
                        "no variables".to_string()
                    } else {
                        used.iter()
                            .map(|u| format!("`{u}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Every templated text field with its field path.
    fn template_fields(&self) -> Vec<(String, &str)> {
        let mut out = vec![("task".to_string(), self.task.as_str())];
        let mut opts: Vec<(&str, &Option<String>)> = vec![
            ("role", &self.role),
            ("audience", &self.audience),
            ("input", &self.input),
        ];
        if let Some(t) = &self.time_frame {
            opts.extend([
                ("time_frame.as_of", &t.as_of),
                ("time_frame.from", &t.from),
                ("time_frame.to", &t.to),
            ]);
        }
        for (name, v) in opts {
            if let Some(s) = v {
                out.push((name.to_string(), s.as_str()));
            }
        }
        if let Some(s) = &self.simplify {
            for (i, step) in s.steps.iter().enumerate() {
                out.push((format!("simplify.steps[{i}]"), step));
            }
        }
        for (i, c) in self.context.iter().enumerate() {
            if let Some(t) = &c.title {
                out.push((format!("context[{i}].title"), t));
            }
            out.push((format!("context[{i}].text"), &c.text));
        }
        for (i, c) in self.constraints.iter().enumerate() {
            out.push((format!("constraints[{i}]"), c));
        }
        for (i, e) in self.examples.iter().enumerate() {
            out.push((format!("examples[{i}].input"), &e.input));
            out.push((format!("examples[{i}].output"), &e.output));
        }
        out
    }

    /// The variables the spec's templates use, sorted.
    pub fn variables(&self) -> Result<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for (field, text) in self.template_fields() {
            all.extend(Template::new(field, text)?.variables().iter().cloned());
        }
        Ok(all)
    }

    /// Substitutes variables in every field. Missing variables (not given and without a
    /// default) and unused ones are errors listing the names.
    pub fn bind(&self, vars: &Vars) -> Result<BoundPrompt> {
        let name = self.name.clone().unwrap_or_else(|| "spec".into());
        let declared = self.variables()?;
        let unused: Vec<String> = vars
            .keys()
            .filter(|k| !declared.contains(*k))
            .cloned()
            .collect();
        if !unused.is_empty() {
            return Err(Error::UnusedVariables {
                name,
                unused,
                declared: declared.into_iter().collect(),
            });
        }
        let mut all = self.defaults.clone();
        all.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let missing: Vec<String> = declared
            .iter()
            .filter(|v| !all.contains_key(*v))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let mut used_in = Vec::new();
            for (field, text) in self.template_fields() {
                let t = Template::new(field.clone(), text)?;
                if missing.iter().any(|m| t.variables().contains(m)) {
                    used_in.push(field);
                }
            }
            return Err(Error::MissingVariables {
                name,
                missing,
                used_in,
                declared: declared.into_iter().collect(),
            });
        }
        let r = |field: &str, s: &str| -> Result<String> {
            Template::new(format!("{name}: {field}"), s)?.render_lenient_unused(&all)
        };
        let ro = |field: &str, s: &Option<String>| -> Result<Option<String>> {
            s.as_deref().map(|s| r(field, s)).transpose()
        };
        let mut spec = self.clone();
        spec.defaults = Vars::new();
        spec.task = r("task", &self.task)?;
        spec.role = ro("role", &self.role)?;
        spec.audience = ro("audience", &self.audience)?;
        spec.input = ro("input", &self.input)?;
        if let Some(t) = &mut spec.time_frame {
            t.as_of = ro("time_frame.as_of", &t.as_of)?;
            t.from = ro("time_frame.from", &t.from)?;
            t.to = ro("time_frame.to", &t.to)?;
        }
        if let Some(s) = &mut spec.simplify {
            for (i, step) in s.steps.iter_mut().enumerate() {
                *step = r(&format!("simplify.steps[{i}]"), step)?;
            }
        }
        for (i, c) in spec.context.iter_mut().enumerate() {
            c.title = ro(&format!("context[{i}].title"), &c.title)?;
            c.text = r(&format!("context[{i}].text"), &c.text)?;
        }
        for (i, c) in spec.constraints.iter_mut().enumerate() {
            *c = r(&format!("constraints[{i}]"), c)?;
        }
        for (i, e) in spec.examples.iter_mut().enumerate() {
            e.input = r(&format!("examples[{i}].input"), &e.input)?;
            e.output = r(&format!("examples[{i}].output"), &e.output)?;
        }
        Ok(BoundPrompt { spec })
    }

    /// Binds `vars` and lays the prompt out as one text (the form for completion models).
    pub fn render(&self, vars: &Vars) -> Result<String> {
        Ok(self.bind(vars)?.text())
    }

    /// Binds `vars` and lays the prompt out as chat messages.
    pub fn render_messages(&self, vars: &Vars) -> Result<Vec<Message>> {
        Ok(self.bind(vars)?.messages())
    }

    /// The checks implied by the output format: bullet count, JSON (with its schema), a
    /// fenced code block, a word limit.
    pub fn derived_check_specs(&self) -> Vec<CheckSpec> {
        match &self.output {
            None => vec![],
            Some(OutputFormat::Bullets { count, min, max }) => vec![CheckSpec::Bullets {
                count: *count,
                min: *min,
                max: *max,
                only: true,
            }],
            Some(OutputFormat::Json { schema }) => vec![CheckSpec::Json {
                schema: schema.clone(),
                allow_fence: true,
            }],
            Some(OutputFormat::Code { language }) => vec![CheckSpec::CodeBlock {
                language: Some(language.clone()),
            }],
            Some(OutputFormat::Prose {
                max_words: Some(w), ..
            }) => vec![CheckSpec::MaxLength {
                chars: None,
                words: Some(*w),
                lines: None,
            }],
            Some(OutputFormat::Prose {
                max_words: None, ..
            }) => vec![],
        }
    }

    /// The compiled checks implied by the output format.
    pub fn checks(&self) -> Result<Vec<Check>> {
        let place = self.name.clone().unwrap_or_else(|| "spec".into());
        self.derived_check_specs()
            .iter()
            .map(|c| Check::from_spec(c, &format!("{place}: output")))
            .collect()
    }
}

/// The sentence that states the output format (also what the built-in generator reads).
pub(crate) fn format_instruction(f: &OutputFormat) -> String {
    match f {
        OutputFormat::Bullets { count, min, max } => {
            let n = match (count, min, max) {
                (Some(c), _, _) => format!("exactly {c} bullet point{}", if *c == 1 { "" } else { "s" }),
                (None, Some(lo), Some(hi)) => format!("between {lo} and {hi} bullet points"),
                (None, Some(lo), None) => format!("at least {lo} bullet points"),
                (None, None, Some(hi)) => format!("at most {hi} bullet points"),
                (None, None, None) => "a list of bullet points".to_string(),
            };
            format!("Answer with {n}, one per line, each starting with \"- \". Write nothing before or after the list.")
        }
        OutputFormat::Json { schema: None } => {
            "Answer with a single JSON value and nothing else.".to_string()
        }
        OutputFormat::Json { schema: Some(s) } => {
            let pretty = serde_json::to_string_pretty(s).unwrap_or_else(|_| s.to_string());
            format!("Answer with a single JSON value that validates against this JSON Schema, and nothing else:\n```json\n{pretty}\n```")
        }
        OutputFormat::Code { language } => format!(
            "Answer with {language} code in one fenced code block (```{language} ... ```). Put any explanation in code comments."
        ),
        OutputFormat::Prose { max_words, paragraphs } => {
            let mut s = "Answer in prose".to_string();
            if let Some(p) = paragraphs {
                s.push_str(&format!(" in exactly {p} paragraph{}", if *p == 1 { "" } else { "s" }));
            }
            if let Some(w) = max_words {
                s.push_str(&format!(", at most {w} words"));
            }
            s.push_str(", without lists or headings.");
            s
        }
    }
}

impl BoundPrompt {
    fn sections(&self, with_examples: bool) -> Vec<(String, String)> {
        let s = &self.spec;
        let mut out: Vec<(String, String)> = vec![("Task".into(), s.task.trim_end().to_string())];
        if let Some(a) = &s.audience {
            out.push((
                "Audience".into(),
                format!("Write for {}.", a.trim_end().trim_end_matches('.')),
            ));
        }
        if let Some(t) = &s.time_frame {
            let mut lines = Vec::new();
            if let Some(d) = &t.as_of {
                lines.push(format!("Answer as of {d}; ignore anything later."));
            }
            match (&t.from, &t.to) {
                (Some(a), Some(b)) => lines.push(format!("Only cover the period from {a} to {b}.")),
                (Some(a), None) => lines.push(format!("Only cover the period from {a} on.")),
                (None, Some(b)) => lines.push(format!("Only cover the period up to {b}.")),
                (None, None) => {}
            }
            match t.order {
                Some(Chronology::Chronological) => {
                    lines.push("Present events in chronological order, oldest first.".into())
                }
                Some(Chronology::ReverseChronological) => lines
                    .push("Present events in reverse chronological order, newest first.".into()),
                None => {}
            }
            if t.dates {
                lines.push(
                    "Give the date of each event (release date or first announcement).".into(),
                );
            }
            if t.changes {
                lines.push("Describe how things changed over time.".into());
            }
            if !lines.is_empty() {
                out.push(("Time frame".into(), lines.join("\n")));
            }
        }
        if let Some(simp) = &s.simplify {
            let mut lines = Vec::new();
            match simp.level {
                Some(ReadingLevel::Expert) => lines.push("Use precise technical language; do not explain standard terms.".to_string()),
                Some(ReadingLevel::Plain) => lines.push("Use plain language: short sentences and everyday words.".to_string()),
                Some(ReadingLevel::Beginner) => lines.push("Use short sentences and explain every technical term the first time you use it.".to_string()),
                Some(ReadingLevel::Child) => lines.push("Explain it as you would to a ten-year-old: simple words, one idea per sentence.".to_string()),
                None => {}
            }
            if !simp.steps.is_empty() {
                lines.push("Work through these steps in order:".into());
                for (i, st) in simp.steps.iter().enumerate() {
                    lines.push(format!("{}. {}", i + 1, st.trim_end()));
                }
            }
            if !lines.is_empty() {
                out.push(("Keep it simple".into(), lines.join("\n")));
            }
        }
        if !s.context.is_empty() {
            let body = s
                .context
                .iter()
                .map(|c| match &c.title {
                    Some(t) => format!("### {}\n{}", t.trim_end(), c.text.trim_end()),
                    None => c.text.trim_end().to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n\n");
            out.push(("Context".into(), body));
        }
        if !s.constraints.is_empty() {
            let body = s
                .constraints
                .iter()
                .map(|c| format!("- {}", c.trim_end()))
                .collect::<Vec<_>>()
                .join("\n");
            out.push(("Constraints".into(), body));
        }
        if with_examples && !s.examples.is_empty() {
            let body = s
                .examples
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    format!(
                        "### Example {}\nInput:\n{}\nOutput:\n{}",
                        i + 1,
                        e.input.trim_end(),
                        e.output.trim_end()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n");
            out.push(("Examples".into(), body));
        }
        if let Some(f) = &s.output {
            out.push(("Output format".into(), format_instruction(f)));
        }
        if let Some(i) = &s.input {
            out.push(("Input".into(), i.trim_end().to_string()));
        }
        out
    }

    fn join(sections: &[(String, String)]) -> String {
        let mut text = String::new();
        for (i, (h, b)) in sections.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(&format!("## {h}\n{b}\n"));
        }
        text
    }

    /// The prompt as one text: the role line, then `## Task`, `## Audience`, `## Time frame`,
    /// `## Keep it simple`, `## Context`, `## Constraints`, `## Examples`, `## Output format`,
    /// `## Input` (each only when set), separated by blank lines, ending with a newline.
    pub fn text(&self) -> String {
        let body = Self::join(&self.sections(true));
        match &self.spec.role {
            Some(r) => format!("{}\n\n{body}", r.trim_end()),
            None => body,
        }
    }

    /// The prompt as chat messages: the role as the system message, each example as a
    /// user/assistant pair, then everything else as the final user message.
    pub fn messages(&self) -> Vec<Message> {
        let mut msgs = Vec::new();
        if let Some(r) = &self.spec.role {
            msgs.push(Message::system(r.trim_end()));
        }
        for e in &self.spec.examples {
            msgs.push(Message::user(e.input.trim_end()));
            msgs.push(Message::assistant(e.output.trim_end()));
        }
        let body = Self::join(&self.sections(false));
        msgs.push(Message::user(body.trim_end()));
        msgs
    }

    /// The messages rendered with a chat template, with the assistant header appended.
    pub fn chat_text(&self, template: &ChatTemplate) -> Result<String> {
        template.render(&self.messages(), true)
    }
}
