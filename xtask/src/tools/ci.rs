//! `cargo xtask ci`: the same checks as `.ci/run`, cheapest first.

use anyhow::{bail, Result};
use std::process::Command;

/// Runs fmt check, clippy with warnings denied, then the test suite.
pub fn run(_args: &[String]) -> Result<()> {
    let steps: [&[&str]; 3] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace"],
    ];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for step in steps {
        eprintln!("==> cargo {}", step.join(" "));
        let status = Command::new(&cargo).args(step).status()?;
        if !status.success() {
            bail!("`cargo {}` failed ({status})", step.join(" "));
        }
    }
    eprintln!("ci: all checks passed");
    Ok(())
}
