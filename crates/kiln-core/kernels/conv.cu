// Convolution kernels (src/ops/cuda_conv.rs), f32 and f64: the data movement
// around cuBLAS gemms. Every kernel works on a slice of `nb` images, its
// pointers already offset to the slice's first image, one thread per output
// element in a grid-stride loop (`n` elements in all).
//
// Column matrices are `[c*kh*kw, nb*ho*wo]`: row `(ci*kh + ki)*kw + kj`,
// column `bi*ho*wo + oy*wo + ox` (the image index outermost), so the rows of
// one group are contiguous and a convolution is one strided-batched gemm over
// the groups. `col2im` gathers (one thread per input pixel sums the taps that
// read it), so it needs no atomics and its sums are deterministic.
#include "common.cuh"

// col = im2col(x): x [nb, c, h, w] -> col [c*kh*kw, nb*ho*wo], zeros where a
// tap falls in the padding.
template <typename T>
__device__ void im2col(const T *x, T *col, size_t n, int nb, int c, int h, int w, int kh, int kw,
                       int ho, int wo, int s, int p, int d) {
  const size_t hwo = (size_t)ho * wo, cols = (size_t)nb * hwo;
  KILN_FOR(i, n) {
    const size_t r = i / cols, q = i % cols;
    const size_t bi = q / hwo;
    const int pix = (int)(q % hwo), oy = pix / wo, ox = pix % wo;
    const int kk = (int)(r % ((size_t)kh * kw)), ci = (int)(r / ((size_t)kh * kw));
    const int iy = oy * s + (kk / kw) * d - p, ix = ox * s + (kk % kw) * d - p;
    T v = T(0);
    if (iy >= 0 && iy < h && ix >= 0 && ix < w)
      v = x[((bi * c + ci) * h + iy) * (size_t)w + ix];
    col[i] = v;
  }
}

// x = col2im(col), the adjoint of im2col: each input pixel of x [nb, c, h, w]
// is the sum of the column entries that read it (0 where none does).
template <typename T>
__device__ void col2im(const T *col, T *x, size_t n, int nb, int c, int h, int w, int kh, int kw,
                       int ho, int wo, int s, int p, int d) {
  const size_t hwo = (size_t)ho * wo, cols = (size_t)nb * hwo;
  KILN_FOR(i, n) {
    const int ix = (int)(i % w), iy = (int)((i / w) % h);
    const size_t plane = i / ((size_t)h * w);
    const int ci = (int)(plane % c);
    const size_t bi = plane / c;
    const T *cb = col + bi * hwo;
    T acc = T(0);
    for (int ki = 0; ki < kh; ++ki) {
      // Output row oy reads input row oy*s + ki*d - p == iy.
      const int ty = iy + p - ki * d;
      if (ty < 0) break;  // ty only decreases with ki
      if (ty % s != 0) continue;
      const int oy = ty / s;
      if (oy >= ho) continue;
      const T *cr = cb + (size_t)((ci * kh + ki) * kw) * cols + (size_t)oy * wo;
      for (int kj = 0; kj < kw; ++kj) {
        const int tx = ix + p - kj * d;
        if (tx < 0) break;
        if (tx % s != 0) continue;
        const int ox = tx / s;
        if (ox >= wo) continue;
        acc += cr[(size_t)kj * cols + ox];
      }
    }
    x[i] = acc;
  }
}

// [nb, c, hw] -> [c, nb*hw] (a gradient dy in the gemm's channel-major layout).
template <typename T>
__device__ void nchw_to_cn(const T *src, T *dst, size_t n, int nb, int c, int hw) {
  const size_t cols = (size_t)nb * hw;
  KILN_FOR(i, n) {
    const size_t ch = i / cols, q = i % cols, bi = q / hw, pix = q % hw;
    dst[i] = src[(bi * c + ch) * hw + pix];
  }
}

// [c, nb*hw] -> [nb, c, hw] (a gemm's output back to images).
template <typename T>
__device__ void cn_to_nchw(const T *src, T *dst, size_t n, int nb, int c, int hw) {
  const size_t cols = (size_t)nb * hw;
  KILN_FOR(i, n) {
    const size_t pix = i % hw, ch = (i / hw) % c, bi = i / ((size_t)hw * c);
    dst[i] = src[ch * cols + bi * hw + pix];
  }
}

// acc += x (weight gradients summed over batch slices).
template <typename T>
__device__ void accumulate(const T *x, T *acc, size_t n) {
  KILN_FOR(i, n) acc[i] += x[i];
}

#define KILN_CONV(T, S)                                                                           \
  extern "C" __global__ void im2col_##S(const T *x, T *col, size_t n, int nb, int c, int h, int w, \
                                        int kh, int kw, int ho, int wo, int s, int p, int d) {     \
    im2col<T>(x, col, n, nb, c, h, w, kh, kw, ho, wo, s, p, d);                                    \
  }                                                                                               \
  extern "C" __global__ void col2im_##S(const T *col, T *x, size_t n, int nb, int c, int h, int w, \
                                        int kh, int kw, int ho, int wo, int s, int p, int d) {     \
    col2im<T>(col, x, n, nb, c, h, w, kh, kw, ho, wo, s, p, d);                                    \
  }                                                                                               \
  extern "C" __global__ void nchw_to_cn_##S(const T *src, T *dst, size_t n, int nb, int c,         \
                                            int hw) {                                             \
    nchw_to_cn<T>(src, dst, n, nb, c, hw);                                                        \
  }                                                                                               \
  extern "C" __global__ void cn_to_nchw_##S(const T *src, T *dst, size_t n, int nb, int c,         \
                                            int hw) {                                             \
    cn_to_nchw<T>(src, dst, n, nb, c, hw);                                                        \
  }                                                                                               \
  extern "C" __global__ void accumulate_##S(const T *x, T *acc, size_t n) { accumulate<T>(x, acc, n); }

KILN_CONV(float, f32)
KILN_CONV(double, f64)
