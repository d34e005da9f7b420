// Fused row-wise kernels for transformers (src/ops/fused.rs), f32: GELU (tanh
// form) and its gradient, softmax over the last dimension, layer norm and its
// gradients, a linear layer's bias add and its bias gradient (column sums).
// Row kernels run one block of KILN_ROW_THREADS threads per row; column sums
// run 32-column tiles over row ranges and add their partial sums atomically
// into a zeroed output.
#include "common.cuh"

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_C 0.044715f

__device__ __forceinline__ float tanh_fast(float u) {
  // tanh(u) = 1 - 2 / (exp(2u) + 1), as the CPU kernel computes it.
  if (u > 10.0f) return 1.0f;
  if (u < -10.0f) return -1.0f;
  return 1.0f - 2.0f / (expf(2.0f * u) + 1.0f);
}

extern "C" __global__ void gelu_tanh_fwd_f32(const float *x, float *y, size_t n) {
  KILN_FOR(i, n) {
    const float v = x[i];
    const float t = tanh_fast(SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
    y[i] = 0.5f * v * (1.0f + t);
  }
}

extern "C" __global__ void gelu_tanh_bwd_f32(const float *x, const float *g, float *dx, size_t n) {
  KILN_FOR(i, n) {
    const float v = x[i];
    const float t = tanh_fast(SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
    const float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * v * v);
    dx[i] = g[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
  }
}

extern "C" __global__ void softmax_fwd_f32(const float *x, float *y, int rows, int c) {
  __shared__ float sh[32];
  const int r = blockIdx.x;
  if (r >= rows) return;
  const float *xr = x + (size_t)r * c;
  float *yr = y + (size_t)r * c;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, xr[j]);
  m = kiln_block_max(m, sh);
  float z = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float e = expf(xr[j] - m);
    yr[j] = e;
    z += e;
  }
  const float inv = 1.0f / kiln_block_sum(z, sh);
  for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] *= inv;
}

extern "C" __global__ void softmax_bwd_f32(const float *y, const float *g, float *dx, int rows,
                                           int c) {
  __shared__ float sh[32];
  const int r = blockIdx.x;
  if (r >= rows) return;
  const size_t o = (size_t)r * c;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) dot += y[o + j] * g[o + j];
  dot = kiln_block_sum(dot, sh);
  for (int j = threadIdx.x; j < c; j += blockDim.x) dx[o + j] = y[o + j] * (g[o + j] - dot);
}

// Mean and 1/std of a row, two passes as on the CPU.
__device__ void ln_moments(const float *x, int c, float eps, float &mean, float &rstd) {
  __shared__ float sh[32];
  float s = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) s += x[j];
  mean = kiln_block_sum(s, sh) / (float)c;
  float q = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float d = x[j] - mean;
    q += d * d;
  }
  rstd = 1.0f / sqrtf(kiln_block_sum(q, sh) / (float)c + eps);
}

extern "C" __global__ void layer_norm_fwd_f32(const float *x, const float *w, const float *b,
                                              float *y, int rows, int c, float eps) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  const size_t o = (size_t)r * c;
  float mean, rstd;
  ln_moments(x + o, c, eps, mean, rstd);
  for (int j = threadIdx.x; j < c; j += blockDim.x)
    y[o + j] = (x[o + j] - mean) * rstd * w[j] + b[j];
}

// gx = rstd * (gh - mean(gh) - xh * mean(gh * xh)), gh = g * w.
extern "C" __global__ void layer_norm_bwd_x_f32(const float *x, const float *w, const float *g,
                                                float *dx, int rows, int c, float eps) {
  __shared__ float sh[32];
  const int r = blockIdx.x;
  if (r >= rows) return;
  const size_t o = (size_t)r * c;
  float mean, rstd;
  ln_moments(x + o, c, eps, mean, rstd);
  float s_gh = 0.0f, s_ghxh = 0.0f;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float gh = g[o + j] * w[j];
    s_gh += gh;
    s_ghxh += gh * (x[o + j] - mean) * rstd;
  }
  const float m_gh = kiln_block_sum(s_gh, sh) / (float)c;
  const float m_ghxh = kiln_block_sum(s_ghxh, sh) / (float)c;
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    const float xh = (x[o + j] - mean) * rstd;
    dx[o + j] = rstd * (g[o + j] * w[j] - m_gh - xh * m_ghxh);
  }
}

// Per-row (mean, rstd) pairs into `stats [rows, 2]`, for the weight/bias gradient.
extern "C" __global__ void layer_norm_stats_f32(const float *x, float *stats, int rows, int c,
                                                float eps) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  float mean, rstd;
  ln_moments(x + (size_t)r * c, c, eps, mean, rstd);
  if (threadIdx.x == 0) {
    stats[2 * r] = mean;
    stats[2 * r + 1] = rstd;
  }
}

// Column-sum tiles: blockDim (32, 8); block (bx, by) sums columns bx*32.. over
// rows by*8+ty, by*8+ty + 8*gridDim.y, ... and adds its partial sums atomically.
#define KILN_COL_TILE_REDUCE(acc, out)                          \
  do {                                                          \
    __shared__ float tile[8][33];                               \
    tile[threadIdx.y][threadIdx.x] = acc;                       \
    __syncthreads();                                            \
    if (threadIdx.y == 0 && col < c) {                          \
      float s = 0.0f;                                           \
      for (int k = 0; k < 8; ++k) s += tile[k][threadIdx.x];    \
      atomicAdd(&(out)[col], s);                                \
    }                                                           \
    __syncthreads();                                            \
  } while (0)

// out [2, c] (zeroed): row 0 sum g * xh (weight gradient), row 1 sum g (bias gradient).
extern "C" __global__ void layer_norm_bwd_wb_f32(const float *x, const float *g,
                                                 const float *stats, float *out, int rows,
                                                 int c) {
  const int col = blockIdx.x * 32 + threadIdx.x;
  float aw = 0.0f, ab = 0.0f;
  if (col < c) {
    for (int r = blockIdx.y * 8 + threadIdx.y; r < rows; r += 8 * gridDim.y) {
      const size_t o = (size_t)r * c + col;
      const float gv = g[o];
      aw += gv * (x[o] - stats[2 * r]) * stats[2 * r + 1];
      ab += gv;
    }
  }
  KILN_COL_TILE_REDUCE(aw, out);
  KILN_COL_TILE_REDUCE(ab, out + c);
}

// out [c] (zeroed): column sums of g [rows, c] (a linear layer's bias gradient).
extern "C" __global__ void sum_rows_f32(const float *g, float *out, int rows, int c) {
  const int col = blockIdx.x * 32 + threadIdx.x;
  float a = 0.0f;
  if (col < c)
    for (int r = blockIdx.y * 8 + threadIdx.y; r < rows; r += 8 * gridDim.y)
      a += g[(size_t)r * c + col];
  KILN_COL_TILE_REDUCE(a, out);
}

// y = x [n / c, c] + b [c].
extern "C" __global__ void add_bias_last_f32(const float *x, const float *b, float *y, size_t n,
                                             int c) {
  KILN_FOR(i, n) y[i] = x[i] + b[i % (size_t)c];
}

// Inverted dropout, y = x * mask(i), the mask of src/ops/fused.rs's DropoutMask:
// element i is kept (factor `scale`, else 0) when the 32-bit half i % 2 (low
// half first) of splitmix64(seed + (i / 2 + 1) * golden) is below `threshold`
// (keep * 2^32). A pure function of the index, so the GPU draws the same mask
// as the CPU and the backward pass regenerates it.
extern "C" __global__ void dropout_f32(const float *x, float *y, size_t n, uint64_t seed,
                                       uint64_t threshold, float scale) {
  KILN_FOR(i, n) {
    uint64_t z = seed + ((uint64_t)(i >> 1) + 1ull) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const uint64_t h = (i & 1) ? (z >> 32) : (z & 0xffffffffull);
    y[i] = x[i] * (h < threshold ? scale : 0.0f);
  }
}
