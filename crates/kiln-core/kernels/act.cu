// ReLU / leaky ReLU and conv bias + ReLU (src/ops/act.rs), f32 and f64,
// element-wise with grid-stride loops. The same comparisons as the CPU
// kernels: the output (or input) is positive or not, so the gradient at
// exactly 0 is `slope * dy` (0 for ReLU), as in PyTorch. At slope 0 the
// non-positive side is written as 0 rather than `x * 0` (no -0 or NaN from it).
// Conv bias + ReLU's backward is relu_bwd at slope 0 followed by pool.cu's
// channel_sum for the bias gradient.
#include "common.cuh"

// y = x where x > 0, else slope * x (0 at slope 0).
template <typename T>
__device__ void relu_fwd(const T *x, T *y, size_t n, double slope) {
  const T k = (T)slope;
  if (slope == 0.0) {
    KILN_FOR(i, n) {
      const T v = x[i];
      y[i] = v > T(0) ? v : T(0);
    }
  } else {
    KILN_FOR(i, n) {
      const T v = x[i];
      y[i] = v > T(0) ? v : v * k;
    }
  }
}

// dx = dy where y > 0, else slope * dy (0 at slope 0).
template <typename T>
__device__ void relu_bwd(const T *y, const T *dy, T *dx, size_t n, double slope) {
  const T k = (T)slope;
  if (slope == 0.0) {
    KILN_FOR(i, n) dx[i] = y[i] > T(0) ? dy[i] : T(0);
  } else {
    KILN_FOR(i, n) {
      const T g = dy[i];
      dx[i] = y[i] > T(0) ? g : g * k;
    }
  }
}

// y = max(x [B, C, hw] + b [C], 0).
template <typename T>
__device__ void channel_bias_relu(const T *x, const T *b, T *y, size_t n, int c, int hw) {
  KILN_FOR(i, n) {
    const T s = x[i] + b[(i / (size_t)hw) % (size_t)c];
    y[i] = s > T(0) ? s : T(0);
  }
}

#define KILN_ACT(T, S)                                                                          \
  extern "C" __global__ void relu_fwd_##S(const T *x, T *y, size_t n, double slope) {           \
    relu_fwd<T>(x, y, n, slope);                                                                 \
  }                                                                                              \
  extern "C" __global__ void relu_bwd_##S(const T *y, const T *dy, T *dx, size_t n,             \
                                          double slope) {                                        \
    relu_bwd<T>(y, dy, dx, n, slope);                                                            \
  }                                                                                              \
  extern "C" __global__ void channel_bias_relu_##S(const T *x, const T *b, T *y, size_t n,      \
                                                   int c, int hw) {                              \
    channel_bias_relu<T>(x, b, y, n, c, hw);                                                     \
  }

KILN_ACT(float, f32)
KILN_ACT(double, f64)
