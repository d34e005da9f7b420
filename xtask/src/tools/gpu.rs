//! CUDA without a GPU, and the data for checking kiln's kernels on one.
//!
//! - `cuda-check [--install] [--compute-cap N] [--ccbin CXX] [--workspace]`
//!   builds kiln-core with its `cuda` feature (candle's kernels and kiln's
//!   `kernels/*.cu` compiled to PTX by nvcc) on a machine without a GPU and
//!   says how long each step took. `--install` first installs CUDA 13.0 from
//!   PyPI under `target/cuda-13.0` ([`super::toolkit`]), or with
//!   `--toolkit debian` Debian bookworm's CUDA 11.8 with apt.
//!   The PTX files are copied to `--ptx-out` (default `scripts/gpu-check/ptx`).
//! - `export-gpu-refs DIR` writes, for every kernel, its inputs and the kiln CPU
//!   ops' outputs as `.npy` files and a `manifest.json` saying how to launch it;
//!   `scripts/gpu-check.sh` runs them on a GPU with CuPy and compares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_core::optim::{OptimKind, Optimizer, ParamGroup};
use kiln_core::rng::SeededRng;
use kiln_core::{ops, DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::toolkit::{self, sh};

#[derive(Parser, Debug)]
#[command(about = "Build kiln-core with --features cuda on a machine without a GPU")]
struct CheckArgs {
    /// Install the toolkit first: CUDA 13.0 from PyPI into --prefix, or with
    /// `--toolkit debian` Debian's CUDA 11.8 with apt (root).
    #[arg(long)]
    install: bool,
    /// Which toolkit: `pypi` (CUDA 13.0 under --prefix; used when installed
    /// there, else nvcc on PATH) or `debian` (CUDA 11.8, nvcc on PATH).
    #[arg(long, value_enum, default_value = "pypi")]
    toolkit: toolkit::Source,
    /// Where the PyPI toolkit lives (default: target/cuda-13.0 in the workspace).
    #[arg(long)]
    prefix: Option<PathBuf>,
    /// CUDA_COMPUTE_CAP for candle's and kiln's kernels: 90 with the PyPI
    /// toolkit, 80 with Debian's (CUDA 11.8's nvcc rejects compute_90a, what
    /// candle's build turns 90 into).
    #[arg(long)]
    compute_cap: Option<String>,
    /// Host C++ compiler for nvcc (NVCC_CCBIN); found automatically if unset.
    #[arg(long)]
    ccbin: Option<String>,
    /// Also `cargo check --workspace --all-targets --features kiln-core/cuda`.
    #[arg(long)]
    workspace: bool,
    /// Only print the toolkit's environment as `export` lines (for
    /// `eval "$(cargo xtask cuda-check --print-env)"`) and build nothing;
    /// with `--toolkit debian`, whose nvcc is on PATH, there are none.
    #[arg(long)]
    print_env: bool,
    /// Where to copy the PTX files (for scripts/gpu-check.sh).
    #[arg(long, default_value = "scripts/gpu-check/ptx")]
    ptx_out: PathBuf,
}

/// Compiles a one-line kernel; on a host-compiler complaint tries g++-11.
fn probe_nvcc(
    ccbin: Option<&str>,
    install: bool,
    tk: Option<&toolkit::Toolkit>,
) -> Result<Option<String>> {
    let dir = std::env::temp_dir().join("kiln-nvcc-probe");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("probe.cu");
    std::fs::write(
        &src,
        "extern \"C\" __global__ void k(float *x) { x[0] = 1.0f; }\n",
    )?;
    let try_with = |cc: Option<&str>| -> Result<(bool, String)> {
        let mut c = Command::new("nvcc");
        if let Some(tk) = tk {
            tk.apply(&mut c);
        }
        c.args(["--ptx", "-o"]).arg(dir.join("probe.ptx")).arg(&src);
        if let Some(cc) = cc {
            c.args(["-ccbin", cc]);
        }
        let out = c.output().context(
            "nvcc not found: pass --install (CUDA 13.0 from PyPI) or put a CUDA toolkit on PATH",
        )?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, err) = try_with(ccbin)?;
    if ok {
        return Ok(ccbin.map(str::to_string));
    }
    eprintln!("nvcc probe failed:\n{err}");
    if ccbin.is_none() && err.contains("unsupported GNU version") {
        if install {
            sh(
                Command::new("apt-get")
                    .args(["install", "-y", "gcc-11", "g++-11"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
                "apt-get install gcc-11 g++-11",
            )?;
        }
        if try_with(Some("g++-11"))?.0 {
            eprintln!("nvcc accepts g++-11: using NVCC_CCBIN=g++-11");
            return Ok(Some("g++-11".into()));
        }
    }
    bail!("nvcc cannot compile a trivial kernel (see above)")
}

/// `cargo xtask cuda-check`.
pub fn cuda_check(args: &[String]) -> Result<()> {
    let a: CheckArgs = crate::parts::parse("cuda-check", args)?;
    if let Some(cap) = &a.compute_cap {
        super::bundle::check_compute_cap(cap)?;
    }
    let total = Instant::now();
    let mut times: Vec<(String, f64)> = Vec::new();
    let prefix = a.prefix.clone().unwrap_or_else(toolkit::default_prefix);
    if a.install {
        let t = Instant::now();
        match a.toolkit {
            toolkit::Source::Pypi => {
                toolkit::install_pypi(&prefix)?;
            }
            toolkit::Source::Debian => toolkit::install_debian()?,
        }
        times.push((
            format!("install toolkit ({:?})", a.toolkit).to_lowercase(),
            t.elapsed().as_secs_f64(),
        ));
    }
    let tk = match a.toolkit {
        toolkit::Source::Pypi => toolkit::Toolkit::find(&prefix),
        toolkit::Source::Debian => None,
    };
    if a.print_env {
        let path = std::env::var_os("PATH");
        print!(
            "{}",
            env_exports(a.toolkit, &prefix, tk.as_ref(), path.as_deref())?
        );
        return Ok(());
    }
    match &tk {
        Some(tk) => eprintln!(
            "toolkit: CUDA {} from PyPI in {}; environment:\n{}",
            toolkit::PYPI_CUDA,
            tk.root.display(),
            tk.exports()
        ),
        None if a.toolkit == toolkit::Source::Pypi => eprintln!(
            "no PyPI toolkit under {} (`--install` puts one there): using nvcc on PATH",
            prefix.display()
        ),
        None => eprintln!("toolkit: nvcc on PATH"),
    }
    let compute_cap = a
        .compute_cap
        .clone()
        .unwrap_or_else(|| a.toolkit.default_compute_cap().to_string());
    let ccbin = a.ccbin.clone().or_else(|| std::env::var("NVCC_CCBIN").ok());
    let ccbin = probe_nvcc(ccbin.as_deref(), a.install, tk.as_ref())?;
    let mut nvcc = Command::new("nvcc");
    if let Some(tk) = &tk {
        tk.apply(&mut nvcc);
    }
    let version = nvcc
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("{version}");
    let ptx_out = std::env::current_dir()?.join(&a.ptx_out);
    let mut steps: Vec<Vec<&str>> = vec![
        vec!["build", "-p", "kiln-core", "--features", "cuda"],
        vec!["check", "-p", "kiln-core", "--tests", "--features", "cuda"],
    ];
    if a.workspace {
        steps.push(vec![
            "check",
            "--workspace",
            "--all-targets",
            "--features",
            "kiln-core/cuda",
        ]);
    }
    for step in steps {
        let t = Instant::now();
        let mut c = toolkit::cuda_cargo(tk.as_ref());
        c.args(&step)
            .env("CUDA_COMPUTE_CAP", &compute_cap)
            .env("KILN_PTX_DIR", &ptx_out);
        if let Some(cc) = &ccbin {
            c.env("NVCC_CCBIN", cc);
        }
        let what = format!("cargo {}", step.join(" "));
        let r = sh(&mut c, &what);
        times.push((what, t.elapsed().as_secs_f64()));
        if let Err(e) = r {
            print_times(&times, total.elapsed().as_secs_f64());
            return Err(e);
        }
    }
    print_times(&times, total.elapsed().as_secs_f64());
    println!(
        "cuda-check: ok (CUDA_COMPUTE_CAP={compute_cap}, NVCC_CCBIN={}); PTX in {}",
        ccbin.as_deref().unwrap_or("(nvcc default)"),
        ptx_out.display()
    );
    if let Some(tk) = &tk {
        println!(
            "to build with this toolkit yourself: eval \"$(cargo xtask cuda-check --print-env)\" \
             && export CUDA_COMPUTE_CAP={compute_cap}\n{}",
            tk.exports()
        );
    }
    Ok(())
}

/// What `--print-env` prints: the PyPI toolkit's `export` lines, or nothing
/// for Debian's, whose nvcc is on `path` (a `PATH` value) and needs no variables.
fn env_exports(
    source: toolkit::Source,
    prefix: &Path,
    tk: Option<&toolkit::Toolkit>,
    path: Option<&std::ffi::OsStr>,
) -> Result<String> {
    match (source, tk) {
        (toolkit::Source::Pypi, Some(tk)) => Ok(tk.exports()),
        (toolkit::Source::Pypi, None) => bail!(
            "no PyPI toolkit under {}: run `cargo xtask cuda-check --install` first",
            prefix.display()
        ),
        (toolkit::Source::Debian, _) => {
            let Some(nvcc) = toolkit::nvcc_on_path(path) else {
                bail!(
                    "no Debian toolkit: nvcc is not on PATH: run `cargo xtask cuda-check \
                     --toolkit debian --install` (as root) first, which installs Debian's \
                     nvidia-cuda-toolkit (CUDA 11.8)"
                );
            };
            eprintln!(
                "toolkit: debian, nvcc on PATH ({}): it needs no environment, nothing to export",
                nvcc.display()
            );
            Ok(String::new())
        }
    }
}

fn print_times(times: &[(String, f64)], total: f64) {
    for (what, s) in times {
        println!("{s:>8.1}s  {what}");
    }
    println!("{total:>8.1}s  total");
}

// ------------------------------------------------------------ reference export

#[derive(Parser, Debug)]
#[command(about = "Write kernel inputs and kiln CPU outputs for scripts/gpu-check.sh")]
struct ExportArgs {
    /// Output folder (created; existing files are overwritten).
    dir: PathBuf,
}

/// `cargo xtask export-gpu-refs`.
pub fn export_gpu_refs(args: &[String]) -> Result<()> {
    let a: ExportArgs = crate::parts::parse("export-gpu-refs", args)?;
    let n = export(&a.dir)?;
    println!("wrote {n} cases to {}", a.dir.display());
    Ok(())
}

/// Launch shapes, as `kiln-core/src/ops/cuda.rs` computes them.
fn row_launch(rows: usize) -> (Value, Value) {
    (json!([rows.max(1), 1, 1]), json!([256, 1, 1]))
}
fn elem_launch(n: usize) -> (Value, Value) {
    (
        json!([n.div_ceil(256).clamp(1, 1 << 16), 1, 1]),
        json!([256, 1, 1]),
    )
}
fn col_launch(rows: usize, c: usize) -> (Value, Value) {
    (
        json!([c.div_ceil(32).max(1), rows.div_ceil(64).clamp(1, 1024), 1]),
        json!([32, 8, 1]),
    )
}

/// One kernel check: buffers (files or zeros, some with expected contents) and launches.
struct Case {
    name: String,
    module: &'static str,
    atol: f64,
    rtol: f64,
    buffers: BTreeMap<String, Value>,
    launches: Vec<Value>,
}

impl Case {
    fn new(name: impl Into<String>, module: &'static str, atol: f64, rtol: f64) -> Self {
        Self {
            name: name.into(),
            module,
            atol,
            rtol,
            buffers: BTreeMap::new(),
            launches: Vec::new(),
        }
    }
}

struct Writer<'a> {
    dir: &'a Path,
    cases: Vec<Value>,
}

fn suffix(dt: DType) -> &'static str {
    if dt == DType::F64 {
        "f64"
    } else {
        "f32"
    }
}

impl Writer<'_> {
    fn file(&self, case: &str, buf: &str, t: &Tensor) -> Result<String> {
        let name = format!("{case}.{buf}.npy");
        t.flatten_all()?
            .write_npy(self.dir.join(&name))
            .with_context(|| format!("writing {name}"))?;
        Ok(name)
    }
    /// An input buffer from a file; with `expect`, also its contents after the launches.
    fn input(&self, c: &mut Case, buf: &str, t: &Tensor, expect: Option<&Tensor>) -> Result<()> {
        let mut v = json!({ "file": self.file(&c.name, buf, t)? });
        if let Some(e) = expect {
            v["expect"] = json!(self.file(&c.name, &format!("{buf}.expect"), e)?);
        }
        c.buffers.insert(buf.into(), v);
        Ok(())
    }
    /// A zeroed buffer of `t`'s dtype and size; with `expect`, its contents after.
    fn output(
        &self,
        c: &mut Case,
        buf: &str,
        n: usize,
        dt: DType,
        expect: Option<&Tensor>,
    ) -> Result<()> {
        let mut v = json!({ "zeros": n, "dtype": suffix(dt) });
        if let Some(e) = expect {
            v["expect"] = json!(self.file(&c.name, &format!("{buf}.expect"), e)?);
        }
        c.buffers.insert(buf.into(), v);
        Ok(())
    }
    fn launch(c: &mut Case, kernel: &str, (grid, block): (Value, Value), args: Vec<Value>) {
        c.launches
            .push(json!({ "kernel": kernel, "grid": grid, "block": block, "args": args }));
    }
    fn push(&mut self, c: Case) {
        self.cases.push(json!({
            "name": c.name,
            "module": c.module,
            "atol": c.atol,
            "rtol": c.rtol,
            "buffers": c.buffers,
            "launches": c.launches,
        }));
    }
}

fn buf(name: &str) -> Value {
    json!({ "buf": name })
}
fn i32a(v: usize) -> Value {
    json!({ "i32": v })
}

/// The gradient of `sum(f(x) * r)` with respect to `x`, through the kiln op's backward.
fn grad_of(
    x: &Tensor,
    r: &Tensor,
    f: impl Fn(&Tensor) -> kiln_core::Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(x)?;
    let y = f(v.as_tensor())?;
    let g = (&y * r)?.sum_all()?.backward()?;
    let dx = g.get(v.as_tensor()).context("no gradient")?.clone();
    Ok((y, dx))
}

/// Writes every kernel's check into `dir`; returns the number of cases.
pub fn export(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cpu = Device::Cpu;
    let rng = |seed: u64, shape: &[usize], scale: f32| -> Result<Tensor> {
        Ok(SeededRng::new(seed).normal(shape, 0.0, scale, &cpu)?)
    };
    let mut w = Writer {
        dir,
        cases: Vec::new(),
    };

    // token.cu, f32 and f64.
    let (rows, v) = (6usize, 3001usize);
    let targets: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 977 + 13) % v as u32)
        .collect();
    let t = Tensor::new(targets.as_slice(), &cpu)?;
    for dt in [DType::F32, DType::F64] {
        let s = suffix(dt);
        let tol = if dt == DType::F64 { 1e-10 } else { 2e-5 };
        let x = rng(1, &[rows, v], 3.0)?.to_dtype(dt)?;
        let g = rng(2, &[rows], 1.0)?.to_dtype(dt)?;
        let (lp, dlp) = grad_of(&x, &g, |x| ops::token_logprobs(x, &t))?;
        let (ent, dent) = grad_of(&x, &g, ops::token_entropy)?;
        let args = |names: &[&str]| -> Vec<Value> {
            let mut a: Vec<Value> = names.iter().map(|n| buf(n)).collect();
            a.extend([i32a(rows), i32a(v)]);
            a
        };
        let mut c = Case::new(format!("token_logprobs_fwd_{s}"), "token", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.input(&mut c, "t", &t, None)?;
        w.output(&mut c, "y", rows, dt, Some(&lp))?;
        let k = c.name.clone();
        Writer::launch(&mut c, &k, row_launch(rows), args(&["x", "t", "y"]));
        w.push(c);
        let mut c = Case::new(format!("token_logprobs_bwd_{s}"), "token", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.input(&mut c, "t", &t, None)?;
        w.input(&mut c, "g", &g, None)?;
        w.output(&mut c, "dx", rows * v, dt, Some(&dlp))?;
        let k = c.name.clone();
        Writer::launch(&mut c, &k, row_launch(rows), args(&["x", "t", "g", "dx"]));
        w.push(c);
        let mut c = Case::new(format!("token_entropy_fwd_{s}"), "token", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.output(&mut c, "y", rows, dt, Some(&ent))?;
        let k = c.name.clone();
        Writer::launch(&mut c, &k, row_launch(rows), args(&["x", "y"]));
        w.push(c);
        let mut c = Case::new(format!("token_entropy_bwd_{s}"), "token", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.input(&mut c, "g", &g, None)?;
        w.output(&mut c, "dx", rows * v, dt, Some(&dent))?;
        let k = c.name.clone();
        Writer::launch(&mut c, &k, row_launch(rows), args(&["x", "g", "dx"]));
        w.push(c);
    }

    // fused.cu, f32.
    let f = DType::F32;
    let x = rng(3, &[4099], 3.0)?;
    let g = rng(4, &[4099], 1.0)?;
    let (y, dx) = grad_of(&x, &g, ops::gelu_tanh)?;
    let n = 4099;
    let mut c = Case::new("gelu_tanh_fwd_f32", "fused", 1e-5, 1e-5);
    w.input(&mut c, "x", &x, None)?;
    w.output(&mut c, "y", n, f, Some(&y))?;
    Writer::launch(
        &mut c,
        "gelu_tanh_fwd_f32",
        elem_launch(n),
        vec![buf("x"), buf("y"), json!({ "u64": n })],
    );
    w.push(c);
    let mut c = Case::new("gelu_tanh_bwd_f32", "fused", 1e-5, 1e-5);
    w.input(&mut c, "x", &x, None)?;
    w.input(&mut c, "g", &g, None)?;
    w.output(&mut c, "dx", n, f, Some(&dx))?;
    Writer::launch(
        &mut c,
        "gelu_tanh_bwd_f32",
        elem_launch(n),
        vec![buf("x"), buf("g"), buf("dx"), json!({ "u64": n })],
    );
    w.push(c);

    // dropout: the CPU op's mask, keep 0.7, an odd length (a lone last draw)
    let (keep, seed) = (0.7f64, 0x0123_4567_89ab_cdefu64);
    let y = ops::dropout(&x, keep, seed)?;
    let mut c = Case::new("dropout_f32", "fused", 0.0, 0.0);
    w.input(&mut c, "x", &x, None)?;
    w.output(&mut c, "y", n, f, Some(&y))?;
    Writer::launch(
        &mut c,
        "dropout_f32",
        elem_launch(n),
        vec![
            buf("x"),
            buf("y"),
            json!({ "u64": n }),
            json!({ "u64": seed }),
            json!({ "u64": (keep * 4_294_967_296.0).round() as u64 }),
            json!({ "f32": (1.0 / keep) as f32 }),
        ],
    );
    w.push(c);

    let (r, cc) = (7usize, 513usize);
    let x = rng(5, &[r, cc], 2.0)?;
    let g = rng(6, &[r, cc], 1.0)?;
    let (y, dx) = grad_of(&x, &g, ops::softmax_last_dim)?;
    let mut c = Case::new("softmax_fwd_f32", "fused", 1e-6, 1e-4);
    w.input(&mut c, "x", &x, None)?;
    w.output(&mut c, "y", r * cc, f, Some(&y))?;
    Writer::launch(
        &mut c,
        "softmax_fwd_f32",
        row_launch(r),
        vec![buf("x"), buf("y"), i32a(r), i32a(cc)],
    );
    w.push(c);
    let mut c = Case::new("softmax_bwd_f32", "fused", 1e-6, 1e-4);
    w.input(&mut c, "y", &y, None)?;
    w.input(&mut c, "g", &g, None)?;
    w.output(&mut c, "dx", r * cc, f, Some(&dx))?;
    Writer::launch(
        &mut c,
        "softmax_bwd_f32",
        row_launch(r),
        vec![buf("y"), buf("g"), buf("dx"), i32a(r), i32a(cc)],
    );
    w.push(c);

    let (r, cc, eps) = (70usize, 768usize, 1e-5f64);
    let x = (rng(7, &[r, cc], 2.0)? + 5.0)?;
    let wt = Var::from_tensor(&rng(8, &[cc], 1.0)?)?;
    let bt = Var::from_tensor(&rng(9, &[cc], 1.0)?)?;
    let g = rng(10, &[r, cc], 1.0)?;
    let xv = Var::from_tensor(&x)?;
    let y = ops::layer_norm(xv.as_tensor(), wt.as_tensor(), bt.as_tensor(), eps)?;
    let gs = (&y * &g)?.sum_all()?.backward()?;
    let gx = gs.get(xv.as_tensor()).context("gx")?;
    let gw = gs.get(wt.as_tensor()).context("gw")?;
    let gb = gs.get(bt.as_tensor()).context("gb")?;
    let e = json!({ "f32": eps });
    let mut c = Case::new("layer_norm_fwd_f32", "fused", 1e-5, 1e-4);
    w.input(&mut c, "x", &x, None)?;
    w.input(&mut c, "w", wt.as_tensor(), None)?;
    w.input(&mut c, "b", bt.as_tensor(), None)?;
    w.output(&mut c, "y", r * cc, f, Some(&y))?;
    Writer::launch(
        &mut c,
        "layer_norm_fwd_f32",
        row_launch(r),
        vec![
            buf("x"),
            buf("w"),
            buf("b"),
            buf("y"),
            i32a(r),
            i32a(cc),
            e.clone(),
        ],
    );
    w.push(c);
    let mut c = Case::new("layer_norm_bwd_x_f32", "fused", 1e-4, 1e-3);
    w.input(&mut c, "x", &x, None)?;
    w.input(&mut c, "w", wt.as_tensor(), None)?;
    w.input(&mut c, "g", &g, None)?;
    w.output(&mut c, "dx", r * cc, f, Some(gx))?;
    Writer::launch(
        &mut c,
        "layer_norm_bwd_x_f32",
        row_launch(r),
        vec![
            buf("x"),
            buf("w"),
            buf("g"),
            buf("dx"),
            i32a(r),
            i32a(cc),
            e.clone(),
        ],
    );
    w.push(c);
    let mut c = Case::new("layer_norm_bwd_wb_f32", "fused", 1e-3, 1e-4);
    w.input(&mut c, "x", &x, None)?;
    w.input(&mut c, "g", &g, None)?;
    w.output(&mut c, "stats", 2 * r, f, None)?;
    w.output(&mut c, "out", 2 * cc, f, Some(&Tensor::cat(&[gw, gb], 0)?))?;
    Writer::launch(
        &mut c,
        "layer_norm_stats_f32",
        row_launch(r),
        vec![buf("x"), buf("stats"), i32a(r), i32a(cc), e],
    );
    Writer::launch(
        &mut c,
        "layer_norm_bwd_wb_f32",
        col_launch(r, cc),
        vec![
            buf("x"),
            buf("g"),
            buf("stats"),
            buf("out"),
            i32a(r),
            i32a(cc),
        ],
    );
    w.push(c);

    let (r, cc) = (150usize, 37usize);
    let x = rng(11, &[r, cc], 1.0)?;
    let bias = Var::from_tensor(&rng(12, &[cc], 1.0)?)?;
    let g = rng(13, &[r, cc], 1.0)?;
    let y = ops::add_bias_last(&x, bias.as_tensor())?;
    let gs = (&y * &g)?.sum_all()?.backward()?;
    let gb = gs.get(bias.as_tensor()).context("gb")?;
    let mut c = Case::new("add_bias_last_f32", "fused", 1e-6, 1e-6);
    w.input(&mut c, "x", &x, None)?;
    w.input(&mut c, "b", bias.as_tensor(), None)?;
    w.output(&mut c, "y", r * cc, f, Some(&y))?;
    Writer::launch(
        &mut c,
        "add_bias_last_f32",
        elem_launch(r * cc),
        vec![
            buf("x"),
            buf("b"),
            buf("y"),
            json!({ "u64": r * cc }),
            i32a(cc),
        ],
    );
    w.push(c);
    let mut c = Case::new("sum_rows_f32", "fused", 1e-4, 1e-5);
    w.input(&mut c, "g", &g, None)?;
    w.output(&mut c, "out", cc, f, Some(gb))?;
    Writer::launch(
        &mut c,
        "sum_rows_f32",
        col_launch(r, cc),
        vec![buf("g"), buf("out"), i32a(r), i32a(cc)],
    );
    w.push(c);

    // pool.cu, f32 and f64: overlapping 3x3 windows every 2 on 9x11 planes.
    let (b, ch, h, wd, k, st) = (2usize, 3usize, 9usize, 11usize, 3usize, 2usize);
    let (ho, wo) = ops::shape::pool_out(h, wd, k, st, "pool refs")?;
    let planes = b * ch;
    let geo = |a: Vec<Value>| -> Vec<Value> {
        let mut a = a;
        a.extend([planes, h, wd, ho, wo, k, st].map(i32a));
        a
    };
    for dt in [DType::F32, DType::F64] {
        let s = suffix(dt);
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
        let x = rng(14, &[b, ch, h, wd], 1.0)?.to_dtype(dt)?;
        let dy = rng(15, &[b, ch, ho, wo], 1.0)?.to_dtype(dt)?;
        let (ym, dxm) = grad_of(&x, &dy, |x| ops::max_pool2d(x, k, st))?;
        let (ya, dxa) = grad_of(&x, &dy, |x| ops::avg_pool2d(x, k, st))?;
        for (kind, y, dx) in [("max", &ym, &dxm), ("avg", &ya, &dxa)] {
            let name = format!("{kind}_pool2d_fwd_{s}");
            let mut c = Case::new(name.clone(), "pool", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.output(&mut c, "y", planes * ho * wo, dt, Some(y))?;
            Writer::launch(
                &mut c,
                &name,
                elem_launch(planes * ho * wo),
                geo(vec![buf("x"), buf("y")]),
            );
            w.push(c);
            let name = format!("{kind}_pool2d_bwd_{s}");
            let mut c = Case::new(name.clone(), "pool", tol, tol);
            let ins = if kind == "max" {
                w.input(&mut c, "x", &x, None)?;
                vec![buf("x"), buf("dy")]
            } else {
                vec![buf("dy")]
            };
            w.input(&mut c, "dy", &dy, None)?;
            w.output(&mut c, "dx", planes * h * wd, dt, Some(dx))?;
            let mut a = ins;
            a.push(buf("dx"));
            Writer::launch(&mut c, &name, elem_launch(planes * h * wd), geo(a));
            w.push(c);
        }
        let bias = Var::from_tensor(&rng(16, &[ch], 1.0)?.to_dtype(dt)?)?;
        let y = ops::add_channel_bias(&x, bias.as_tensor())?;
        let gs = (&y * &x)?.sum_all()?.backward()?;
        let db = gs.get(bias.as_tensor()).context("db")?;
        let n = b * ch * h * wd;
        let name = format!("channel_bias_{s}");
        let mut c = Case::new(name.clone(), "pool", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.input(&mut c, "b", bias.as_tensor(), None)?;
        w.output(&mut c, "y", n, dt, Some(&y))?;
        Writer::launch(
            &mut c,
            &name,
            elem_launch(n),
            vec![
                buf("x"),
                buf("b"),
                buf("y"),
                json!({ "u64": n }),
                i32a(ch),
                i32a(h * wd),
            ],
        );
        w.push(c);
        let name = format!("channel_sum_{s}");
        let mut c = Case::new(name.clone(), "pool", tol * 10.0, tol);
        w.input(&mut c, "dy", &x, None)?;
        w.output(&mut c, "out", ch, dt, Some(db))?;
        Writer::launch(
            &mut c,
            &name,
            row_launch(ch),
            vec![buf("dy"), buf("out"), i32a(b), i32a(ch), i32a(h * wd)],
        );
        w.push(c);
    }

    // act.cu, f32 and f64: ReLU, leaky ReLU and conv bias + ReLU, inputs with
    // exact zeros (the gradient's edge: 0 for ReLU, `slope` for leaky ReLU).
    let (b, ch, h, wd) = (2usize, 3usize, 9usize, 11usize);
    let n = b * ch * h * wd;
    let zeroed = |t: Tensor| -> Result<Tensor> {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 5 == 0 { 0.0 } else { x })
            .collect();
        Ok(Tensor::from_vec(v, t.dims(), &cpu)?)
    };
    for dt in [DType::F32, DType::F64] {
        let s = suffix(dt);
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
        let x = zeroed(rng(20, &[b, ch, h, wd], 1.0)?)?.to_dtype(dt)?;
        let dy = rng(21, &[b, ch, h, wd], 1.0)?.to_dtype(dt)?;
        let len = json!({ "u64": n });
        for (kind, slope) in [("relu", 0.0f64), ("leaky_relu", 0.2)] {
            let (y, dx) = grad_of(&x, &dy, |x| ops::leaky_relu(x, slope))?;
            let sl = json!({ "f64": slope });
            let mut c = Case::new(format!("{kind}_fwd_{s}"), "act", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.output(&mut c, "y", n, dt, Some(&y))?;
            let args = vec![buf("x"), buf("y"), len.clone(), sl.clone()];
            Writer::launch(&mut c, &format!("relu_fwd_{s}"), elem_launch(n), args);
            w.push(c);
            let mut c = Case::new(format!("{kind}_bwd_{s}"), "act", tol, tol);
            w.input(&mut c, "y", &y, None)?;
            w.input(&mut c, "dy", &dy, None)?;
            w.output(&mut c, "dx", n, dt, Some(&dx))?;
            let args = vec![buf("y"), buf("dy"), buf("dx"), len.clone(), sl];
            Writer::launch(&mut c, &format!("relu_bwd_{s}"), elem_launch(n), args);
            w.push(c);
        }
        // A zero bias on channel 1 puts exact zeros into x + b there.
        let bias = Var::from_tensor(&Tensor::new(&[0.3f32, 0.0, -0.2], &cpu)?.to_dtype(dt)?)?;
        let xv = Var::from_tensor(&x)?;
        let y = ops::add_channel_bias_relu(xv.as_tensor(), bias.as_tensor())?;
        let gs = (&y * &dy)?.sum_all()?.backward()?;
        let gx = gs.get(xv.as_tensor()).context("gx")?;
        let gb = gs.get(bias.as_tensor()).context("gb")?;
        let (cc, hw) = (i32a(ch), i32a(h * wd));
        let name = format!("channel_bias_relu_{s}");
        let mut c = Case::new(name.clone(), "act", tol, tol);
        w.input(&mut c, "x", &x, None)?;
        w.input(&mut c, "b", bias.as_tensor(), None)?;
        w.output(&mut c, "y", n, dt, Some(&y))?;
        let args = vec![
            buf("x"),
            buf("b"),
            buf("y"),
            len.clone(),
            cc.clone(),
            hw.clone(),
        ];
        Writer::launch(&mut c, &name, elem_launch(n), args);
        w.push(c);
        // Backward: the masked gradient (act.cu), then its channel sums (pool.cu).
        let mut c = Case::new(
            format!("channel_bias_relu_bwd_{s}"),
            "act",
            tol * 100.0,
            tol * 10.0,
        );
        w.input(&mut c, "y", &y, None)?;
        w.input(&mut c, "dy", &dy, None)?;
        w.output(&mut c, "dx", n, dt, Some(gx))?;
        w.output(&mut c, "db", ch, dt, Some(gb))?;
        let args = vec![buf("y"), buf("dy"), buf("dx"), len, json!({ "f64": 0.0 })];
        Writer::launch(&mut c, &format!("relu_bwd_{s}"), elem_launch(n), args);
        let args = vec![buf("dx"), buf("db"), i32a(b), cc, hw];
        let at = c.launches.len();
        Writer::launch(&mut c, &format!("channel_sum_{s}"), row_launch(ch), args);
        c.launches[at]["module"] = json!("pool");
        w.push(c);
    }

    // norm.cu, f32 and f64: batch norm statistics, forward (train and eval
    // statistics), gradient sums and input gradient, on [B, C, H, W] with an
    // offset mean; the statistics also on [B, C] (one value per plane).
    let (b, ch, h, wd, eps) = (4usize, 3usize, 7usize, 9usize, 1e-5f64);
    let (sp, n) = (h * wd, b * ch * h * wd);
    for dt in [DType::F32, DType::F64] {
        let s = suffix(dt);
        let tol = if dt == DType::F64 { 1e-11 } else { 1e-5 };
        let e = json!({ "f64": eps });
        for (tag, shape, seed) in [("", vec![b, ch, h, wd], 22u64), ("_2d", vec![32, 5], 23)] {
            let x = (rng(seed, &shape, 2.0)? + 5.0)?.to_dtype(dt)?;
            let (m, v) = ops::batch_norm_stats(&x)?;
            let (bb, cc) = (shape[0], shape[1]);
            let ss: usize = shape[2..].iter().product();
            let name = format!("bn_stats{tag}_{s}");
            let mut c = Case::new(name, "norm", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.output(&mut c, "out", 2 * cc, dt, Some(&Tensor::cat(&[&m, &v], 0)?))?;
            let args = vec![buf("x"), buf("out"), i32a(bb), i32a(cc), i32a(ss)];
            Writer::launch(&mut c, &format!("bn_stats_{s}"), row_launch(cc), args);
            w.push(c);
        }
        let x = (rng(22, &[b, ch, h, wd], 2.0)? + 5.0)?.to_dtype(dt)?;
        let dy = rng(24, &[b, ch, h, wd], 1.0)?.to_dtype(dt)?;
        let wt = rng(25, &[ch], 1.0)?.to_dtype(dt)?;
        let bt = rng(26, &[ch], 1.0)?.to_dtype(dt)?;
        let (bm, bv) = ops::batch_norm_stats(&x)?;
        let rm = rng(27, &[ch], 1.0)?.to_dtype(dt)?;
        let rv = (rng(28, &[ch], 1.0)?.abs()? + 0.5)?.to_dtype(dt)?;
        for (mode, m, v, train) in [("train", &bm, &bv, true), ("eval", &rm, &rv, false)] {
            let xv = Var::from_tensor(&x)?;
            let (wv, bv_) = (Var::from_tensor(&wt)?, Var::from_tensor(&bt)?);
            let y = ops::batch_norm(
                xv.as_tensor(),
                m,
                v,
                wv.as_tensor(),
                bv_.as_tensor(),
                eps,
                train,
            )?;
            let gs = (&y * &dy)?.sum_all()?.backward()?;
            let gx = gs.get(xv.as_tensor()).context("gx")?;
            let gw = gs.get(wv.as_tensor()).context("gw")?;
            let gb = gs.get(bv_.as_tensor()).context("gb")?;
            let p = Tensor::stack(&[m, v, &wt, &bt], 0)?;
            let sums = Tensor::stack(&[gb, gw], 0)?;
            let q = Tensor::cat(&[&p, &sums], 0)?;
            let geo = |a: Vec<Value>| -> Vec<Value> {
                let mut a = a;
                a.extend([json!({ "u64": n }), i32a(ch), i32a(sp)]);
                a
            };
            let mut c = Case::new(format!("batch_norm_fwd_{mode}_{s}"), "norm", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.input(&mut c, "p", &p, None)?;
            w.output(&mut c, "coef", 3 * ch, dt, None)?;
            w.output(&mut c, "y", n, dt, Some(&y))?;
            let args = vec![buf("p"), buf("coef"), i32a(ch), e.clone()];
            Writer::launch(&mut c, &format!("bn_fwd_coef_{s}"), elem_launch(ch), args);
            let args = geo(vec![buf("x"), buf("coef"), buf("y")]);
            Writer::launch(&mut c, &format!("batch_norm_fwd_{s}"), elem_launch(n), args);
            w.push(c);
            let mut c = Case::new(format!("bn_sums_{mode}_{s}"), "norm", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.input(&mut c, "dy", &dy, None)?;
            w.input(&mut c, "p", &p, None)?;
            w.output(&mut c, "out", 2 * ch, dt, Some(&sums))?;
            let args = vec![
                buf("x"),
                buf("dy"),
                buf("p"),
                buf("out"),
                i32a(b),
                i32a(ch),
                i32a(sp),
                e.clone(),
            ];
            Writer::launch(&mut c, &format!("bn_sums_{s}"), row_launch(ch), args);
            w.push(c);
            let mut c = Case::new(format!("bn_grad_x_{mode}_{s}"), "norm", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.input(&mut c, "dy", &dy, None)?;
            w.input(&mut c, "q", &q, None)?;
            w.output(&mut c, "coef", 5 * ch, dt, None)?;
            w.output(&mut c, "dx", n, dt, Some(gx))?;
            let args = vec![
                buf("q"),
                buf("coef"),
                i32a(ch),
                e.clone(),
                json!({ "f64": (b * sp) as f64 }),
                json!({ "i32": i32::from(train) }),
            ];
            Writer::launch(&mut c, &format!("bn_grad_coef_{s}"), elem_launch(ch), args);
            let args = geo(vec![buf("x"), buf("dy"), buf("coef"), buf("dx")]);
            Writer::launch(&mut c, &format!("bn_grad_x_{s}"), elem_launch(n), args);
            w.push(c);
        }
    }

    // optim.cu: the second AdamW step of kiln's CPU optimizer.
    let n = 1000usize;
    let (lr, wdk, betas, eps) = (1e-2f64, 0.1f64, (0.9f64, 0.999f64), 1e-8f64);
    let p = Var::from_tensor(&rng(17, &[n], 1.0)?)?;
    let kind = OptimKind::AdamW { betas, eps };
    let mut opt = Optimizer::new(
        kind,
        vec![ParamGroup::new(vec![("p".into(), p.clone())], lr).weight_decay(wdk)],
    )?;
    let g1 = rng(18, &[n], 1.0)?;
    let g2 = rng(19, &[n], 1.0)?;
    opt.backward_step(&(p.as_tensor() * &g1)?.sum_all()?)?;
    let state = |o: &Optimizer| -> Result<(Tensor, Tensor)> {
        let (ts, _) = o.state()?;
        let get = |k: &str| {
            ts.iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| t.clone())
                .with_context(|| format!("no {k} in the optimizer state"))
        };
        Ok((get("p.exp_avg")?, get("p.exp_avg_sq")?))
    };
    let p1 = p.as_tensor().copy()?;
    let (m1, v1) = state(&opt)?;
    opt.backward_step(&(p.as_tensor() * &g2)?.sum_all()?)?;
    let (m2, v2) = state(&opt)?;
    let t = 2i32;
    let bc1 = 1.0 - betas.0.powi(t);
    let bc2 = 1.0 - betas.1.powi(t);
    let mut c = Case::new("adam_update_f32", "optim", 1e-6, 1e-5);
    w.input(&mut c, "p", &p1, Some(p.as_tensor()))?;
    w.input(&mut c, "g", &g2, None)?;
    w.input(&mut c, "m", &m1, Some(&m2))?;
    w.input(&mut c, "v", &v1, Some(&v2))?;
    let f = |v: f64| json!({ "f32": v });
    Writer::launch(
        &mut c,
        "adam_update_f32",
        elem_launch(n),
        vec![
            buf("p"),
            buf("g"),
            buf("m"),
            buf("v"),
            json!({ "u64": n }),
            f(lr / bc1),
            f(bc2.sqrt()),
            f(eps),
            f(wdk),
            f(1.0 - lr * wdk),
            f(1.0 - betas.0),
            f(betas.1),
            f(1.0 - betas.1),
            json!({ "i32": 1 }),
        ],
    );
    w.push(c);

    export_conv(&mut w)?;

    let count = w.cases.len();
    let manifest = json!({
        "format": "kiln-gpu-refs/1",
        "note": "written by `cargo xtask export-gpu-refs`; read by scripts/gpu-check/check.py",
        "cases": w.cases,
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(count)
}

/// A convolution's sizes for the conv.cu checks: `x [b, c, h, w]`, a `kh x kw`
/// kernel with stride, padding and dilation, and its output size.
#[derive(Debug, Clone, Copy)]
struct ConvGeo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    d: usize,
}

impl ConvGeo {
    /// `(ho, wo)` by kiln's own rule ([`ops::shape::conv_out`]); the
    /// geometries below all fit, so a miss is 0.
    fn out(&self) -> (usize, usize) {
        let p = ops::shape::ConvParams {
            stride: self.s,
            padding: self.p,
            dilation: self.d,
            groups: 1,
        };
        let side = |i: usize, k: usize| ops::shape::conv_out(i, k, &p).unwrap_or(0);
        (side(self.h, self.kh), side(self.w, self.kw))
    }
    /// `(x index, column-matrix index)` of every tap that reads an input pixel
    /// (padding taps read nothing): column matrix `[c*kh*kw, b*ho*wo]`, rows
    /// `(ci, ki, kj)`, columns `(image, oy, ox)`, as `kernels/conv.cu` lays it out.
    fn taps(&self) -> Vec<(usize, usize)> {
        let (ho, wo) = self.out();
        let cols = self.b * ho * wo;
        let mut t = Vec::new();
        for ci in 0..self.c {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = (ci * self.kh + ki) * self.kw + kj;
                    for bi in 0..self.b {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let iy = (oy * self.s + ki * self.d) as isize - self.p as isize;
                                let ix = (ox * self.s + kj * self.d) as isize - self.p as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= self.h as isize
                                    || ix >= self.w as isize
                                {
                                    continue;
                                }
                                let xi = ((bi * self.c + ci) * self.h + iy as usize) * self.w
                                    + ix as usize;
                                t.push((xi, row * cols + (bi * ho + oy) * wo + ox));
                            }
                        }
                    }
                }
            }
        }
        t
    }
    fn col_len(&self) -> usize {
        let (ho, wo) = self.out();
        self.c * self.kh * self.kw * self.b * ho * wo
    }
    fn args(&self, bufs: [&str; 2], n: usize) -> Vec<Value> {
        let (ho, wo) = self.out();
        let mut a = vec![buf(bufs[0]), buf(bufs[1]), json!({ "u64": n })];
        a.extend(
            [
                self.b, self.c, self.h, self.w, self.kh, self.kw, ho, wo, self.s, self.p, self.d,
            ]
            .map(i32a),
        );
        a
    }
}

/// conv.cu, f32 and f64: im2col and col2im against plain loops over the taps
/// (col2im scatters here where the kernel gathers), the layout permutes
/// against candle's transpose, and the slice accumulation. Groups change no
/// kernel (a group is a block of the column matrix's rows), so the geometries
/// vary stride, padding, dilation, kernel shape and odd sizes.
fn export_conv(w: &mut Writer<'_>) -> Result<()> {
    let cpu = Device::Cpu;
    let rng = |seed: u64, shape: &[usize]| -> Result<Tensor> {
        Ok(SeededRng::new(seed).normal(shape, 0.0, 1.0, &cpu)?)
    };
    let geos = [
        // (b, c, h, w, kh, kw, stride, padding, dilation)
        [2, 3, 7, 9, 3, 3, 2, 1, 1],
        [3, 4, 11, 9, 3, 3, 2, 0, 2],
        [2, 2, 13, 7, 5, 5, 3, 2, 1],
        [2, 3, 5, 5, 4, 4, 1, 3, 1],
        [6, 5, 4, 4, 4, 4, 1, 0, 1],
        [2, 6, 8, 8, 1, 1, 1, 0, 1],
        [3, 4, 8, 8, 4, 4, 2, 1, 1],
        [3, 2, 6, 5, 3, 2, 1, 1, 2],
    ];
    for (gi, a) in geos.iter().enumerate() {
        let [b, ch, h, wd, kh, kw, s, p, d] = *a;
        let g = ConvGeo {
            b,
            c: ch,
            h,
            w: wd,
            kh,
            kw,
            s,
            p,
            d,
        };
        let (ho, wo) = g.out();
        let (n_x, n_col) = (b * ch * h * wd, g.col_len());
        let taps = g.taps();
        for dt in [DType::F32, DType::F64] {
            let sx = suffix(dt);
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let seed = 300 + 10 * gi as u64;
            let x = rng(seed, &[n_x])?.to_dtype(dt)?;
            let xv: Vec<f64> = x.to_dtype(DType::F64)?.to_vec1()?;
            let mut col = vec![0f64; n_col];
            for &(xi, ci) in &taps {
                col[ci] = xv[xi];
            }
            let col = Tensor::from_vec(col, n_col, &cpu)?.to_dtype(dt)?;
            let mut c = Case::new(format!("im2col_{sx}_g{gi}"), "conv", tol, tol);
            w.input(&mut c, "x", &x, None)?;
            w.output(&mut c, "col", n_col, dt, Some(&col))?;
            let k = format!("im2col_{sx}");
            Writer::launch(&mut c, &k, elem_launch(n_col), g.args(["x", "col"], n_col));
            w.push(c);

            let dcol = rng(seed + 1, &[n_col])?.to_dtype(dt)?;
            let dv: Vec<f64> = dcol.to_dtype(DType::F64)?.to_vec1()?;
            let mut dx = vec![0f64; n_x];
            for &(xi, ci) in &taps {
                dx[xi] += dv[ci];
            }
            let dx = Tensor::from_vec(dx, n_x, &cpu)?.to_dtype(dt)?;
            let mut c = Case::new(format!("col2im_{sx}_g{gi}"), "conv", tol, tol);
            w.input(&mut c, "col", &dcol, None)?;
            w.output(&mut c, "dx", n_x, dt, Some(&dx))?;
            let k = format!("col2im_{sx}");
            Writer::launch(&mut c, &k, elem_launch(n_x), g.args(["col", "dx"], n_x));
            w.push(c);

            // dy [b, c_out, ho, wo] <-> [c_out, b*ho*wo], c_out = 2c + 1.
            let co = 2 * ch + 1;
            let n_y = b * co * ho * wo;
            let dy = rng(seed + 2, &[b, co, ho, wo])?.to_dtype(dt)?;
            let cn = dy
                .reshape((b, co, ho * wo))?
                .transpose(0, 1)?
                .contiguous()?;
            let pa = vec![i32a(b), i32a(co), i32a(ho * wo)];
            let mut c = Case::new(format!("conv_permute_{sx}_g{gi}"), "conv", 0.0, 0.0);
            w.input(&mut c, "dy", &dy, None)?;
            w.output(&mut c, "cn", n_y, dt, Some(&cn))?;
            w.output(&mut c, "back", n_y, dt, Some(&dy))?;
            let mut args = vec![buf("dy"), buf("cn"), json!({ "u64": n_y })];
            args.extend(pa.clone());
            Writer::launch(&mut c, &format!("nchw_to_cn_{sx}"), elem_launch(n_y), args);
            let mut args = vec![buf("cn"), buf("back"), json!({ "u64": n_y })];
            args.extend(pa);
            Writer::launch(&mut c, &format!("cn_to_nchw_{sx}"), elem_launch(n_y), args);
            w.push(c);
        }
    }
    for dt in [DType::F32, DType::F64] {
        let sx = suffix(dt);
        let n = 5003usize;
        let (a, b) = (rng(390, &[n])?.to_dtype(dt)?, rng(391, &[n])?.to_dtype(dt)?);
        let mut c = Case::new(format!("accumulate_{sx}"), "conv", 1e-12, 1e-6);
        w.input(&mut c, "x", &a, None)?;
        w.input(&mut c, "acc", &b, Some(&(&a + &b)?))?;
        Writer::launch(
            &mut c,
            &format!("accumulate_{sx}"),
            elem_launch(n),
            vec![buf("x"), buf("acc"), json!({ "u64": n })],
        );
        w.push(c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda_check_with(args: &[&str]) -> Result<()> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        cuda_check(&args)
    }

    #[test]
    fn print_env_names_the_toolkit_it_was_asked_for() -> Result<()> {
        let base = std::env::temp_dir().join(format!("kiln-print-env-{}", std::process::id()));
        let (empty, with_nvcc) = (base.join("empty"), base.join("bin"));
        std::fs::create_dir_all(&empty)?;
        std::fs::create_dir_all(&with_nvcc)?;
        std::fs::write(with_nvcc.join("nvcc"), "")?;
        let debian = toolkit::Source::Debian;
        let e = env_exports(debian, &base, None, Some(empty.as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no Debian toolkit: nvcc is not on PATH") && !e.contains("PyPI"),
            "{e}"
        );
        let path = std::env::join_paths([&empty, &with_nvcc])?;
        assert_eq!(env_exports(debian, &base, None, Some(&path))?, "");
        let e = env_exports(toolkit::Source::Pypi, &base, None, Some(&path))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PyPI toolkit under"), "{e}");
        std::fs::remove_dir_all(&base)?;
        Ok(())
    }

    #[test]
    fn cuda_check_refuses_a_bad_compute_cap_even_with_print_env() {
        let prefix = std::env::temp_dir().join(format!("kiln-no-toolkit-{}", std::process::id()));
        let prefix = prefix.to_str().unwrap_or("/nonexistent");
        for toolkit in ["pypi", "debian"] {
            let e = cuda_check_with(&[
                "--toolkit",
                toolkit,
                "--compute-cap",
                "abc",
                "--print-env",
                "--prefix",
                prefix,
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("--compute-cap \"abc\"") && e.contains("such as 80"),
                "{toolkit}: {e}"
            );
        }
        // A good one goes on to the toolkit (none under this prefix).
        let e = cuda_check_with(&["--compute-cap", "86", "--print-env", "--prefix", prefix])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PyPI toolkit under"), "{e}");
    }

    #[test]
    fn export_writes_a_manifest_whose_files_exist_and_match_their_sizes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kiln-gpu-refs-{}", std::process::id()));
        let n = export(&dir)?;
        let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
        let cases = m["cases"].as_array().context("cases")?;
        assert_eq!(cases.len(), n);
        assert!(n >= 30, "{n} cases");
        let mut total = 0u64;
        for c in cases {
            let bufs = c["buffers"].as_object().context("buffers")?;
            for (name, b) in bufs {
                for key in ["file", "expect"] {
                    if let Some(f) = b[key].as_str() {
                        let path = dir.join(f);
                        let t = Tensor::read_npy(&path)?;
                        total += std::fs::metadata(&path)?.len();
                        if let Some(z) = b["zeros"].as_u64() {
                            assert_eq!(t.elem_count() as u64, z, "{} {name}", c["name"]);
                        }
                    }
                }
            }
            for l in c["launches"].as_array().context("launches")? {
                for a in l["args"].as_array().context("args")? {
                    if let Some(b) = a["buf"].as_str() {
                        assert!(bufs.contains_key(b), "{}: no buffer {b}", c["name"]);
                    }
                }
            }
            assert!(
                bufs.values().any(|b| b.get("expect").is_some()),
                "{} checks nothing",
                c["name"]
            );
        }
        assert!(total < 8 << 20, "{total} bytes of references");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
