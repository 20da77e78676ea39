// Row-wise elementwise ops of the decoder, fused (one pass instead of torch's 5-8 kernels), with
// the roundings of the Hugging Face modules they replace (model/fused_ops.py):
//
//     rms_norm:  for each row x:  y = E(x * 1 / sqrt(mean(x^2) + eps));  out = E(w * y)
//     silu_mul:  for each row:    out = E(E(g / (1 + e^-g)) * u)
//     rope (in place), for each token t, head h, d < D/2 of x[t, h] with c = cos[t], s = sin[t]:
//         x[d]       = E(E(x[d] * c[d])             + E(-x[d + D/2] * s[d]))
//         x[d + D/2] = E(E(x[d + D/2] * c[d + D/2]) + E(x[d] * s[d + D/2]))   (x before the update)
//
// where E() rounds to the element type (bf16 round-to-nearest-even; identity for fp32) and
// everything in between is fp32. Rows are split over `num_threads` OpenMP threads (torch's, see
// paged_attention.cpp) when a call is big enough to pay for them.
#include <cmath>
#include <cstdint>

#include "elements.h"

namespace {

constexpr int64_t PARALLEL_MIN_ELEMENTS = 1 << 16;

inline int threads_for(int64_t rows, int64_t cols, int num_threads) {
    return rows * cols >= PARALLEL_MIN_ELEMENTS && num_threads > 1 ? num_threads : 1;
}

template <class E>
void rms_norm_row(const typename E::T *x, const typename E::T *w, typename E::T *out, int64_t cols, float eps) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < cols; d++) {
        const float v = E::load(x[d]);
        sum += v * v;
    }
    const float r = 1.f / std::sqrt(sum / float(cols) + eps);
#pragma omp simd
    for (int64_t d = 0; d < cols; d++) {
        const float y = E::load(E::store(E::load(x[d]) * r));
        out[d] = E::store(E::load(w[d]) * y);
    }
}

template <class E>
void silu_mul_row(const typename E::T *g, const typename E::T *u, typename E::T *out, int64_t cols) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; d + 16 <= cols; d += 16) {
        const __m512 gv = load16(g + d);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        typename E::T rounded[16];
        store16(rounded, s);
        store16(out + d, _mm512_mul_ps(load16(rounded), load16(u + d)));
    }
#endif
    for (; d < cols; d++) {
        const float gv = E::load(g[d]);
        out[d] = E::store(E::load(E::store(gv / (1.f + std::exp(-gv)))) * E::load(u[d]));
    }
}

template <class E>
int rms_norm(const void *x_, int64_t x_stride, const void *w_, void *out_, int64_t out_stride, int64_t rows,
             int64_t cols, float eps, int num_threads) {
    using T = typename E::T;
    const T *x = static_cast<const T *>(x_), *w = static_cast<const T *>(w_);
    T *out = static_cast<T *>(out_);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, cols, num_threads))
#endif
    for (int64_t i = 0; i < rows; i++) rms_norm_row<E>(x + i * x_stride, w, out + i * out_stride, cols, eps);
    return 0;
}

template <class E>
int silu_mul(const void *g_, int64_t g_stride, const void *u_, int64_t u_stride, void *out_, int64_t out_stride,
             int64_t rows, int64_t cols, int num_threads) {
    using T = typename E::T;
    const T *g = static_cast<const T *>(g_), *u = static_cast<const T *>(u_);
    T *out = static_cast<T *>(out_);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, cols, num_threads))
#endif
    for (int64_t i = 0; i < rows; i++) silu_mul_row<E>(g + i * g_stride, u + i * u_stride, out + i * out_stride, cols);
    return 0;
}

// No fused multiply-add here: torch rounds each product (fp32 too), and so must we.
#if defined(__GNUC__) && !defined(__clang__)
#define LORAPLEX_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define LORAPLEX_NO_FMA
#endif

template <class E>
LORAPLEX_NO_FMA void rope_head(typename E::T *x, const typename E::T *c, const typename E::T *s, int64_t half) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#pragma omp simd
    for (int64_t d = 0; d < half; d++) {
        const float x1 = E::load(x[d]), x2 = E::load(x[d + half]);
        const float lo = E::load(E::store(x1 * E::load(c[d]))) + E::load(E::store(-x2 * E::load(s[d])));
        const float hi = E::load(E::store(x2 * E::load(c[d + half]))) + E::load(E::store(x1 * E::load(s[d + half])));
        x[d] = E::store(lo);
        x[d + half] = E::store(hi);
    }
}

template <class E>
int rope(void *x_, int64_t x_stride, int64_t tokens, int64_t heads, int64_t head_dim, const void *cos_,
         const void *sin_, int64_t cs_stride, int num_threads) {
    using T = typename E::T;
    if (head_dim % 2 != 0) return 1;
    T *x = static_cast<T *>(x_);
    const T *cos = static_cast<const T *>(cos_), *sin = static_cast<const T *>(sin_);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_for(tokens, heads * head_dim, num_threads))
#endif
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            rope_head<E>(x + t * x_stride + h * head_dim, cos + t * cs_stride, sin + t * cs_stride, head_dim / 2);
    return 0;
}

}  // namespace

#define LORAPLEX_ROPE_ARGS                                                                                  \
    void *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t head_dim, const void *cos, const void *sin, \
        int64_t cs_stride, int num_threads
extern "C" int loraplex_rope_f32(LORAPLEX_ROPE_ARGS) {
    return rope<F32>(x, x_stride, tokens, heads, head_dim, cos, sin, cs_stride, num_threads);
}
extern "C" int loraplex_rope_bf16(LORAPLEX_ROPE_ARGS) {
    return rope<BF16>(x, x_stride, tokens, heads, head_dim, cos, sin, cs_stride, num_threads);
}

#define LORAPLEX_NORM_ARGS \
    const void *x, int64_t x_stride, const void *w, void *out, int64_t out_stride, int64_t rows, int64_t cols, float eps, \
        int num_threads
#define LORAPLEX_SILU_ARGS                                                                                  \
    const void *g, int64_t g_stride, const void *u, int64_t u_stride, void *out, int64_t out_stride, int64_t rows, \
        int64_t cols, int num_threads

extern "C" int loraplex_rms_norm_f32(LORAPLEX_NORM_ARGS) {
    return rms_norm<F32>(x, x_stride, w, out, out_stride, rows, cols, eps, num_threads);
}
extern "C" int loraplex_rms_norm_bf16(LORAPLEX_NORM_ARGS) {
    return rms_norm<BF16>(x, x_stride, w, out, out_stride, rows, cols, eps, num_threads);
}
extern "C" int loraplex_silu_mul_f32(LORAPLEX_SILU_ARGS) {
    return silu_mul<F32>(g, g_stride, u, u_stride, out, out_stride, rows, cols, num_threads);
}
extern "C" int loraplex_silu_mul_bf16(LORAPLEX_SILU_ARGS) {
    return silu_mul<BF16>(g, g_stride, u, u_stride, out, out_stride, rows, cols, num_threads);
}
