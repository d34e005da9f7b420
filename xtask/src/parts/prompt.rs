//! kiln-prompt's commands and demo part:
//! `prompt eval DIR [--json] [--model DIR]`, `prompt render SPEC [--var k=v ...]`, and the
//! `prompt` demo (a prompt spec plus checked generation with the deterministic generator).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln_prompt::{
    evaluate, fit, generate_checked_with, parse_var_assignments, vars, Budget, ChatTemplate, Check,
    EvalOptions, EvalSuite, FitOptions, GenParams, Layout, PromptSpec, RuleGenerator,
    TextGenerator, TokenCounter, WordCounter,
};

use super::{float_in, int_in, Component, DemoPart};

/// Registers the `prompt` command and demo part.
pub fn component() -> Component {
    Component {
        demos: vec![DemoPart {
            name: "prompt",
            about: "prompt spec -> rendered prompt -> checked generation with re-asking, plus a 3-variant prompt evaluation",
            run: demo,
        }],
        commands: vec![(
            "prompt",
            "eval DIR [--json] [--model DIR] | render SPEC [--var k=v ...]  prompt specs",
            command,
        )],
        ..Default::default()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask prompt",
    about = "Prompt specs: render them, evaluate variants against checks"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every prompt variant (spec files in DIR) over the cases in DIR/cases.toml and print a
    /// comparison table.
    Eval {
        /// Folder with spec files (*.toml / *.json) and cases.toml (or cases.json).
        dir: PathBuf,
        /// Print the full report as JSON instead of markdown.
        #[arg(long)]
        json: bool,
        /// A kiln-lm model folder to generate with (default: the built-in deterministic generator).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Attempts per case (1 = no re-asking).
        #[arg(long, default_value_t = 2, value_parser = int_in(1usize, 100))]
        attempts: usize,
        /// Seed: the built-in generator's slips, and --model's sampling when --temperature > 0.
        #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
        seed: u64,
        /// --model's softmax temperature; 0 (the default) decodes greedily, so a table compares
        /// the prompts and not the draws.
        #[arg(long, default_value_t = 0.0, value_parser = float_in::<f32>("in [0, 100]", |x| (0.0..=100.0).contains(&x)))]
        temperature: f32,
        /// --model's nucleus sampling mass with --temperature > 0 (1 = off).
        #[arg(long, default_value_t = 1.0, value_parser = float_in::<f32>("in (0, 1]", |x| x > 0.0 && x <= 1.0))]
        top_p: f32,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1_000_000))]
        max_new_tokens: usize,
        /// Render prompts as chat: `chatml`, `llama-3.1`, a model folder, a tokenizer_config.json
        /// or a .jinja file.
        #[arg(long)]
        chat: Option<String>,
        /// Count prompt tokens with this tokenizer.json (default: whitespace words).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The built-in generator's slip rate on first attempts.
        #[arg(long, default_value_t = 0.3, value_parser = float_in::<f64>("in [0, 1]", |x| (0.0..=1.0).contains(&x)))]
        slip_rate: f64,
        /// Also write the JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a rendered prompt.
    Render {
        /// The spec file (.toml or .json).
        spec: PathBuf,
        /// A variable, NAME=VALUE or NAME=@FILE (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Render as chat with `chatml`, `llama-3.1`, a model folder, a tokenizer_config.json or
        /// a .jinja file.
        #[arg(long)]
        chat: Option<String>,
        /// Print the chat messages as JSON instead of text.
        #[arg(long)]
        messages: bool,
        /// Fit the prompt into this many tokens (cuts are reported on stderr).
        #[arg(long, value_parser = int_in(1usize, usize::MAX))]
        context_size: Option<usize>,
        /// Tokens kept free for the answer when fitting.
        #[arg(long, default_value_t = 0, value_parser = int_in(0usize, usize::MAX))]
        reserve: usize,
        /// Count tokens with this tokenizer.json (default: whitespace words).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
}

fn command(args: &[String]) -> Result<()> {
    let a: Args = super::parse("prompt", args)?;
    match a.cmd {
        Cmd::Eval {
            dir,
            json,
            model,
            attempts,
            seed,
            temperature,
            top_p,
            max_new_tokens,
            chat,
            tokenizer,
            slip_rate,
            out,
        } => {
            let suite = EvalSuite::load(&dir)?;
            let counter = counter(tokenizer.as_deref())?;
            let mut generator = generator(model.as_deref(), slip_rate)?;
            let opts = EvalOptions {
                max_attempts: attempts,
                params: GenParams {
                    seed,
                    max_new_tokens,
                    temperature,
                    top_p,
                    ..GenParams::default()
                },
                chat_template: chat.as_deref().map(chat_template).transpose()?,
            };
            let report = evaluate(&suite, generator.as_dyn(), counter.as_ref(), &opts)?;
            if let Some(w) = generator.context_warning() {
                eprintln!("warning: {w}");
            }
            let json_text = serde_json::to_string_pretty(&report)?;
            if let Some(p) = out {
                std::fs::write(&p, &json_text)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if json {
                println!("{json_text}");
            } else {
                print!("{}", report.to_markdown());
            }
            // As a test runner would: a cell that could not run (a case
            // missing a variable, a generator error) fails the command, so
            // a CI step does not pass on a table of errors.
            let errored = report.cells.iter().filter(|c| c.error.is_some()).count();
            if errored > 0 {
                bail!(
                    "prompt eval: {errored} of {} cells could not run (see the errors above)",
                    report.cells.len()
                );
            }
            Ok(())
        }
        Cmd::Render {
            spec,
            vars,
            chat,
            messages,
            context_size,
            reserve,
            tokenizer,
        } => {
            let path = spec;
            let spec = PromptSpec::load(&path)?;
            let mut vars = parse_var_assignments(&vars)?;
            for (name, value) in vars.iter_mut() {
                if let Some(path) = value.as_str().and_then(|v| v.strip_prefix('@')) {
                    let text = std::fs::read_to_string(path).with_context(|| {
                        format!("--var {name}=@{path}: reading the value's file")
                    })?;
                    *value = text.into();
                }
            }
            let bound = spec
                .bind(&vars)
                .with_context(|| format!("rendering {}", path.display()))?;
            let template = chat.as_deref().map(chat_template).transpose()?;
            let bound = match context_size {
                Some(n) => {
                    let counter = counter(tokenizer.as_deref())?;
                    let layout = template.as_ref().map_or(Layout::Text, Layout::Chat);
                    let f = fit(
                        &bound,
                        counter.as_ref(),
                        Budget::new(n, reserve),
                        layout,
                        &FitOptions::default(),
                    )?;
                    eprintln!(
                        "fitted to {} tokens (budget {}):",
                        f.tokens,
                        n.saturating_sub(reserve)
                    );
                    for c in &f.cuts {
                        eprintln!("  cut: {}", serde_json::to_string(c)?);
                    }
                    f.prompt
                }
                None => bound,
            };
            if messages {
                println!("{}", serde_json::to_string_pretty(&bound.messages())?);
            } else if let Some(t) = &template {
                print!("{}", bound.chat_text(t)?);
            } else {
                print!("{}", bound.text());
            }
            Ok(())
        }
    }
}

fn chat_template(s: &str) -> Result<ChatTemplate> {
    if Path::new(s).exists() {
        return Ok(ChatTemplate::from_path(s)?);
    }
    Ok(ChatTemplate::builtin(s)?)
}

fn counter(tokenizer: Option<&Path>) -> Result<Box<dyn TokenCounter>> {
    match tokenizer {
        Some(p) => {
            let t = kiln_prompt::tokenizers::Tokenizer::from_file(p)
                .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", p.display()))?;
            Ok(Box::new(t))
        }
        None => Ok(Box::new(WordCounter)),
    }
}

fn generator(model: Option<&Path>, slip_rate: f64) -> Result<Gen> {
    if let Some(m) = model {
        // A kiln-lm model: a Hugging Face GPT-2 folder or a `train lm` run.
        let dir = if m.join("config.toml").is_file() {
            m.join(kiln_lm::train::MODEL_DIR)
        } else {
            m.to_path_buf()
        };
        let files = kiln_lm::ModelFiles::from_dir(&dir)?;
        let model = kiln_lm::Gpt2::from_files(&files, &kiln_core::Device::Cpu)
            .with_context(|| format!("--model {}", m.display()))?;
        return Ok(Gen::Lm(Box::new(kiln_lm::LmGenerator::new(
            model,
            files.load_tokenizer()?,
            m.display().to_string(),
        ))));
    }
    Ok(Gen::Rule(RuleGenerator::new(slip_rate)))
}

/// The generator `prompt eval` runs: a kiln-lm model (whose answers cut by
/// its context are reported) or the built-in rule generator.
enum Gen {
    Lm(Box<kiln_lm::LmGenerator>),
    Rule(RuleGenerator),
}

impl Gen {
    fn as_dyn(&mut self) -> &mut dyn TextGenerator {
        match self {
            Gen::Lm(g) => g,
            Gen::Rule(g) => g,
        }
    }

    /// The warning about answers cut by the model's context, if any.
    fn context_warning(&self) -> Option<String> {
        match self {
            Gen::Lm(g) => g.context_cuts().warning(),
            Gen::Rule(_) => None,
        }
    }
}

const DEMO_FILES: [(&str, &str); 4] = [
    (
        "cases.toml",
        include_str!("../../../crates/kiln-prompt/examples/eval/cases.toml"),
    ),
    (
        "1-vague.toml",
        include_str!("../../../crates/kiln-prompt/examples/eval/1-vague.toml"),
    ),
    (
        "2-explicit.toml",
        include_str!("../../../crates/kiln-prompt/examples/eval/2-explicit.toml"),
    ),
    (
        "3-explicit-fewshot.toml",
        include_str!("../../../crates/kiln-prompt/examples/eval/3-explicit-fewshot.toml"),
    ),
];

/// The `prompt` demo part: writes under `<out>/prompt/`:
/// `spec.toml`, `prompt.txt`, `prompt.llama31.txt`, `attempts.json`, `eval/` (the example
/// suite), `eval.md` and `eval.json`.
fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let out = ctx.out.join("prompt");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    // 1. A spec, rendered as text and as Llama 3.1 chat.
    let spec =
        PromptSpec::from_toml_str(DEMO_FILES[2].1, "kiln-prompt/examples/eval/2-explicit.toml")?;
    let v = vars([
        ("topic", "variational autoencoders"),
        (
            "notes",
            "A variational autoencoder encodes each image as a mean and a log-variance over a small latent space. \
             New images come from decoding random latent vectors. Training balances reconstruction quality against \
             a KL penalty that keeps the latent space smooth.",
        ),
    ]);
    let bound = spec.bind(&v)?;
    std::fs::write(out.join("spec.toml"), spec.to_toml()?)?;
    std::fs::write(out.join("prompt.txt"), bound.text())?;
    std::fs::write(
        out.join("prompt.llama31.txt"),
        bound.chat_text(&ChatTemplate::llama31())?,
    )?;

    // 2. Checked generation: the format's own checks plus tests against hallucinated chatter.
    //    The stand-in generator always slips on its first attempt here, to show the re-ask.
    let mut checks = spec.checks()?;
    checks.push(Check::contains(["latent"])?);
    checks.push(Check::avoids(["Sure!", "as an AI"])?);
    let mut generator = RuleGenerator::new(1.0);
    let params = GenParams {
        seed: ctx.seed,
        ..GenParams::default()
    };
    let res = generate_checked_with(&mut generator, bound.text(), &checks, 4, &params)?;
    std::fs::write(
        out.join("attempts.json"),
        serde_json::to_string_pretty(&res)? + "\n",
    )?;
    if !ctx.quiet {
        for a in &res.attempts {
            let failed: Vec<String> = a
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.detail.clone().unwrap_or_default())
                .collect();
            if a.passed {
                eprintln!(
                    "    attempt {}: passed all {} checks",
                    a.number,
                    a.checks.len()
                );
            } else {
                eprintln!("    attempt {}: failed ({})", a.number, failed.join("; "));
            }
        }
    }
    if !res.passed() {
        eprintln!(
            "    checked generation did not pass within {} attempts (all kept in {})",
            res.attempts.len(),
            out.join("attempts.json").display()
        );
    }

    // 3. The example evaluation: three variants of one prompt over three cases.
    let eval_dir = out.join("eval");
    std::fs::create_dir_all(&eval_dir)?;
    for (name, text) in DEMO_FILES {
        std::fs::write(eval_dir.join(name), text)?;
    }
    let suite = EvalSuite::load(&eval_dir)?;
    let opts = EvalOptions {
        max_attempts: 2,
        params: GenParams {
            seed: ctx.seed,
            ..GenParams::default()
        },
        chat_template: None,
    };
    let report = evaluate(&suite, &mut RuleGenerator::default(), &WordCounter, &opts)?;
    let md = report.to_markdown();
    std::fs::write(out.join("eval.md"), &md)?;
    std::fs::write(
        out.join("eval.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if !ctx.quiet {
        for line in md.lines().take(7) {
            eprintln!("    {line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<Args>("prompt", Some("eval"), &["dir"]);
        assert_numeric_flags_checked::<Args>("prompt", Some("render"), &["spec.toml"]);
    }

    /// The example suite passes; with a case that lacks a variable every
    /// variant needs, its cells are errors and the command fails.
    #[test]
    fn an_evaluation_with_errored_cells_fails() {
        #![allow(clippy::unwrap_used)]
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/kiln-prompt/examples/eval");
        let dir = tempfile::tempdir().unwrap();
        kiln_core::files::copy_dir(&example, dir.path()).unwrap();
        let run = || {
            let args = ["eval".to_string(), dir.path().display().to_string()];
            command(&args)
        };
        run().unwrap();
        let cases = dir.path().join("cases.toml");
        let text = std::fs::read_to_string(&cases).unwrap();
        std::fs::write(
            &cases,
            format!("{text}\n[[cases]]\nname = \"bare\"\nvars = {{ topic = \"x\" }}\n"),
        )
        .unwrap();
        let e = run().unwrap_err().to_string();
        assert!(e.contains("3 of 12 cells could not run"), "{e}");
    }
}
