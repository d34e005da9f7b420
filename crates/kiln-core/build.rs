//! Compiles `kernels/*.cu` to PTX with nvcc, only when the `cuda` feature is on;
//! the default build returns at once and needs no GPU toolchain.
//!
//! Environment: `CUDA_COMPUTE_CAP` (e.g. `90`; else asked of `nvidia-smi`),
//! `NVCC` (the compiler, default `nvcc`), `NVCC_CCBIN` (host compiler for nvcc,
//! e.g. `g++-11` when the toolkit rejects the default gcc), and `KILN_PTX_DIR`
//! (a folder to copy the PTX files into as well, for `scripts/gpu-check.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for v in ["CUDA_COMPUTE_CAP", "NVCC", "NVCC_CCBIN", "KILN_PTX_DIR"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=kernels");
    if let Err(e) = build_ptx() {
        eprintln!("kiln-core build.rs: {e}");
        std::process::exit(1);
    }
}

fn compute_cap() -> Result<String, String> {
    if let Ok(c) = std::env::var("CUDA_COMPUTE_CAP") {
        let c = c.trim().replace('.', "");
        let digits = c.trim_end_matches(['a', 'f']);
        if digits.is_empty() || !digits.chars().all(|ch| ch.is_ascii_digit()) {
            return Err(format!(
                "CUDA_COMPUTE_CAP={c:?}: expected a compute capability such as 80, 90 or 90a"
            ));
        }
        return Ok(c);
    }
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .map_err(|e| {
            format!("no CUDA_COMPUTE_CAP and nvidia-smi did not run ({e}); set CUDA_COMPUTE_CAP, e.g. 90")
        })?;
    let s = String::from_utf8_lossy(&out.stdout);
    let first = s.lines().next().unwrap_or("").trim().replace('.', "");
    if !out.status.success() || first.is_empty() {
        return Err(
            "no CUDA_COMPUTE_CAP and nvidia-smi found no GPU; set CUDA_COMPUTE_CAP, e.g. 90".into(),
        );
    }
    Ok(first)
}

fn build_ptx() -> Result<(), String> {
    let cap = compute_cap()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ccbin = std::env::var("NVCC_CCBIN").ok();
    let copy_to = std::env::var_os("KILN_PTX_DIR").map(PathBuf::from);
    let kernels = Path::new("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .map_err(|e| format!("reading {}: {e}", kernels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .args(["-O3", "-std=c++17", "-Ikernels", "-o"])
            .arg(&ptx)
            .arg(src);
        if let Some(cc) = &ccbin {
            cmd.arg("-ccbin").arg(cc);
        }
        let out = cmd.output().map_err(|e| {
            format!("could not run {nvcc} ({e}); install the CUDA toolkit or set NVCC")
        })?;
        if !out.status.success() {
            return Err(format!(
                "{nvcc} failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if let Some(dir) = &copy_to {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let dst = dir.join(format!("{stem}.ptx"));
            std::fs::copy(&ptx, &dst).map_err(|e| format!("copying to {}: {e}", dst.display()))?;
        }
    }
    Ok(())
}
