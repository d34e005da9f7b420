//! CIFAR-10 binary batches: the input is `test_batch.bin`.
#![no_main]
use kiln_data::{Cifar10, Dataset, Split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    kiln_fuzz::put(dir.path(), "test_batch.bin", data);
    if let Ok(ds) = Cifar10::new(dir.path(), Split::Test) {
        for i in 0..ds.len().min(4) {
            let _ = ds.get(i);
        }
        let _ = ds.get(ds.len());
    }
});
