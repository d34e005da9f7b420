//! `device::tune_allocator` in a process of its own (its settings are
//! process-wide): a worker thread's large blocks are reused, not mapped and
//! faulted in afresh each time.
#![allow(clippy::unwrap_used, missing_docs)]

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_faults() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// A 200 MB block (a GPT-2 step's logits) on a worker thread, written in full
/// and freed, twice: glibc serves a block larger than a thread arena's 64 MiB
/// heaps with a fresh mapping unless every thread shares the main heap, and
/// then the second block faults in all ~49k pages again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_worker_threads_large_blocks_are_reused_not_faulted_in_again() {
    assert!(kiln_core::device::tune_allocator());
    let faults = std::thread::spawn(|| {
        let block = || {
            let mut v = vec![0u8; 200 << 20];
            // Write every page, as a kernel filling its output does.
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            std::hint::black_box(&v);
        };
        block();
        let before = thread_faults();
        block();
        thread_faults() - before
    })
    .join()
    .unwrap();
    // 51200 pages; a reused block faults in none of them.
    assert!(faults < 1000, "the second block took {faults} page faults");
}
