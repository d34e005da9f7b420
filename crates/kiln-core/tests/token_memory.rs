//! Peak memory of `ops::token_logprobs` forward + backward at RLHF scale
//! (B=8, T=256, V=50257: 411 MB of logits), measured with a counting allocator,
//! against the naive `log_softmax` + `gather` path. Its own test binary, so no
//! other test allocates while it measures. Measured here: forward 0.025 MB;
//! forward + backward 823 MB beyond the logits and their gradient (candle's
//! gradient accumulation: a zero buffer and a sum), naive 3705 MB.
#![allow(clippy::unwrap_used, missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_core::{DType, Device, Tensor, Var, D};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: forwards every call to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::SeqCst);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated at the peak of `f`, beyond what was live before it.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn token_logprobs_needs_a_small_fraction_of_the_naive_paths_memory() {
    let (b, t, v) = (8usize, 256usize, 50257usize);
    let n = b * t * v;
    // Cheap deterministic logits in [-8, 8) (random draws would dominate the runtime).
    let data: Vec<f32> = (0..n)
        .map(|i| ((i.wrapping_mul(2654435761) % 1601) as f32) / 100.0 - 8.0)
        .collect();
    let logits =
        Var::from_tensor(&Tensor::from_vec(data, (b, t, v), &Device::Cpu).unwrap()).unwrap();
    let targets: Vec<u32> = (0..b * t).map(|i| ((i * 7919) % v) as u32).collect();
    let targets = Tensor::from_vec(targets, (b, t), &Device::Cpu).unwrap();
    let logits_bytes = n * 4;

    let mut kiln_value = 0f32;
    let kiln = peak_during(|| {
        let lp = kiln_core::ops::token_logprobs(logits.as_tensor(), &targets).unwrap();
        let loss = lp.sum_all().unwrap();
        kiln_value = loss.to_scalar::<f32>().unwrap();
        let g = loss.backward().unwrap();
        assert_eq!(g.get(logits.as_tensor()).unwrap().dims(), &[b, t, v]);
    });
    let mut naive_value = 0f32;
    let naive = peak_during(|| {
        let lp = kiln_core::nn::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let idx = targets.to_dtype(DType::U32).unwrap().unsqueeze(2).unwrap();
        let lp = lp.gather(&idx, 2).unwrap().squeeze(2).unwrap();
        let loss = lp.sum_all().unwrap();
        naive_value = loss.to_scalar::<f32>().unwrap();
        let g = loss.backward().unwrap();
        assert_eq!(g.get(logits.as_tensor()).unwrap().dims(), &[b, t, v]);
    });
    // Beyond the logits' gradient, which both paths must produce.
    let kiln_extra = kiln.saturating_sub(logits_bytes);
    let naive_extra = naive.saturating_sub(logits_bytes);
    let mb = |x: usize| x as f64 / 1e6;
    eprintln!(
        "token_logprobs B={b} T={t} V={v}: logits {:.0} MB; peak beyond logits + gradient: kiln {:.1} MB, naive {:.0} MB ({:.2}%)",
        mb(logits_bytes),
        mb(kiln_extra),
        mb(naive_extra),
        100.0 * kiln_extra as f64 / naive_extra as f64
    );
    assert!((kiln_value - naive_value).abs() <= 1e-4 * naive_value.abs());
    // The op itself allocates nothing [B, T, V]-sized beyond the gradient; candle's
    // backprop then adds a zero buffer and a sum of the same size when it
    // accumulates that gradient (`or_insert` + `add`), which no custom op avoids.
    assert!(
        kiln_extra <= 2 * logits_bytes + (16 << 20),
        "kiln {kiln_extra} bytes beyond logits + gradient"
    );
    assert!(
        kiln_extra * 4 < naive_extra,
        "kiln {kiln_extra} vs naive {naive_extra}"
    );
    let fwd = peak_during(|| {
        let lp = kiln_core::ops::token_logprobs(logits.as_tensor(), &targets).unwrap();
        assert_eq!(lp.dims(), &[b, t]);
    });
    eprintln!("token_logprobs forward alone: {:.3} MB", mb(fwd));
    assert!(fwd < 1 << 20, "forward allocated {fwd} bytes");
}
