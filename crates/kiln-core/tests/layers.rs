//! kiln-core layers: values against PyTorch, and gradients reaching every
//! parameter of a model that uses every layer.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::nn::{
    self, AvgPool2d, BatchNorm, Conv2d, ConvConfig, ConvTranspose2d, Dropout, Embedding, LayerNorm,
    Linear, MaxPool2d,
};
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::tolerance::{chain_length, f32_abs_tol_tight, F32_UNIT_ROUNDOFF};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, ModuleT, Tensor, Var};

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "got {got:?}\nwant {want:?}"
        );
    }
}

/// The tolerance, relative to `1 + |want|`, for a value behind a chain of
/// `n` f32 roundings (the reductions, of at most 16 terms here, and the
/// elementwise steps after them; their errors add) whose relative errors the
/// layer amplifies by `amp` (a normalisation divides by σ, a weight
/// multiplies): [`kiln_core::tolerance`], whose worst case holds for any
/// summation order. Plus half a unit in the last decimal PyTorch's value was
/// printed with.
fn tol(chain: &[usize], amp: f64, decimals: i32) -> f32 {
    (f32_abs_tol_tight(chain_length(chain), amp) + 0.5 * 10f64.powi(-decimals)) as f32
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// PyTorch:
/// ```python
/// x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.4]], requires_grad=True)
/// w = torch.tensor([1.5, -0.5, 2.0, 1.0], requires_grad=True)
/// b = torch.tensor([0.1, 0.2, -0.1, 0.0], requires_grad=True)
/// c = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, -2.0, 0.25]])
/// y = F.layer_norm(x, (4,), w, b, 1e-5); (y * c).sum().backward()
/// ```
#[test]
fn layer_norm_forward_and_backward_match_torch() {
    let dev = Device::Cpu;
    let x = Var::new(&[[1.0f32, -2.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.4]], &dev).unwrap();
    let w = Var::new(&[1.5f32, -0.5, 2.0, 1.0], &dev).unwrap();
    let b = Var::new(&[0.1f32, 0.2, -0.1, 0.0], &dev).unwrap();
    let c = Tensor::new(&[[0.3f32, -1.0, 2.0, 0.5], [1.0, 1.0, -2.0, 0.25]], &dev).unwrap();
    let y = nn::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    close(
        &flat(&y),
        &[
            0.4158376, 0.9369544, -0.2403723, 1.3335365, 0.1000000, 0.0038989, -3.2376168,
            1.1766064,
        ],
        // Mean and variance over 4, then 4 elementwise steps; |w| <= 2 times
        // (|x| + |mean|) / σ <= 2.1 in both rows.
        tol(&[4, 4, 4], 4.2, 7),
    );
    let g = (y * c).unwrap().sum_all().unwrap().backward().unwrap();
    close(
        &flat(g.get(x.as_tensor()).unwrap()),
        &[
            -0.5047869, -0.5372867, 1.4784033, -0.4363296, 8.5794210, -1.7155075, -3.1881495,
            -3.6757641,
        ],
        // The statistics, means over 4 of g = c w and g xhat, 4 elementwise
        // steps; (|g| + |mean g| + |xhat| |mean g xhat|) / σ <= (4 + 4 + 6.4) / 0.255.
        tol(&[4, 4, 4, 4, 4], 56.0, 7),
    );
    close(
        &flat(g.get(w.as_tensor()).unwrap()),
        &[0.0631675, 1.8661109, 2.9972448, 0.9609199],
        // xhat (chain 12), then a sum over the batch of 2: sum |c xhat| <= 6.4.
        tol(&[4, 4, 4, 2], 6.4, 7),
    );
    close(
        &flat(g.get(b.as_tensor()).unwrap()),
        &[1.3, 0.0, 0.0, 0.75],
        // Sums of 2 values of c (one rounding, any order), sum |c| <= 3.
        tol(&[2], 3.0, 8),
    );
}

/// PyTorch:
/// ```python
/// x = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.3]], requires_grad=True)
/// s = F.log_softmax(x, 1); (s * torch.tensor([[1., 2., 3.], [0.5, -1, 0]])).sum().backward()
/// ```
#[test]
fn log_softmax_and_softmax_carry_gradients() {
    let dev = Device::Cpu;
    let x = Var::new(&[[1.0f32, -2.0, 0.5], [0.1, 0.2, -0.3]], &dev).unwrap();
    let s = nn::log_softmax(x.as_tensor(), 1).unwrap();
    close(
        &flat(&s),
        &[
            -0.5045969, -3.5045969, -1.0045969, -1.0208277, -0.9208276, -1.4208276,
        ],
        // A sum of 3 exponentials, then exp, log and two subtractions; the
        // roundings scale with |x| + |max| + |log sum| <= 4.5, over 1 + |want| >= 1.5.
        tol(&[3, 4], 3.0, 7),
    );
    let c = Tensor::new(&[[1.0f32, 2., 3.], [0.5, -1., 0.]], &dev).unwrap();
    let g = (s * c).unwrap().sum_all().unwrap().backward().unwrap();
    close(
        &flat(g.get(x.as_tensor()).unwrap()),
        &[
            -2.6224935, 1.8196467, 0.8028467, 0.6801483, -0.8009053, 0.1207570,
        ],
        // c - softmax * sum(c): sums of 3 (exponentials, c) and 4 elementwise
        // steps; |c| + p sum |c| <= 3 + 6.
        tol(&[3, 3, 4], 9.0, 7),
    );
    let p = nn::softmax(x.as_tensor(), 1).unwrap();
    let g = p
        .narrow(1, 0, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(flat(g.get(x.as_tensor()).unwrap())
        .iter()
        .all(|v| v.abs() > 1e-4));
    // Extreme logits stay finite.
    let big = Tensor::new(&[[1e4f32, -1e4, 0.0]], &dev).unwrap();
    assert!(flat(&nn::log_softmax(&big, 1).unwrap())
        .iter()
        .all(|v| v.is_finite()));
}

/// PyTorch:
/// ```python
/// bn = torch.nn.BatchNorm2d(2)
/// xb = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2) ** 1.5 / 10
/// yb = bn(xb)   # train mode
/// ```
#[test]
fn batch_norm_matches_torch_in_train_and_eval() {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let bn = BatchNorm::new(2, vs.builder(DType::F32, &dev).pp("bn")).unwrap();
    let x = (Tensor::arange(0f32, 16.0, &dev)
        .unwrap()
        .reshape((2, 2, 2, 2))
        .unwrap()
        .powf(1.5)
        .unwrap()
        / 10.0)
        .unwrap();
    let y = bn.forward_t(&x, true).unwrap();
    close(
        &flat(&y),
        &[
            -1.120540, -1.049820, -0.920513, -0.753067, -1.230435, -1.063308, -0.878512, -0.677597,
            0.479674, 0.788904, 1.115828, 1.459535, 0.533624, 0.812293, 1.101897, 1.402038,
        ],
        // Mean and variance over the 8 values of a channel, 4 elementwise
        // steps; (|x| + |mean|) / σ <= 4.7 (channel 1).
        tol(&[8, 8, 4], 4.7, 6),
    );
    // 0.1 * the mean over 8 (plus 0.9 * 0): magnitude 0.1 * mean |x| <= 0.33.
    close(
        &flat(vs.get("bn.running_mean").unwrap().as_tensor()),
        &[0.1584470570087433, 0.31414610147476196],
        tol(&[8, 2], 0.33, 9),
    );
    // 0.9 + 0.1 * the unbiased variance over 8 (sum of (x - mean)², 16 or
    // less, / 7): magnitude <= 1.13, over 1 + |want| >= 2.1.
    close(
        &flat(vs.get("bn.running_var").unwrap().as_tensor()),
        &[1.1285089254379272, 1.3138540983200073],
        tol(&[8, 8, 3], 0.6, 9),
    );
    // Eval mode uses the running statistics.
    let ye = bn.forward_t(&x, false).unwrap();
    let rm = flat(vs.get("bn.running_mean").unwrap().as_tensor());
    let rv = flat(vs.get("bn.running_var").unwrap().as_tensor());
    let xv = flat(&x);
    // The same formula in f32 on both sides, elementwise (a subtraction, an
    // add, a square root, a division or product): 8 u, on any CPU.
    close(
        &flat(&ye)[..1],
        &[(xv[0] - rm[0]) / (rv[0] + 1e-5).sqrt()],
        (8.0 * F32_UNIT_ROUNDOFF) as f32,
    );
}

/// PyTorch (training mode, gradients through the batch statistics):
/// ```python
/// bn = torch.nn.BatchNorm2d(2)
/// with torch.no_grad():
///     bn.weight.copy_(torch.tensor([1.5, -0.5])); bn.bias.copy_(torch.tensor([0.25, 2.0]))
/// xb = (torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2) ** 1.5 / 10).requires_grad_()
/// r = torch.cos(torch.arange(16, dtype=torch.float32)).reshape(2, 2, 2, 2)
/// y = bn(xb); (y * r).sum().backward()
/// ```
#[test]
fn batch_norm_gradients_match_torch_in_train_mode() {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let bn = BatchNorm::new(2, vs.builder(DType::F32, &dev).pp("bn")).unwrap();
    let w = vs.get("bn.weight").unwrap();
    let b = vs.get("bn.bias").unwrap();
    w.set(&Tensor::new(&[1.5f32, -0.5], &dev).unwrap()).unwrap();
    b.set(&Tensor::new(&[0.25f32, 2.0], &dev).unwrap()).unwrap();
    let x = (Tensor::arange(0f32, 16.0, &dev)
        .unwrap()
        .reshape((2, 2, 2, 2))
        .unwrap()
        .powf(1.5)
        .unwrap()
        / 10.0)
        .unwrap();
    let x = kiln_core::Var::from_tensor(&x).unwrap();
    let r = Tensor::arange(0f32, 16.0, &dev)
        .unwrap()
        .cos()
        .unwrap()
        .reshape((2, 2, 2, 2))
        .unwrap();
    let y = bn.forward_t(x.as_tensor(), true).unwrap();
    close(
        &flat(&y),
        &[
            -1.43081, -1.32473, -1.13077, -0.879601, 2.615217, 2.531654, 2.439256, 2.338798,
            0.969512, 1.433357, 1.923742, 2.439302, 1.733188, 1.593853, 1.449051, 1.298981,
        ],
        // As in train mode above, times |w| <= 1.5; printed to 5 decimals.
        tol(&[8, 8, 4], 1.5 * 4.7, 5),
    );
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    close(
        &flat(g.get(x.as_tensor()).unwrap()),
        &[
            0.955389, 0.489098, -0.486454, -1.044622, 0.276337, 0.026883, -0.154381, -0.104003,
            0.22351, -0.495284, -0.320111, 0.678473, -0.150661, -0.172667, 0.024331, 0.254162,
        ],
        // The statistics, means over 8 of r and r xhat (r = cos: a libm
        // rounding or two each), 4 elementwise steps;
        // |w| (|r| + |mean r| + |xhat| |mean r xhat|) / σ <= 1.5 (1 + 1 + 1.7) / 1.41.
        tol(&[8, 8, 8, 8, 4], 4.0, 5),
    );
    // sum over 8 of r xhat after xhat's chain: sum |r xhat| <= 13.6, over
    // 1 + |want| >= 1.57.
    close(
        &flat(g.get(w.as_tensor()).unwrap()),
        &[-2.277547836303711, -0.5787449479103088],
        tol(&[8, 8, 4, 8], 9.0, 9),
    );
    // sum over 8 of r (with cos's own rounding, 8 more): sum |r| <= 8, over
    // 1 + |want| >= 2.7.
    close(
        &flat(g.get(b.as_tensor()).unwrap()),
        &[-1.7571132183074951, 2.4724411964416504],
        tol(&[8, 8], 3.0, 9),
    );
}

#[test]
fn dropout_is_seeded_scaled_and_off_in_eval() {
    let dev = Device::Cpu;
    let x = Tensor::ones((1000,), DType::F32, &dev).unwrap();
    let d1 = Dropout::new(0.25, kiln_core::vars::SharedRng::new(3)).unwrap();
    let d2 = Dropout::new(0.25, kiln_core::vars::SharedRng::new(3)).unwrap();
    let a = flat(&d1.forward_t(&x, true).unwrap());
    assert_eq!(a, flat(&d2.forward_t(&x, true).unwrap()));
    let kept = a.iter().filter(|v| **v != 0.0).count();
    assert!((700..800).contains(&kept), "{kept}");
    assert!(a
        .iter()
        .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() <= 4.0 * F32_UNIT_ROUNDOFF as f32 / 0.75));
    assert_eq!(flat(&d1.forward_t(&x, false).unwrap()), vec![1.0; 1000]);
    assert!(Dropout::new(1.0, kiln_core::vars::SharedRng::new(0)).is_err());
}

/// A model using every kiln-core layer: every parameter gets a non-zero
/// gradient and changes after one optimizer step.
#[test]
fn every_layer_passes_gradients_to_every_parameter() {
    let dev = Device::Cpu;
    let vs = VarStore::new(11);
    let vb = vs.builder(DType::F32, &dev);
    let conv = Conv2d::new(3, 4, 3, ConvConfig::padding(1), vb.pp("conv")).unwrap();
    let bn = BatchNorm::new(4, vb.pp("bn")).unwrap();
    let pool = MaxPool2d::new(2);
    let up = ConvTranspose2d::new(4, 2, 2, ConvConfig::stride(2), vb.pp("up")).unwrap();
    let avg = AvgPool2d::new(2);
    let emb = Embedding::new(5, 8, vb.pp("emb")).unwrap();
    let fc = Linear::new(2 * 4 * 4, 8, vb.pp("fc")).unwrap();
    let ln = LayerNorm::new(8, 1e-5, vb.pp("ln")).unwrap();
    let drop = Dropout::new(0.1, vs.rng().clone()).unwrap();
    let head = Linear::new(8, 3, vb.pp("head")).unwrap();

    let mut rng = kiln_core::rng::SeededRng::new(5);
    let x = rng.normal(&[4, 3, 8, 8], 0.0, 1.0, &dev).unwrap();
    let ids = Tensor::new(&[0u32, 1, 3, 4], &dev).unwrap();
    let h = conv.forward(&x).unwrap();
    let h = bn.forward_t(&h, true).unwrap().relu().unwrap();
    let h = pool.forward(&h).unwrap(); // [4,4,4,4]
    let h = up.forward(&h).unwrap(); // [4,2,8,8]
    let h = avg.forward(&h).unwrap(); // [4,2,4,4]
    let h = fc.forward(&h.flatten_from(1).unwrap()).unwrap();
    let h = (h + emb.forward(&ids).unwrap()).unwrap();
    let h = ln.forward(&h).unwrap();
    let h = drop.forward_t(&h, true).unwrap();
    let logits = head.forward(&h).unwrap();
    let loss = kiln_core::loss::cross_entropy(
        &logits,
        &Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap(),
        None,
        kiln_core::loss::Reduction::Mean,
    )
    .unwrap();

    let grads = loss.backward().unwrap();
    let trainable: Vec<_> = vs.vars_where(|n| !n.contains("running_"));
    assert_eq!(trainable.len(), 13, "{:?}", vs.names());
    let before: Vec<Vec<f32>> = trainable
        .iter()
        .map(|(_, v)| flat(&v.as_tensor().copy().unwrap()))
        .collect();
    for (name, v) in &trainable {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 && n.is_finite(), "gradient of {name} is {n}");
    }
    let mut opt = Optimizer::single(OptimKind::adam(), vs.vars(), 1e-3, 0.0).unwrap();
    opt.step(&grads).unwrap();
    for ((name, v), b) in trainable.iter().zip(&before) {
        assert_ne!(&flat(v.as_tensor()), b, "{name} did not change");
    }
}

#[test]
fn pytorch_default_init_bounds() {
    let dev = Device::Cpu;
    let vs = VarStore::new(0);
    let vb = vs.builder(DType::F32, &dev);
    let _ = Linear::new(3072, 512, vb.pp("l")).unwrap();
    let w = flat(vs.get("l.weight").unwrap().as_tensor());
    let bound = 1.0 / (3072f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        max > 0.99 * bound,
        "uniform should reach its bound: {max} vs {bound}"
    );
    let _ = ConvTranspose2d::new(32, 8, 2, ConvConfig::stride(2), vb.pp("d")).unwrap();
    let w = flat(vs.get("d.weight").unwrap().as_tensor());
    // PyTorch's fan-in for ConvTranspose2d(32, 8, 2) is 8*2*2 = 32.
    assert!(w.iter().all(|v| v.abs() <= 1.0 / 32f32.sqrt()));
    assert!(Conv2d::new(
        3,
        8,
        3,
        ConvConfig {
            groups: 2,
            ..Default::default()
        },
        vb.pp("g")
    )
    .is_err());
}

/// Max pooling sends each window's gradient to its maximum, whole (PyTorch's
/// behaviour; candle 0.11's own backward scales it by 1/k²).
#[test]
fn max_pool_gradient_goes_whole_to_the_maximum() {
    let dev = Device::Cpu;
    // 1x1x4x5: odd width exercises floor mode; values distinct.
    let v: Vec<f32> = (0..20).map(|i| ((i * 7) % 20) as f32).collect();
    let x = Var::from_tensor(&Tensor::from_vec(v.clone(), (1, 1, 4, 5), &dev).unwrap()).unwrap();
    let y = MaxPool2d::new(2).forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(x.as_tensor()).unwrap());
    let mut want = vec![0f32; 20];
    for oy in 0..2 {
        for ox in 0..2 {
            let idx = (0..2).flat_map(|dy| (0..2).map(move |dx| (2 * oy + dy) * 5 + 2 * ox + dx));
            let best = idx.max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            want[best] = 1.0;
        }
    }
    assert_eq!(gx, want);
    let want_y: Vec<f32> = (0..20).filter(|&i| want[i] == 1.0).map(|i| v[i]).collect();
    let mut got_y = flat(&y);
    got_y.sort_by(f32::total_cmp);
    let mut want_y = want_y;
    want_y.sort_by(f32::total_cmp);
    assert_eq!(got_y, want_y);
}
