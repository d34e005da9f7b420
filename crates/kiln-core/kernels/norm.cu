// Batch norm over [B, C, S] (src/ops/norm.rs), f32 and f64, mirroring the CPU
// arithmetic: per-channel statistics and gradient sums accumulate in double
// (one block of KILN_ROW_THREADS per channel; the statistics take two passes,
// mean then squared deviations, so there is no cancellation), and per-channel
// coefficients are computed in double and rounded once to T by a small
// kernel (bn_*_coef) before the element-wise pass does the CPU's T arithmetic.
#include "common.cuh"

// Element `k` (over batch and space) of channel `ch` of x [b, c, s].
__device__ __forceinline__ size_t bn_at(size_t k, int c, int s, int ch) {
  return ((k / (size_t)s) * (size_t)c + (size_t)ch) * (size_t)s + k % (size_t)s;
}

// out [2, C]: mean and biased variance per channel.
template <typename T>
__device__ void bn_stats(const T *x, T *out, int b, int c, int s) {
  __shared__ double sh[32];
  const int ch = blockIdx.x;
  if (ch >= c) return;
  const size_t total = (size_t)b * (size_t)s;
  const double n = total > 0 ? (double)total : 1.0;
  double acc = 0.0;
  for (size_t k = threadIdx.x; k < total; k += blockDim.x) acc += (double)x[bn_at(k, c, s, ch)];
  const double mean = kiln_block_sum(acc, sh) / n;
  acc = 0.0;
  for (size_t k = threadIdx.x; k < total; k += blockDim.x) {
    const double d = (double)x[bn_at(k, c, s, ch)] - mean;
    acc += d * d;
  }
  const double var = kiln_block_sum(acc, sh) / n;
  if (threadIdx.x == 0) {
    out[ch] = (T)mean;
    out[c + ch] = (T)var;
  }
}

// coef [3, C] = (mean, rstd * weight, bias) from p [4, C] = (mean, var, weight, bias).
template <typename T>
__device__ void bn_fwd_coef(const T *p, T *coef, int c, double eps) {
  KILN_FOR(ch, c) {
    const double r = 1.0 / sqrt((double)p[c + ch] + eps);
    coef[ch] = p[ch];
    coef[c + ch] = (T)(r * (double)p[2 * c + ch]);
    coef[2 * c + ch] = p[3 * c + ch];
  }
}

// y = (x - mean) * k + bias per channel, from bn_fwd_coef's rows.
template <typename T>
__device__ void batch_norm_fwd(const T *x, const T *coef, T *y, size_t n, int c, int s) {
  KILN_FOR(i, n) {
    const size_t ch = (i / (size_t)s) % (size_t)c;
    y[i] = (x[i] - coef[ch]) * coef[c + ch] + coef[2 * c + ch];
  }
}

// out [2, C]: sum(dy) and sum(dy * xhat) per channel, xhat = (x - mean) * rstd
// with p [4, C] = (mean, var, weight, bias).
template <typename T>
__device__ void bn_sums(const T *x, const T *dy, const T *p, T *out, int b, int c, int s,
                        double eps) {
  __shared__ double sh[32];
  const int ch = blockIdx.x;
  if (ch >= c) return;
  const double m = (double)p[ch];
  const double r = 1.0 / sqrt((double)p[c + ch] + eps);
  const size_t total = (size_t)b * (size_t)s;
  double sg = 0.0, sgx = 0.0;
  for (size_t k = threadIdx.x; k < total; k += blockDim.x) {
    const size_t at = bn_at(k, c, s, ch);
    const double g = (double)dy[at];
    sg += g;
    sgx += g * ((double)x[at] - m) * r;
  }
  sg = kiln_block_sum(sg, sh);
  sgx = kiln_block_sum(sgx, sh);
  if (threadIdx.x == 0) {
    out[ch] = (T)sg;
    out[c + ch] = (T)sgx;
  }
}

// coef [5, C] = (mean, rstd, weight * rstd, sum dy / n, sum dy*xhat / n) from
// q [6, C] = (mean, var, weight, bias, sum dy, sum dy*xhat); the last two rows
// are 0 outside training (the statistics are constants then).
template <typename T>
__device__ void bn_grad_coef(const T *q, T *coef, int c, double eps, double n, int train) {
  KILN_FOR(ch, c) {
    const double r = 1.0 / sqrt((double)q[c + ch] + eps);
    coef[ch] = q[ch];
    coef[c + ch] = (T)r;
    coef[2 * c + ch] = (T)((double)q[2 * c + ch] * r);
    coef[3 * c + ch] = train ? (T)((double)q[4 * c + ch] / n) : T(0);
    coef[4 * c + ch] = train ? (T)((double)q[5 * c + ch] / n) : T(0);
  }
}

// dx = k * (dy - m1 - (x - mean) * rstd * m2), from bn_grad_coef's rows.
template <typename T>
__device__ void bn_grad_x(const T *x, const T *dy, const T *coef, T *dx, size_t n, int c,
                          int s) {
  KILN_FOR(i, n) {
    const size_t ch = (i / (size_t)s) % (size_t)c;
    const T m = coef[ch], r = coef[c + ch], k = coef[2 * c + ch];
    const T m1 = coef[3 * c + ch], m2 = coef[4 * c + ch];
    dx[i] = k * (dy[i] - m1 - (x[i] - m) * r * m2);
  }
}

#define KILN_NORM(T, S)                                                                         \
  extern "C" __global__ void bn_stats_##S(const T *x, T *out, int b, int c, int s) {            \
    bn_stats<T>(x, out, b, c, s);                                                                \
  }                                                                                              \
  extern "C" __global__ void bn_fwd_coef_##S(const T *p, T *coef, int c, double eps) {          \
    bn_fwd_coef<T>(p, coef, c, eps);                                                             \
  }                                                                                              \
  extern "C" __global__ void batch_norm_fwd_##S(const T *x, const T *coef, T *y, size_t n,      \
                                                int c, int s) {                                  \
    batch_norm_fwd<T>(x, coef, y, n, c, s);                                                      \
  }                                                                                              \
  extern "C" __global__ void bn_sums_##S(const T *x, const T *dy, const T *p, T *out, int b,    \
                                         int c, int s, double eps) {                             \
    bn_sums<T>(x, dy, p, out, b, c, s, eps);                                                     \
  }                                                                                              \
  extern "C" __global__ void bn_grad_coef_##S(const T *q, T *coef, int c, double eps, double n, \
                                              int train) {                                       \
    bn_grad_coef<T>(q, coef, c, eps, n, train);                                                  \
  }                                                                                              \
  extern "C" __global__ void bn_grad_x_##S(const T *x, const T *dy, const T *coef, T *dx,       \
                                           size_t n, int c, int s) {                             \
    bn_grad_x<T>(x, dy, coef, dx, n, c, s);                                                      \
  }

KILN_NORM(float, f32)
KILN_NORM(double, f64)
