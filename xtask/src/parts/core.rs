//! kiln-core's own demo: a tiny autoencoder trained from kiln-core's pieces
//! (layers, fused Adam, session with checkpoints, metrics, figures).

use anyhow::Result;
use kiln_core::image::{plot_metrics, save_image_rows, GridOptions};
use kiln_core::nn::Linear;
use kiln_core::observer::ObserverConfig;
use kiln_core::optim::{OptimKind, Optimizer};
use kiln_core::rng::SeededRng;
use kiln_core::run::RunOptions;
use kiln_core::session::{Record, Session};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device, Module, Tensor};

use super::{Component, DemoPart};

/// Registers the core demo.
pub fn component() -> Component {
    Component {
        demos: vec![DemoPart {
            name: "core",
            about: "tiny MLP autoencoder on procedural 12x12 stripes (kiln-core only)",
            run: demo,
        }],
        ..Default::default()
    }
}

const SIDE: usize = 12;

/// Procedural images: oriented stripes with random phase and colour.
fn stripes(n: usize, seed: u64, dev: &Device) -> Result<Tensor> {
    let mut r = SeededRng::new(seed);
    let mut v = Vec::with_capacity(n * 3 * SIDE * SIDE);
    for _ in 0..n {
        let angle = r.uniform_f32(0.0, std::f32::consts::PI);
        let freq = r.uniform_f32(0.4, 1.2);
        let phase = r.uniform_f32(0.0, 6.3);
        let col = [
            r.uniform_f32(0.2, 1.0),
            r.uniform_f32(0.2, 1.0),
            r.uniform_f32(0.2, 1.0),
        ];
        for c in col {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let t = (x as f32 * angle.cos() + y as f32 * angle.sin()) * freq + phase;
                    v.push(c * (0.5 + 0.5 * t.sin()));
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (n, 3, SIDE, SIDE), dev)?)
}

fn demo(ctx: &super::DemoCtx) -> Result<()> {
    let dev = &ctx.device;
    let d = 3 * SIDE * SIDE;
    let vs = VarStore::new(ctx.seed);
    let vb = vs.builder(DType::F32, dev);
    let enc1 = Linear::new(d, 64, vb.pp("enc1"))?;
    let enc2 = Linear::new(64, 8, vb.pp("enc2"))?;
    let dec1 = Linear::new(8, 64, vb.pp("dec1"))?;
    let dec2 = Linear::new(64, d, vb.pp("dec2"))?;
    let forward = |x: &Tensor| -> kiln_core::Result<Tensor> {
        let h = enc1.forward(&x.flatten_from(1)?)?.relu()?;
        let z = enc2.forward(&h)?;
        let h = dec1.forward(&z)?.relu()?;
        kiln_core::candle_nn::ops::sigmoid(&dec2.forward(&h)?)?.reshape(x.shape())
    };
    let data = stripes(512, ctx.seed + 1, dev)?;
    let (epochs, batch) = (15u64, 32usize);
    let cfg = serde_json::json!({"epochs": epochs, "batch": batch, "lr": 3e-3, "latent": 8});
    let opts = RunOptions::new_run(Some(&ctx.out.join("core"))).quiet(ctx.quiet);
    let run = opts.open("core-demo", "core-autoencoder", &cfg, &[])?;
    let dir = run.dir().clone();
    let opt = Optimizer::single(OptimKind::adam(), vs.vars(), 3e-3, 0.0)?;
    let mut s = Session::builder(run, ctx.seed)
        .part("model", &vs, opt)
        .epochs(epochs, (512 / batch) as u64)
        .observer(ObserverConfig {
            quiet: ctx.quiet,
            silent: false,
            log_every: 0,
        })
        .start()?;
    s.run_epochs(
        |epoch, start| {
            let order = SeededRng::derive(ctx.seed, &[epoch]).permutation(512);
            let chunks: Vec<Vec<usize>> = order
                .chunks(batch)
                .skip(start)
                .map(<[usize]>::to_vec)
                .collect();
            chunks.into_iter().map(Ok::<_, anyhow::Error>)
        },
        |s, chunk| {
            let idx = Tensor::new(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), dev)?;
            let x = data.index_select(&idx, 0)?;
            let loss = kiln_core::loss::mse(&forward(&x)?, &x, kiln_core::loss::Reduction::Mean)?;
            let v = s.train_step("model", &loss)?;
            Ok(Record::new(chunk.len()).with("loss", v))
        },
        |_| Ok(()),
    )?;
    super::stop_demo_if_interrupted(ctx, "core");
    let last = s.last_epoch("loss").unwrap_or(f64::NAN);
    s.finish(serde_json::json!({"final_train_mse": last}))?;
    let sample = data.narrow(0, 0, 8)?;
    save_image_rows(
        &[&sample, &forward(&sample)?],
        &dir.join("reconstructions.png"),
        &GridOptions {
            scale: 4,
            ..Default::default()
        },
    )?;
    plot_metrics(
        &dir.join("metrics.jsonl"),
        &dir.join("loss.png"),
        "core demo: train MSE",
        &["loss"],
    )?;
    eprintln!(
        "    core: final train MSE {last:.5}; run folder {}",
        dir.path().display()
    );
    Ok(())
}
