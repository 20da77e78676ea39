// Decode attention over the paged K/V cache, read in place (no gather of the context).
//
// For every decode row i (one new token of a sequence, at packed row rows[i]; the sequence has
// ctx_lens[i] tokens in the cache, the new one included), every KV head g and each query head
// h = g * G + k of its group:
//
//     lo = window > 0 ? max(0, len - window) : 0
//     slot(j) = block_tables[i, j / block_size] * block_size + j % block_size
//     s[j] = scale * q[row, h] . K[slot(j), g]              for j in lo .. len-1
//     out[row, h] = sum_j softmax(s)[j] * V[slot(j), g]
//
// Two passes per row: every head's scores while K is read once, in slot order, then the weighted
// sums while V is read once; fp32 accumulation for every element type. Rows are split statically
// over `num_threads` OpenMP threads; each row's result does not depend on the split. Built with
// g++'s -fopenmp, the library shares torch's libgomp (same soname, already loaded), so its threads
// are torch's own intra-op threads, not a second pool fighting them for the cores. Plain C ABI, no
// torch headers: it builds in about a second (model/native.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "elements.h"

namespace {

struct Shape {
    int64_t q_stride_h, kv_stride_slot, kv_stride_head, out_stride_h;
    int block_size, num_heads, num_kv_heads, head_dim;
    float scale;
};

// Block-aligned walk over the context [lo, len): fn(first_slot, first_token_index, count) for each run
// of consecutive tokens that share one cache block (no division per token).
template <class Fn>
inline void for_each_run(const int32_t *table, int block_size, int64_t lo, int64_t len, Fn fn) {
    for (int64_t j = lo; j < len;) {
        const int64_t block = j / block_size, offset = j % block_size;
        const int64_t count = std::min<int64_t>(block_size - offset, len - j);
        fn(int64_t(table[block]) * block_size + offset, j - lo, count);
        j += count;
    }
}

// One decode row, all heads, any head size (the portable path). Each cache slot's K (then V) rows of
// every KV head are contiguous, so they are read once, in order. ws: q [H][D] (scaled), acc [H][D],
// row [D], scores [H][len - lo].
template <class E, int FIXED_D>
void attend_row(const Shape &sh, const typename E::T *q, const typename E::T *k, const typename E::T *v,
                typename E::T *out, const int32_t *table, int64_t len, int64_t lo, float *ws) {
    const int H = sh.num_heads, D = FIXED_D > 0 ? FIXED_D : sh.head_dim, G = sh.num_heads / sh.num_kv_heads;
    const int64_t n = len - lo;
    float *qf = ws, *acc = ws + H * D, *row = acc + H * D, *s = row + D;
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) qf[h * D + d] = E::load(q[h * sh.q_stride_h + d]) * sh.scale;
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++) {
            const typename E::T *kp = k + (first_slot + t) * sh.kv_stride_slot;
            for (int g = 0; g < sh.num_kv_heads; g++) {
                for (int d = 0; d < D; d++) row[d] = E::load(kp[g * sh.kv_stride_head + d]);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    const float *qh = qf + h * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += qh[d] * row[d];
                    s[h * n + idx + t] = dot;
                }
            }
        }
    });
    for (int h = 0; h < H; h++) {
        float *sh_ = s + h * n, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < n; j++) m = sh_[j] > m ? sh_[j] : m;
        for (int64_t j = 0; j < n; j++) sum += (sh_[j] = std::exp(sh_[j] - m));
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; j++) sh_[j] *= inv;
    }
    std::memset(acc, 0, sizeof(float) * H * D);
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++) {
            const typename E::T *vp = v + (first_slot + t) * sh.kv_stride_slot;
            for (int g = 0; g < sh.num_kv_heads; g++) {
                for (int d = 0; d < D; d++) row[d] = E::load(vp[g * sh.kv_stride_head + d]);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    const float w = s[h * n + idx + t];
                    float *ah = acc + h * D;
#pragma omp simd
                    for (int d = 0; d < D; d++) ah[d] += w * row[d];
                }
            }
        }
    });
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) out[h * sh.out_stride_h + d] = E::store(acc[h * D + d]);
}

#if defined(__AVX512F__)
// The same row with 16-lane AVX-512 vectors when the head size is a multiple of 16 (C = D / 16
// vectors per head; 64 and 128 unrolled): K and V rows widened to fp32 in registers, one horizontal
// sum per score, a vectorized exp, fp32 accumulators. Same maths, same two passes.
inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1);
}

// softmax in place over s[0 .. n)
inline void softmax16(float *s, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) m = _mm512_mask_max_ps(m, tail_mask(n - j), m, _mm512_loadu_ps(s + j));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail_mask(n - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), max));
        _mm512_mask_storeu_ps(s + j, mask, e);
        sum = _mm512_mask_add_ps(sum, mask, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail_mask(n - j);
        _mm512_mask_storeu_ps(s + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), inv));
    }
}

// ws: q [H][D] (scaled), acc [H][D], scores [H][n rounded up to 16].
template <class T, int FIXED_C>
void attend_row_avx512(const Shape &sh, const T *q, const T *k, const T *v, T *out, const int32_t *table,
                       int64_t len, int64_t lo, float *ws) {
    const int H = sh.num_heads, C = FIXED_C > 0 ? FIXED_C : sh.head_dim / 16, D = 16 * C;
    const int G = sh.num_heads / sh.num_kv_heads;
    const int64_t n = len - lo, stride = (n + 15) & ~int64_t(15);
    float *qf = ws, *acc = qf + H * D, *s = acc + H * D;
    const __m512 scale = _mm512_set1_ps(sh.scale);
    __m512 row[16];
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(qf + h * D + 16 * c, _mm512_mul_ps(load16(q + h * sh.q_stride_h + 16 * c), scale));
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++)
            for (int g = 0; g < sh.num_kv_heads; g++) {
                const T *kp = k + (first_slot + t) * sh.kv_stride_slot + g * sh.kv_stride_head;
                for (int c = 0; c < C; c++) row[c] = load16(kp + 16 * c);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    __m512 dot = _mm512_mul_ps(row[0], _mm512_loadu_ps(qf + h * D));
                    for (int c = 1; c < C; c++) dot = _mm512_fmadd_ps(row[c], _mm512_loadu_ps(qf + h * D + 16 * c), dot);
                    s[h * stride + idx + t] = _mm512_reduce_add_ps(dot);
                }
            }
    });
    for (int h = 0; h < H; h++) softmax16(s + h * stride, n);
    std::memset(acc, 0, sizeof(float) * H * D);
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++)
            for (int g = 0; g < sh.num_kv_heads; g++) {
                const T *vp = v + (first_slot + t) * sh.kv_stride_slot + g * sh.kv_stride_head;
                for (int c = 0; c < C; c++) row[c] = load16(vp + 16 * c);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    const __m512 w = _mm512_set1_ps(s[h * stride + idx + t]);
                    float *ah = acc + h * D;
                    for (int c = 0; c < C; c++) _mm512_storeu_ps(ah + 16 * c, _mm512_fmadd_ps(w, row[c], _mm512_loadu_ps(ah + 16 * c)));
                }
            }
    });
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) store16(out + h * sh.out_stride_h + 16 * c, _mm512_loadu_ps(acc + h * D + 16 * c));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// attend_row_avx512 with 8-lane AVX2 vectors, for CPUs without AVX-512, when the head size is a
// multiple of 8 (C = D / 8 vectors per head; 64 and 128 unrolled). The portable path's softmax
// calls the scalar exp once per score; here exp8 takes 8 at a time.
inline void softmax8(float *s, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i lanes = lanes_below(n - j);
        m = _mm256_max_ps(m, _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(s + j, lanes), _mm256_castsi256_ps(lanes)));
    }
    const __m256 max = _mm256_set1_ps(hmax8(m));
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i lanes = lanes_below(n - j);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + j, lanes), max)),
                                       _mm256_castsi256_ps(lanes));
        _mm256_maskstore_ps(s + j, lanes, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum8(sum));
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i lanes = lanes_below(n - j);
        _mm256_maskstore_ps(s + j, lanes, _mm256_mul_ps(_mm256_maskload_ps(s + j, lanes), inv));
    }
}

// ws: q [H][D] (scaled), acc [H][D], scores [H][n rounded up to 8].
template <class T, int FIXED_C>
void attend_row_avx2(const Shape &sh, const T *q, const T *k, const T *v, T *out, const int32_t *table,
                     int64_t len, int64_t lo, float *ws) {
    const int H = sh.num_heads, C = FIXED_C > 0 ? FIXED_C : sh.head_dim / 8, D = 8 * C;
    const int G = sh.num_heads / sh.num_kv_heads;
    const int64_t n = len - lo, stride = (n + 7) & ~int64_t(7);
    float *qf = ws, *acc = qf + H * D, *s = acc + H * D;
    const __m256 scale = _mm256_set1_ps(sh.scale);
    __m256 row[32];
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(qf + h * D + 8 * c, _mm256_mul_ps(load8(q + h * sh.q_stride_h + 8 * c), scale));
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++)
            for (int g = 0; g < sh.num_kv_heads; g++) {
                const T *kp = k + (first_slot + t) * sh.kv_stride_slot + g * sh.kv_stride_head;
                for (int c = 0; c < C; c++) row[c] = load8(kp + 8 * c);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    __m256 dot = _mm256_mul_ps(row[0], _mm256_loadu_ps(qf + h * D));
                    for (int c = 1; c < C; c++) dot = _mm256_fmadd_ps(row[c], _mm256_loadu_ps(qf + h * D + 8 * c), dot);
                    s[h * stride + idx + t] = hsum8(dot);
                }
            }
    });
    for (int h = 0; h < H; h++) softmax8(s + h * stride, n);
    std::memset(acc, 0, sizeof(float) * H * D);
    for_each_run(table, sh.block_size, lo, len, [&](int64_t first_slot, int64_t idx, int64_t count) {
        for (int64_t t = 0; t < count; t++)
            for (int g = 0; g < sh.num_kv_heads; g++) {
                const T *vp = v + (first_slot + t) * sh.kv_stride_slot + g * sh.kv_stride_head;
                for (int c = 0; c < C; c++) row[c] = load8(vp + 8 * c);
                for (int h = g * G; h < (g + 1) * G; h++) {
                    const __m256 w = _mm256_set1_ps(s[h * stride + idx + t]);
                    float *ah = acc + h * D;
                    for (int c = 0; c < C; c++) _mm256_storeu_ps(ah + 8 * c, _mm256_fmadd_ps(w, row[c], _mm256_loadu_ps(ah + 8 * c)));
                }
            }
    });
    for (int h = 0; h < H; h++)
        for (int c = 0; c < C; c++) store8(out + h * sh.out_stride_h + 8 * c, _mm256_loadu_ps(acc + h * D + 8 * c));
}
#endif

// One row through the fastest variant for the head size.
template <class E>
void attend(const Shape &sh, const typename E::T *q, const typename E::T *k, const typename E::T *v,
            typename E::T *out, const int32_t *table, int64_t len, int64_t lo, float *ws) {
    using T = typename E::T;
#if defined(__AVX512F__)
    if (sh.head_dim % 16 == 0 && sh.head_dim <= 256) {
        switch (sh.head_dim) {  // the common head sizes get fully unrolled inner loops
            case 64: return attend_row_avx512<T, 4>(sh, q, k, v, out, table, len, lo, ws);
            case 128: return attend_row_avx512<T, 8>(sh, q, k, v, out, table, len, lo, ws);
            default: return attend_row_avx512<T, 0>(sh, q, k, v, out, table, len, lo, ws);
        }
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (sh.head_dim % 8 == 0 && sh.head_dim <= 256) {
        switch (sh.head_dim) {
            case 64: return attend_row_avx2<T, 8>(sh, q, k, v, out, table, len, lo, ws);
            case 128: return attend_row_avx2<T, 16>(sh, q, k, v, out, table, len, lo, ws);
            default: return attend_row_avx2<T, 0>(sh, q, k, v, out, table, len, lo, ws);
        }
    }
#endif
    switch (sh.head_dim) {
        case 64: return attend_row<E, 64>(sh, q, k, v, out, table, len, lo, ws);
        case 128: return attend_row<E, 128>(sh, q, k, v, out, table, len, lo, ws);
        default: return attend_row<E, 0>(sh, q, k, v, out, table, len, lo, ws);
    }
}

template <class E>
int paged_decode(const void *q_, int64_t q_stride_t, int64_t q_stride_h, const void *k_, const void *v_,
                 int64_t kv_stride_slot, int64_t kv_stride_head, void *out_, int64_t out_stride_t,
                 int64_t out_stride_h, const int64_t *rows, const int32_t *ctx_lens, const int32_t *tables,
                 int64_t table_stride, int64_t num_rows, int num_heads, int num_kv_heads, int head_dim,
                 int block_size, float scale, int64_t window, int num_threads) {
    using T = typename E::T;
    const T *q = static_cast<const T *>(q_), *k = static_cast<const T *>(k_), *v = static_cast<const T *>(v_);
    T *out = static_cast<T *>(out_);
    if (num_heads % num_kv_heads != 0) return 1;
    const Shape sh{q_stride_h, kv_stride_slot, kv_stride_head, out_stride_h, block_size, num_heads,
                   num_kv_heads, head_dim, scale};
    int64_t max_len = 0;
    for (int64_t i = 0; i < num_rows; i++) max_len = ctx_lens[i] > max_len ? ctx_lens[i] : max_len;
    const size_t ws_size = size_t(num_heads) * (2 * head_dim + max_len + 16) + head_dim;
#if defined(_OPENMP)
#pragma omp parallel num_threads(num_threads > 1 ? num_threads : 1)
#endif
    {
        std::vector<float> ws(ws_size);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < num_rows; i++) {
            const int64_t len = ctx_lens[i], lo = window > 0 && len > window ? len - window : 0;
            const T *qi = q + rows[i] * q_stride_t;
            T *oi = out + rows[i] * out_stride_t;
            const int32_t *table = tables + i * table_stride;
            attend<E>(sh, qi, k, v, oi, table, len, lo, ws.data());
        }
    }
    return 0;
}

}  // namespace

#define LORAPLEX_DECODE_ARGS                                                                              \
    const void *q, int64_t q_stride_t, int64_t q_stride_h, const void *k, const void *v,                  \
        int64_t kv_stride_slot, int64_t kv_stride_head, void *out, int64_t out_stride_t,                  \
        int64_t out_stride_h, const int64_t *rows, const int32_t *ctx_lens, const int32_t *tables,         \
        int64_t table_stride, int64_t num_rows, int num_heads, int num_kv_heads, int head_dim,            \
        int block_size, float scale, int64_t window, int num_threads
#define LORAPLEX_DECODE_CALL                                                                             \
    q, q_stride_t, q_stride_h, k, v, kv_stride_slot, kv_stride_head, out, out_stride_t, out_stride_h, rows, \
        ctx_lens, tables, table_stride, num_rows, num_heads, num_kv_heads, head_dim, block_size, scale,     \
        window, num_threads

extern "C" int loraplex_paged_decode_f32(LORAPLEX_DECODE_ARGS) { return paged_decode<F32>(LORAPLEX_DECODE_CALL); }
extern "C" int loraplex_paged_decode_bf16(LORAPLEX_DECODE_ARGS) { return paged_decode<BF16>(LORAPLEX_DECODE_CALL); }
