//! The `xtask` binary as a shell user meets it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Stdio};

/// `cargo xtask ... | head` closes the pipe early: the process ends as
/// `cat` does (killed by SIGPIPE), not with Rust's "failed printing to
/// stdout: Broken pipe" panic.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--help")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    const SIGPIPE: i32 = 13;
    assert_eq!(
        out.status.signal(),
        Some(SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}

/// `cargo xtask train --help` (and `eval`, `sample`) prints the tasks and
/// succeeds; it was an error with exit status 1.
#[test]
fn group_help_lists_the_tasks_and_succeeds() {
    for (group, task) in [("train", "simclr"), ("eval", "ssl"), ("sample", "gan")] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args([group, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{group}: {out:?}");
        assert!(
            text.contains(&format!("cargo xtask {group} <task>")) && text.contains(task),
            "{group}: {text}"
        );
    }
}
