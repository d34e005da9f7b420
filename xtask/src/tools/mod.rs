//! xtask's tools: commands about the project itself (checks, fuzzing, CUDA
//! builds and GPU reference data), kept apart from the components' pipelines
//! in `parts/`. Tools may use `parts`' CLI helpers; no part uses a tool.

use anyhow::Result;

pub mod ci;
pub mod fuzz;
pub mod gpu;

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
        "[--install] [--compute-cap N] [--workspace]  build kiln-core's CUDA kernels without a GPU (opt-in)",
        gpu::cuda_check,
    ),
    (
        "export-gpu-refs",
        "DIR  kernel inputs + CPU outputs for scripts/gpu-check.sh",
        gpu::export_gpu_refs,
    ),
];
