//! MNIST IDX files: `read_idx` on raw and gzipped bytes, then `Mnist::new`
//! with the input as the image file beside a valid label file.
#![no_main]
use kiln_data::mnist::read_idx;
use kiln_data::{Dataset, Mnist, Split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "x.idx", data);
    let _ = read_idx(&p, 0x803);
    let _ = read_idx(&p, 0x801);
    let g = kiln_fuzz::put(dir.path(), "x.idx.gz", &kiln_fuzz::gzip(data));
    let _ = read_idx(&g, 0x803);
    // As a dataset: the input's images with labels for up to 4 of them.
    kiln_fuzz::put(dir.path(), "t10k-images-idx3-ubyte", data);
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 4];
    labels.extend_from_slice(&[3, 1, 4, 1]);
    kiln_fuzz::put(dir.path(), "t10k-labels-idx1-ubyte", &labels);
    if let Ok(ds) = Mnist::new(dir.path(), Split::Test) {
        for i in 0..ds.len().min(4) {
            let _ = ds.get(i);
        }
    }
});
