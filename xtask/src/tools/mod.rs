//! xtask's tools: commands about the project itself (checks, fuzzing, CUDA
//! builds and GPU reference data), kept apart from the components' pipelines
//! in `parts/`. Tools may use `parts`' CLI helpers; no part uses a tool.

use anyhow::Result;

pub mod bundle;
pub mod ci;
pub mod fuzz;
pub mod gpu;
pub mod toolkit;

/// A tool: its command name, a one-line usage for `cargo xtask --help`, and its handler.
pub type Tool = (&'static str, &'static str, fn(&[String]) -> Result<()>);

/// Every tool, in the order `--help` lists them.
pub const ALL: &[Tool] = &[
    (
        "ci",
        "[--threads N] [--no-avx512] [--tests-only]  fmt check, clippy -D warnings, tests",
        ci::run,
    ),
    (
        "fuzz",
        "[TARGET] [--runs N] [--minutes M]  cargo-fuzz targets (opt-in)",
        fuzz::run,
    ),
    (
        "cuda-check",
        "[--install] [--toolkit pypi|debian] [--compute-cap N] [--print-env]  build kiln-core's CUDA kernels without a GPU (opt-in)",
        gpu::cuda_check,
    ),
    (
        "gpu-bundle",
        "OUT [--compute-cap 90]  CUDA test binaries, xtask (and a CPU one without AVX-512) and scripts for a GPU machine without Rust (opt-in)",
        bundle::gpu_bundle,
    ),
    (
        "export-gpu-refs",
        "DIR  kernel inputs + CPU outputs for scripts/gpu-check.sh",
        gpu::export_gpu_refs,
    ),
];
