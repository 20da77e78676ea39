// Row-wise argmax of fp32 logits, as torch.argmax(dim=1) answers it (first maximal index; a NaN
// counts as the maximum, first NaN wins), for the greedy sampler:
//
//     for r in rows: out[r] = min(j for j in cols if x[r, j] == max(x[r, :]))
//
// One pass over each row in chunks of CHUNK columns (L1-resident): a vectorised max and NaN test
// per chunk; a chunk whose max beats the best so far (strictly: earlier chunks win ties) becomes the
// best chunk. Then only the best chunk is scanned for its first index equal to the max; a chunk
// holding a NaN ends the row at once with that chunk's first NaN (no earlier chunk had one). The row
// is read from memory once: a 49,152-column row costs one streaming read instead of a reduction
// plus a scalar scan. Rows are split over `num_threads` OpenMP threads (torch's, see
// paged_attention.cpp). torch's own argmax runs a scalar loop.
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t CHUNK = 512;

// Max of x[0..n) ignoring NaN (-inf when all NaN), and whether any element is NaN.
inline float chunk_max(const float *x, int64_t n, bool *has_nan) {
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < n; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    *has_nan = nan != 0;
    return m;
}

int64_t row_argmax(const float *row, int64_t num_cols) {
    float best = -INFINITY;
    int64_t best_start = 0;
    for (int64_t start = 0; start < num_cols; start += CHUNK) {
        const int64_t n = num_cols - start < CHUNK ? num_cols - start : CHUNK;
        bool has_nan;
        const float m = chunk_max(row + start, n, &has_nan);
        if (has_nan) {
            int64_t j = start;
            while (row[j] == row[j]) j++;
            return j;
        }
        if (m > best) {
            best = m;
            best_start = start;
        }
    }
    int64_t j = best_start;
    while (j < num_cols - 1 && row[j] != best) j++;  // a row of all -inf answers 0, as torch does
    return row[j] == best ? j : 0;
}

}  // namespace

extern "C" int loraplex_argmax_f32(const float *x, int64_t num_rows, int64_t num_cols, int64_t row_stride,
                                   int64_t *out, int num_threads) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads > 1 ? num_threads : 1)
#endif
    for (int64_t r = 0; r < num_rows; r++) out[r] = row_argmax(x + r * row_stride, num_cols);
    return 0;
}
