//! How much memory the machine has available, and a check that a planned
//! allocation fits in it.
//!
//! Rust's allocator aborts the process when an allocation fails ("memory
//! allocation of N bytes failed"), with nothing that names the cause, and a
//! large allocation that does succeed may get the process killed later. The
//! places that allocate a model's largest buffers on the CPU (new variables
//! in [`crate::vars::VarStore`], an optimizer's moment buffers) check first
//! and return an error naming what needs the memory, how much, and how much
//! the machine has.
//!
//! Availability is Linux's `MemAvailable` (`/proc/meminfo`): what can be
//! allocated without swapping. Where it is unknown (another OS, a sandbox
//! without `/proc`) nothing is refused. To it is added what this process's
//! allocator holds free ([`free_heap`]): `tune_allocator` keeps freed
//! memory instead of handing it back, so a model dropped earlier in the
//! same process is not in `MemAvailable` but is reused. Swap is left out,
//! so a refusal can be wrong on a machine that relies on it: [`SKIP_ENV`]
//! set to `1` turns the checks off, and every refusal says so
//! ([`SKIP_HINT`]).
//!
//! ```
//! use kiln_core::memory::{check_fits_in, format_bytes};
//! assert!(check_fits_in("a buffer", 1 << 20, Some(1 << 30)).is_ok());
//! let e = check_fits_in("a buffer", 3 << 30, Some(1 << 30)).unwrap_err();
//! assert_eq!(
//!     e.to_string(),
//!     "not enough memory for a buffer: it needs 3.0 GiB, and this machine has 1.0 GiB available"
//! );
//! assert!(check_fits_in("a buffer", u64::MAX, None).is_ok()); // unknown: never refused
//! assert_eq!(format_bytes(1536 << 10), "1.5 MiB");
//! ```

/// A planned allocation that does not fit in the memory the machine has
/// available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not enough memory for {what}: it needs {}, and this machine has {} available",
    format_bytes(*needed),
    format_bytes(*available)
)]
pub struct OutOfMemory {
    /// What needs the memory (`variable fc.weight of shape [512, 3072]`).
    pub what: String,
    /// Bytes it needs.
    pub needed: u64,
    /// Bytes the machine has available.
    pub available: u64,
}

/// The environment variable that, set to `1`, turns the memory checks off
/// ([`available`] then reports `None`).
pub const SKIP_ENV: &str = "KILN_NO_MEMORY_CHECK";

/// The end of every refusal: how to try anyway.
pub const SKIP_HINT: &str = "KILN_NO_MEMORY_CHECK=1 skips this check (to use swap)";

/// The memory this machine has available for new allocations, in bytes:
/// `MemAvailable` in `/proc/meminfo` and what this process's allocator holds
/// free ([`free_heap`]), for many blocks (a training state, an optimizer's
/// buffers). `None` when unknown (not Linux, no `/proc`, a field missing),
/// in which case callers should not refuse.
pub fn available() -> Option<u64> {
    #[cfg(test)]
    if let Some(a) = test_hook::get() {
        return a;
    }
    Some(available_for_one_block()?.saturating_add(free_heap()))
}

/// [`available`] for one contiguous block (a variable): `MemAvailable`
/// alone, since the allocator's free memory is scattered in chunks that a
/// large block may not fit (it then grows the heap from the machine).
pub fn available_for_one_block() -> Option<u64> {
    #[cfg(test)]
    if let Some(a) = test_hook::get() {
        return a;
    }
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

/// Bytes this process's allocator holds free for reuse (glibc's
/// `mallinfo2().fordblks`, over every arena), 0 where unknown. Looked up at
/// run time: `mallinfo2` came with glibc 2.33, and linking it would keep
/// the binary from starting on older systems.
pub fn free_heap() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        match mallinfo2() {
            // SAFETY: mallinfo2 takes no arguments and only reads allocator state.
            Some(f) => unsafe { f() }.fordblks as u64,
            None => 0,
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// glibc's `mallinfo2`, when this glibc has it (2.33 and later).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mallinfo2() -> Option<unsafe extern "C" fn() -> libc::mallinfo2> {
    type MallInfo2 = unsafe extern "C" fn() -> libc::mallinfo2;
    static FIND: std::sync::OnceLock<Option<MallInfo2>> = std::sync::OnceLock::new();
    *FIND.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name only looks the symbol up.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallinfo2".as_ptr()) };
        // SAFETY: glibc's mallinfo2 has exactly this signature.
        (!sym.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut libc::c_void, MallInfo2>(sym) })
    })
}

/// `MemAvailable` from the text of `/proc/meminfo` (`MemAvailable:  24059820 kB`),
/// in bytes; `None` when the field is missing or malformed.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Checks that `needed` bytes for `what` fit in the memory this machine has
/// available ([`available`]); never refuses when that is unknown.
pub fn check_fits(what: &str, needed: u64) -> Result<(), OutOfMemory> {
    check_fits_in(what, needed, available())
}

/// [`check_fits`] against a given availability (`None`: unknown, never
/// refused), for callers that read it once for several checks, and for tests.
pub fn check_fits_in(what: &str, needed: u64, available: Option<u64>) -> Result<(), OutOfMemory> {
    match available {
        Some(available) if needed > available => Err(OutOfMemory {
            what: what.to_string(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// Bytes f32 training with Adam keeps per parameter: the weight, its
/// gradient and the two moments.
pub const TRAIN_BYTES_PER_PARAM: u64 = 16;

/// Checks, before a model is built, that training `params` f32 parameters
/// with Adam ([`TRAIN_BYTES_PER_PARAM`] each) fits in `available` bytes
/// (`None`: unknown, never refused). `model` names it in the message
/// (`this VAE at 1024x1024`). Activations come on top; this catches a model
/// that cannot fit at all, at once rather than after its first layers.
pub fn check_training_fits(
    model: &str,
    params: u64,
    available: Option<u64>,
) -> Result<(), OutOfMemory> {
    let what = format!(
        "training {model} ({} parameters: weights, gradients and Adam's two moments, \
         {TRAIN_BYTES_PER_PARAM} bytes each)",
        format_count(params)
    );
    check_fits_in(
        &what,
        params.saturating_mul(TRAIN_BYTES_PER_PARAM),
        available,
    )
}

/// A training run whose batches do not fit in the memory the machine has:
/// the model's fixed share (weights, gradients, optimizer state) plus the
/// activations of `batch` samples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not enough memory for training {model} on batches of {batch} {}: it needs about {} \
     ({} for weights, gradients and optimizer state, and {} of activations per {unit}), \
     and this machine has {} available",
    plural(unit, *batch),
    format_bytes(self.needed()),
    format_bytes(*fixed),
    format_bytes(*activations / (*batch).max(1)),
    format_bytes(*available)
)]
pub struct BatchTooLarge {
    /// The model (`this GPT-2 (4 layers of width 128)`).
    pub model: String,
    /// What one sample of a batch is (`block of 64 tokens`, `image`).
    pub unit: String,
    /// The planned batch size.
    pub batch: u64,
    /// Bytes that do not grow with the batch.
    pub fixed: u64,
    /// Bytes of the planned batch's activations.
    pub activations: u64,
    /// Bytes the machine has available.
    pub available: u64,
    /// The largest batch that fits (0: not even one sample).
    pub largest: u64,
}

impl BatchTooLarge {
    /// The bytes the planned batch needs.
    pub fn needed(&self) -> u64 {
        self.fixed.saturating_add(self.activations)
    }

    /// The largest batch that fits (0: not even one sample).
    pub fn largest_batch(&self) -> u64 {
        self.largest
    }
}

/// `unit` for `n` of them: its first word gets an `s` (`block of 64 tokens`
/// becomes `blocks of 64 tokens`).
fn plural(unit: &str, n: u64) -> String {
    if n == 1 {
        return unit.to_string();
    }
    match unit.split_once(' ') {
        Some((first, rest)) => format!("{first}s {rest}"),
        None => format!("{unit}s"),
    }
}

/// Checks, before a run starts, that training `model` on batches of `batch`
/// samples (`unit`: what one is) fits in `available` bytes (`None`:
/// unknown, never refused): `fixed` bytes for the weights and optimizer
/// state, and about `per_sample` bytes of activations for each sample. A
/// batch too large for the machine otherwise shows as the process being
/// killed in its first step, with no message.
///
/// ```
/// use kiln_core::memory::check_batch_fits;
/// let e = check_batch_fits("this VAE", "image", 1 << 30, 1 << 20, 4096, Some(3 << 30)).unwrap_err();
/// assert_eq!(e.largest_batch(), 2048);
/// assert!(e.to_string().starts_with("not enough memory for training this VAE on batches of 4096 images: it needs about 5.0 GiB"));
/// assert!(check_batch_fits("this VAE", "image", 1 << 30, 1 << 20, 2048, Some(3 << 30)).is_ok());
/// let e = check_batch_fits("a GPT-2", "block of 64 tokens", 0, 1 << 30, 8, Some(1 << 30)).unwrap_err();
/// assert!(e.to_string().contains("batches of 8 blocks of 64 tokens"));
/// assert!(e.to_string().contains("1.0 GiB of activations per block of 64 tokens"));
/// ```
pub fn check_batch_fits(
    model: &str,
    unit: &str,
    fixed: u64,
    per_sample: u64,
    batch: u64,
    available: Option<u64>,
) -> Result<(), BatchTooLarge> {
    check_batch_fits_by(
        model,
        unit,
        fixed,
        |b| per_sample.saturating_mul(b),
        batch,
        available,
    )
}

/// [`check_batch_fits`] with activations that need not grow linearly:
/// `activations(b)` is the bytes a batch of `b` holds (nondecreasing in
/// `b`), such as a contrastive loss's `b x b` similarities.
///
/// ```
/// use kiln_core::memory::check_batch_fits_by;
/// let quadratic = |b: u64| b * b;
/// let e = check_batch_fits_by("a model", "image", 0, quadratic, 100, Some(2500)).unwrap_err();
/// assert_eq!(e.largest_batch(), 50);
/// assert!(check_batch_fits_by("a model", "image", 0, quadratic, 50, Some(2500)).is_ok());
/// ```
pub fn check_batch_fits_by(
    model: &str,
    unit: &str,
    fixed: u64,
    activations: impl Fn(u64) -> u64,
    batch: u64,
    available: Option<u64>,
) -> Result<(), BatchTooLarge> {
    let Some(available) = available else {
        return Ok(());
    };
    let fits = |b: u64| fixed.saturating_add(activations(b)) <= available;
    if fits(batch) {
        return Ok(());
    }
    // The largest batch below `batch` that fits (activations grow with the
    // batch); 0 when none does.
    let (mut lo, mut hi) = (0u64, batch);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Err(BatchTooLarge {
        model: model.to_string(),
        unit: unit.to_string(),
        batch,
        fixed,
        activations: activations(batch),
        available,
        largest: lo,
    })
}

/// How far an activation estimate may lie from the peak a counting
/// allocator measured, as `estimate / measured`: never far under (a run
/// the check lets start would be killed), and not so far over that runs
/// which fit are refused.
pub const ESTIMATE_BAND: std::ops::RangeInclusive<f64> = 0.85..=1.3;

/// Compares an activation estimate (`estimate` bytes) with what a
/// [`CountingAllocator`] measured for the same work (`measured` bytes):
/// the line to print (`what: measured .. B, estimate .. B, ratio ..`), or
/// an error naming both when the ratio lies outside [`ESTIMATE_BAND`].
/// Each model's memory test calls it, so they share one band.
///
/// ```
/// use kiln_core::memory::compare_estimate;
/// assert!(compare_estimate("a VAE", 1100.0, 1000.0).is_ok());
/// let e = compare_estimate("a VAE", 500.0, 1000.0).unwrap_err();
/// assert!(e.contains("ratio 0.500"), "{e}");
/// ```
pub fn compare_estimate(what: &str, estimate: f64, measured: f64) -> Result<String, String> {
    let ratio = estimate / measured;
    let line =
        format!("{what}: measured {measured:.0} B, estimate {estimate:.0} B, ratio {ratio:.3}");
    if ESTIMATE_BAND.contains(&ratio) {
        Ok(line)
    } else {
        Err(format!(
            "{line}, outside {:.2} to {:.2}",
            ESTIMATE_BAND.start(),
            ESTIMATE_BAND.end()
        ))
    }
}

/// A byte count for people, with one decimal: `6.0 GiB`, `512.0 MiB`,
/// `12.5 KiB`, `100 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return format!("{:.1} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

/// A count with thousands separators: `1,611,137,024`.
pub fn format_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A global allocator that counts the bytes live in it and their peak:
/// what measures a training step's memory exactly, where the process's
/// resident size also moves with the allocator's caching and other
/// threads. Install it in a binary or test with `#[global_allocator]`;
/// it forwards to the system allocator.
///
/// ```
/// use kiln_core::memory::CountingAllocator;
/// // In a binary: #[global_allocator] static ALLOC: CountingAllocator = CountingAllocator::new();
/// static ALLOC: CountingAllocator = CountingAllocator::new();
/// ALLOC.reset_peak();
/// assert_eq!(ALLOC.current(), 0); // not installed here: nothing counted
/// ```
#[derive(Debug)]
pub struct CountingAllocator {
    current: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl CountingAllocator {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self {
            current: std::sync::atomic::AtomicU64::new(0),
            peak: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bytes allocated and not yet freed.
    pub fn current(&self) -> u64 {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`Self::reset_peak`].
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.current(), std::sync::atomic::Ordering::Relaxed);
    }

    fn grew(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.current.fetch_add(bytes as u64, Relaxed) + bytes as u64;
        self.peak.fetch_max(now, Relaxed);
    }

    fn shrank(&self, bytes: usize) {
        self.current
            .fetch_sub(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded to `System` with the caller's layout and
// pointer; the counters are only bookkeeping.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        self.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`; System keeps `ptr` valid when it fails.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.grew(new_size);
            self.shrank(layout.size());
        }
        p
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod heap_tests {
    /// Blocks freed while their neighbours live stay in the allocator's
    /// free lists (nothing to trim), and `free_heap` counts them.
    #[test]
    fn freed_blocks_are_counted_as_free_heap() {
        if super::mallinfo2().is_none() {
            return; // glibc before 2.33: no figure to check.
        }
        // 64 KiB blocks: under glibc's mmap threshold, so they come from
        // the heap, not from their own mappings.
        let mut blocks: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; 64 << 10]).collect();
        // Kept observable, so an optimised build makes them too.
        std::hint::black_box(&blocks);
        let before = super::free_heap();
        for b in blocks.iter_mut().step_by(2) {
            *b = Vec::new();
        }
        std::hint::black_box(&blocks);
        let after = super::free_heap();
        // 256 blocks of 64 KiB freed: 16 MiB; other tests' threads move
        // the figure by a little, never by half.
        assert!(after >= before + (8 << 20), "{before} -> {after}");
        drop(blocks);
    }
}

/// Tests set the availability [`available`] reports on their own thread, so
/// that checks are deterministic whatever machine runs them.
#[cfg(test)]
pub(crate) mod test_hook {
    use std::cell::Cell;

    thread_local! {
        static AVAILABLE: Cell<Option<Option<u64>>> = const { Cell::new(None) };
    }

    pub(super) fn get() -> Option<Option<u64>> {
        AVAILABLE.with(Cell::get)
    }

    /// Runs `f` with [`super::available`] reporting `available` on this thread.
    pub(crate) fn with_available<R>(available: Option<u64>, f: impl FnOnce() -> R) -> R {
        struct Reset(Option<Option<u64>>);
        impl Drop for Reset {
            fn drop(&mut self) {
                AVAILABLE.with(|a| a.set(self.0));
            }
        }
        let _reset = Reset(AVAILABLE.with(|a| a.replace(Some(available))));
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_request_that_fits_passes() {
        check_fits_in("the weights", GIB, Some(2 * GIB)).unwrap();
        check_fits_in("the weights", 2 * GIB, Some(2 * GIB)).unwrap();
        check_fits_in("nothing", 0, Some(0)).unwrap();
    }

    #[test]
    fn a_request_that_does_not_fit_is_refused_with_its_figures() {
        let e = check_fits_in("variable fc.weight", 13 * GIB / 2, Some(GIB + GIB / 5)).unwrap_err();
        assert_eq!(
            e,
            OutOfMemory {
                what: "variable fc.weight".into(),
                needed: 13 * GIB / 2,
                available: GIB + GIB / 5,
            }
        );
        assert_eq!(
            e.to_string(),
            "not enough memory for variable fc.weight: it needs 6.5 GiB, and this machine has \
             1.2 GiB available"
        );
        let e = check_fits_in("a buffer", 300 << 20, Some(100 << 20)).unwrap_err();
        assert!(
            e.to_string().contains("300.0 MiB") && e.to_string().contains("100.0 MiB"),
            "{e}"
        );
    }

    #[test]
    fn unknown_availability_never_refuses() {
        check_fits_in("everything", u64::MAX, None).unwrap();
        test_hook::with_available(None, || check_fits("everything", u64::MAX)).unwrap();
    }

    #[test]
    fn the_injected_availability_is_used_and_then_reset() {
        // (The machine's own figure moves between two readings: compare the
        // hook's state, not two live figures.)
        let e = test_hook::with_available(Some(GIB), || check_fits("x", 2 * GIB)).unwrap_err();
        assert_eq!(e.available, GIB);
        assert!(
            test_hook::get().is_none(),
            "the injected figure outlived its closure"
        );
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24683784 kB\nMemFree:        21092048 kB\n\
                    MemAvailable:   24059820 kB\nBuffers:          123 kB\n";
        assert_eq!(parse_meminfo(text), Some(24_059_820 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: 5 MB\n"), None);
    }

    #[test]
    fn sizes_and_counts_read_well() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(6_442_450_944), "6.0 GiB");
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1000), "1,000");
        assert_eq!(format_count(1_611_137_024), "1,611,137,024");
    }

    /// The largest batch is exact at the boundary, 0 when the fixed share
    /// alone does not fit, and sizes that overflow saturate instead of
    /// wrapping to a batch that seems to fit.
    #[test]
    fn the_largest_batch_that_fits_is_exact() {
        let e = check_batch_fits("m", "image", 100, 10, 50, Some(395)).unwrap_err();
        assert_eq!((e.largest_batch(), e.needed()), (29, 600));
        assert!(check_batch_fits("m", "image", 100, 10, 29, Some(390)).is_ok());
        assert!(check_batch_fits("m", "image", 100, 10, 30, Some(399)).is_err());
        let e = check_batch_fits("m", "image", 500, 10, 3, Some(400)).unwrap_err();
        assert_eq!(e.largest_batch(), 0);
        let e = check_batch_fits("m", "image", 0, u64::MAX / 2, 3, Some(1 << 40)).unwrap_err();
        assert_eq!((e.needed(), e.largest_batch()), (u64::MAX, 0));
        assert!(e.to_string().contains("on batches of 3 images"), "{e}");
        let one = check_batch_fits("m", "image", 0, 10, 1, Some(5)).unwrap_err();
        assert!(one.to_string().contains("on batches of 1 image:"), "{one}");
        // Unknown availability never refuses.
        assert!(check_batch_fits("m", "image", u64::MAX, u64::MAX, 9, None).is_ok());
    }
}
