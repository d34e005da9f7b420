//! `cargo xtask gpu-bundle OUT`: everything a GPU machine with no Rust needs to
//! check kiln on CUDA, built here with the PyPI toolkit and no GPU.
//!
//! `OUT/kiln-gpu/` holds
//! - `tests/`: kiln-core's unit-test binary (every CUDA op against the CPU op,
//!   forward and gradients; the fused Adam against the tensor path), built
//!   with `--release --features cuda`, stripped;
//! - `bin/xtask`: xtask with `kiln-core/cuda`, stripped (`demo --device cuda`,
//!   `generate --device cuda`);
//! - `bin/xtask-no-avx512`: xtask for the CPU built with `--cfg
//!   kiln_no_avx512` (gemm's and kiln's AVX-512 kernels left out), stripped:
//!   `run.sh --cpu` compares kiln with PyTorch on the GPU machine's CPU with
//!   and without them, the performance issue's two data points on an AVX-512
//!   CPU;
//! - `scripts/`: `gpu-check.sh` with the PTX and the exported references,
//!   the PyTorch reference scripts (`torch_gpu.py`, `torch_reference.py`, and
//!   kiln's copy of the CPU one with the machine keys, `bench/torch_reference.py`),
//!   `gpu_compare.py` (kiln's GPU benchmark lines beside PyTorch's, one table)
//!   and `gpt2_greedy.py` (transformers' greedy tokens on the fixture);
//! - `fixtures/tiny-gpt2`: kiln-lm's transformers-written GPT-2 fixture;
//! - `stub/libcuda.so.1`: the link-only driver stub, used by `run.sh
//!   --dry-run` alone, so the binaries start (and list their tests) where no
//!   driver is;
//! - `run.sh` and `MANIFEST.txt` (files, sizes, the libraries each binary loads).
//!
//! and `OUT/kiln-gpu.tar.xz`, which must stay under [`MAX_BYTES`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

use super::toolkit::{self, sh, Toolkit};

/// The compressed bundle's size limit (issue 20): 50 MB.
pub const MAX_BYTES: u64 = 50_000_000;

#[derive(Parser, Debug)]
#[command(about = "Build the CUDA test binaries, xtask and scripts for a GPU machine without Rust")]
struct BundleArgs {
    /// Output folder: OUT/kiln-gpu/ and OUT/kiln-gpu.tar.xz (an earlier bundle's
    /// kiln-gpu/ is replaced once every build has succeeded).
    out: PathBuf,
    /// The PyPI toolkit's prefix (`cargo xtask cuda-check --install` puts it in target/cuda-13.0).
    #[arg(long)]
    prefix: Option<PathBuf>,
    /// CUDA_COMPUTE_CAP of the PTX: 90 for Hopper (H100/H200), 80 for Ampere.
    #[arg(long, default_value = "90")]
    compute_cap: String,
    /// The PyTorch GPU reference script (imports torch_reference.py from its own folder).
    #[arg(long)]
    torch_gpu: Option<PathBuf>,
}

/// `cargo xtask gpu-bundle`.
pub fn gpu_bundle(args: &[String]) -> Result<()> {
    let a: BundleArgs = crate::parts::parse("gpu-bundle", args)?;
    let total = Instant::now();
    let root = toolkit::workspace_root();
    let prefix = a.prefix.clone().unwrap_or_else(toolkit::default_prefix);
    let Some(tk) = Toolkit::find(&prefix) else {
        bail!(
            "no CUDA toolkit under {}: run `cargo xtask cuda-check --install` first",
            prefix.display()
        )
    };
    let torch_gpu = a
        .torch_gpu
        .clone()
        .unwrap_or_else(|| root.join("../shared/bench/torch_gpu.py"));
    let torch_ref = torch_gpu.with_file_name("torch_reference.py");
    for f in [&torch_gpu, &torch_ref] {
        if !f.is_file() {
            bail!(
                "{} is not a file: pass --torch-gpu PATH/torch_gpu.py (torch_reference.py beside it)",
                f.display()
            );
        }
    }
    check_compute_cap(&a.compute_cap)?;
    let out = std::path::absolute(&a.out)?;
    if out.exists() && !out.is_dir() {
        bail!(
            "OUT {}: is a file; expected a folder (new or existing)",
            out.display()
        );
    }
    let dir = out.join("kiln-gpu");
    check_replaceable(&dir)?;
    let mut times: Vec<(String, f64)> = Vec::new();

    // The test binaries and the PTX (from kiln-core's build-script OUT_DIR).
    let t = Instant::now();
    let msgs = cargo_json(
        &tk,
        &a.compute_cap,
        &[
            "test",
            "--release",
            "-p",
            "kiln-core",
            "--features",
            "cuda",
            "--no-run",
        ],
    )?;
    times.push((
        "cargo test --release -p kiln-core --features cuda --no-run".into(),
        t.elapsed().as_secs_f64(),
    ));
    let mut tests = Vec::new();
    for m in &msgs {
        if m["reason"] == "compiler-artifact" && m["profile"]["test"] == true {
            if let Some(exe) = m["executable"].as_str() {
                let name = m["target"]["name"].as_str().unwrap_or("test");
                let kind = m["target"]["kind"][0].as_str().unwrap_or("test");
                tests.push((format!("kiln_core-{kind}-{name}"), PathBuf::from(exe)));
            }
        }
    }
    // Only the library's unit tests hold the CUDA tests; the integration
    // tests run on the CPU and stay out of the bundle.
    tests.retain(|(n, _)| n.starts_with("kiln_core-lib-"));
    if tests.is_empty() {
        bail!("cargo built no kiln-core library test binary");
    }
    let ptx_dir = msgs
        .iter()
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| {
            m["package_id"]
                .as_str()
                .is_some_and(|p| p.contains("kiln-core"))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("cargo reported no build-script output folder for kiln-core")?;
    let ptx: Vec<PathBuf> = std::fs::read_dir(&ptx_dir)
        .with_context(|| format!("reading {}", ptx_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
        .collect();
    if ptx.is_empty() {
        bail!("no PTX files in {}", ptx_dir.display());
    }
    let n_ptx = ptx.len();

    // xtask with CUDA.
    let t = Instant::now();
    let msgs = cargo_json(
        &tk,
        &a.compute_cap,
        &[
            "build",
            "--release",
            "-p",
            "xtask",
            "--features",
            "kiln-core/cuda",
        ],
    )?;
    times.push((
        "cargo build --release -p xtask --features kiln-core/cuda".into(),
        t.elapsed().as_secs_f64(),
    ));
    let xtask = msgs
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "xtask")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no xtask executable")?;

    // xtask for the CPU without the AVX-512 kernels, in the folder `bench
    // --no-avx512` and `ci --no-avx512` build into (their cache is reused).
    let t = Instant::now();
    let cpu_xtask = no_avx512_xtask()?;
    times.push((
        "cargo build --release -p xtask (--cfg kiln_no_avx512)".into(),
        t.elapsed().as_secs_f64(),
    ));

    // Every build succeeded: only now is an earlier bundle replaced.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    for sub in [
        "bin",
        "tests",
        "scripts/gpu-check/ptx",
        "scripts/bench",
        "fixtures",
        "stub",
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    for p in &ptx {
        let name = p.file_name().context("ptx name")?;
        std::fs::copy(p, dir.join("scripts/gpu-check/ptx").join(name))
            .with_context(|| format!("copying {}", p.display()))?;
    }

    let t = Instant::now();
    let mut bins = vec![
        ("bin/xtask".to_string(), xtask),
        ("bin/xtask-no-avx512".to_string(), cpu_xtask),
    ];
    bins.extend(tests.iter().map(|(n, p)| (format!("tests/{n}"), p.clone())));
    for (rel, src) in &bins {
        let dst = dir.join(rel);
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        sh(Command::new("strip").arg(&dst), &format!("strip {rel}"))?;
    }

    // Scripts, references, fixtures, the stub.
    let refs = dir.join("scripts/gpu-check/refs");
    let n_refs = super::gpu::export(&refs)?;
    copy(
        &root.join("scripts/gpu-check.sh"),
        &dir.join("scripts/gpu-check.sh"),
    )?;
    copy(
        &root.join("scripts/gpu-check/check.py"),
        &dir.join("scripts/gpu-check/check.py"),
    )?;
    copy(&torch_gpu, &dir.join("scripts/torch_gpu.py"))?;
    copy(
        &root.join("scripts/bench/gpu_compare.py"),
        &dir.join("scripts/gpu_compare.py"),
    )?;
    copy(&torch_ref, &dir.join("scripts/torch_reference.py"))?;
    copy(
        &root.join("scripts/bench/torch_reference.py"),
        &dir.join("scripts/bench/torch_reference.py"),
    )?;
    write(&dir.join("scripts/gpt2_greedy.py"), GPT2_GREEDY_PY, false)?;
    let fixture = root.join("crates/kiln-lm/tests/fixtures/tiny-gpt2");
    let fx_dst = dir.join("fixtures/tiny-gpt2");
    std::fs::create_dir_all(&fx_dst)?;
    for e in
        std::fs::read_dir(&fixture).with_context(|| format!("reading {}", fixture.display()))?
    {
        let p = e?.path();
        if p.is_file() {
            copy(&p, &fx_dst.join(p.file_name().context("fixture name")?))?;
        }
    }
    copy(
        &tk.stubs().join("libcuda.so"),
        &dir.join("stub/libcuda.so.1"),
    )?;
    write(&dir.join("run.sh"), RUN_SH, true)?;
    let manifest = manifest(&dir, &bins)?;
    write(&dir.join("MANIFEST.txt"), &manifest, false)?;
    times.push((
        "strip, scripts, references".into(),
        t.elapsed().as_secs_f64(),
    ));

    let t = Instant::now();
    let tar = out.join("kiln-gpu.tar.xz");
    sh(
        Command::new("tar")
            .arg("-cJf")
            .arg(&tar)
            .arg("-C")
            .arg(&out)
            .arg("kiln-gpu")
            .env("XZ_OPT", "-6 -T0"),
        &format!("tar -cJf {}", tar.display()),
    )?;
    times.push(("xz".into(), t.elapsed().as_secs_f64()));
    let size = std::fs::metadata(&tar)?.len();
    for (what, s) in &times {
        println!("{s:>8.1}s  {what}");
    }
    println!("{:>8.1}s  total", total.elapsed().as_secs_f64());
    print!("{manifest}");
    println!(
        "gpu-bundle: {} ({:.1} MB; {} PTX files, {n_refs} reference cases); on the GPU machine: tar xf kiln-gpu.tar.xz && kiln-gpu/run.sh",
        tar.display(),
        size as f64 / 1e6,
        n_ptx
    );
    if size > MAX_BYTES {
        bail!(
            "{} is {:.1} MB, over the {} MB limit",
            tar.display(),
            size as f64 / 1e6,
            MAX_BYTES / 1_000_000
        );
    }
    Ok(())
}

/// Runs cargo with the toolkit's environment and returns its JSON messages.
fn cargo_json(tk: &Toolkit, cap: &str, args: &[&str]) -> Result<Vec<Value>> {
    let what = format!("cargo {}", args.join(" "));
    eprintln!(
        "==> {what} (CUDA_COMPUTE_CAP={cap}, into {})",
        toolkit::cuda_target_dir().display()
    );
    let out = toolkit::cuda_cargo(Some(tk))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .env("CUDA_COMPUTE_CAP", cap)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Builds xtask (CPU only) with `--cfg kiln_no_avx512` into
/// `target/no-avx512` and returns the executable.
fn no_avx512_xtask() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let env = toolkit::no_avx512_env();
    let what = "cargo build --release -p xtask";
    eprintln!("==> {env:?} {what}");
    let out = Command::new(&cargo)
        .current_dir(toolkit::workspace_root())
        .args(["build", "--release", "-p", "xtask"])
        .arg("--message-format=json-render-diagnostics")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} (--cfg kiln_no_avx512) failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "xtask")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no xtask executable (--cfg kiln_no_avx512)")
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str, exec: bool) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    if exec {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The bundle's files with sizes, and each binary's `NEEDED` libraries (readelf -d).
fn manifest(dir: &Path, bins: &[(String, PathBuf)]) -> Result<String> {
    let mut s = String::from(
        "kiln-gpu bundle\n\nbinaries and the shared libraries they load (ELF NEEDED):\n",
    );
    for (rel, _) in bins {
        let p = dir.join(rel);
        let out = Command::new("readelf")
            .arg("-d")
            .arg(&p)
            .output()
            .context("running readelf -d")?;
        let needed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| {
                l.split('[')
                    .nth(1)
                    .map(|x| x.trim_end_matches(']').to_string())
            })
            .collect();
        s.push_str(&format!(
            "  {rel} ({:.1} MB): {}\n",
            std::fs::metadata(&p)?.len() as f64 / 1e6,
            needed.join(" ")
        ));
    }
    s.push_str(&format!(
        "\nbuilt with CUDA {} from PyPI: needs an NVIDIA driver for CUDA {} or newer (580+) and\n\
         libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 (any CUDA 13.x:\n\
         /usr/local/cuda/lib64 is searched, or set LD_LIBRARY_PATH)\n",
        toolkit::PYPI_CUDA,
        toolkit::PYPI_CUDA
    ));
    Ok(s)
}

/// `--compute-cap` as candle's and kiln's build scripts take it: two or three
/// digits (`80`, `90`, `120`), optionally `a` or `f` (`90a`), from 50 up
/// (`gpu-bundle` and `cuda-check`).
pub fn check_compute_cap(cap: &str) -> Result<()> {
    let digits = cap.trim_end_matches(['a', 'f']);
    let ok = (2..=3).contains(&digits.len())
        && cap.len() <= digits.len() + 1
        && digits.parse::<u32>().is_ok_and(|n| (50..=130).contains(&n));
    if !ok {
        bail!("--compute-cap {cap:?}: expected a compute capability such as 80, 86, 90 or 90a");
    }
    Ok(())
}

/// Refuses to replace `OUT/kiln-gpu` unless it is absent or an earlier bundle
/// (its `run.sh` is this one's kind): a folder of the user's by that name is
/// not deleted to make room.
fn check_replaceable(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let run = std::fs::read_to_string(dir.join("run.sh")).unwrap_or_default();
    if !dir.is_dir() || !run.contains("# kiln on a GPU machine") {
        bail!(
            "{} exists and is not an earlier kiln GPU bundle (no kiln run.sh in it); it would be \
             replaced: move it, or pick another OUT",
            dir.display()
        );
    }
    Ok(())
}

/// transformers' greedy continuation of a prompt on a model folder, as ids.
const GPT2_GREEDY_PY: &str = r#""""transformers' greedy token ids for kiln's GPT-2 parity check.
usage: python3 gpt2_greedy.py MODEL_DIR PROMPT N  (prints N new token ids, space-separated)"""
import sys
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

model_dir, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=tok.eos_token_id or 0)
print(" ".join(str(int(i)) for i in out[0, ids.shape[1]:]))
"#;

/// The bundle's driver script.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# kiln on a GPU machine without Rust: the CUDA tests, the demo on CUDA, GPT-2
# greedy parity against transformers, scripts/gpu-check.sh, and the GPU
# benchmarks beside PyTorch's (KILN_NO_BENCH=1 skips them); then the tables.
# usage: ./run.sh            (needs an NVIDIA GPU and driver 580+, CUDA 13 libraries)
#        ./run.sh --dry-run  (any machine: checks the files and libraries, lists
#                             the tests, and runs nothing that needs a GPU)
#        ./run.sh --cpu [NAME...]  (any machine with python3 and torch; no GPU
#             needed): kiln against PyTorch on this CPU, `bench --compare` with
#             the AVX-512 kernels (bin/xtask) and, on an AVX-512 CPU, without
#             them (bin/xtask-no-avx512). KILN_CPU_THREADS (2), KILN_CPU_ROUNDS
#             (1), PYTHON (python3); KILN_CPU_NO_AVX512=1 runs the second pass
#             on any CPU. Tables in /tmp/kiln-cpu-compare*.txt.
# Exit status: 0 all passed, 1 a failure, 2 no CUDA device (nothing was run).
set -uo pipefail
cd "$(dirname "$0")"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export LD_LIBRARY_PATH="${CUDA_HOME:-/usr/local/cuda}/lib64:${LD_LIBRARY_PATH:-}"
# What .cargo/config.toml gives `cargo test`: candle's element-wise CPU ops run
# inline, not on its spinning pool beside rayon's (the CUDA tests' CPU
# reference ops). A value the caller set stands.
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"

if [ "${1:-}" = "--cpu" ]; then
  shift
  T="${KILN_CPU_THREADS:-2}"; R="${KILN_CPU_ROUNDS:-1}"
  # bin/xtask links the CUDA driver; where there is none, the stub lets it
  # start (the CPU benchmarks never call it).
  if ldd bin/xtask | grep -q 'libcuda.so.1 => not found'; then
    export LD_LIBRARY_PATH="$PWD/stub:$LD_LIBRARY_PATH"
  fi
  AVX512=no
  grep -qw avx512f /proc/cpuinfo && AVX512=yes
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(nproc) logical CPUs; avx512f: $AVX512; $T threads, $R round(s)"
  ARGS=(bench --compare "$@" --rounds "$R" --threads "$T" --python "${PYTHON:-python3}" --torch scripts/bench/torch_reference.py)
  STATUS=0
  echo "== with the AVX-512 kernels where the CPU has them (bin/xtask)"
  bin/xtask "${ARGS[@]}" 2>&1 | tee /tmp/kiln-cpu-compare.txt || STATUS=1
  if [ $AVX512 = yes ] || [ "${KILN_CPU_NO_AVX512:-0}" = 1 ]; then
    echo "== without them (bin/xtask-no-avx512, built with --cfg kiln_no_avx512)"
    bin/xtask-no-avx512 "${ARGS[@]}" 2>&1 | tee /tmp/kiln-cpu-compare-no-avx512.txt || STATUS=1
  else
    echo "== no AVX-512 on this CPU: a run without the AVX-512 kernels would repeat the one above"
  fi
  exit $STATUS
fi
ROWS=()
FAILED=0
rm -f /tmp/kiln-gpu-compare.txt
row() { ROWS+=("$(printf '%-30s %-8s %7s  %s' "$1" "$2" "$3" "$4")"); [ "$2" = FAIL ] && FAILED=1; return 0; }
secs() { echo $(( $(date +%s) - $1 ))s; }

GPU=""
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU="$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)"
fi
if [ -z "$GPU" ]; then
  if [ $DRY = 0 ]; then
    echo "run.sh: no CUDA device (nvidia-smi finds no GPU); nothing was run." >&2
    echo "        ./run.sh --dry-run checks the bundle on a machine without one." >&2
    exit 2
  fi
  echo "no CUDA device: dry run (files, libraries, test lists)"
else
  echo "GPU: $GPU"
fi

# Files.
missing=0
for f in bin/xtask bin/xtask-no-avx512 tests/* scripts/gpu-check.sh scripts/gpu-check/check.py \
         scripts/gpu-check/refs/manifest.json scripts/torch_gpu.py scripts/torch_reference.py \
         scripts/bench/torch_reference.py \
         scripts/gpu_compare.py \
         scripts/gpt2_greedy.py fixtures/tiny-gpt2/model.safetensors; do
  [ -e "$f" ] || { echo "missing: $f"; missing=1; }
done
n_ptx=$(ls scripts/gpu-check/ptx/*.ptx 2>/dev/null | wc -l)
[ "$n_ptx" -gt 0 ] || missing=1
if [ $missing = 0 ]; then row "bundle files" ok - "$n_ptx PTX files"; else row "bundle files" FAIL - "see above"; fi

# Libraries: the driver's libcuda.so.1 comes from the stub in a dry run only.
LIBS="$LD_LIBRARY_PATH"
[ $DRY = 1 ] && [ -z "$GPU" ] && LIBS="$PWD/stub:$LD_LIBRARY_PATH"
nf=$(for b in bin/* tests/*; do LD_LIBRARY_PATH="$LIBS" ldd "$b" | grep 'not found'; done | sort -u)
if [ -z "$nf" ]; then row "shared libraries" ok - "all found"; else
  row "shared libraries" FAIL - "not found: $(echo "$nf" | awk '{print $1}' | tr '\n' ' ')"; fi

# Every Python script parses (no torch needed): a broken one would only show as a skipped row.
if pc=$(python3 - scripts/*.py scripts/gpu-check/check.py scripts/bench/*.py 2>&1 <<'PY'
import sys
for f in sys.argv[1:]:
    compile(open(f, encoding="utf-8").read(), f, "exec")
print(len(sys.argv) - 1)
PY
); then row "python scripts parse" ok - "$pc files"; else row "python scripts parse" FAIL - "$(echo "$pc" | tail -1 | cut -c1-60)"; fi

if [ $DRY = 1 ] && [ -z "$GPU" ]; then
  for t in tests/*; do
    if n=$(LD_LIBRARY_PATH="$LIBS" "$t" --list 2>/dev/null | grep -c ': test$'); then
      c=$(LD_LIBRARY_PATH="$LIBS" "$t" --list 2>/dev/null | grep ': test$' | grep -c cuda)
      row "list $(basename "$t")" ok - "$n tests, $c CUDA"
    else row "list $(basename "$t")" FAIL - "could not start"; fi
  done
  if LD_LIBRARY_PATH="$LIBS" bin/xtask --help >/dev/null 2>&1; then row "xtask starts" ok - ""; else row "xtask starts" FAIL - ""; fi
  if g=$(bin/xtask-no-avx512 bench vae_mlp_train_step --steps 1 2>/dev/null | grep -o '"gemm_simd":"[a-z0-9.]*"'); then
    if [ "$g" = '"gemm_simd":"avx512"' ]; then row "xtask-no-avx512" FAIL - "its gemm runs AVX-512 kernels";
    else row "xtask-no-avx512" ok - "one VAE step on the CPU, $g"; fi
  else row "xtask-no-avx512" FAIL - "could not run a CPU benchmark"; fi
  out=$(LD_LIBRARY_PATH="$LIBS" bin/xtask demo --device cuda --quiet 2>&1 | tail -1)
  row "demo --device cuda" skip - "refused: ${out:0:60}"
  row "gpt2 greedy parity" skip - "no CUDA device"
  if bash scripts/gpu-check.sh --dry-run >/tmp/kiln-gpu-check.log 2>&1; then row "gpu-check.sh --dry-run" ok - "$(tail -1 /tmp/kiln-gpu-check.log | cut -c1-60)";
  else row "gpu-check.sh --dry-run" FAIL - "$(tail -1 /tmp/kiln-gpu-check.log | cut -c1-60)"; fi
  if LD_LIBRARY_PATH="$LIBS" bin/xtask bench --help 2>/dev/null | grep -q -- '--device'; then
    row "bench --device cuda" skip - "no CUDA device (bench --help lists --device)"
  else row "bench --device cuda" FAIL - "bench --help has no --device"; fi
else
  for t in tests/*; do
    s=$(date +%s)
    if timeout 240 "$t" --test-threads 4 >"/tmp/kiln-$(basename "$t").log" 2>&1; then st=ok; else st=FAIL; fi
    row "$(basename "$t")" $st "$(secs $s)" "$(grep 'test result' "/tmp/kiln-$(basename "$t").log" | tail -1 | cut -c1-60)"
  done
  s=$(date +%s)
  if timeout 300 bin/xtask demo --device cuda --out /tmp/kiln-gpu-demo --quiet >/tmp/kiln-demo.log 2>&1; then st=ok; else st=FAIL; fi
  row "demo --device cuda" $st "$(secs $s)" "$(tail -1 /tmp/kiln-demo.log | cut -c1-60)"
  s=$(date +%s)
  P="The kiln fires the clay"
  k=$(timeout 120 bin/xtask generate --model fixtures/tiny-gpt2 --prompt "$P" --temperature 0 --ids \
        --ignore-eos --max-new-tokens 24 --device cuda --offline 2>/tmp/kiln-gen.log | tr -s ' \n' ' ' | sed 's/ $//')
  echo "kiln (cuda): $k" >>/tmp/kiln-gen.log
  # skipped only where transformers is missing: a script that fails beside it is a failure
  if ! python3 -c "import torch, transformers" 2>/tmp/kiln-gen-ref.log; then
    row "gpt2 greedy parity (cuda)" skip "$(secs $s)" "no torch/transformers (/tmp/kiln-gen-ref.log)"
  elif r=$(timeout 120 python3 scripts/gpt2_greedy.py fixtures/tiny-gpt2 "$P" 24 2>/tmp/kiln-gen-ref.log); then
    echo "transformers: $r" >>/tmp/kiln-gen.log
    if [ -n "$k" ] && [ "$k" = "$r" ]; then row "gpt2 greedy parity (cuda)" ok "$(secs $s)" "24 tokens equal transformers'";
    else row "gpt2 greedy parity (cuda)" FAIL "$(secs $s)" "kiln [$k] transformers [$r]"; fi
  else row "gpt2 greedy parity (cuda)" FAIL "$(secs $s)" "gpt2_greedy.py failed (/tmp/kiln-gen-ref.log)"; fi
  s=$(date +%s)
  if bash scripts/gpu-check.sh >/tmp/kiln-gpu-check.log 2>&1; then st=ok; else st=FAIL; fi
  row "gpu-check.sh" $st "$(secs $s)" "$(tail -1 /tmp/kiln-gpu-check.log | cut -c1-60)"
  if [ "${KILN_NO_BENCH:-0}" != 1 ]; then
    s=$(date +%s)
    if timeout 420 bin/xtask bench --device cuda >/tmp/kiln-bench.jsonl 2>/tmp/kiln-bench.log; then st=ok; else st=FAIL; fi
    row "bench --device cuda" $st "$(secs $s)" "$(grep -c '"bench"' /tmp/kiln-bench.jsonl) lines; /tmp/kiln-bench.jsonl"
    s=$(date +%s)
    if timeout 420 python3 scripts/torch_gpu.py >/tmp/torch-bench.jsonl 2>/tmp/torch-bench.log; then st=ok; else st=skip; fi
    row "torch_gpu.py" $st "$(secs $s)" "$(grep -c '"bench"' /tmp/torch-bench.jsonl) lines; /tmp/torch-bench.jsonl"
    python3 scripts/gpu_compare.py /tmp/kiln-bench.jsonl /tmp/torch-bench.jsonl >/tmp/kiln-gpu-compare.txt 2>&1
  fi
fi

echo
printf '%-30s %-8s %7s  %s\n' check status time detail
for r in "${ROWS[@]}"; do echo "$r"; done
if [ -s /tmp/kiln-gpu-compare.txt ] && [ $DRY = 0 ]; then echo; cat /tmp/kiln-gpu-compare.txt; fi
exit $FAILED
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_sh_refuses_without_a_gpu_and_names_every_check() {
        assert!(RUN_SH.starts_with("#!/usr/bin/env bash"));
        assert!(RUN_SH.contains("no CUDA device"));
        for check in [
            "demo --device cuda",
            "gpt2 greedy parity",
            "gpu-check.sh",
            "shared libraries",
            "bench --device cuda",
            "gpu_compare.py",
        ] {
            assert!(RUN_SH.contains(check), "{check}");
        }
        assert!(GPT2_GREEDY_PY.contains("do_sample=False"));
        // the test binaries run without cargo, so the script sets what
        // .cargo/config.toml would, before any binary runs
        let env = RUN_SH
            .find(r#"export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}""#)
            .expect("run.sh sets CANDLE_NUM_THREADS");
        let first_run = RUN_SH
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find(|l| l.contains("bin/xtask"))
            .and_then(|l| RUN_SH.find(l))
            .expect("run.sh runs bin/xtask");
        assert!(env < first_run);
        // --cpu: the comparison with and without the AVX-512 kernels, on
        // kiln's copy of the reference script (the machine keys)
        let cpu = &RUN_SH[RUN_SH.find(r#"if [ "${1:-}" = "--cpu" ]"#).unwrap()..];
        let cpu = &cpu[..cpu.find("\nfi\n").unwrap()];
        for part in [
            "bench --compare",
            "--torch scripts/bench/torch_reference.py",
            "bin/xtask \"${ARGS[@]}\"",
            "bin/xtask-no-avx512 \"${ARGS[@]}\"",
            "grep -qw avx512f /proc/cpuinfo",
            "exit $STATUS",
        ] {
            assert!(cpu.contains(part), "--cpu lacks {part}");
        }
    }

    /// The GPU machine is lent for minutes: a script that does not parse
    /// there wastes the run, so each one is parsed here (no torch needed).
    #[test]
    fn bundle_scripts_parse() {
        let dir = std::env::temp_dir().join(format!("kiln-bundle-parse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (greedy, run) = (dir.join("gpt2_greedy.py"), dir.join("run.sh"));
        std::fs::write(&greedy, GPT2_GREEDY_PY).unwrap();
        std::fs::write(&run, RUN_SH).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut scripts = vec![greedy];
        for f in [
            "scripts/gpu-check/check.py",
            "scripts/bench/gpu_compare.py",
            "scripts/bench/torch_reference.py",
        ] {
            scripts.push(root.join(f));
        }
        for f in &scripts {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sys; f = sys.argv[1]; compile(open(f, encoding='utf-8').read(), f, 'exec')"])
                .arg(f)
                .output()
                .expect("python3 runs");
            assert!(
                out.status.success(),
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg(&run)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compute_caps_are_checked_before_any_build() {
        for ok in ["75", "80", "86", "90", "90a", "100f", "120"] {
            check_compute_cap(ok).unwrap();
        }
        for bad in ["", "abc", "0", "9", "9a", "90aa", "1000", "-90", "90 "] {
            let e = check_compute_cap(bad).unwrap_err().to_string();
            assert!(
                e.contains("--compute-cap") && e.contains("such as 80"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn only_an_earlier_bundle_is_replaced() {
        let base = std::env::temp_dir().join(format!("kiln-bundle-replace-{}", std::process::id()));
        let dir = base.join("kiln-gpu");
        // absent: fine
        check_replaceable(&dir).unwrap();
        // a user's folder by that name: refused, and left alone
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = check_replaceable(&dir).unwrap_err().to_string();
        assert!(e.contains("not an earlier kiln GPU bundle"), "{e}");
        assert!(dir.join("notes.txt").is_file());
        // a file by that name: refused too
        let file = base.join("f").join("kiln-gpu");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "x").unwrap();
        assert!(check_replaceable(&file).is_err());
        // an earlier bundle: replaceable
        std::fs::write(dir.join("run.sh"), RUN_SH).unwrap();
        check_replaceable(&dir).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn gpu_compare_pairs_kiln_and_pytorch_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-gpu-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, t) = (dir.join("k.jsonl"), dir.join("t.jsonl"));
        std::fs::write(
            &k,
            "progress\n\
             {\"bench\":\"vae_mlp_train_step\",\"batch\":32,\"images_per_s\":12000.0,\"peak_gpu_mem_mb\":310}\n\
             {\"bench\":\"vae_mlp_train_step\",\"batch\":512,\"images_per_s\":150000.0}\n\
             {\"bench\":\"gpt2_small_train_step\",\"batch\":8,\"seq\":128,\"tokens_per_s\":30000.0,\
             \"phases_ms\":{\"forward\":{\"issue\":20.5,\"done\":21.0},\"backward\":{\"issue\":40.0,\"done\":45.0}}}\n",
        )
        .unwrap();
        std::fs::write(
            &t,
            "{\"bench\": \"vae_mlp_train_step\", \"batch\": 32, \"images_per_s\": 9600.0}\n\
             {\"bench\": \"gpt2_small_train_step\", \"batch\": 1024, \"tokens_per_s\": 40000.0}\n",
        )
        .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/gpu_compare.py");
        let out = std::process::Command::new("python3")
            .arg(&script)
            .args([&k, &t])
            .output()
            .expect("python3 runs");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{table}");
        let row = |name: &str, batch: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name) && l.split_whitespace().nth(1) == Some(batch))
                .unwrap_or_else(|| panic!("no {name} {batch} row in\n{table}"))
                .to_string()
        };
        assert!(row("vae_mlp_train_step", "32").contains("1.25x"), "{table}");
        assert!(row("vae_mlp_train_step", "32").ends_with("310"), "{table}");
        assert!(row("vae_mlp_train_step", "512").contains(" - "), "{table}");
        // kiln's 8 rows of 128 tokens are PyTorch's 1024-token batch.
        assert!(
            row("gpt2_small_train_step", "8").contains("0.75x"),
            "{table}"
        );
        assert!(
            table.contains("gpt2_small_train_step b8: ms per phase, host issue/device done: forward 20.5/21.0, backward 40.0/45.0"),
            "{table}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
