//! Prompt evaluation: K prompt variants over M cases through one generator, scored by checks.
//!
//! An eval directory holds one spec file per variant (`*.toml` / `*.json`) and a cases file
//! (`cases.toml` or `cases.json`). Every variant is scored by the same checks (the suite's and
//! the case's), not by the checks its own output format implies, so the scores compare:
//!
//! ```toml
//! # checks applied to every case
//! [[checks]]
//! kind = "bullets"
//! count = 3
//! only = true
//!
//! [[cases]]
//! name = "vae"
//! vars = { topic = "variational autoencoders", notes = "..." }
//! checks = [{ kind = "contains", terms = ["latent"] }]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::budget::TokenCounter;
use crate::chat::ChatTemplate;
use crate::check::{compile_checks, CheckSpec};
use crate::error::{json_error, toml_error, Error, Result};
use crate::generate::{generate_checked_with, Attempt, GenParams, PromptInput, TextGenerator};
use crate::spec::PromptSpec;
use crate::template::Vars;

/// One case: the variables to render each variant with, and checks for this case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalCase {
    /// The case's name (a table column).
    pub name: String,
    /// Variables for the variants' templates.
    #[serde(default)]
    pub vars: Vars,
    /// Checks for this case, in addition to the suite's.
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
}

/// The cases file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    /// Checks applied to every case.
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// The cases.
    #[serde(default)]
    pub cases: Vec<EvalCase>,
}

/// Prompt variants and cases, loaded from a directory.
#[derive(Debug, Clone)]
pub struct EvalSuite {
    /// Where it came from.
    pub dir: PathBuf,
    /// `(name, spec)` per variant, sorted by file name; the name is the spec's `name` or the
    /// file stem.
    pub variants: Vec<(String, PromptSpec)>,
    /// The cases file.
    pub cases: CasesFile,
}

impl EvalSuite {
    /// Loads `dir`: every `*.toml` / `*.json` except `cases.*` is a variant.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list", e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("toml" | "json")
                    )
            })
            .collect();
        files.sort();
        let mut cases = None;
        let mut variants = Vec::new();
        for f in files {
            let stem = f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if stem == "cases" {
                if cases.is_some() {
                    return Err(Error::invalid(
                        dir.display().to_string(),
                        "both cases.toml and cases.json are present; keep one",
                    ));
                }
                cases = Some(load_cases(&f)?);
                continue;
            }
            let spec = PromptSpec::load(&f)?;
            let name = spec.name.clone().unwrap_or(stem);
            if variants.iter().any(|(n, _)| *n == name) {
                return Err(Error::invalid(
                    f.display().to_string(),
                    format!("variant name {name:?} is used twice"),
                ));
            }
            variants.push((name, spec));
        }
        let Some(cases) = cases else {
            return Err(Error::invalid(
                dir.display().to_string(),
                "no cases.toml or cases.json: add one with [[cases]] entries (name, vars, checks)",
            ));
        };
        if variants.is_empty() {
            return Err(Error::invalid(
                dir.display().to_string(),
                "no prompt variants: add spec files (*.toml or *.json) next to the cases file",
            ));
        }
        if cases.cases.is_empty() {
            return Err(Error::invalid(
                format!("{}: cases", dir.display()),
                "no cases: add at least one [[cases]] entry",
            ));
        }
        let suite = EvalSuite {
            dir: dir.to_path_buf(),
            variants,
            cases,
        };
        suite.validate()?;
        Ok(suite)
    }

    fn cases_place(&self) -> String {
        self.dir.join("cases").display().to_string()
    }

    /// Compiles every check so bad schemas/regexes fail before any generation.
    fn validate(&self) -> Result<()> {
        let place = self.cases_place();
        compile_checks(&self.cases.checks, &format!("{place}: checks"))?;
        let mut used = std::collections::BTreeSet::new();
        for (_, spec) in &self.variants {
            used.extend(spec.variables()?);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.cases.cases.iter().enumerate() {
            if !seen.insert(c.name.as_str()) {
                return Err(Error::invalid(
                    format!("{place}: cases[{i}].name"),
                    format!("case name {:?} is used twice", c.name),
                ));
            }
            let unused: Vec<String> = c
                .vars
                .keys()
                .filter(|k| !used.contains(*k))
                .cloned()
                .collect();
            if !unused.is_empty() {
                return Err(Error::UnusedVariables {
                    name: format!("{place}: cases[{i}] ({:?}).vars", c.name),
                    unused,
                    declared: used.iter().cloned().collect(),
                });
            }
            compile_checks(&c.checks, &format!("{place}: cases[{i}].checks"))?;
        }
        Ok(())
    }
}

fn load_cases(path: &Path) -> Result<CasesFile> {
    let text = crate::error::read_text(path)?;
    let place = path.display().to_string();
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| json_error(&place, &e))
    } else {
        toml::from_str(&text).map_err(|e| toml_error(&place, &text, &e))
    }
}

/// Options for [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Attempts per cell (1 = no re-asking).
    pub max_attempts: usize,
    /// Sampling parameters.
    pub params: GenParams,
    /// Render prompts as chat with this template (default: plain text).
    pub chat_template: Option<ChatTemplate>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_attempts: 2,
            params: GenParams::default(),
            chat_template: None,
        }
    }
}

/// One variant on one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// The variant.
    pub variant: String,
    /// The case.
    pub case: String,
    /// Length of the first attempt's prompt, in the report's `length_unit`.
    pub prompt_tokens: usize,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
    /// Whether the first attempt passed every check.
    pub passed_first: bool,
    /// Whether some attempt passed every check.
    pub passed: bool,
    /// Rendering failed (e.g. a missing variable): the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A variant's scores over all cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    /// The variant.
    pub variant: String,
    /// Cases run.
    pub cases: usize,
    /// Cases whose first attempt passed every check.
    pub passed_first: usize,
    /// Cases that passed within the allowed attempts.
    pub passed: usize,
    /// Fraction of individual checks passed on first attempts.
    pub check_pass_rate: f64,
    /// Mean attempts used.
    pub mean_attempts: f64,
    /// Mean prompt length (first attempt), in the report's `length_unit`.
    pub mean_prompt_tokens: f64,
    /// Cases that could not be rendered.
    pub errors: usize,
}

/// The evaluation's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The generator's name.
    pub generator: String,
    /// Attempts allowed per cell.
    pub max_attempts: usize,
    /// What prompt lengths are counted in ("tokens", "words").
    pub length_unit: String,
    /// One row per variant, in the suite's order.
    pub variants: Vec<VariantSummary>,
    /// Every cell, variant-major.
    pub cells: Vec<CellResult>,
}

/// Runs every variant on every case. Each variant gets the case variables it uses; a case
/// missing a variable a variant needs is recorded as an error cell rather than aborting.
pub fn evaluate(
    suite: &EvalSuite,
    generator: &mut dyn TextGenerator,
    counter: &dyn TokenCounter,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let place = suite.cases_place();
    let common = compile_checks(&suite.cases.checks, &format!("{place}: checks"))?;
    let mut cells = Vec::new();
    for (vname, spec) in &suite.variants {
        for (ci, case) in suite.cases.cases.iter().enumerate() {
            let mut checks = common.clone();
            checks.extend(compile_checks(
                &case.checks,
                &format!("{place}: cases[{ci}].checks"),
            )?);
            // Variants may use a subset of the case's variables (each case variable is used by
            // some variant: checked at load).
            let wanted = spec.variables()?;
            let vars: Vars = case
                .vars
                .iter()
                .filter(|(k, _)| wanted.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let bound = match spec.bind(&vars) {
                Ok(b) => b,
                Err(e) => {
                    cells.push(CellResult {
                        variant: vname.clone(),
                        case: case.name.clone(),
                        prompt_tokens: 0,
                        attempts: vec![],
                        passed_first: false,
                        passed: false,
                        error: Some(e.to_string()),
                    });
                    continue;
                }
            };
            let input = match &opts.chat_template {
                Some(t) => PromptInput::Chat {
                    template: t.clone(),
                    messages: bound.messages(),
                },
                None => PromptInput::Text(bound.text()),
            };
            let first_text = match &input {
                PromptInput::Text(t) => t.clone(),
                PromptInput::Chat { template, messages } => template.render(messages, true)?,
            };
            let prompt_tokens = counter.count(&first_text)?;
            // A generator error (a prompt that fills the model's context, say)
            // is this cell's, not the whole table's: the other cells still run
            // and the error shows in the table's errors column.
            let res = match generate_checked_with(
                generator,
                input,
                &checks,
                opts.max_attempts,
                &opts.params,
            ) {
                Ok(r) => r,
                Err(e) => {
                    cells.push(CellResult {
                        variant: vname.clone(),
                        case: case.name.clone(),
                        prompt_tokens,
                        attempts: vec![],
                        passed_first: false,
                        passed: false,
                        error: Some(e.to_string()),
                    });
                    continue;
                }
            };
            cells.push(CellResult {
                variant: vname.clone(),
                case: case.name.clone(),
                prompt_tokens,
                passed_first: res.attempts.first().is_some_and(|a| a.passed),
                passed: res.passed(),
                attempts: res.attempts,
                error: None,
            });
        }
    }
    let mut variants = Vec::new();
    for (vname, _) in &suite.variants {
        let mine: Vec<&CellResult> = cells.iter().filter(|c| &c.variant == vname).collect();
        let ok: Vec<&&CellResult> = mine.iter().filter(|c| c.error.is_none()).collect();
        let (mut checks_total, mut checks_passed) = (0usize, 0usize);
        for c in &ok {
            if let Some(a) = c.attempts.first() {
                checks_total += a.checks.len();
                checks_passed += a.checks.iter().filter(|r| r.passed).count();
            }
        }
        let mean = |f: &dyn Fn(&CellResult) -> f64| {
            if ok.is_empty() {
                0.0
            } else {
                ok.iter().map(|c| f(c)).sum::<f64>() / ok.len() as f64
            }
        };
        variants.push(VariantSummary {
            variant: vname.clone(),
            cases: mine.len(),
            passed_first: mine.iter().filter(|c| c.passed_first).count(),
            passed: mine.iter().filter(|c| c.passed).count(),
            check_pass_rate: if checks_total == 0 {
                0.0
            } else {
                checks_passed as f64 / checks_total as f64
            },
            mean_attempts: mean(&|c| c.attempts.len() as f64),
            mean_prompt_tokens: mean(&|c| c.prompt_tokens as f64),
            errors: mine.len() - ok.len(),
        });
    }
    Ok(EvalReport {
        generator: generator.name(),
        max_attempts: opts.max_attempts,
        length_unit: counter.unit().to_string(),
        variants,
        cells,
    })
}

impl EvalReport {
    /// A markdown comparison: one row per variant, then a variant x case grid
    /// (`pass@1` / `pass after re-ask` / error per cell).
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "Generator: {}; up to {} attempt{} per case.\n\n",
            self.generator,
            self.max_attempts,
            if self.max_attempts == 1 { "" } else { "s" }
        );
        s.push_str(&format!(
            "| variant | pass@1 | pass (with re-ask) | checks passed @1 | mean attempts | mean prompt {} | errors |\n",
            self.length_unit
        ));
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for v in &self.variants {
            s.push_str(&format!(
                "| {} | {}/{} | {}/{} | {:.0}% | {:.2} | {:.1} | {} |\n",
                v.variant,
                v.passed_first,
                v.cases,
                v.passed,
                v.cases,
                v.check_pass_rate * 100.0,
                v.mean_attempts,
                v.mean_prompt_tokens,
                v.errors
            ));
        }
        let mut case_names: Vec<&str> = Vec::new();
        for c in &self.cells {
            if !case_names.contains(&c.case.as_str()) {
                case_names.push(&c.case);
            }
        }
        let by: BTreeMap<(&str, &str), &CellResult> = self
            .cells
            .iter()
            .map(|c| ((c.variant.as_str(), c.case.as_str()), c))
            .collect();
        s.push_str(&format!("\n| variant | {} |\n", case_names.join(" | ")));
        s.push_str(&format!("|---|{}\n", "---|".repeat(case_names.len())));
        for v in &self.variants {
            let cols: Vec<String> = case_names
                .iter()
                .map(|c| match by.get(&(v.variant.as_str(), *c)) {
                    Some(cell) if cell.error.is_some() => "error".to_string(),
                    Some(cell) if cell.passed_first => "pass".to_string(),
                    Some(cell) if cell.passed => format!("pass after {}", cell.attempts.len()),
                    Some(cell) => {
                        let failed = cell
                            .attempts
                            .last()
                            .map_or(0, |a| a.checks.iter().filter(|r| !r.passed).count());
                        format!(
                            "fail ({failed} check{})",
                            if failed == 1 { "" } else { "s" }
                        )
                    }
                    None => "-".to_string(),
                })
                .collect();
            s.push_str(&format!("| {} | {} |\n", v.variant, cols.join(" | ")));
        }
        let errors: Vec<&CellResult> = self.cells.iter().filter(|c| c.error.is_some()).collect();
        if !errors.is_empty() {
            s.push_str("\nErrors:\n");
            for c in errors {
                s.push_str(&format!(
                    "- {} / {}: {}\n",
                    c.variant,
                    c.case,
                    c.error.as_deref().unwrap_or_default()
                ));
            }
        }
        s
    }
}
