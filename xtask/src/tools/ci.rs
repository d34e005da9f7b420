//! `cargo xtask ci`: the same checks as `.ci/run`, cheapest first, and the
//! configurations the suite must also pass in (thread counts, gemm without its
//! AVX-512 kernels), which is how a tolerance fitted to one machine is caught.

use anyhow::{bail, Result};
use clap::Parser;
use std::process::Command;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask ci",
    about = "fmt check, clippy -D warnings, the libraries' docs with warnings denied, then `cargo test --workspace`"
)]
struct Args {
    /// Run the tests with this many threads (RAYON_NUM_THREADS), 1 to 1024.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Build without gemm's AVX-512 kernels (RUSTFLAGS="--cfg kiln_no_avx512",
    /// in target/no-avx512 so the usual build is kept): on an AVX-512 CPU the
    /// suite then runs on the AVX2 kernels, whose sums round differently.
    #[arg(long)]
    no_avx512: bool,
    /// Skip fmt, clippy and docs; run only the tests.
    #[arg(long)]
    tests_only: bool,
}

/// The libraries' docs, built as docs.rs would, with rustdoc's warnings
/// (broken intra-doc links, links to private items) denied. xtask is left
/// out: its doc comments are clap's `--help` text (`<seed>` is a
/// placeholder there, not HTML).
const DOC_STEP: &[&str] = &["doc", "--workspace", "--no-deps", "--exclude", "xtask"];

/// Runs fmt check, clippy with warnings denied, the libraries' docs, then
/// the test suite.
pub fn run(args: &[String]) -> Result<()> {
    let a = Args::try_parse_from(std::iter::once("ci".to_string()).chain(args.iter().cloned()))?;
    let mut steps: Vec<&[&str]> = Vec::new();
    if !a.tests_only {
        steps.push(&["fmt", "--all", "--", "--check"]);
        steps.push(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        steps.push(DOC_STEP);
    }
    steps.push(&["test", "--workspace"]);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for step in steps {
        let mut cmd = Command::new(&cargo);
        cmd.args(step);
        let mut env = Vec::new();
        if step == DOC_STEP {
            env.push(("RUSTDOCFLAGS".to_string(), "-D warnings".to_string()));
        }
        if let Some(t) = a.threads {
            env.push(("RAYON_NUM_THREADS".to_string(), t.to_string()));
        }
        if a.no_avx512 {
            env.extend(super::toolkit::no_avx512_env().map(|(k, v)| (k.to_string(), v)));
        }
        let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v:?} ")).collect();
        eprintln!("==> {}cargo {}", shown.concat(), step.join(" "));
        let status = cmd.envs(env).status()?;
        if !status.success() {
            bail!("`cargo {}` failed ({status})", step.join(" "));
        }
    }
    eprintln!("ci: all checks passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_are_range_checked() {
        let parse =
            |v: &[&str]| Args::try_parse_from(std::iter::once("ci").chain(v.iter().copied()));
        assert!(parse(&["--threads", "0"]).is_err());
        assert!(parse(&["--threads", "1025"]).is_err());
        let a = parse(&["--threads", "4", "--no-avx512", "--tests-only"]).unwrap();
        assert_eq!(a.threads, Some(4));
        assert!(a.no_avx512 && a.tests_only);
    }
}
