// AVX-512 kernels (AVX-512F/BW/VL/DQ + AVX512-BF16).
//
// gemm_bf16: one 64-byte panel row (16 columns x one K pair) is exactly one __m512bh, so
// _mm512_dpbf16_ps(acc, row, broadcast(A[m, 2q..2q+1])) adds both products of the pair to the 16
// columns at once. Register block: up to 6 rows x 4 panels (64 columns) = 24 accumulators + 4 panel
// rows; the A pair is an embedded {1to16} broadcast from memory, so 28 of the 32 zmm are live.
// The accumulators stay in registers for the whole K loop. Rows are split into near-equal blocks
// (M = 32 -> 6,6,5,5,5,5) so no block degenerates to 1-2 rows; every row sees the same operation
// sequence whatever its block, so a row's result does not depend on M. While the row blocks after
// the first multiply a group of panels from cache, they prefetch the next group's panels (same K
// range) into L2, one line of each per K pair, so that its first block does not wait on DRAM.
//
// Note: VDPBF16PS treats denormal inputs as zero and flushes denormal results (DAZ/FTZ);
// the scalar oracle does not. Only values below ~1e-38 are affected.
//
// Conversions, sgemm_*, the activations and transpose_block: avx512_common.h.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own _mm512_undefined_* intrinsics as uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "avx512_common.h"
#include "kernels.h"

namespace kt {
namespace {

constexpr int kMaxRows = 6;
constexpr int kMaxPanels = 4;

// C[0..R, 0..16P) (= or +=) A[0..R, :] x panels W[0..P).
// pf: npf panels (stride pstride) to prefetch along the K loop.
template <int R, int P>
void block(float *__restrict__ C, int64_t ldc, const uint16_t *__restrict__ A, int64_t lda,
           const uint16_t *__restrict__ W, int64_t pstride, int64_t Kp, bool accumulate, const uint16_t *pf,
           int64_t npf) {
    __m512 acc[R][P];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    for (int64_t q = 0; q < Kp / 2; ++q) {
        for (int64_t j = 0; j < npf; ++j)
            _mm_prefetch(reinterpret_cast<const char *>(pf + j * pstride + q * 32), _MM_HINT_T1);
        __m512bh w[P];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) w[p] = (__m512bh)_mm512_loadu_si512(W + p * pstride + q * 32);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            int32_t pair;   // A[r, 2q] | A[r, 2q+1] << 16, the operand layout of VDPBF16PS
            std::memcpy(&pair, A + r * lda + 2 * q, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], w[p], x);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
            float *out = C + r * ldc + p * 16;
            _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[r][p]) : acc[r][p]);
        }
}

using BlockFn = void (*)(float *, int64_t, const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, bool,
                        const uint16_t *, int64_t);

constexpr BlockFn kBlocks[kMaxRows][kMaxPanels] = {
    {block<1, 1>, block<1, 2>, block<1, 3>, block<1, 4>},
    {block<2, 1>, block<2, 2>, block<2, 3>, block<2, 4>},
    {block<3, 1>, block<3, 2>, block<3, 3>, block<3, 4>},
    {block<4, 1>, block<4, 2>, block<4, 3>, block<4, 4>},
    {block<5, 1>, block<5, 2>, block<5, 3>, block<5, 4>},
    {block<6, 1>, block<6, 2>, block<6, 3>, block<6, 4>},
};

void gemm_bf16(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t ldw,
               int64_t M, int64_t N, int64_t Kp, bool accumulate) {
    const int64_t panels = N / 16;
    const int64_t nblocks = (M + kMaxRows - 1) / kMaxRows;
    // Panel groups outer: one group of W (4 panels x Kp) stays cache-hot across the row blocks,
    // and blocks 1.. share the next group's prefetches.
    for (int64_t p = 0; p < panels; p += kMaxPanels) {
        const int64_t np = panels - p < kMaxPanels ? panels - p : kMaxPanels;
        const int64_t next = std::min<int64_t>(kMaxPanels, panels - p - np);
        int64_t m = 0;
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t rows = M / nblocks + (b < M % nblocks ? 1 : 0);   // 1..kMaxRows
            const int64_t f0 = b == 0 ? 0 : (b - 1) * next / (nblocks - 1), f1 = b == 0 ? 0 : b * next / (nblocks - 1);
            kBlocks[rows - 1][np - 1](C + m * ldc + p * 16, ldc, A + m * lda, lda, Wp + p * ldw, ldw, Kp,
                                      accumulate, f1 > f0 ? Wp + (p + np + f0) * ldw : nullptr, f1 - f0);
            m += rows;
        }
    }
}

}  // namespace

const Kernels kernels_avx512 = {"avx512",          gemm_bf16,           avx512::sgemm_nt,
                                avx512::sgemm_nn,  avx512::sgemm_tn,    avx512::bf16_to_f32,
                                avx512::f32_to_bf16, avx512::glu,         avx512::glu_backward,
                                avx512::transpose_block, avx512::decode_rows, nullptr, nullptr};

}  // namespace kt
