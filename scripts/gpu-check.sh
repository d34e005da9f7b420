#!/usr/bin/env bash
# Checks kiln's CUDA kernels on a GPU machine that has an NVIDIA driver, Python
# with numpy and CuPy, and no Rust toolchain. It needs two folders carried over
# from a machine that built them:
#   PTX:  cargo xtask cuda-check            (writes scripts/gpu-check/ptx/*.ptx)
#   refs: cargo xtask export-gpu-refs scripts/gpu-check/refs
# Usage: scripts/gpu-check.sh [--ptx DIR] [--refs DIR] [--dry-run] [--only NAME,...]
# Exit status: 0 all kernels match the CPU ops, 1 a mismatch or error, 2 no
# CuPy or no GPU (nothing was run).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 240 python3 scripts/gpu-check/check.py "$@"
