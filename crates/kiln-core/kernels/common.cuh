// Shared helpers for kiln's CUDA kernels: block-wide reductions and
// grid-stride loops. Every kernel is `extern "C"` so that its PTX name is the
// name used by `src/ops/cuda.rs` and by `scripts/gpu-check/check.py`.
#pragma once
#include <stdint.h>

// Threads per block of the row kernels (one block per row).
#define KILN_ROW_THREADS 256

// Grid-stride loop over `n` elements.
#define KILN_FOR(i, n)                                                            \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
       i += (size_t)blockDim.x * gridDim.x)

// Sum of `v` over the block; `sh` holds at least 32 elements. Every thread gets
// the result; `sh` may be reused after the call.
template <typename A>
__device__ __forceinline__ A kiln_block_sum(A v, A *sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    v = lane < nw ? sh[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

// Maximum of `v` over the block (NaN-free inputs); as `kiln_block_sum`.
template <typename A>
__device__ __forceinline__ A kiln_block_max(A v, A *sh) {
  for (int o = 16; o > 0; o >>= 1) {
    A u = __shfl_down_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    v = lane < nw ? sh[lane] : sh[0];
    for (int o = 16; o > 0; o >>= 1) {
      A u = __shfl_down_sync(0xffffffffu, v, o);
      v = u > v ? u : v;
    }
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

__device__ __forceinline__ float kiln_exp(float x) { return expf(x); }
__device__ __forceinline__ double kiln_exp(double x) { return exp(x); }
__device__ __forceinline__ float kiln_log(float x) { return logf(x); }
__device__ __forceinline__ double kiln_log(double x) { return log(x); }
template <typename T> __device__ __forceinline__ T kiln_nan();
template <> __device__ __forceinline__ float kiln_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double kiln_nan<double>() { return __longlong_as_double(0x7ff8000000000000ll); }
