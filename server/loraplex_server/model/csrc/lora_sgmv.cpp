// Segmented LoRA apply (SGMV) over flat weight buffers, for CPU decode and mixed steps:
//
//     for (start, end, s) in segments:           # tokens start..end-1 all use slot s
//         r = ranks[s]                           # the slot's rank for this module (0: untouched)
//         A = a[a_offsets[s] : a_offsets[s] + r*in] viewed [r, in]      # element offsets
//         Bt = bt[b_offsets[s] : b_offsets[s] + r*out] viewed [r, out]
//         for t in start .. end-1:
//             h = A @ x[t]                       # shrink: [r]
//             y[t] += h @ Bt                     # expand: [out] (the LoRA scale is folded in Bt)
//
// A slot's r rows are contiguous and read at the true rank; A and Bt sit anywhere in their buffers
// (a_numel and b_numel elements). A segment whose slot, rank or weights fall outside the tables or the buffers is refused
// (nonzero return) before anything is computed. Weights may be bf16 (the model's dtype) or fp32; x and y are f32 or bf16;
// everything accumulates in fp32 and y is rounded once (h stays fp32). Work is split into tiles of up to TILE
// tokens of one segment; each tile reads its slot's weights once (later tiles of the slot find
// them in cache) and is computed by one thread, so the result does not depend on the split.
// Tiles are spread over `num_threads` OpenMP threads (torch's own, see paged_attention.cpp).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "elements.h"

namespace {

constexpr int64_t TILE = 4;
// The AVX2 expand reads r rows of Bt side by side, 8 columns at a time: r strided streams, more
// than the hardware prefetcher follows. Asking for each row's line PREFETCH_AHEAD columns ahead
// (two 64-byte lines of fp32) made a decode-sized call (57 tokens, 16 slots of rank 8/16/32,
// 576 -> 1536, weights from DRAM) 25% faster on an AVX2 AMD EPYC (median 469 -> 342 us, 32 ahead
// beating 16-512); results bit-equal. The AVX-512 tile is unmeasured with it and goes without.
constexpr int64_t PREFETCH_AHEAD = 32;  // elements

struct Problem {
    int64_t x_stride, y_stride, in, out;
};

// One tile, any sizes: tokens t0 .. t0+n-1 (n <= TILE) of one slot at rank r. ws: h [TILE][r].
template <class XE, class WE>
void tile_generic(const Problem &p, const typename XE::T *x, typename XE::T *y, const typename WE::T *a,
                  const typename WE::T *bt, int64_t t0, int64_t n, int64_t r, float *h) {
    for (int64_t t = 0; t < n; t++) {
        const typename XE::T *xt = x + (t0 + t) * p.x_stride;
        for (int64_t j = 0; j < r; j++) {
            float dot = 0.f;
            for (int64_t d = 0; d < p.in; d++) dot += WE::load(a[j * p.in + d]) * XE::load(xt[d]);
            h[t * r + j] = dot;
        }
        typename XE::T *yt = y + (t0 + t) * p.y_stride;
        for (int64_t d = 0; d < p.out; d++) {
            float acc = XE::load(yt[d]);
            for (int64_t j = 0; j < r; j++) acc += h[t * r + j] * WE::load(bt[j * p.out + d]);
            yt[d] = XE::store(acc);
        }
    }
}

#if defined(__AVX512F__)
// The same tile with AVX-512 when in and out are multiples of 16: the shrink reads each rank row
// of A once for the tile's tokens (TILE accumulators), the expand walks y in 16-wide columns with
// the tile's rows in registers, reading Bt's rows down the rank. ws: xs [TILE][in], h [TILE][r].
template <class XT, class WT>
void tile_avx512(const Problem &p, const XT *x, XT *y, const WT *a, const WT *bt, int64_t t0, int64_t n, int64_t r,
                 float *ws) {
    const int64_t in = p.in, out = p.out;
    float *xs = ws, *h = xs + TILE * in;
    for (int64_t t = 0; t < TILE; t++)
        for (int64_t c = 0; c < in; c += 16)
            _mm512_storeu_ps(xs + t * in + c, t < n ? load16(x + (t0 + t) * p.x_stride + c) : _mm512_setzero_ps());
    for (int64_t j = 0; j < r; j++) {
        __m512 acc[TILE];
        for (int64_t t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t c = 0; c < in; c += 16) {
            const __m512 av = load16(a + j * in + c);
            for (int64_t t = 0; t < TILE; t++) acc[t] = _mm512_fmadd_ps(av, _mm512_loadu_ps(xs + t * in + c), acc[t]);
        }
        for (int64_t t = 0; t < TILE; t++) h[t * r + j] = _mm512_reduce_add_ps(acc[t]);
    }
    for (int64_t c = 0; c < out; c += 16) {
        __m512 acc[TILE];
        for (int64_t t = 0; t < TILE; t++) acc[t] = t < n ? load16(y + (t0 + t) * p.y_stride + c) : _mm512_setzero_ps();
        for (int64_t j = 0; j < r; j++) {
            const __m512 bv = load16(bt + j * out + c);
            for (int64_t t = 0; t < TILE; t++) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(h[t * r + j]), bv, acc[t]);
        }
        for (int64_t t = 0; t < n; t++) store16(y + (t0 + t) * p.y_stride + c, acc[t]);
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// tile_avx512 with 8-wide AVX2 registers, for CPUs without AVX-512, when in and out are multiples
// of 8, for exactly NT tokens (a decode step's one-token segments keep no idle lanes: 32 distinct
// rank-4 adapters over SmolLM2's 210 modules, weights from DRAM: 35.4 -> 26.7 ms on an AVX2 AMD
// EPYC; software prefetch of the next tile's weights made it slower). ws: xs [TILE][in], h [TILE][r].
template <int NT, class XT, class WT>
void tile_avx2(const Problem &p, const XT *x, XT *y, const WT *a, const WT *bt, int64_t t0, int64_t r, float *ws) {
    const int64_t in = p.in, out = p.out;
    float *xs = ws, *h = xs + TILE * in;
    for (int64_t t = 0; t < NT; t++)
        for (int64_t c = 0; c < in; c += 8) _mm256_storeu_ps(xs + t * in + c, load8(x + (t0 + t) * p.x_stride + c));
    for (int64_t j = 0; j < r; j++) {
        __m256 acc[NT];
        for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t c = 0; c < in; c += 8) {
            const __m256 av = load8(a + j * in + c);
            for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(av, _mm256_loadu_ps(xs + t * in + c), acc[t]);
        }
        for (int t = 0; t < NT; t++) h[t * r + j] = hsum8(acc[t]);
    }
    for (int64_t c = 0; c < out; c += 8) {
        __m256 acc[NT];
        for (int t = 0; t < NT; t++) acc[t] = load8(y + (t0 + t) * p.y_stride + c);
        const bool prefetch = c % 16 == 0 && c + PREFETCH_AHEAD < out;
        for (int64_t j = 0; j < r; j++) {
            if (prefetch) _mm_prefetch(reinterpret_cast<const char *>(bt + j * out + c + PREFETCH_AHEAD), _MM_HINT_T0);
            const __m256 bv = load8(bt + j * out + c);
            for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(h[t * r + j]), bv, acc[t]);
        }
        for (int t = 0; t < NT; t++) store8(y + (t0 + t) * p.y_stride + c, acc[t]);
    }
}
#endif

template <class XE, class WE>
void tile(const Problem &p, const typename XE::T *x, typename XE::T *y, const typename WE::T *a,
          const typename WE::T *bt, int64_t t0, int64_t n, int64_t r, float *ws) {
#if defined(__AVX512F__)
    if (p.in % 16 == 0 && p.out % 16 == 0) return tile_avx512(p, x, y, a, bt, t0, n, r, ws);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (p.in % 8 == 0 && p.out % 8 == 0) {
        static_assert(TILE == 4, "one case per tile size");
        switch (n) {
            case 1: return tile_avx2<1>(p, x, y, a, bt, t0, r, ws);
            case 2: return tile_avx2<2>(p, x, y, a, bt, t0, r, ws);
            case 3: return tile_avx2<3>(p, x, y, a, bt, t0, r, ws);
            default: return tile_avx2<4>(p, x, y, a, bt, t0, r, ws);
        }
    }
#endif
    tile_generic<XE, WE>(p, x, y, a, bt, t0, n, r, ws);
}

template <class XE, class WE>
int sgmv(const void *x_, void *y_, const void *a_, const void *bt_, const Problem &p, const int32_t *ranks,
         const int32_t *a_offsets, const int32_t *b_offsets, const int32_t *segments, int64_t num_segments,
         int64_t num_tokens, int64_t num_slots, int64_t a_numel, int64_t b_numel, int64_t max_rank, int num_threads) {
    using XT = typename XE::T;
    using WT = typename WE::T;
    const XT *x = static_cast<const XT *>(x_);
    XT *y = static_cast<XT *>(y_);
    const WT *a = static_cast<const WT *>(a_), *bt = static_cast<const WT *>(bt_);
    std::vector<int64_t> tiles;  // (segment, first token) pairs
    for (int64_t i = 0; i < num_segments; i++) {
        const int32_t start = segments[3 * i], end = segments[3 * i + 1], slot = segments[3 * i + 2];
        if (slot < 0 || slot >= num_slots || start < 0 || end < start || end > num_tokens) return 1;
        if (ranks[slot] < 0 || ranks[slot] > max_rank) return 2;
        if (ranks[slot] == 0) continue;
        if (a_offsets[slot] < 0 || int64_t(a_offsets[slot]) + ranks[slot] * p.in > a_numel) return 3;
        if (b_offsets[slot] < 0 || int64_t(b_offsets[slot]) + ranks[slot] * p.out > b_numel) return 3;
        for (int64_t t = start; t < end; t += TILE) tiles.insert(tiles.end(), {i, t});
    }
    const int64_t num_tiles = int64_t(tiles.size()) / 2;
    const size_t ws_size = size_t(TILE * (p.in + max_rank));
#if defined(_OPENMP)
#pragma omp parallel num_threads(num_threads > 1 ? num_threads : 1)
#endif
    {
        std::vector<float> ws(ws_size);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t k = 0; k < num_tiles; k++) {
            const int64_t i = tiles[2 * k], t0 = tiles[2 * k + 1];
            const int32_t end = segments[3 * i + 1], slot = segments[3 * i + 2];
            tile<XE, WE>(p, x, y, a + a_offsets[slot], bt + b_offsets[slot], t0,
                         std::min<int64_t>(TILE, end - t0), ranks[slot], ws.data());
        }
    }
    return 0;
}

}  // namespace

#define LORAPLEX_SGMV_ARGS                                                                                \
    const void *x, int64_t x_stride, void *y, int64_t y_stride, const void *a, const void *bt,             \
        int64_t in, int64_t out, const int32_t *ranks, const int32_t *a_offsets, const int32_t *b_offsets,  \
        const int32_t *segments, int64_t num_segments, int64_t num_tokens, int64_t num_slots, int64_t a_numel, \
        int64_t b_numel, int64_t max_rank, int num_threads
#define LORAPLEX_SGMV(XT, WT)                                                                             \
    sgmv<XT, WT>(x, y, a, bt, Problem{x_stride, y_stride, in, out}, ranks, a_offsets, b_offsets, segments,      \
                 num_segments, num_tokens, num_slots, a_numel, b_numel, max_rank, num_threads)

extern "C" int loraplex_sgmv_f32_f32(LORAPLEX_SGMV_ARGS) { return LORAPLEX_SGMV(F32, F32); }
extern "C" int loraplex_sgmv_bf16_f32(LORAPLEX_SGMV_ARGS) { return LORAPLEX_SGMV(BF16, F32); }
extern "C" int loraplex_sgmv_bf16_bf16(LORAPLEX_SGMV_ARGS) { return LORAPLEX_SGMV(BF16, BF16); }
