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
