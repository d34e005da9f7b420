//! Device selection from a string (`cpu`, `cuda`, `cuda:N`, `auto`) and the CPU
//! thread count.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// Why a device could not be chosen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The string is not one of the accepted forms.
    #[error("unknown device {0:?}: expected `cpu`, `cuda` (also `gpu`: GPU 0), `cuda:N` (N = GPU index) or `auto`")]
    Parse(String),
    /// CUDA was asked for but this build has no CUDA support.
    #[error(
        "device {0:?} needs CUDA, but kiln was built without it: rebuild with `--features cuda` \
         (needs the CUDA toolkit), or use `--device cpu`"
    )]
    NoCudaSupport(String),
    /// CUDA support is compiled in, but the GPU could not be opened.
    #[error("device {spec:?}: could not open the GPU ({reason}); use `--device cpu` or `auto`")]
    CudaUnavailable {
        /// The requested device.
        spec: String,
        /// What candle reported.
        reason: String,
    },
    /// The thread count is outside `1..=max_threads()`.
    #[error(
        "thread count {threads} is out of range: expected 1..={max} (at most \
         {MAX_THREADS_PER_CORE} per logical core of this machine, which has {cores}, and never \
         more than {MAX_THREADS}); more threads than that only contend for the cores"
    )]
    ThreadCount {
        /// The requested number of threads.
        threads: usize,
        /// The largest count accepted here ([`max_threads`]).
        max: usize,
        /// The machine's logical cores.
        cores: usize,
    },
    /// The thread pool could not be configured.
    #[error("could not set the CPU thread count to {threads}: {reason}")]
    Threads {
        /// The requested number of threads.
        threads: usize,
        /// Why it failed.
        reason: String,
    },
}

/// A parsed device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// GPU number N.
    Cuda(usize),
    /// GPU 0 when CUDA is compiled in and a GPU opens, otherwise the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map(Self::Cuda)
                    .map_err(|_| DeviceError::Parse(s.to_string())),
                None => Err(DeviceError::Parse(s.to_string())),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. CUDA requests fail with a clear error when the build has
    /// no CUDA support or no GPU opens; only [`DeviceSpec::Auto`] falls back to the CPU.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n).map_err(|reason| {
                if candle_core::utils::cuda_is_available() {
                    DeviceError::CudaUnavailable {
                        spec: self.to_string(),
                        reason,
                    }
                } else {
                    DeviceError::NoCudaSupport(self.to_string())
                }
            }),
            Self::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

fn open_cuda(n: usize) -> Result<Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("built without CUDA".into());
    }
    // candle may panic deep in the driver bindings when no GPU is present;
    // contain it so the caller gets an error, never a crash.
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the CUDA driver panicked while opening the device".into()),
    }
}

/// Parses and opens a device in one call: `device("auto")?`.
pub fn device(spec: &str) -> Result<Device, DeviceError> {
    spec.parse::<DeviceSpec>()?.open()
}

/// A CUDA device's memory in use across the whole device (every process) and
/// its total, in bytes, from the driver (`cuMemGetInfo`). `None` on the CPU
/// or in a build without CUDA. Safe to call from any thread.
pub fn gpu_memory(dev: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total.saturating_sub(free), total));
    }
    let _ = dev;
    None
}

/// Waits for a CUDA device, then hands the memory its allocator keeps for
/// reuse back to the driver, so that [`gpu_memory`] counts live tensors
/// only: the stream-ordered pool (`cuMemAllocAsync`) keeps what a finished
/// benchmark freed, and a peak measured above it reads as 0. Does nothing on
/// the CPU or in a build without CUDA.
pub fn gpu_trim(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::result;
        if dev.synchronize().is_err() {
            return;
        }
        let ctx = d.cuda_stream().context().clone();
        if ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: the device handle comes from a live context bound to this
        // thread, and the pool it returns is that device's default pool.
        unsafe {
            if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
                let _ = result::mem_pool::trim_to(pool, 0);
            }
        }
    }
    let _ = dev;
}

/// What a device is, for reports: `cpu`, or the GPU's name and ordinal
/// (`cuda:0 NVIDIA H200`).
pub fn device_name(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        return format!("cuda:{} {name}", ctx.ordinal());
    }
    match dev {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// The most threads [`set_threads`] accepts per logical core.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The most threads [`set_threads`] accepts on any machine.
pub const MAX_THREADS: usize = 1024;

/// The machine's logical cores (as the OS reports them to this process,
/// CPU quotas included; 1 if unknown).
pub fn logical_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The CPU's model name (`/proc/cpuinfo`'s `model name`), with its family and
/// model numbers where the CPU has them (x86: `"AMD EPYC (family 25 model
/// 17)"`); `"unknown"` where it cannot be read. For benchmark reports, since
/// figures differ between CPUs, and a virtual machine may name only the brand,
/// which the numbers tell apart (family 25 is Zen 3 with model 1, Zen 4 with
/// model 17).
pub fn cpu_model() -> String {
    describe_cpu(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// [`cpu_model`] from the text of `/proc/cpuinfo` (its first processor).
fn describe_cpu(cpuinfo: &str) -> String {
    let field = |key: &str| {
        cpuinfo
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let name = field("model name").unwrap_or("unknown");
    match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!("{name} (family {family} model {model})"),
        _ => name.to_string(),
    }
}

/// The widest SIMD level this CPU offers, detected at run time:
/// `avx512`, `avx2`, `sse4.2` or `none` on x86-64, `neon` on aarch64.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "avx2"
        } else if std::arch::is_x86_feature_detected!("sse4.2") {
            "sse4.2"
        } else {
            "none"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "none"
    }
}

/// The SIMD level of the matrix-multiply kernels candle's `gemm` picks here:
/// `avx512` on an AVX-512 CPU unless built with `RUSTFLAGS="--cfg kiln_no_avx512"`,
/// which leaves gemm's `x86-v4` kernels out (see kiln-core's Cargo.toml).
pub fn gemm_simd_level() -> &'static str {
    match simd_level() {
        "avx512" if cfg!(not(kiln_no_avx512)) => "avx512",
        "avx512" | "avx2" => "avx2",
        other => other,
    }
}

/// The largest thread count [`set_threads`] accepts here:
/// [`MAX_THREADS_PER_CORE`] per logical core, at most [`MAX_THREADS`].
pub fn max_threads() -> usize {
    logical_cores()
        .saturating_mul(MAX_THREADS_PER_CORE)
        .min(MAX_THREADS)
}

/// Checks a thread count against `1..=`[`max_threads`] without applying it.
pub fn check_threads(threads: usize) -> Result<(), DeviceError> {
    let max = max_threads();
    if threads == 0 || threads > max {
        return Err(DeviceError::ThreadCount {
            threads,
            max,
            cores: logical_cores(),
        });
    }
    Ok(())
}

/// Sets the number of threads used for CPU work (rayon's global pool and
/// candle's gemm). Call once, early; a second call with a different count
/// fails. A count outside `1..=`[`max_threads`] (0, or more than
/// [`MAX_THREADS_PER_CORE`] per logical core) is refused before any thread
/// is started.
pub fn set_threads(threads: usize) -> Result<(), DeviceError> {
    check_threads(threads)?;
    // candle's CPU kernels size their parallelism from RAYON_NUM_THREADS via
    // `get_num_threads`; the global pool covers kiln's own kernels.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    inline_elementwise();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(e) if rayon::current_num_threads() == threads => {
            let _ = e;
            Ok(())
        }
        Err(e) => Err(DeviceError::Threads {
            threads,
            reason: e.to_string(),
        }),
    }
}

/// Runs candle's element-wise CPU ops on the calling thread, unless the
/// user set `CANDLE_NUM_THREADS`. Returns whether kiln chose it (false when
/// the user's value stands).
///
/// candle 0.11 otherwise runs element-wise ops of 64K elements or more on
/// its own pool, beside rayon's, whose idle workers spin 25,000 times before
/// they sleep. Those spins take the cores from the rayon threads that run the
/// matrix products: with more runnable threads than cores (parallel tests,
/// other jobs) a step got ~4x slower, and the RLHF demo part ran 37.8-38.6 s
/// inline against 43.3-45.4 s with the pool (Zen 3, two cores). With the
/// pool's spins cut (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0`, its workers sleep
/// at once) GPT-2 small's train step ran no faster on a quiet machine
/// (183-188 tok/s either way, three alternated rounds), and the caller
/// still spins until its worker gets a core.
///
/// candle reads the variable once, when its pool first starts, so call this
/// before the first tensor operation; [`set_threads`] calls it, and kiln's
/// binaries call it at start.
pub fn inline_elementwise() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}

/// Makes glibc's allocator keep freed tensor buffers for reuse: every block
/// comes from the heap instead of a fresh `mmap` (`M_MMAP_MAX` 0; glibc
/// still maps when the heap cannot grow), and the heap is not trimmed back.
/// Without it every large tensor of a training step is mapped, zero-filled by
/// page faults and unmapped again (with cross-thread TLB flushes): the chapter
/// VAE's step ran 22% and GPT-2 small's ~20% faster with blocks up to 32 MiB
/// kept, and GPT-2 small's a further 4% with all of them (its `[B, T, 50257]`
/// logits and their gradients are 200 MB each).
///
/// It also keeps 64 MiB of padding when a heap shrinks (`M_TOP_PAD`). glibc
/// gives each worker thread its own 64 MiB heaps and unmaps one as soon as it
/// is empty unless that padding is kept, whatever the trim threshold; the
/// next step then maps it again and faults in every page. The chapter VAE's
/// step spent ~10% in those page faults and ran 1.35-1.5x faster with the
/// padding (Zen 3, two threads).
///
/// And it keeps every thread on the main heap (`M_ARENA_MAX` 1). A worker
/// thread's own arena cannot hold a block larger than one of its 64 MiB heaps,
/// and glibc maps such a block afresh whatever `M_MMAP_MAX` says: a GPT-2
/// small train step run on the kernels' pool (as the trainers' loop runs it)
/// mapped, faulted in and unmapped 2.15 GB of logits, log-probabilities and
/// embedding gradients every step, and took 9.4-10.7 s instead of 8.0-8.6 s
/// (Zen 3, two threads). Small blocks still come from each thread's cache.
///
/// The process keeps its peak heap instead of returning freed blocks to the
/// system. Process-wide and
/// irreversible, so kiln's binaries call it at start; a no-op off glibc.
/// Returns whether the settings were taken.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; all values are
        // within glibc's documented ranges (the mmap threshold's maximum is 32 MiB).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The number of threads CPU work runs on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_gpu_memory_and_a_plain_name() {
        assert_eq!(gpu_memory(&Device::Cpu), None);
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }

    #[test]
    fn cpu_facts_are_named_and_consistent() {
        let simd = simd_level();
        assert!(
            ["avx512", "avx2", "sse4.2", "none", "neon"].contains(&simd),
            "{simd}"
        );
        let gemm = gemm_simd_level();
        // gemm never goes past the CPU, and reaches AVX-512 unless built without it.
        assert!(
            gemm == simd || (simd == "avx512" && gemm == "avx2"),
            "{simd} {gemm}"
        );
        assert_eq!(
            gemm == "avx512",
            simd == "avx512" && cfg!(not(kiln_no_avx512))
        );
        let model = cpu_model();
        assert!(!model.is_empty() && !model.contains('\n'), "{model:?}");
        if cfg!(target_os = "linux") && cfg!(target_arch = "x86_64") {
            // x86 Linux always names the model, its family and its number.
            assert!(!model.starts_with("unknown"), "{model:?}");
            assert!(model.contains(" (family "), "{model:?}");
        }
    }

    #[test]
    fn the_cpu_is_described_by_name_family_and_model() {
        let zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n\
                    model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n\
                    processor\t: 1\ncpu family\t: 99\nmodel\t\t: 99\nmodel name\t: other\n";
        assert_eq!(describe_cpu(zen4), "AMD EPYC (family 25 model 17)");
        // aarch64 names neither; an unreadable file names nothing.
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n";
        assert_eq!(describe_cpu(arm), "unknown");
        assert_eq!(describe_cpu(""), "unknown");
        let named = "model name\t: Intel(R) Xeon(R) Platinum 8488C\ncpu family\t: 6\n";
        assert_eq!(describe_cpu(named), "Intel(R) Xeon(R) Platinum 8488C");
    }

    #[test]
    fn elementwise_ops_go_inline_unless_the_user_chose() {
        let before = std::env::var_os("CANDLE_NUM_THREADS");
        let chose = inline_elementwise();
        assert_eq!(chose, before.is_none());
        let after = std::env::var_os("CANDLE_NUM_THREADS");
        // the user's value stands; otherwise kiln's is one thread
        assert_eq!(after, before.or_else(|| Some("1".into())));
        assert!(!inline_elementwise(), "a second call keeps the value");
    }

    #[test]
    fn allocator_tuning_is_accepted_on_glibc() {
        let took = tune_allocator();
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Allocation still works after it, large and small.
        let v = vec![1u8; 40 << 20];
        assert_eq!(v.iter().map(|&x| x as usize).sum::<usize>(), 40 << 20);
    }

    #[test]
    fn thread_counts_outside_the_limit_are_refused_with_the_range() {
        let max = max_threads();
        assert!((1..=MAX_THREADS).contains(&max));
        assert_eq!(
            max,
            (logical_cores() * MAX_THREADS_PER_CORE).min(MAX_THREADS)
        );
        for bad in [0, max + 1, 100_000] {
            // refused before the global pool is touched
            let e = set_threads(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("thread count {bad}")) && e.contains(&format!("1..={max}")),
                "{e}"
            );
        }
        assert!(check_threads(1).is_ok() && check_threads(max).is_ok());
    }

    #[test]
    fn parses_every_form() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("expected `cpu`"), "{e}");
        }
    }

    #[test]
    fn cpu_and_auto_open_and_cuda_errors_cleanly_without_a_gpu() {
        assert!(device("cpu").unwrap().is_cpu());
        let auto = device("auto").unwrap();
        if !candle_core::utils::cuda_is_available() {
            assert!(auto.is_cpu());
            let e = device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("without it"), "{e}");
        }
    }
}
