//! Checks on generated output: tests for answers, the way unit tests check functions.
//!
//! A [`CheckSpec`] is the serializable description (used in spec and eval files); a
//! [`Check`] is compiled (regex built, schema compiled) and may also wrap a user closure.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A serializable check, tagged by `kind`.
///
/// ```toml
/// checks = [
///   { kind = "json", schema = { type = "object", required = ["name"] } },
///   { kind = "regex", pattern = "^- " },
///   { kind = "bullets", count = 3 },
///   { kind = "max_length", words = 50 },
///   { kind = "contains", terms = ["GAN"] },
///   { kind = "avoids", terms = ["as an AI"] },
///   { kind = "code_block", language = "rust" },
/// ]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckSpec {
    /// The output parses as JSON and, when `schema` is given, validates against it.
    Json {
        /// A JSON Schema.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<serde_json::Value>,
        /// Accept the JSON inside one fenced code block (```json ... ```); default true.
        #[serde(default = "yes")]
        allow_fence: bool,
    },
    /// The output matches a regular expression somewhere (anchor with `^`/`$`, or `(?s)`).
    Regex {
        /// The pattern (Rust `regex` syntax).
        pattern: String,
    },
    /// The output is a bulleted list (`- `, `* `, `• `, `1.`, `1)`).
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
        /// No other non-empty lines than bullets (default false).
        #[serde(default)]
        only: bool,
    },
    /// The output stays under a length.
    MaxLength {
        /// At most this many characters (Unicode scalar values).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chars: Option<usize>,
        /// At most this many whitespace-separated words.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        words: Option<usize>,
        /// At most this many lines.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lines: Option<usize>,
    },
    /// The output mentions every term (or any one, with `any = true`).
    Contains {
        /// The terms.
        terms: Vec<String>,
        /// Match case exactly (default false).
        #[serde(default)]
        case_sensitive: bool,
        /// One term is enough (default false: all are needed).
        #[serde(default)]
        any: bool,
    },
    /// The output mentions none of the terms.
    Avoids {
        /// The terms.
        terms: Vec<String>,
        /// Match case exactly (default false).
        #[serde(default)]
        case_sensitive: bool,
    },
    /// The output contains a fenced code block (in `language`, when given).
    CodeBlock {
        /// The fence's info string (`rust`, `python`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        language: Option<String>,
    },
}

fn yes() -> bool {
    true
}

/// A user-supplied check: `Ok(())` passes, `Err(reason)` fails with the reason.
pub type CheckFn = dyn Fn(&str) -> std::result::Result<(), String> + Send + Sync;

#[derive(Clone)]
enum Kind {
    Spec(CheckSpec),
    Json(Option<Arc<jsonschema::Validator>>, bool),
    Regex(regex::Regex),
    Custom(Arc<CheckFn>),
}

/// A compiled check.
///
/// ```
/// use kiln_prompt::Check;
/// let c = Check::bullets(2);
/// assert!(c.run("- one\n- two").passed);
/// let r = c.run("- one\n- two\n- three");
/// assert!(!r.passed);
/// assert_eq!(r.detail.as_deref(), Some("found 3 bullet points"));
/// ```
#[derive(Clone)]
pub struct Check {
    spec: Option<CheckSpec>,
    description: String,
    kind: Kind,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Check({})", self.description)
    }
}

/// The outcome of one check on one output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// What the check requires ("must have exactly 3 bullet points").
    pub check: String,
    /// Whether the output passed.
    pub passed: bool,
    /// Why it failed (what was found), when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

fn describe(spec: &CheckSpec) -> String {
    match spec {
        CheckSpec::Json { schema: None, .. } => "The answer must be valid JSON".into(),
        CheckSpec::Json {
            schema: Some(_), ..
        } => "The answer must be JSON that validates against the given JSON Schema".into(),
        CheckSpec::Regex { pattern } => {
            format!("The answer must match the regular expression {pattern:?}")
        }
        CheckSpec::Bullets {
            count,
            min,
            max,
            only,
        } => {
            let n = match (count, min, max) {
                (Some(c), _, _) => format!("exactly {}", plural(*c, "bullet point")),
                (None, Some(lo), Some(hi)) => format!("between {lo} and {hi} bullet points"),
                (None, Some(lo), None) => format!("at least {}", plural(*lo, "bullet point")),
                (None, None, Some(hi)) => format!("at most {}", plural(*hi, "bullet point")),
                (None, None, None) => "a list of bullet points".into(),
            };
            let only = if *only {
                ", and nothing but the list"
            } else {
                ""
            };
            format!("The answer must have {n}, one per line starting with \"- \"{only}")
        }
        CheckSpec::MaxLength {
            chars,
            words,
            lines,
        } => {
            let mut parts = Vec::new();
            if let Some(c) = chars {
                parts.push(format!("at most {c} characters"));
            }
            if let Some(w) = words {
                parts.push(format!("at most {w} words"));
            }
            if let Some(l) = lines {
                parts.push(format!("at most {l} lines"));
            }
            format!("The answer must be {}", parts.join(" and "))
        }
        CheckSpec::Contains { terms, any, .. } => format!(
            "The answer must mention {}: {}",
            if *any { "at least one of" } else { "all of" },
            terms.join(", ")
        ),
        CheckSpec::Avoids { terms, .. } => {
            format!("The answer must not mention: {}", terms.join(", "))
        }
        CheckSpec::CodeBlock { language: Some(l) } => {
            format!("The answer must contain a fenced code block in {l} (```{l})")
        }
        CheckSpec::CodeBlock { language: None } => {
            "The answer must contain a fenced code block".into()
        }
    }
}

impl Check {
    /// Compiles a [`CheckSpec`]; `place` names where it came from in errors.
    pub fn from_spec(spec: &CheckSpec, place: &str) -> Result<Self> {
        let kind = match spec {
            CheckSpec::Json {
                schema,
                allow_fence,
            } => {
                let v = match schema {
                    Some(s) => Some(Arc::new(jsonschema::validator_for(s).map_err(|e| {
                        Error::InvalidSchema {
                            place: format!("{place}.schema"),
                            message: format!(
                                "{e} (at {})",
                                if e.schema_path().as_str().is_empty() {
                                    "/"
                                } else {
                                    e.schema_path().as_str()
                                }
                            ),
                        }
                    })?)),
                    None => None,
                };
                Kind::Json(v, *allow_fence)
            }
            CheckSpec::Regex { pattern } => {
                Kind::Regex(regex::Regex::new(pattern).map_err(|e| Error::InvalidRegex {
                    place: format!("{place}.pattern"),
                    pattern: pattern.clone(),
                    message: e.to_string(),
                })?)
            }
            CheckSpec::Bullets {
                count, min, max, ..
            } => {
                if count.is_some() && (min.is_some() || max.is_some()) {
                    return Err(Error::invalid(
                        place,
                        "bullets: give either `count` or `min`/`max`, not both",
                    ));
                }
                if let (Some(lo), Some(hi)) = (min, max) {
                    if lo > hi {
                        return Err(Error::invalid(
                            format!("{place}.min"),
                            format!("min {lo} is greater than max {hi}"),
                        ));
                    }
                }
                Kind::Spec(spec.clone())
            }
            CheckSpec::MaxLength {
                chars,
                words,
                lines,
            } => {
                if chars.is_none() && words.is_none() && lines.is_none() {
                    return Err(Error::invalid(
                        place,
                        "max_length: give at least one of `chars`, `words`, `lines`",
                    ));
                }
                Kind::Spec(spec.clone())
            }
            CheckSpec::Contains { terms, .. } | CheckSpec::Avoids { terms, .. } => {
                if terms.is_empty() || terms.iter().any(|t| t.trim().is_empty()) {
                    return Err(Error::invalid(
                        format!("{place}.terms"),
                        "expected a non-empty list of non-empty terms",
                    ));
                }
                Kind::Spec(spec.clone())
            }
            CheckSpec::CodeBlock { .. } => Kind::Spec(spec.clone()),
        };
        Ok(Check {
            spec: Some(spec.clone()),
            description: describe(spec),
            kind,
        })
    }

    fn infallible(spec: CheckSpec) -> Self {
        Check {
            description: describe(&spec),
            kind: Kind::Spec(spec.clone()),
            spec: Some(spec),
        }
    }

    /// The output must be valid JSON (optionally inside one ```json fence).
    pub fn json() -> Self {
        Check {
            description: describe(&CheckSpec::Json {
                schema: None,
                allow_fence: true,
            }),
            kind: Kind::Json(None, true),
            spec: Some(CheckSpec::Json {
                schema: None,
                allow_fence: true,
            }),
        }
    }

    /// The output must be JSON validating against `schema`.
    pub fn json_schema(schema: serde_json::Value) -> Result<Self> {
        Self::from_spec(
            &CheckSpec::Json {
                schema: Some(schema),
                allow_fence: true,
            },
            "check",
        )
    }

    /// The output must match `pattern`.
    pub fn regex(pattern: &str) -> Result<Self> {
        Self::from_spec(
            &CheckSpec::Regex {
                pattern: pattern.into(),
            },
            "check",
        )
    }

    /// Exactly `count` bullet points.
    pub fn bullets(count: usize) -> Self {
        Self::infallible(CheckSpec::Bullets {
            count: Some(count),
            min: None,
            max: None,
            only: false,
        })
    }

    /// Between `min` and `max` bullet points.
    pub fn bullets_between(min: usize, max: usize) -> Result<Self> {
        Self::from_spec(
            &CheckSpec::Bullets {
                count: None,
                min: Some(min),
                max: Some(max),
                only: false,
            },
            "check",
        )
    }

    /// At most `n` characters.
    pub fn max_chars(n: usize) -> Self {
        Self::infallible(CheckSpec::MaxLength {
            chars: Some(n),
            words: None,
            lines: None,
        })
    }

    /// At most `n` words.
    pub fn max_words(n: usize) -> Self {
        Self::infallible(CheckSpec::MaxLength {
            chars: None,
            words: Some(n),
            lines: None,
        })
    }

    /// Mentions every term (case-insensitive).
    pub fn contains<S: Into<String>>(terms: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::from_spec(
            &CheckSpec::Contains {
                terms: terms.into_iter().map(Into::into).collect(),
                case_sensitive: false,
                any: false,
            },
            "check",
        )
    }

    /// Mentions none of the terms (case-insensitive).
    pub fn avoids<S: Into<String>>(terms: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::from_spec(
            &CheckSpec::Avoids {
                terms: terms.into_iter().map(Into::into).collect(),
                case_sensitive: false,
            },
            "check",
        )
    }

    /// Contains a fenced code block in `language`.
    pub fn code_block(language: &str) -> Self {
        Self::infallible(CheckSpec::CodeBlock {
            language: Some(language.into()),
        })
    }

    /// A user check: `f` returns `Err(reason)` to fail. `description` is what the model is
    /// told the answer must do when it fails ("The answer must cite a source").
    pub fn custom<F>(description: impl Into<String>, f: F) -> Self
    where
        F: Fn(&str) -> std::result::Result<(), String> + Send + Sync + 'static,
    {
        Check {
            spec: None,
            description: description.into(),
            kind: Kind::Custom(Arc::new(f)),
        }
    }

    /// What the check requires, as told to the model.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The serializable form (`None` for closures).
    pub fn spec(&self) -> Option<&CheckSpec> {
        self.spec.as_ref()
    }

    /// Runs the check on `output`.
    pub fn run(&self, output: &str) -> CheckResult {
        let detail = match &self.kind {
            Kind::Custom(f) => f(output).err(),
            Kind::Regex(re) => (!re.is_match(output)).then(|| "no match".to_string()),
            Kind::Json(schema, fence) => check_json(output, schema.as_deref(), *fence).err(),
            Kind::Spec(spec) => check_spec(spec, output).err(),
        };
        CheckResult {
            check: self.description.clone(),
            passed: detail.is_none(),
            detail,
        }
    }
}

/// The text inside one fenced block spanning the whole (trimmed) output, if that is its shape.
fn fenced_body(s: &str) -> Option<&str> {
    let t = s.trim();
    let rest = t.strip_prefix("```")?;
    let nl = rest.find('\n')?;
    let body = rest[nl + 1..].strip_suffix("```")?;
    (!body.contains("```")).then_some(body)
}

fn check_json(
    output: &str,
    schema: Option<&jsonschema::Validator>,
    allow_fence: bool,
) -> std::result::Result<(), String> {
    let text = match (allow_fence, fenced_body(output)) {
        (true, Some(b)) => b,
        _ => output,
    };
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("not valid JSON: {e}"))?;
    if let Some(v) = schema {
        let errors: Vec<String> = v
            .iter_errors(&value)
            .take(5)
            .map(|e| {
                let at = e.instance_path().as_str().to_string();
                format!("{}: {e}", if at.is_empty() { "/" } else { at.as_str() })
            })
            .collect();
        if !errors.is_empty() {
            return Err(format!("schema violations: {}", errors.join("; ")));
        }
    }
    Ok(())
}

/// Is `line` a bullet? Returns the item text.
pub(crate) fn bullet_item(line: &str) -> Option<&str> {
    let t = line.trim_start();
    for p in ["- ", "* ", "• ", "+ "] {
        if let Some(r) = t.strip_prefix(p) {
            return Some(r);
        }
    }
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    if digits > 0 && digits <= 3 {
        let r = &t[digits..];
        if let Some(r) = r.strip_prefix(". ").or_else(|| r.strip_prefix(") ")) {
            return Some(r);
        }
    }
    None
}

fn find_term(hay: &str, term: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        hay.contains(term)
    } else {
        hay.to_lowercase().contains(&term.to_lowercase())
    }
}

fn check_spec(spec: &CheckSpec, out: &str) -> std::result::Result<(), String> {
    match spec {
        CheckSpec::Bullets {
            count,
            min,
            max,
            only,
        } => {
            let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            let n = lines
                .iter()
                .filter(|l| bullet_item(l).is_some_and(|i| !i.trim().is_empty()))
                .count();
            let found = format!("found {}", plural(n, "bullet point"));
            let ok = match (count, min, max) {
                (Some(c), _, _) => n == *c,
                _ => min.is_none_or(|lo| n >= lo) && max.is_none_or(|hi| n <= hi) && n > 0,
            };
            if !ok {
                return Err(found);
            }
            if *only {
                let other: Vec<&str> = lines
                    .iter()
                    .filter(|l| bullet_item(l).is_none())
                    .copied()
                    .collect();
                if let Some(first) = other.first() {
                    return Err(format!(
                        "found {} besides the list, first: {:?}",
                        plural(other.len(), "other line"),
                        first.trim()
                    ));
                }
            }
            Ok(())
        }
        CheckSpec::MaxLength {
            chars,
            words,
            lines,
        } => {
            let mut over = Vec::new();
            if let Some(c) = chars {
                let n = out.chars().count();
                if n > *c {
                    over.push(format!("{n} characters"));
                }
            }
            if let Some(w) = words {
                let n = out.split_whitespace().count();
                if n > *w {
                    over.push(format!("{n} words"));
                }
            }
            if let Some(l) = lines {
                let n = out.trim_end().lines().count();
                if n > *l {
                    over.push(format!("{n} lines"));
                }
            }
            if over.is_empty() {
                Ok(())
            } else {
                Err(format!("found {}", over.join(" and ")))
            }
        }
        CheckSpec::Contains {
            terms,
            case_sensitive,
            any,
        } => {
            let missing: Vec<&str> = terms
                .iter()
                .filter(|t| !find_term(out, t, *case_sensitive))
                .map(String::as_str)
                .collect();
            let ok = if *any {
                missing.len() < terms.len()
            } else {
                missing.is_empty()
            };
            if ok {
                Ok(())
            } else {
                Err(format!("missing: {}", missing.join(", ")))
            }
        }
        CheckSpec::Avoids {
            terms,
            case_sensitive,
        } => {
            let found: Vec<&str> = terms
                .iter()
                .filter(|t| find_term(out, t, *case_sensitive))
                .map(String::as_str)
                .collect();
            if found.is_empty() {
                Ok(())
            } else {
                Err(format!("mentions: {}", found.join(", ")))
            }
        }
        CheckSpec::CodeBlock { language } => {
            let mut in_block = false;
            let mut opened: Option<String> = None;
            let mut langs = Vec::new();
            for line in out.lines() {
                let t = line.trim_start();
                if let Some(info) = t.strip_prefix("```") {
                    if in_block {
                        if let Some(l) = opened.take() {
                            langs.push(l);
                        }
                        in_block = false;
                    } else {
                        in_block = true;
                        opened = Some(info.trim().to_string());
                    }
                }
            }
            match language {
                _ if langs.is_empty() => Err("found no complete fenced code block".into()),
                None => Ok(()),
                Some(l) if langs.iter().any(|x| x.eq_ignore_ascii_case(l)) => Ok(()),
                Some(_) => Err(format!("found code blocks tagged {:?}", langs)),
            }
        }
        CheckSpec::Json { .. } | CheckSpec::Regex { .. } => Ok(()), // compiled kinds handle these
    }
}

/// Runs every check on `output`.
pub fn run_checks(checks: &[Check], output: &str) -> Vec<CheckResult> {
    checks.iter().map(|c| c.run(output)).collect()
}

/// Compiles a list of check specs; errors name `place[i]`.
pub fn compile_checks(specs: &[CheckSpec], place: &str) -> Result<Vec<Check>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| Check::from_spec(s, &format!("{place}[{i}]")))
        .collect()
}
