// 16 x 16 packed-block transposition with AVX2 (see transpose.h and transpose_avx512.cpp for the
// derivation): a halfword swap inside each qword, then an 8 x 8 qword transpose done as four
// 4 x 4 transposes of ymm halves.
#include <immintrin.h>

#include "transpose.h"

namespace kt {
namespace {

// out[c] = column c of the 4 x 4 qword matrix whose rows are x[0..3].
inline void transpose4x4(__m256i out[4], const __m256i x[4]) {
    const __m256i t0 = _mm256_unpacklo_epi64(x[0], x[1]), t1 = _mm256_unpackhi_epi64(x[0], x[1]);
    const __m256i t2 = _mm256_unpacklo_epi64(x[2], x[3]), t3 = _mm256_unpackhi_epi64(x[2], x[3]);
    out[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
    out[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    out[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
    out[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

}  // namespace

void transpose_block_avx2(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src) {
    const __m256i swap_mid = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
                                              0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    __m256i lo[8], hi[8];   // qwords 0-3 and 4-7 of source row q
    for (int q = 0; q < 8; ++q) {
        lo[q] = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + q * 32)), swap_mid);
        hi[q] = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + q * 32 + 16)), swap_mid);
    }
    __m256i t[4];
    // Destination row j = (rows 0-3 of column j, rows 4-7 of column j).
    for (int part = 0; part < 4; ++part) {
        const __m256i *rows = (part & 1) ? (part & 2 ? hi + 4 : lo + 4) : (part & 2 ? hi : lo);
        transpose4x4(t, rows);
        const int j0 = (part & 2) ? 4 : 0, half = (part & 1) ? 16 : 0;
        for (int c = 0; c < 4; ++c)
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + (j0 + c) * 32 + half), t[c]);
    }
}

}  // namespace kt
