//! `cargo xtask bench`: throughput benchmarks with the protocol and JSON keys of
//! `shared/bench/torch_reference.py` (warm-up steps, then timed steps).

use anyhow::{bail, Result};

use crate::parts::{BenchCtx, Component};

/// Runs the named benchmarks (all when none is named).
pub fn run(args: &[String], components: &[Component]) -> Result<()> {
    let mut names = Vec::new();
    let mut threads = 2usize;
    let mut steps = 200usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => threads = it.next().map(|s| s.parse()).transpose()?.unwrap_or(2),
            "--steps" => steps = it.next().map(|s| s.parse()).transpose()?.unwrap_or(200),
            "-h" | "--help" => {
                println!("usage: cargo xtask bench [NAME...] [--threads N] [--steps N]\n");
                println!("One JSON line per benchmark; all of them when no NAME is given:");
                for c in components {
                    for b in &c.benches {
                        println!("  {}", b.name);
                    }
                }
                return Ok(());
            }
            s if s.starts_with('-') => {
                bail!("unknown flag {s}; usage: bench [NAME...] [--threads N] [--steps N]")
            }
            s => names.push(s.to_string()),
        }
    }
    kiln_core::device::set_threads(threads)?;
    let benches: Vec<_> = components.iter().flat_map(|c| c.benches.iter()).collect();
    for n in &names {
        if !benches.iter().any(|b| b.name == n) {
            let all: Vec<_> = benches.iter().map(|b| b.name).collect();
            bail!("unknown benchmark {n:?}; benchmarks: {}", all.join(", "));
        }
    }
    let ctx = BenchCtx {
        threads,
        steps,
        warm: 20,
    };
    for b in benches {
        if names.is_empty() || names.iter().any(|n| n == b.name) {
            let line = (b.run)(&ctx)?;
            println!("{line}");
        }
    }
    Ok(())
}
