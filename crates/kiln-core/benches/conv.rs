//! Each kiln op, forward + backward, at the layer shapes of the chapter's
//! inpainting autoencoder (batch 32) and of torch_reference.py's DCGAN
//! generator/discriminator (batch 64), against candle's own ops.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_core::ops;
use kiln_core::rng::SeededRng;
use kiln_core::{Device, Result, Tensor, Var};

type Op = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor>>;

/// `sum(f(x, w))` backward: the forward, both gradients.
fn fwd_bwd(f: &Op, x: &Var, w: &Var) {
    let y = f(x.as_tensor(), w.as_tensor()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
}

fn case(c: &mut Criterion, name: &str, x: &[usize], w: &[usize], kiln: Op, candle: Op) {
    let mut rng = SeededRng::new(0);
    let x = Var::from_tensor(&rng.normal(x, 0.0, 1.0, &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&rng.normal(w, 0.0, 0.1, &Device::Cpu).unwrap()).unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(20);
    g.bench_function("kiln", |b| b.iter(|| fwd_bwd(&kiln, &x, &w)));
    g.bench_function("candle", |b| b.iter(|| fwd_bwd(&candle, &x, &w)));
    g.finish();
}

fn conv(c: &mut Criterion, name: &str, x: &[usize], w: &[usize], s: usize, p: usize) {
    case(
        c,
        name,
        x,
        w,
        Box::new(move |x, w| ops::conv2d(x, w, s, p, 1, 1)),
        Box::new(move |x, w| x.conv2d(w, p, s, 1, 1)),
    );
}

fn convt(c: &mut Criterion, name: &str, x: &[usize], w: &[usize], s: usize, p: usize) {
    case(
        c,
        name,
        x,
        w,
        Box::new(move |x, w| ops::conv_transpose2d(x, w, s, p, 0, 1)),
        Box::new(move |x, w| x.conv_transpose2d(w, p, 0, s, 1)),
    );
}

fn pool(c: &mut Criterion, name: &str, x: &[usize]) {
    case(
        c,
        name,
        x,
        &[1],
        Box::new(|x, w| ops::max_pool2d(x, 2, 2)?.broadcast_mul(w)),
        Box::new(|x, w| x.max_pool2d(2)?.broadcast_mul(w)),
    );
}

fn convae(c: &mut Criterion) {
    conv(
        c,
        "convae/conv1_3x8_32",
        &[32, 3, 32, 32],
        &[8, 3, 3, 3],
        1,
        1,
    );
    conv(
        c,
        "convae/conv2_8x32_16",
        &[32, 8, 16, 16],
        &[32, 8, 3, 3],
        1,
        1,
    );
    convt(
        c,
        "convae/convt1_32x8_8",
        &[32, 32, 8, 8],
        &[32, 8, 2, 2],
        2,
        0,
    );
    convt(
        c,
        "convae/convt2_8x3_16",
        &[32, 8, 16, 16],
        &[8, 3, 2, 2],
        2,
        0,
    );
    pool(c, "convae/maxpool_8_32", &[32, 8, 32, 32]);
    pool(c, "convae/maxpool_32_16", &[32, 32, 16, 16]);
}

fn dcgan(c: &mut Criterion) {
    // Generator (nz=100, ngf=64): 1 -> 4 -> 8 -> 16 -> 32.
    convt(
        c,
        "dcgan/g1_100x256_1",
        &[64, 100, 1, 1],
        &[100, 256, 4, 4],
        1,
        0,
    );
    convt(
        c,
        "dcgan/g2_256x128_4",
        &[64, 256, 4, 4],
        &[256, 128, 4, 4],
        2,
        1,
    );
    convt(
        c,
        "dcgan/g3_128x64_8",
        &[64, 128, 8, 8],
        &[128, 64, 4, 4],
        2,
        1,
    );
    convt(
        c,
        "dcgan/g4_64x3_16",
        &[64, 64, 16, 16],
        &[64, 3, 4, 4],
        2,
        1,
    );
    // Discriminator (ndf=64): 32 -> 16 -> 8 -> 4 -> 1.
    conv(
        c,
        "dcgan/d1_3x64_32",
        &[64, 3, 32, 32],
        &[64, 3, 4, 4],
        2,
        1,
    );
    conv(
        c,
        "dcgan/d2_64x128_16",
        &[64, 64, 16, 16],
        &[128, 64, 4, 4],
        2,
        1,
    );
    conv(
        c,
        "dcgan/d3_128x256_8",
        &[64, 128, 8, 8],
        &[256, 128, 4, 4],
        2,
        1,
    );
    conv(
        c,
        "dcgan/d4_256x1_4",
        &[64, 256, 4, 4],
        &[1, 256, 4, 4],
        1,
        0,
    );
}

criterion_group!(benches, convae, dcgan);
criterion_main!(benches);
