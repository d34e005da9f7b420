//! `cargo xtask`: kiln's pipelines (demo, train, eval, sample, bench, ci, and the
//! commands components register).

use anyhow::{bail, Result};

mod bench;
mod demo;
mod parts;
mod tools;

const USAGE: &str = "usage: cargo xtask <command> [args]

commands:";

/// The built-in commands as `(name, "ARGS  description")`, listed first.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "demo",
        "[--only PART,...] [--out DIR] [--quiet]  run the main jobs on embedded data",
    ),
    ("train", "<task> [args]  train a model (see `train --help`)"),
    ("eval", "<task> [args]  evaluate a run"),
    ("sample", "<task> [args]  sample from a run"),
    (
        "bench",
        "[NAME...] [--threads N] [--compare]  throughput benchmarks, one JSON line each",
    ),
];

/// Column at which the descriptions start.
const DESC_COLUMN: usize = 47;

/// One command of the usage: `help` is `"ARGS  description"` (two spaces
/// between them). The description starts at [`DESC_COLUMN`]; after a longer
/// name and arguments it goes on the next line, at the same column.
fn usage_line(name: &str, help: &str) -> String {
    let (args, desc) = help.split_once("  ").unwrap_or((help, ""));
    let head = format!("{name} {args}");
    if head.len() < DESC_COLUMN {
        format!("\n  {head:<DESC_COLUMN$}{desc}")
    } else {
        format!("\n  {head}\n  {:DESC_COLUMN$}{desc}", "")
    }
}

fn main() {
    if let Err(e) = run() {
        // clap reports --help and usage mistakes as errors; print them as clap would.
        if let Some(ce) = e.downcast_ref::<clap::Error>() {
            let _ = ce.print();
            let help = matches!(
                ce.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            std::process::exit(if help { 0 } else { 2 });
        }
        // Resuming a run that had already finished changes nothing: say so
        // and succeed, whichever trainer's error carries it.
        if let Some(f) = e
            .chain()
            .filter_map(|c| c.downcast_ref::<kiln_core::session::SessionError>())
            .find(|s| matches!(s, kiln_core::session::SessionError::Finished { .. }))
        {
            eprintln!("{f}");
            std::process::exit(0);
        }
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined with ": ", leaving out a cause whose text
/// the message already holds (library errors such as `checkpoint PATH: {io}`
/// print their source themselves and also expose it as the source).
fn error_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        // candle appends a captured backtrace to its message when
        // RUST_BACKTRACE is set: the message is for the user, keep it alone.
        let full = cause.to_string();
        let s = match full.find("\n   0: ") {
            Some(i) => full[..i].trim_end().to_string(),
            None => full,
        };
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// Lets a closed pipe end the process quietly, as it ends `cat` or `grep`
/// (`cargo xtask rlhf agreement DIR | head`): Rust ignores SIGPIPE, so
/// `println!` would panic with "failed printing to stdout: Broken pipe".
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at start, before any
    // thread or other handler exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run() -> Result<()> {
    default_sigpipe();
    // Reuse freed tensor buffers instead of mmap/munmap per op (see tune_allocator).
    kiln_core::device::tune_allocator();
    // The binary also runs without cargo (gpu-bundle, target/release/xtask),
    // where .cargo/config.toml's CANDLE_NUM_THREADS does not reach it.
    kiln_core::device::inline_elementwise();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().map(String::as_str) else {
        println!("{USAGE}{}", extra_usage());
        return Ok(());
    };
    let rest = &args[1..];
    let components = parts::all();
    match cmd {
        "demo" => demo::run(rest, &components),
        "bench" => bench::run(rest, &components),
        "train" | "eval" | "sample" => {
            let table: Vec<(&str, parts::Handler)> = components
                .iter()
                .flat_map(|c| match cmd {
                    "train" => c.train.clone(),
                    "eval" => c.eval.clone(),
                    _ => c.sample.clone(),
                })
                .collect();
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            if matches!(
                rest.first().map(String::as_str),
                Some("-h" | "--help" | "help")
            ) {
                println!(
                    "usage: cargo xtask {cmd} <task> [args]\ntasks: {}\n\n\
                     cargo xtask {cmd} <task> --help describes one.",
                    names.join(", ")
                );
                return Ok(());
            }
            let Some(task) = rest.first().filter(|t| !t.starts_with('-')) else {
                bail!(
                    "usage: cargo xtask {cmd} <task> [args]; tasks: {}",
                    names.join(", ")
                );
            };
            match table.iter().find(|(n, _)| n == task) {
                Some((_, h)) => h(&rest[1..]),
                None => bail!("unknown {cmd} task {task:?}; tasks: {}", names.join(", ")),
            }
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}{}", extra_usage());
            Ok(())
        }
        other => {
            if let Some((_, _, h)) = tools::ALL.iter().find(|(n, _, _)| *n == other) {
                return h(rest);
            }
            for c in &components {
                if let Some((_, _, h)) = c.commands.iter().find(|(n, _, _)| *n == other) {
                    return h(rest);
                }
            }
            bail!("unknown command {other:?}\n\n{USAGE}{}", extra_usage())
        }
    }
}

fn extra_usage() -> String {
    let mut s = String::new();
    for (name, help) in BUILT_IN {
        s.push_str(&usage_line(name, help));
    }
    for (name, help, _) in tools::ALL {
        s.push_str(&usage_line(name, help));
    }
    for c in parts::all() {
        for (name, help, _) in &c.commands {
            s.push_str(&usage_line(name, help));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command's description starts in the same column, on the
    /// command's line or, after long arguments, on the next one; every
    /// command is listed with a description.
    #[test]
    fn usage_lists_every_command_with_aligned_descriptions() {
        let text = extra_usage();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        let col = 2 + DESC_COLUMN;
        let pad = " ".repeat(col);
        let mut heads = 0;
        for (i, l) in lines.iter().enumerate() {
            if let Some(desc) = l.strip_prefix(&pad) {
                // A description under a long head: right after it.
                assert!(!desc.is_empty() && !desc.starts_with(' '), "{l:?}");
                assert!(i > 0 && !lines[i - 1].starts_with(&pad), "{l:?}");
                continue;
            }
            heads += 1;
            let next = lines.get(i + 1).copied().unwrap_or("");
            let inline =
                l.len() > col && l.as_bytes()[col - 1] == b' ' && l.as_bytes()[col] != b' ';
            assert!(inline || next.starts_with(&pad), "{l:?} has no description");
        }
        let commands = BUILT_IN.len()
            + tools::ALL.len()
            + parts::all().iter().map(|c| c.commands.len()).sum::<usize>();
        assert_eq!(heads, commands, "{text}");
        assert!(text.contains("\n  demo [--only PART,...] [--out DIR] [--quiet]"));
        assert_eq!(
            usage_line("x", "[--a]  does a"),
            format!("\n  x [--a]{}does a", " ".repeat(DESC_COLUMN - 7))
        );
    }

    /// A finished run's notice is found through a trainer's error wrapper.
    #[test]
    fn a_finished_session_is_found_in_a_trainers_error() {
        let f = kiln_core::session::SessionError::Finished {
            path: "R".into(),
            done: "1 of 1 epochs".into(),
        };
        let e = anyhow::Error::new(kiln_vae::VaeError::from(f));
        assert!(e
            .chain()
            .filter_map(|c| c.downcast_ref::<kiln_core::session::SessionError>())
            .any(|s| matches!(s, kiln_core::session::SessionError::Finished { .. })));
        assert_eq!(
            error_message(&e),
            "R already finished (1 of 1 epochs); nothing was changed. To train further, resume \
             it with a larger --epochs"
        );
        // Online RL counts iterations: the hint names their flag.
        let f = kiln_core::session::SessionError::Finished {
            path: "R".into(),
            done: "40 of 40 iterations".into(),
        };
        assert!(f
            .to_string()
            .ends_with("resume it with a larger --iterations"));
    }

    /// candle's errors carry a backtrace in their text when RUST_BACKTRACE
    /// is set; the user's message stops before it.
    #[test]
    fn a_backtrace_in_a_message_is_left_out() {
        let e = anyhow::anyhow!(
            "shape mismatch in matmul\n   0: candle_core::error::Error::bt\n   1: main"
        )
        .context("loading m");
        assert_eq!(error_message(&e), "loading m: shape mismatch in matmul");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file (os error 2)");
        let e = kiln_core::checkpoint::CheckpointError::Io {
            path: "run/checkpoints/healthy.safetensors".into(),
            source: io,
        };
        let e = anyhow::Error::new(e).context("sample gan");
        assert_eq!(
            error_message(&e),
            "sample gan: checkpoint run/checkpoints/healthy.safetensors: No such file (os error 2)"
        );
    }
}
