//! `cargo xtask fuzz [TARGET] [--runs N] [--minutes M] [--install]`: runs the
//! cargo-fuzz targets of `fuzz/` (opt-in, not part of CI) and reports, for
//! each target, the runs done and the runs per second.
//!
//! It uses the machine's nightly toolchain where there is one, otherwise the
//! stable one with `RUSTC_BOOTSTRAP=1` (cargo-fuzz needs `-Z` flags).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const HELP: &str = "usage: cargo xtask fuzz [TARGET] [--runs N] [--minutes M] [--install] [--list]

Runs each fuzz target of fuzz/ (or only TARGET) until N runs (default 1000000)
or M minutes (default 20) have passed, whichever comes first, and reports the
runs done and the runs per second. Crashes are saved under fuzz/artifacts/TARGET/.
Needs cargo-fuzz (`cargo install cargo-fuzz`, or pass --install).";

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
struct Args {
    target: Option<String>,
    runs: u64,
    minutes: f64,
    install: bool,
    list: bool,
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut out = Args {
        target: None,
        runs: 1_000_000,
        minutes: 20.0,
        install: false,
        list: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--install" => out.install = true,
            "--list" => out.list = true,
            "--runs" => {
                let v = value("--runs")?;
                out.runs =
                    v.parse().ok().filter(|&n: &u64| n >= 1).with_context(|| {
                        format!("--runs expects a whole number >= 1, found {v:?}")
                    })?;
            }
            "--minutes" => {
                let v = value("--minutes")?;
                out.minutes = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| m.is_finite() && (0.02..=10_000.0).contains(m))
                    .with_context(|| {
                        format!("--minutes expects a number in 0.02..=10000, found {v:?}")
                    })?;
            }
            s if s.starts_with('-') => bail!("unknown flag {s:?}\n\n{HELP}"),
            s if out.target.is_none() => out.target = Some(s.to_string()),
            s => bail!("only one TARGET may be given (found {s:?} too)\n\n{HELP}"),
        }
    }
    Ok(Some(out))
}

/// The fuzz crate's folder (`fuzz/` at the repository root).
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("fuzz")
}

/// The target names: the file stems of `fuzz/fuzz_targets/*.rs`, sorted.
fn targets(dir: &Path) -> Result<Vec<String>> {
    let ft = dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&ft)
        .with_context(|| format!("reading {}", ft.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo` set up for cargo-fuzz: nightly where installed, else stable with
/// `RUSTC_BOOTSTRAP=1`. Returns the command and a word for the report.
fn cargo(dir: &Path) -> (Command, &'static str) {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS");
    if nightly {
        cmd.env("RUSTUP_TOOLCHAIN", "nightly");
        (cmd, "nightly")
    } else {
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .env("RUSTC_BOOTSTRAP", "1");
        (cmd, "stable with RUSTC_BOOTSTRAP=1")
    }
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What libFuzzer's final statistics say: runs done and seconds taken.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    runs: u64,
    secs: Option<f64>,
}

/// Reads `Done N runs in S second(s)` or `stat::number_of_executed_units: N`.
fn parse_stats(log: &str) -> Option<Stats> {
    let mut out = None;
    for line in log.lines() {
        if let Some(rest) = line.trim().strip_prefix("Done ") {
            let mut w = rest.split_whitespace();
            let runs = w.next().and_then(|n| n.parse().ok());
            let secs = w.nth(2).and_then(|s| s.parse().ok());
            if let Some(runs) = runs {
                out = Some(Stats { runs, secs });
            }
        } else if let Some(n) = line.trim().strip_prefix("stat::number_of_executed_units:") {
            if let (None, Ok(runs)) = (out, n.trim().parse()) {
                out = Some(Stats { runs, secs: None });
            }
        }
    }
    out
}

/// Runs the fuzz targets and prints one report line each.
pub fn run(args: &[String]) -> Result<()> {
    let Some(args) = parse_args(args)? else {
        println!("{HELP}");
        return Ok(());
    };
    let dir = fuzz_dir();
    let all = targets(&dir)?;
    if args.list {
        println!("{}", all.join("\n"));
        return Ok(());
    }
    let chosen: Vec<String> = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("unknown fuzz target {t:?}; targets: {}", all.join(", ")),
        None => all,
    };
    if !has_cargo_fuzz() {
        if !args.install {
            bail!(
                "cargo-fuzz is not installed: run `cargo install cargo-fuzz` \
                 (or `cargo xtask fuzz --install`), then try again"
            );
        }
        eprintln!("==> cargo install cargo-fuzz");
        let st = Command::new("cargo")
            .args(["install", "cargo-fuzz"])
            .status()?;
        if !st.success() {
            bail!("`cargo install cargo-fuzz` failed ({st})");
        }
    }
    let (mut build, toolchain) = cargo(&dir);
    eprintln!("==> cargo fuzz build ({toolchain})");
    build.args(["fuzz", "build"]);
    // One target asked for: build only it (each target links the whole parser stack).
    if let [one] = chosen.as_slice() {
        build.arg(one);
    }
    let st = build.status()?;
    if !st.success() {
        bail!("`cargo fuzz build` failed ({st}) in {}", dir.display());
    }
    let secs = (args.minutes * 60.0).ceil() as u64;
    let logs = dir.join("target").join("xtask-fuzz");
    std::fs::create_dir_all(&logs)?;
    let mut failed = Vec::new();
    println!(
        "{:<14} {:>10} {:>9} {:>10}  result",
        "target", "runs", "seconds", "runs/s"
    );
    for t in &chosen {
        let log_path = logs.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)?;
        let (mut cmd, _) = cargo(&dir);
        let seeds = dir.join("seeds").join(t);
        cmd.args(["fuzz", "run", t.as_str()]);
        // The corpus folder comes first (new inputs go there); seeds are read only.
        cmd.arg(dir.join("corpus").join(t));
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-runs={}", args.runs))
            .arg(format!("-max_total_time={secs}"))
            .arg("-timeout=30")
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1")
            .stdout(log.try_clone()?)
            .stderr(log);
        std::fs::create_dir_all(dir.join("corpus").join(t))?;
        let start = Instant::now();
        let st = cmd.status()?;
        let wall = start.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let stats = parse_stats(&text);
        let runs = stats.map_or(0, |s| s.runs);
        let took = stats.and_then(|s| s.secs).unwrap_or(wall).max(1e-3);
        let result = if st.success() {
            "ok".to_string()
        } else {
            failed.push(t.clone());
            format!(
                "CRASH ({st}): input in fuzz/artifacts/{t}/, log {}",
                log_path.display()
            )
        };
        println!(
            "{t:<14} {runs:>10} {took:>9.0} {:>10.0}  {result}",
            runs as f64 / took
        );
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets crashed: {}; reproduce with `cargo fuzz run TARGET fuzz/artifacts/TARGET/FILE` \
             in fuzz/, then commit the input as a regression test in the crate that owns the parser",
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flags_are_parsed_and_range_checked() {
        let a = parse_args(&args(&["idx", "--runs", "500", "--minutes", "0.5"]))
            .unwrap()
            .unwrap();
        assert_eq!(a.target.as_deref(), Some("idx"));
        assert_eq!((a.runs, a.minutes), (500, 0.5));
        let d = parse_args(&[]).unwrap().unwrap();
        assert_eq!((d.runs, d.minutes, d.target), (1_000_000, 20.0, None));
        for bad in [
            &["--runs", "0"][..],
            &["--runs", "-3"],
            &["--minutes", "nan"],
            &["--minutes"],
            &["a", "b"],
            &["--frobnicate"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn libfuzzer_final_stats_are_read() {
        let log = "#1000000\tDONE   cov: 12 ft: 34\nDone 1000000 runs in 42 second(s)\n\
                   stat::number_of_executed_units: 1000000\n";
        assert_eq!(
            parse_stats(log),
            Some(Stats {
                runs: 1_000_000,
                secs: Some(42.0)
            })
        );
        let only_stat = "stat::number_of_executed_units: 77\n";
        assert_eq!(
            parse_stats(only_stat),
            Some(Stats {
                runs: 77,
                secs: None
            })
        );
        assert_eq!(parse_stats("crash\n"), None);
    }

    #[test]
    fn every_target_file_is_listed() {
        let t = targets(&fuzz_dir()).unwrap();
        for name in [
            "idx",
            "mat",
            "checkpoint",
            "tar",
            "tokenizer",
            "prompt_spec",
        ] {
            assert!(t.iter().any(|x| x == name), "{name} in {t:?}");
        }
    }
}
