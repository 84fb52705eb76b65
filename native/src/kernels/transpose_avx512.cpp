// 16 x 16 packed-block transposition with AVX-512 (see transpose.h).
//
// View the source as 8 rows S_q (q = k/2) of 16 dwords, dword n = (M[n][2q], M[n][2q+1]). The
// destination row T_j (j = n/2) has dword k = (M[2j][k], M[2j+1][k]). Qword j of S_q holds
// (M[2j][2q], M[2j][2q+1], M[2j+1][2q], M[2j+1][2q+1]); swapping its two middle halfwords gives
// (M[2j][2q], M[2j+1][2q], M[2j][2q+1], M[2j+1][2q+1]) = qword q of T_j. So: one byte shuffle per
// row, then an 8 x 8 transpose of qwords (three butterfly stages).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own _mm512_undefined_* intrinsics as uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "transpose.h"

namespace kt {

void transpose_block_avx512(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src) {
    const __m512i swap_mid = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
    __m512i r[8];
    for (int q = 0; q < 8; ++q)
        r[q] = _mm512_shuffle_epi8(_mm512_loadu_si512(src + q * 32), swap_mid);
    // 8 x 8 qword transpose: r[q] qword j -> out[j] qword q.
    __m512i a[8], b[8];
    for (int i = 0; i < 4; ++i) {   // pairs (0,1), (2,3), ...: interleave qwords
        a[2 * i] = _mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]);
    }
    const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int i = 0; i < 2; ++i)
        for (int h = 0; h < 2; ++h) {
            b[4 * i + h] = _mm512_permutex2var_epi64(a[4 * i + h], lo2, a[4 * i + 2 + h]);
            b[4 * i + 2 + h] = _mm512_permutex2var_epi64(a[4 * i + h], hi2, a[4 * i + 2 + h]);
        }
    const __m512i lo4 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i hi4 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    __m512i out[8];
    for (int h = 0; h < 4; ++h) {
        out[h] = _mm512_permutex2var_epi64(b[h], lo4, b[4 + h]);
        out[4 + h] = _mm512_permutex2var_epi64(b[h], hi4, b[4 + h]);
    }
    for (int j = 0; j < 8; ++j) _mm512_storeu_si512(dst + j * 32, out[j]);
}

}  // namespace kt
