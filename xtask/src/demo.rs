//! `cargo xtask demo`: every component's main job on embedded data, no download.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

use crate::parts::{int_in, threads_flag, Component, DemoCtx};

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Run kiln's main jobs on embedded data (no download)"
)]
struct Args {
    /// Run only these parts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Output folder (default: runs/demo-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Random seed.
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, u64::MAX))]
    seed: u64,
    /// CPU threads (default: all cores; at most 4 per logical core).
    #[arg(long, value_parser = threads_flag())]
    threads: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Runs the selected demo parts in order.
pub fn run(args: &[String], components: &[Component]) -> Result<()> {
    let a: Args = crate::parts::parse("cargo xtask demo", args)?;
    if let Some(t) = a.threads {
        kiln_core::device::set_threads(t)?;
    }
    let device = kiln_core::device::device(&a.device)?;
    let parts: Vec<_> = components.iter().flat_map(|c| c.demos.iter()).collect();
    for o in &a.only {
        if !parts.iter().any(|p| p.name == o) {
            let names: Vec<_> = parts.iter().map(|p| p.name).collect();
            bail!("unknown demo part {o:?}; parts: {}", names.join(", "));
        }
    }
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("demo-{}", kiln_core::run::timestamp()))
    });
    if out.exists() && !out.is_dir() {
        bail!("demo: --out {} is a file, not a folder", out.display());
    }
    // Each part writes OUT/<part>; refuse before any part runs rather than
    // fail halfway with a trainer's advice (--resume, --overwrite) that the
    // demo does not take.
    let taken: Vec<String> = parts
        .iter()
        .filter(|p| a.only.is_empty() || a.only.iter().any(|o| o == p.name))
        .map(|p| out.join(p.name))
        .filter(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()) || d.is_file())
        .map(|d| d.display().to_string())
        .collect();
    if !taken.is_empty() {
        let verb = if taken.len() == 1 { "holds" } else { "hold" };
        bail!(
            "demo: {} already {verb} an earlier demo's output; choose a new --out (the default \
             is a new runs/demo-<timestamp>) or remove it first",
            taken.join(", ")
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("demo: creating {}", out.display()))?;
    let ctx = DemoCtx {
        out: out.clone(),
        seed: a.seed,
        device,
        quiet: a.quiet,
    };
    let t0 = Instant::now();
    for p in parts {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == p.name) {
            continue;
        }
        eprintln!("==> demo {}: {}", p.name, p.about);
        let t = Instant::now();
        (p.run)(&ctx)?;
        crate::parts::stop_demo_if_interrupted(&ctx, p.name);
        eprintln!("    {} done in {:.1}s", p.name, t.elapsed().as_secs_f64());
    }
    eprintln!("demo finished in {:.1}s", t0.elapsed().as_secs_f64());
    println!("{}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::parts::assert_numeric_flags_checked;

    #[test]
    fn every_numeric_flag_is_range_checked() {
        assert_numeric_flags_checked::<Args>("cargo xtask demo", None, &[]);
        let parse = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            crate::parts::parse::<Args>("cargo xtask demo", &a)
        };
        let e = parse(&["--threads", "100000"]).unwrap_err().to_string();
        assert!(
            e.contains("--threads") && e.contains("expected an integer in 1..="),
            "{e}"
        );
        for bad in [&["--threads", "0"][..], &["--seed", "-1"], &["--seed", "x"]] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad[0]) && e.contains("expected"), "{bad:?}: {e}");
        }
        let a = parse(&["--threads", "2", "--seed", "7"]).unwrap();
        assert_eq!((a.threads, a.seed), (Some(2), 7));
    }

    /// A second demo into the same --out is refused before any part runs,
    /// naming the part's folder and without advice the demo cannot take.
    #[test]
    fn an_earlier_demos_output_is_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d");
        std::fs::create_dir_all(out.join("vae")).unwrap();
        std::fs::write(out.join("vae/metrics.jsonl"), "{}\n").unwrap();
        let args = |only: &str| -> Vec<String> {
            ["--only", only, "--out", out.to_str().unwrap(), "--quiet"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let e = run(&args("core,vae"), &crate::parts::all())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vae already holds an earlier demo's output") && !e.contains("--resume"),
            "{e}"
        );
        // Nothing ran: the core part's folder was not made.
        assert!(!out.join("core").exists());
        // A part whose folder is free still runs.
        run(&args("prompt"), &crate::parts::all()).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let a: Vec<String> = ["--only", "prompt", "--out", file.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = run(&a, &crate::parts::all()).unwrap_err().to_string();
        assert!(e.contains("is a file, not a folder"), "{e}");
    }
}
