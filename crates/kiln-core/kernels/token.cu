// Per-token log-probabilities and entropies over a vocabulary (src/ops/token.rs):
// one block per row of `v` logits; nothing of size [rows, v] is written except
// the gradients. Sums run in double, as the CPU kernels' do. A target outside
// the vocabulary gives NaN (the CPU op returns an error instead).
#include "common.cuh"

// Row max, sum exp(x - max) and sum exp(x - max) * (x - max).
template <typename T>
__device__ void kiln_row_stats(const T *row, int v, T &m, T &s0, T &s1) {
  __shared__ double sh[32];
  double mx = (double)row[0];
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmax(mx, (double)row[j]);
  m = (T)kiln_block_max(mx, sh);
  double a0 = 0.0, a1 = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    T z = row[j] - m;
    T e = kiln_exp(z);
    a0 += (double)e;
    a1 += (double)(e * z);
  }
  s0 = (T)kiln_block_sum(a0, sh);
  s1 = (T)kiln_block_sum(a1, sh);
}

template <typename T>
__device__ void logprobs_fwd(const T *x, const uint32_t *t, T *y, int rows, int v) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  const T *row = x + (size_t)r * v;
  T m, s0, s1;
  kiln_row_stats(row, v, m, s0, s1);
  if (threadIdx.x == 0) {
    const uint32_t i = t[r];
    y[r] = i < (uint32_t)v ? (row[i] - m) - kiln_log(s0) : kiln_nan<T>();
  }
}

template <typename T>
__device__ void logprobs_bwd(const T *x, const uint32_t *t, const T *g, T *dx, int rows, int v) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  const T *row = x + (size_t)r * v;
  T *d = dx + (size_t)r * v;
  T m, s0, s1;
  kiln_row_stats(row, v, m, s0, s1);
  const T ls = kiln_log(s0), gi = g[r];
  const uint32_t i = t[r];
  const bool ok = i < (uint32_t)v;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    T o = -(gi * kiln_exp((row[j] - m) - ls));
    if (j == (int)i) o += gi;
    d[j] = ok ? o : kiln_nan<T>();
  }
}

template <typename T>
__device__ void entropy_fwd(const T *x, T *y, int rows, int v) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  T m, s0, s1;
  kiln_row_stats(x + (size_t)r * v, v, m, s0, s1);
  if (threadIdx.x == 0) y[r] = kiln_log(s0) - s1 / s0;
}

template <typename T>
__device__ void entropy_bwd(const T *x, const T *g, T *dx, int rows, int v) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  const T *row = x + (size_t)r * v;
  T *d = dx + (size_t)r * v;
  T m, s0, s1;
  kiln_row_stats(row, v, m, s0, s1);
  const T ls = kiln_log(s0), h = ls - s1 / s0, gi = g[r];
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    T lp = (row[j] - m) - ls;
    d[j] = -(gi * kiln_exp(lp) * (lp + h));
  }
}

#define KILN_TOKEN(T, S)                                                                     \
  extern "C" __global__ void token_logprobs_fwd_##S(const T *x, const uint32_t *t, T *y,      \
                                                    int rows, int v) {                        \
    logprobs_fwd<T>(x, t, y, rows, v);                                                        \
  }                                                                                           \
  extern "C" __global__ void token_logprobs_bwd_##S(const T *x, const uint32_t *t, const T *g, \
                                                    T *dx, int rows, int v) {                 \
    logprobs_bwd<T>(x, t, g, dx, rows, v);                                                    \
  }                                                                                           \
  extern "C" __global__ void token_entropy_fwd_##S(const T *x, T *y, int rows, int v) {       \
    entropy_fwd<T>(x, y, rows, v);                                                            \
  }                                                                                           \
  extern "C" __global__ void token_entropy_bwd_##S(const T *x, const T *g, T *dx, int rows,   \
                                                   int v) {                                   \
    entropy_bwd<T>(x, g, dx, rows, v);                                                        \
  }

KILN_TOKEN(float, f32)
KILN_TOKEN(double, f64)
