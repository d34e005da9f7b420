//! SIGTERM (`timeout`, systemd, Slurm's pre-emption) stops training as
//! Ctrl-C does, at the next step with a checkpoint, instead of killing the
//! process and losing the epoch. Its own test binary: the handler and the
//! stop flag are process-wide.
#![allow(clippy::unwrap_used, missing_docs)]

#[cfg(unix)]
#[test]
fn sigterm_asks_training_to_stop_like_ctrl_c() {
    assert!(kiln_core::observer::install_ctrlc());
    assert!(!kiln_core::observer::interrupted());
    // SAFETY: sends a signal to this process, whose handler was just installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    // The handler runs on ctrlc's own thread.
    let t = std::time::Instant::now();
    while !kiln_core::observer::interrupted() && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(kiln_core::observer::interrupted());
}
