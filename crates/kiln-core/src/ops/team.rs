//! A fork-join team whose threads spin between calls, for the many short
//! parallel loops of token-by-token decoding.
//!
//! A decode step runs ~60 parallel loops (four matrix-vector products and one
//! attention per GPT-2 layer), each 20-300 µs. Between two of them rayon's idle
//! worker goes to sleep, and waking it costs more than the loop saves: on a
//! two-core KVM guest (Zen 4) an empty two-task rayon loop took 19-25 µs
//! after a 5-50 µs pause and 46-75 µs after 100-200 µs, against 1.1 µs for
//! this team, whose helpers spin (yielding the core to any other runnable
//! thread) for [`SPIN`] after each loop before they sleep. OpenMP's runtimes,
//! under PyTorch, do the same.
//!
//! One caller at a time has the team; a call made while it is busy (another
//! thread's loop, or a loop inside a loop) runs on rayon instead, so results
//! never wait on each other. The team has as many threads as the caller's
//! rayon pool (the caller plus `rayon::current_num_threads() - 1` helpers),
//! at most one per logical core.
//! Tasks are taken in any order by any thread, so a task's result must not
//! depend on which thread runs it, as with rayon.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins after its last loop before it sleeps: longer than
/// the pauses between a decode step's loops and between two steps.
pub const SPIN: Duration = Duration::from_millis(2);

/// The most helpers the team starts (the count of joined helpers has 16 bits).
const MAX_HELPERS: usize = 255;

/// `ctl` holds the loop's generation above [`OPEN`], the open flag, and below
/// it how many helpers joined the loop. A helper joins with a compare-exchange
/// on the whole word, so it joins only the loop it saw open.
const OPEN: usize = 1 << 16;
const GENERATION: usize = OPEN << 1;

/// One loop: its task function and task count.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    ctl: AtomicUsize,
    /// The open loop's [`Job`], valid while `ctl` has [`OPEN`] and until
    /// every joined helper has counted itself in `left`.
    job: AtomicPtr<Job<'static>>,
    /// Helpers with an index below this may join the open loop.
    allowed: AtomicUsize,
    /// The next task index to take.
    next: AtomicUsize,
    /// Joined helpers that have finished the loop.
    left: AtomicUsize,
    /// A panic from a helper's task, raised again on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Whether each helper is (about to be) parked.
    asleep: Vec<AtomicBool>,
    /// Raised by [`rest`]: helpers that see a new count sleep at once.
    rest: AtomicUsize,
}

struct Team {
    shared: &'static Shared,
    /// The helpers' handles; holding the lock is having the team.
    helpers: Mutex<Vec<Thread>>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            ctl: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            allowed: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            left: AtomicUsize::new(0),
            panic: Mutex::new(None),
            asleep: (0..MAX_HELPERS).map(|_| AtomicBool::new(false)).collect(),
            rest: AtomicUsize::new(0),
        }));
        Team {
            shared,
            helpers: Mutex::new(Vec::new()),
        }
    })
}

/// Logical cores: the team never has more threads, since a helper spinning
/// beside another thread on one core only slows both (rayon's pool may be
/// larger, up to `device::MAX_THREADS_PER_CORE` per core).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Takes task indices until none are left; stops at the first panic.
fn take_tasks(s: &Shared, job: &Job<'_>) -> Result<(), Box<dyn Any + Send>> {
    catch_unwind(AssertUnwindSafe(|| loop {
        let k = s.next.fetch_add(1, Ordering::Relaxed);
        if k >= job.tasks {
            break;
        }
        (job.f)(k);
    }))
}

/// Spins a little, then yields the core, so that a waiting thread never
/// holds a core another runnable thread needs.
fn pause(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(32) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn helper(s: &'static Shared, index: usize) {
    let mut seen = 0usize;
    let mut rested = s.rest.load(Ordering::SeqCst);
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let c = s.ctl.load(Ordering::SeqCst);
        let fresh = c & OPEN != 0 && c / GENERATION != seen;
        if fresh {
            seen = c / GENERATION;
            let mut joined = false;
            if index < s.allowed.load(Ordering::SeqCst) {
                let mut cur = c;
                // Another helper joining changes the count: try again while
                // this loop is still the open one.
                loop {
                    match s
                        .ctl
                        .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
                    {
                        Ok(_) => {
                            joined = true;
                            break;
                        }
                        Err(now) if now & OPEN != 0 && now / GENERATION == seen => cur = now,
                        Err(_) => break,
                    }
                }
            }
            if joined {
                // SAFETY: the caller keeps the job alive until every helper
                // that joined has counted itself in `left`, below.
                let job = unsafe { &*s.job.load(Ordering::SeqCst) };
                if let Err(p) = take_tasks(s, job) {
                    let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(p);
                }
                s.left.fetch_add(1, Ordering::SeqCst);
            }
            idle_since = Instant::now();
            continue;
        }
        // The clock and the rest count are read on every 32nd spin only
        // (with the yield), not on each: a clock read per spin showed in
        // decode profiles.
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(32) {
            std::hint::spin_loop();
            continue;
        }
        let rest = s.rest.load(Ordering::SeqCst);
        if rest == rested && idle_since.elapsed() < SPIN {
            std::thread::yield_now();
            continue;
        }
        rested = rest;
        // Sleep. The caller stores `ctl` and then reads `asleep`; this thread
        // stores `asleep` and then reads `ctl` (all sequentially consistent),
        // so either it sees the new loop or the caller sees it asleep and
        // unparks it.
        s.asleep[index].store(true, Ordering::SeqCst);
        let c = s.ctl.load(Ordering::SeqCst);
        if !(c & OPEN != 0 && c / GENERATION != seen) {
            std::thread::park();
        }
        s.asleep[index].store(false, Ordering::SeqCst);
        idle_since = Instant::now();
    }
}

/// Runs `f(0)`, ..., `f(tasks - 1)`, each once, on the calling thread and the
/// team's helpers, and returns when all are done. A panic in a task is raised
/// again here, after the other threads have stopped.
pub fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = rayon::current_num_threads()
        .min(cores())
        .min(tasks)
        .min(MAX_HELPERS + 1);
    if threads <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    let t = team();
    let mut helpers = match t.helpers.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => {
            (0..tasks).into_par_iter().for_each(f);
            return;
        }
    };
    let s = t.shared;
    while helpers.len() < threads - 1 {
        let index = helpers.len();
        let spawned = std::thread::Builder::new()
            .name(format!("kiln-team-{index}"))
            .spawn(move || helper(s, index));
        match spawned {
            Ok(h) => helpers.push(h.thread().clone()),
            Err(_) => break,
        }
    }
    let allowed = helpers.len().min(threads - 1);
    let job = Job { f, tasks };
    s.next.store(0, Ordering::SeqCst);
    s.left.store(0, Ordering::SeqCst);
    s.allowed.store(allowed, Ordering::SeqCst);
    // The pointer outlives its scope only in `job`'s type: every helper that
    // reads it has finished with it before this function returns.
    s.job.store(
        (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut(),
        Ordering::SeqCst,
    );
    let generation = s.ctl.load(Ordering::SeqCst) / GENERATION + 1;
    s.ctl
        .store((generation * GENERATION) | OPEN, Ordering::SeqCst);
    for (h, thread) in helpers.iter().enumerate().take(allowed) {
        if s.asleep[h].load(Ordering::SeqCst) {
            thread.unpark();
        }
    }
    let mine = take_tasks(s, &job);
    // Close the loop to late helpers, then wait for the ones that joined.
    let joined = s.ctl.fetch_and(!OPEN, Ordering::SeqCst) & (OPEN - 1);
    let mut spins = 0u32;
    while s.left.load(Ordering::SeqCst) < joined {
        pause(&mut spins);
    }
    let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(helpers);
    if let Err(p) = mine {
        resume_unwind(p);
    }
    if let Some(p) = theirs {
        resume_unwind(p);
    }
}

/// Sends the team's helpers to sleep now instead of after [`SPIN`], and
/// waits (up to 5 ms) until they are, so that work on other threads
/// has the cores to itself: the decode benchmark's bandwidth probe calls it,
/// lest a spinning helper slow the probe's threads. Returns at once while
/// another thread has the team.
pub fn rest() {
    let t = team();
    let Ok(helpers) = t.helpers.try_lock() else {
        return;
    };
    let s = t.shared;
    s.rest.fetch_add(1, Ordering::SeqCst);
    let start = Instant::now();
    let mut spins = 0u32;
    while !(0..helpers.len()).all(|h| s.asleep[h].load(Ordering::SeqCst))
        && start.elapsed() < Duration::from_millis(5)
    {
        pause(&mut spins);
    }
}

/// Splits `data` into chunks of `chunk` elements (the last may be shorter)
/// and runs `f(index, chunk)` on each, in parallel on the team, as rayon's
/// `par_chunks_mut(chunk).enumerate().for_each(..)`.
///
/// ```
/// let mut v = vec![0usize; 10];
/// kiln_core::ops::team::chunks_mut(&mut v, 4, |i, c| c.iter_mut().for_each(|x| *x = i));
/// assert_eq!(v, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
/// ```
///
/// # Panics
/// If `chunk` is 0 and `data` is not empty, or when a call of `f` panics.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if data.is_empty() {
        return;
    }
    assert!(chunk > 0, "team::chunks_mut: chunk size must be positive");
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    run(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: each index runs once, and index `i` owns the disjoint
        // range `start..start + n` of `data`, which outlives the call.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, part);
    });
}

/// `f(0)`, ..., `f(tasks - 1)` computed in parallel on the team, in index order.
///
/// ```
/// let squares = kiln_core::ops::team::map(5, |i| i * i);
/// assert_eq!(squares, [0, 1, 4, 9, 16]);
/// ```
pub fn map<R: Send>(tasks: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..tasks).map(|_| None).collect();
    chunks_mut(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter()
        .map(|r| r.expect("every task ran"))
        .collect()
}

/// A raw pointer shared by the tasks of one [`chunks_mut`] call.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    /// Reads the pointer through `&self`, so a closure captures the whole
    /// (Sync) wrapper rather than its raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the tasks write disjoint ranges, and `T: Send` lets each range
// move to the thread that runs its task.
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// The tests share the one team; those that look at its helpers' state
    /// run alone, so that another test's loop cannot wake them meanwhile.
    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let _one = one_at_a_time();
        for tasks in [0usize, 1, 2, 3, 17, 1000] {
            for _ in 0..200 {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                run(tasks, &|k| {
                    hits[k].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn helpers_take_tasks_and_finish_them_before_run_returns() {
        let _one = one_at_a_time();
        if rayon::current_num_threads().min(cores()) < 2 {
            return;
        }
        // Slow tasks, so a helper joins; on a loaded machine it may not, so
        // one of 50 loops must show a second thread.
        let mut shared = false;
        for _ in 0..50 {
            let ran: Vec<Mutex<Option<std::thread::ThreadId>>> =
                (0..8).map(|_| Mutex::new(None)).collect();
            run(8, &|k| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(300) {
                    std::hint::spin_loop();
                }
                *ran[k].lock().expect("no panic") = Some(std::thread::current().id());
            });
            let ids: Vec<_> = ran
                .iter()
                .map(|r| {
                    r.lock()
                        .expect("no panic")
                        .expect("task done when run returns")
                })
                .collect();
            shared |= ids.iter().any(|&i| i != std::thread::current().id());
            if shared {
                break;
            }
        }
        assert!(shared, "no helper took a task in 50 loops");
    }

    #[test]
    fn the_team_has_at_most_one_thread_per_core() {
        let _one = one_at_a_time();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores() + 2)
            .build()
            .expect("a pool larger than the machine");
        let ids = Mutex::new(std::collections::HashSet::new());
        pool.install(|| {
            for _ in 0..20 {
                run(16, &|_| {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(200) {
                        std::hint::spin_loop();
                    }
                    ids.lock()
                        .expect("no panic")
                        .insert(std::thread::current().id());
                });
            }
        });
        let n = ids.into_inner().expect("no panic").len();
        assert!(
            (1..=cores()).contains(&n),
            "{n} threads ran tasks on {} cores",
            cores()
        );
    }

    #[test]
    fn loops_after_the_helpers_sleep_still_run_every_task() {
        let _one = one_at_a_time();
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            assert_eq!(map(64, |i| i + 1), (1..=64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn concurrent_and_nested_callers_get_their_own_results() {
        let _one = one_at_a_time();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for r in 0..100 {
                        // A loop inside a loop finds the team busy and runs on rayon.
                        let got = map(8, |i| map(5, |j| t * 1000 + r + i * 10 + j));
                        for (i, row) in got.iter().enumerate() {
                            let want: Vec<_> = (0..5).map(|j| t * 1000 + r + i * 10 + j).collect();
                            assert_eq!(row, &want);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no caller panicked");
        }
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_goes_on() {
        let _one = one_at_a_time();
        for bad in [0usize, 7, 63] {
            let r = catch_unwind(|| {
                run(64, &|k| {
                    if k == bad {
                        panic!("task {k} failed");
                    }
                })
            });
            let msg = r.expect_err("the panic comes back");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("task {bad} failed"));
            assert_eq!(map(10, |i| 2 * i)[9], 18);
        }
    }

    #[test]
    fn one_thread_pools_run_in_order_on_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        let order = Mutex::new(Vec::new());
        pool.install(|| {
            let me = std::thread::current().id();
            run(6, &|k| {
                assert_eq!(std::thread::current().id(), me);
                order.lock().expect("no panic").push(k);
            })
        });
        assert_eq!(order.into_inner().expect("no panic"), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn rest_puts_the_helpers_to_sleep_and_the_next_loop_wakes_them() {
        let _one = one_at_a_time();
        assert_eq!(map(4, |i| i)[3], 3);
        rest();
        let t = team();
        let helpers = t.helpers.lock().expect("no panic").len();
        assert!(helpers >= 1 || rayon::current_num_threads().min(cores()) == 1);
        // rest() waits a few milliseconds at most; a loaded machine may run
        // a helper later than that.
        let start = Instant::now();
        while !(0..helpers).all(|i| t.shared.asleep[i].load(Ordering::SeqCst)) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "a helper never slept"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(map(100, |i| i * 3)[99], 297);
    }

    #[test]
    fn chunks_cover_the_slice_with_a_short_last_one() {
        let _one = one_at_a_time();
        let mut v = vec![0u32; 1001];
        chunks_mut(&mut v, 64, |i, c| {
            assert!(c.len() == 64 || (i == 15 && c.len() == 41));
            c.iter_mut().for_each(|x| *x += i as u32 + 1);
        });
        assert!(v.iter().enumerate().all(|(j, &x)| x == (j / 64) as u32 + 1));
        chunks_mut(&mut Vec::<u32>::new(), 0, |_, _| unreachable!());
    }
}
