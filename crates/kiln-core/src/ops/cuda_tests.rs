//! Each CUDA op against the CPU op (its reference): forward values and the
//! gradients of `sum(f(x) * r)`. Built and run only with `--features cuda`
//! on a machine with a GPU.

use crate::ops;
use crate::rng::SeededRng;
use candle_core::{DType, Device, Result, Tensor, Var};

fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    SeededRng::new(seed)
        .normal(shape, 0.0, scale, &Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn run(
    dev: &Device,
    xs: &[Tensor],
    r_seed: u64,
    f: &dyn Fn(&[Tensor], &Device) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = xs
        .iter()
        .map(|x| Var::from_tensor(&x.to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts, dev).unwrap();
    let r = rand(y.dims(), r_seed, 1.0)
        .to_dtype(y.dtype())
        .unwrap()
        .to_device(dev)
        .unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
    (y, grads)
}

fn check(what: &str, xs: &[Tensor], tol: f64, f: &dyn Fn(&[Tensor], &Device) -> Result<Tensor>) {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let (yc, gc) = run(&Device::Cpu, xs, 99, f);
    let (yg, gg) = run(&gpu, xs, 99, f);
    assert!(yg.device().is_cuda(), "{what}: output left the GPU");
    let d = max_diff(&yc, &yg);
    assert!(d <= tol, "{what}: forward differs by {d}");
    for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
        let d = max_diff(a, b);
        assert!(d <= tol * 10.0, "{what}: gradient {i} differs by {d}");
    }
}

#[test]
fn token_ops_match_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        let x = rand(&[3, 4, 5003], 1, 3.0).to_dtype(dt).unwrap();
        let t: Vec<u32> = (0..12).map(|i| (i * 1237 + 5) % 5003).collect();
        check(
            "token_logprobs",
            std::slice::from_ref(&x),
            1e-5,
            &|xs, dev| {
                let t = Tensor::from_slice(&t, (3, 4), dev)?;
                ops::token_logprobs(&xs[0], &t)
            },
        );
        check("token_entropy", &[x], 1e-5, &|xs, _| {
            ops::token_entropy(&xs[0])
        });
    }
}

#[test]
fn dropout_draws_the_cpu_mask() {
    // odd lengths and an offset view: the pairs of draws split at every place
    let x = rand(&[3, 1001], 21, 1.0);
    for keep in [0.9, 0.5, 1.0] {
        check("dropout", std::slice::from_ref(&x), 0.0, &|xs, _| {
            ops::dropout(&xs[0].narrow(1, 1, 999)?, keep, 0x0123_4567_89ab_cdef)
        });
    }
}

#[test]
fn fused_ops_match_the_cpu() {
    let x = rand(&[5, 7, 769], 2, 2.0);
    check("gelu", std::slice::from_ref(&x), 1e-5, &|xs, _| {
        ops::gelu_tanh(&xs[0])
    });
    check("softmax", std::slice::from_ref(&x), 1e-5, &|xs, _| {
        ops::softmax_last_dim(&xs[0])
    });
    let w = rand(&[769], 3, 1.0);
    let b = rand(&[769], 4, 1.0);
    check(
        "layer_norm",
        &[(x.clone() + 3.0).unwrap(), w, b.clone()],
        1e-4,
        &|xs, _| ops::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5),
    );
    check("add_bias_last", &[x, b], 1e-4, &|xs, _| {
        ops::add_bias_last(&xs[0], &xs[1])
    });
}

#[test]
fn pooling_and_channel_bias_match_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        let x = rand(&[2, 3, 13, 10], 5, 1.0).to_dtype(dt).unwrap();
        for (k, s) in [(2, 2), (3, 2), (3, 1)] {
            check("max_pool2d", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                ops::max_pool2d(&xs[0], k, s)
            });
            check("avg_pool2d", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                ops::avg_pool2d(&xs[0], k, s)
            });
        }
        let b = rand(&[3], 6, 1.0).to_dtype(dt).unwrap();
        check("add_channel_bias", &[x, b], 1e-5, &|xs, _| {
            ops::add_channel_bias(&xs[0], &xs[1])
        });
    }
}

/// `t` with every fifth element set to exactly 0 (the ReLU gradient's edge).
fn with_zeros(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let v: Vec<f32> = v
        .iter()
        .enumerate()
        .map(|(i, &x)| if i % 5 == 0 { 0.0 } else { x })
        .collect();
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn activations_match_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        let x = with_zeros(&rand(&[2, 3, 13, 10], 7, 1.0))
            .to_dtype(dt)
            .unwrap();
        check("relu", std::slice::from_ref(&x), 1e-6, &|xs, _| {
            ops::relu(&xs[0])
        });
        for slope in [0.0, 0.2] {
            check("leaky_relu", std::slice::from_ref(&x), 1e-6, &|xs, _| {
                ops::leaky_relu(&xs[0], slope)
            });
        }
        // A zero bias on channel 1 puts exact zeros into x + b there.
        let b = Tensor::new(&[0.3f32, 0.0, -0.2], &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        check("add_channel_bias_relu", &[x, b], 1e-5, &|xs, _| {
            ops::add_channel_bias_relu(&xs[0], &xs[1])
        });
    }
}

#[test]
fn batch_norm_matches_the_cpu() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    for dt in [DType::F32, DType::F64] {
        // [B, C, H, W], [B, C, L] and [B, C]; an offset mean tests the
        // statistics' cancellation.
        for (shape, seed) in [
            (&[4usize, 3, 7, 9][..], 8u64),
            (&[5usize, 4, 33][..], 9),
            (&[16usize, 5][..], 10),
        ] {
            let x = (rand(shape, seed, 2.0) + 5.0)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let c = shape[1];
            let stats = |dev: &Device| {
                let (m, v) = ops::batch_norm_stats(&x.to_device(dev).unwrap()).unwrap();
                Tensor::stack(&[m, v], 0).unwrap()
            };
            let (sc, sg) = (stats(&Device::Cpu), stats(&gpu));
            assert!(sg.device().is_cuda());
            let d = max_diff(&sc, &sg);
            assert!(d <= 1e-5, "batch_norm_stats {shape:?}: differs by {d}");
            let w = rand(&[c], seed + 10, 1.0).to_dtype(dt).unwrap();
            let b = rand(&[c], seed + 20, 1.0).to_dtype(dt).unwrap();
            check(
                "batch_norm train",
                &[x.clone(), w.clone(), b.clone()],
                1e-5,
                &|xs, _| {
                    let (m, v) = ops::batch_norm_stats(&xs[0])?;
                    ops::batch_norm(&xs[0], &m, &v, &xs[1], &xs[2], 1e-5, true)
                },
            );
            let rm = rand(&[c], seed + 30, 1.0).to_dtype(dt).unwrap();
            let rv = (rand(&[c], seed + 40, 1.0).abs().unwrap() + 0.5)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            check("batch_norm eval", &[x, w, b], 1e-5, &|xs, dev| {
                let (m, v) = (rm.to_device(dev)?, rv.to_device(dev)?);
                ops::batch_norm(&xs[0], &m, &v, &xs[1], &xs[2], 1e-5, false)
            });
        }
    }
    // Half types keep candle's ops on CUDA.
    let x = rand(&[4, 3, 5, 5], 11, 1.0)
        .to_dtype(DType::F16)
        .unwrap()
        .to_device(&gpu)
        .unwrap();
    let (m, v) = ops::batch_norm_stats(&x).unwrap();
    let y = ops::batch_norm(&x, &m, &v, &m.ones_like().unwrap(), &m, 1e-5, true).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    assert_eq!(ops::relu(&x).unwrap().dtype(), DType::F16);
}
