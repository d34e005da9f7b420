// Fused Adam/AdamW step (src/optim.rs), f32, in place on the parameter and
// its two moment buffers; the same arithmetic as the CPU kernel, with the
// step's scalars computed on the host in f64 and rounded once.
#include "common.cuh"

extern "C" __global__ void adam_update_f32(float *p, const float *g, float *m, float *v, size_t n,
                                           float step_size, float bc2_sqrt, float eps, float wd,
                                           float decay, float w1, float b2, float w2,
                                           int decoupled) {
  KILN_FOR(i, n) {
    float gi = g[i];
    float pi = p[i];
    if (decoupled) {
      pi *= decay;
    } else if (wd != 0.0f) {
      gi += wd * pi;
    }
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * b2 + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi - step_size * (mi / denom);
  }
}
