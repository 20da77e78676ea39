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
// sums while V is read once; fp32 accumulation for every element type. Rows are split evenly over
// `num_workers` calls (worker = 0 .. num_workers-1), so a caller may run the workers on threads
// of its own. Plain C ABI, no torch headers: it builds in under a second (model/native.py).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct F32 {
    using T = float;
    static float load(T x) { return x; }
    static T store(float x) { return x; }
};

struct BF16 {
    using T = uint16_t;
    static float load(T h) {
        uint32_t u = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
    }
    static T store(float f) {  // round to nearest even; NaN stays NaN
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<T>((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return static_cast<T>(u >> 16);
    }
};

struct Shape {
    int64_t q_stride_h, kv_stride_slot, kv_stride_head, out_stride_h;
    int block_size, num_heads, num_kv_heads, head_dim;
    float scale;
};

// One decode row, all heads: each cache slot's K (then V) rows of every KV head are contiguous, so
// they are read once, in order. ws: q [H][D] (scaled), acc [H][D], row [D], scores [H][len - lo].
template <class E, int FIXED_D>
void attend_row(const Shape &sh, const typename E::T *q, const typename E::T *k, const typename E::T *v,
                typename E::T *out, const int32_t *table, int64_t len, int64_t lo, float *ws) {
    const int H = sh.num_heads, D = FIXED_D > 0 ? FIXED_D : sh.head_dim, G = sh.num_heads / sh.num_kv_heads;
    const int64_t n = len - lo;
    float *qf = ws, *acc = ws + H * D, *row = acc + H * D, *s = row + D;
    auto slot = [&](int64_t j) { return int64_t(table[j / sh.block_size]) * sh.block_size + j % sh.block_size; };
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) qf[h * D + d] = E::load(q[h * sh.q_stride_h + d]) * sh.scale;
    for (int64_t j = lo; j < len; j++) {
        const typename E::T *kp = k + slot(j) * sh.kv_stride_slot;
        for (int g = 0; g < sh.num_kv_heads; g++) {
            for (int d = 0; d < D; d++) row[d] = E::load(kp[g * sh.kv_stride_head + d]);
            for (int h = g * G; h < (g + 1) * G; h++) {
                const float *qh = qf + h * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qh[d] * row[d];
                s[h * n + (j - lo)] = dot;
            }
        }
    }
    for (int h = 0; h < H; h++) {
        float *sh_ = s + h * n, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < n; j++) m = sh_[j] > m ? sh_[j] : m;
        for (int64_t j = 0; j < n; j++) sum += (sh_[j] = std::exp(sh_[j] - m));
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; j++) sh_[j] *= inv;
    }
    std::memset(acc, 0, sizeof(float) * H * D);
    for (int64_t j = lo; j < len; j++) {
        const typename E::T *vp = v + slot(j) * sh.kv_stride_slot;
        for (int g = 0; g < sh.num_kv_heads; g++) {
            for (int d = 0; d < D; d++) row[d] = E::load(vp[g * sh.kv_stride_head + d]);
            for (int h = g * G; h < (g + 1) * G; h++) {
                const float w = s[h * n + (j - lo)];
                float *ah = acc + h * D;
#pragma omp simd
                for (int d = 0; d < D; d++) ah[d] += w * row[d];
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) out[h * sh.out_stride_h + d] = E::store(acc[h * D + d]);
}

template <class E>
int paged_decode(const void *q_, int64_t q_stride_t, int64_t q_stride_h, const void *k_, const void *v_,
                 int64_t kv_stride_slot, int64_t kv_stride_head, void *out_, int64_t out_stride_t,
                 int64_t out_stride_h, const int64_t *rows, const int32_t *ctx_lens, const int32_t *tables,
                 int64_t table_stride, int64_t num_rows, int num_heads, int num_kv_heads, int head_dim,
                 int block_size, float scale, int64_t window, int worker, int num_workers) {
    using T = typename E::T;
    const T *q = static_cast<const T *>(q_), *k = static_cast<const T *>(k_), *v = static_cast<const T *>(v_);
    T *out = static_cast<T *>(out_);
    if (num_heads % num_kv_heads != 0) return 1;
    const Shape sh{q_stride_h, kv_stride_slot, kv_stride_head, out_stride_h, block_size, num_heads,
                   num_kv_heads, head_dim, scale};
    const int64_t per = (num_rows + num_workers - 1) / num_workers;
    const int64_t first = per * worker, last = first + per < num_rows ? first + per : num_rows;
    int64_t max_len = 0;
    for (int64_t i = first; i < last; i++) max_len = ctx_lens[i] > max_len ? ctx_lens[i] : max_len;
    std::vector<float> ws(size_t(num_heads) * (2 * head_dim + max_len) + head_dim);
    for (int64_t i = first; i < last; i++) {
        const int64_t len = ctx_lens[i], lo = window > 0 && len > window ? len - window : 0;
        const T *qi = q + rows[i] * q_stride_t;
        T *oi = out + rows[i] * out_stride_t;
        const int32_t *table = tables + i * table_stride;
        switch (head_dim) {  // the common head sizes get fully unrolled inner loops
            case 64: attend_row<E, 64>(sh, qi, k, v, oi, table, len, lo, ws.data()); break;
            case 128: attend_row<E, 128>(sh, qi, k, v, oi, table, len, lo, ws.data()); break;
            default: attend_row<E, 0>(sh, qi, k, v, oi, table, len, lo, ws.data());
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
        int block_size, float scale, int64_t window, int worker, int num_workers
#define LORAPLEX_DECODE_CALL                                                                             \
    q, q_stride_t, q_stride_h, k, v, kv_stride_slot, kv_stride_head, out, out_stride_t, out_stride_h, rows, \
        ctx_lens, tables, table_stride, num_rows, num_heads, num_kv_heads, head_dim, block_size, scale,     \
        window, worker, num_workers

extern "C" int loraplex_paged_decode_f32(LORAPLEX_DECODE_ARGS) { return paged_decode<F32>(LORAPLEX_DECODE_CALL); }
extern "C" int loraplex_paged_decode_bf16(LORAPLEX_DECODE_ARGS) { return paged_decode<BF16>(LORAPLEX_DECODE_CALL); }
