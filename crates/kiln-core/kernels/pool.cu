// Pooling and per-channel bias kernels (src/ops/pool.rs), f32 and f64, on
// [B, C, H, W] with square windows, no padding, floor mode. Backward kernels
// gather (one thread per input pixel over the windows that contain it), so
// overlapping windows (kernel > stride) need no atomics and results are
// deterministic. Max pooling picks as PyTorch does (and the CPU kernels): the
// first maximum of each window in row-major order, except that NaN propagates
// (the window's last NaN is its argmax).
#include "common.cuh"

// Index of the maximum (PyTorch's pick, above) of the window at (oy, ox) within a plane.
template <typename T>
__device__ __forceinline__ int window_argmax(const T *xp, int w, int k, int s, int oy, int ox) {
  const int base = oy * s * w + ox * s;
  int at = base;
  T m = xp[base];
  for (int ky = 0; ky < k; ++ky)
    for (int kx = 0; kx < k; ++kx) {
      const int i = base + ky * w + kx;
      if (xp[i] > m || isnan(xp[i])) {
        m = xp[i];
        at = i;
      }
    }
  return at;
}

template <typename T>
__device__ void max_fwd(const T *x, T *y, int planes, int h, int w, int ho, int wo, int k, int s) {
  KILN_FOR(i, (size_t)planes * ho * wo) {
    const size_t p = i / ((size_t)ho * wo);
    const int q = (int)(i % ((size_t)ho * wo)), oy = q / wo, ox = q % wo;
    const T *xp = x + p * h * w;
    y[i] = xp[window_argmax(xp, w, k, s, oy, ox)];
  }
}

// Output rows/cols whose window covers input row/col `iy`: [lo, hi].
__device__ __forceinline__ void covering(int iy, int k, int s, int n_out, int &lo, int &hi) {
  lo = iy - k + 1 <= 0 ? 0 : (iy - k + 1 + s - 1) / s;
  hi = iy / s;
  if (hi > n_out - 1) hi = n_out - 1;
}

template <typename T>
__device__ void max_bwd(const T *x, const T *dy, T *dx, int planes, int h, int w, int ho, int wo,
                        int k, int s) {
  KILN_FOR(i, (size_t)planes * h * w) {
    const size_t p = i / ((size_t)h * w);
    const int q = (int)(i % ((size_t)h * w)), iy = q / w, ix = q % w;
    const T *xp = x + p * h * w;
    const T *dyp = dy + p * ho * wo;
    int y0, y1, x0, x1;
    covering(iy, k, s, ho, y0, y1);
    covering(ix, k, s, wo, x0, x1);
    T acc = T(0);
    for (int oy = y0; oy <= y1; ++oy)
      for (int ox = x0; ox <= x1; ++ox)
        if (window_argmax(xp, w, k, s, oy, ox) == q) acc += dyp[oy * wo + ox];
    dx[i] = acc;
  }
}

template <typename T>
__device__ void avg_fwd(const T *x, T *y, int planes, int h, int w, int ho, int wo, int k, int s) {
  const T scale = (T)(1.0 / (double)(k * k));
  KILN_FOR(i, (size_t)planes * ho * wo) {
    const size_t p = i / ((size_t)ho * wo);
    const int q = (int)(i % ((size_t)ho * wo)), oy = q / wo, ox = q % wo;
    const T *xp = x + p * h * w + oy * s * w + ox * s;
    T acc = T(0);
    for (int ky = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx) acc += xp[ky * w + kx];
    y[i] = acc * scale;
  }
}

template <typename T>
__device__ void avg_bwd(const T *dy, T *dx, int planes, int h, int w, int ho, int wo, int k, int s) {
  const T scale = (T)(1.0 / (double)(k * k));
  KILN_FOR(i, (size_t)planes * h * w) {
    const size_t p = i / ((size_t)h * w);
    const int q = (int)(i % ((size_t)h * w)), iy = q / w, ix = q % w;
    const T *dyp = dy + p * ho * wo;
    int y0, y1, x0, x1;
    covering(iy, k, s, ho, y0, y1);
    covering(ix, k, s, wo, x0, x1);
    T acc = T(0);
    for (int oy = y0; oy <= y1; ++oy)
      for (int ox = x0; ox <= x1; ++ox) acc += dyp[oy * wo + ox] * scale;
    dx[i] = acc;
  }
}

// y = x [B, C, hw] + b [C].
template <typename T>
__device__ void channel_bias(const T *x, const T *b, T *y, size_t n, int c, int hw) {
  KILN_FOR(i, n) y[i] = x[i] + b[(i / (size_t)hw) % (size_t)c];
}

// out [C] = sum of x [B, C, hw] over B and hw; one block per channel.
template <typename T>
__device__ void channel_sum(const T *x, T *out, int bsz, int c, int hw) {
  __shared__ T sh[32];
  const int ch = blockIdx.x;
  if (ch >= c) return;
  T acc = T(0);
  for (int bi = 0; bi < bsz; ++bi) {
    const T *xp = x + ((size_t)bi * c + ch) * hw;
    for (int j = threadIdx.x; j < hw; j += blockDim.x) acc += xp[j];
  }
  acc = kiln_block_sum(acc, sh);
  if (threadIdx.x == 0) out[ch] = acc;
}

#define KILN_POOL(T, S)                                                                         \
  extern "C" __global__ void max_pool2d_fwd_##S(const T *x, T *y, int planes, int h, int w,      \
                                                int ho, int wo, int k, int s) {                  \
    max_fwd<T>(x, y, planes, h, w, ho, wo, k, s);                                                \
  }                                                                                              \
  extern "C" __global__ void max_pool2d_bwd_##S(const T *x, const T *dy, T *dx, int planes,      \
                                                int h, int w, int ho, int wo, int k, int s) {    \
    max_bwd<T>(x, dy, dx, planes, h, w, ho, wo, k, s);                                           \
  }                                                                                              \
  extern "C" __global__ void avg_pool2d_fwd_##S(const T *x, T *y, int planes, int h, int w,      \
                                                int ho, int wo, int k, int s) {                  \
    avg_fwd<T>(x, y, planes, h, w, ho, wo, k, s);                                                \
  }                                                                                              \
  extern "C" __global__ void avg_pool2d_bwd_##S(const T *dy, T *dx, int planes, int h, int w,    \
                                                int ho, int wo, int k, int s) {                  \
    avg_bwd<T>(dy, dx, planes, h, w, ho, wo, k, s);                                              \
  }                                                                                              \
  extern "C" __global__ void channel_bias_##S(const T *x, const T *b, T *y, size_t n, int c,     \
                                              int hw) {                                          \
    channel_bias<T>(x, b, y, n, c, hw);                                                          \
  }                                                                                              \
  extern "C" __global__ void channel_sum_##S(const T *x, T *out, int bsz, int c, int hw) {       \
    channel_sum<T>(x, out, bsz, c, hw);                                                          \
  }

KILN_POOL(float, f32)
KILN_POOL(double, f64)
