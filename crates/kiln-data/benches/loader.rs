//! Loader throughput: JPEG decode + resize to 32x32 through the DataLoader,
//! 1 vs 2 threads (images/s), and synthetic flowers for comparison.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_core::Device;
use kiln_data::{
    open, DataLoader, Dataset, DatasetSpec, LoaderConfig, Split, SyntheticFlowers,
    SyntheticFlowersConfig,
};

const N: usize = 64;

/// A folder of N flower JPEGs of about Flowers102's size (500x375).
fn jpeg_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SyntheticFlowersConfig {
        size: 500,
        train: N,
        ..Default::default()
    };
    let ds = SyntheticFlowers::new(cfg, Split::Train).unwrap();
    for i in 0..N {
        let s = ds.get(i).unwrap();
        let img = kiln_data::transforms::crop(&s.image, 60, 0, 375, 500).unwrap();
        let d = dir.path().join(format!("c{}", s.label));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{i}.jpg")), img.to_jpeg().unwrap()).unwrap();
    }
    dir
}

fn bench(c: &mut Criterion) {
    let dir = jpeg_folder();
    let spec: DatasetSpec = format!("folder:{}", dir.path().display()).parse().unwrap();
    let ds: Arc<dyn Dataset> = open(&spec, "".as_ref(), Split::Train, 32).unwrap().into();
    let mut g = c.benchmark_group("loader");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    for threads in [1, 2] {
        let cfg = LoaderConfig {
            batch_size: 32,
            threads,
            prefetch: 2,
            ..Default::default()
        };
        let loader = DataLoader::new(ds.clone(), cfg, &Device::Cpu).unwrap();
        g.bench_function(format!("jpeg_500x375_to_32x32/threads={threads}"), |b| {
            b.iter(|| {
                let n: usize = loader.epoch(0).map(|x| x.unwrap().len()).sum();
                assert_eq!(n, N);
            })
        });
    }
    let syn: Arc<dyn Dataset> = Arc::new(
        SyntheticFlowers::new(
            SyntheticFlowersConfig {
                train: 256,
                ..Default::default()
            },
            Split::Train,
        )
        .unwrap(),
    );
    g.throughput(Throughput::Elements(256));
    for threads in [1, 2] {
        let cfg = LoaderConfig {
            batch_size: 32,
            threads,
            ..Default::default()
        };
        let loader = DataLoader::new(syn.clone(), cfg, &Device::Cpu).unwrap();
        g.bench_function(format!("synthetic_flowers_32/threads={threads}"), |b| {
            b.iter(|| loader.epoch(0).map(|x| x.unwrap().len()).sum::<usize>())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
