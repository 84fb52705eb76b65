// AVX-512 kernels shared by avx512.cpp and amx.cpp (both compiled with AVX-512F/BW/VL/DQ/BF16):
// BF16 <-> FP32 conversions, the FP32 LoRA GEMMs of sgemm.inc, the activations of act.inc and the
// packed-block transpose. Include from those two files only. Everything lives in an anonymous
// namespace, so each file gets its own copy compiled with its own flags (no ODR merging of code
// built for different ISAs).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "bf16.h"
#include "kernels.h"

namespace kt {
namespace {
namespace avx512 {

#define KT_SGEMM_VL 16
#define KT_SGEMM_NV 4
#include "sgemm.inc"
#undef KT_SGEMM_VL
#undef KT_SGEMM_NV
#include "act.inc"

// Mask of the first n (0 < n < 16) lanes.
inline __mmask16 head_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512i widen_bf16(__m256i h) { return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16); }

void bf16_to_f32(float *__restrict__ dst, const uint16_t *__restrict__ src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512(dst + i, widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + i))));
    if (i < n) {
        const __mmask16 k = head_mask(n - i);
        _mm512_mask_storeu_epi32(dst + i, k, widen_bf16(_mm256_maskz_loadu_epi16(k, src + i)));
    }
}

// float_to_bf16 of bf16.h on 16 lanes, in integer arithmetic. _mm512_cvtneps_pbh is not used:
// it flushes denormal inputs to zero, where bf16.h rounds them.
inline __m256i narrow_bf16(__m512i bits) {
    const __m512i hi = _mm512_srli_epi32(bits, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i biased = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    // |x| > inf as integers <=> NaN; both sides are non-negative int32.
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, _mm512_srli_epi32(biased, 16), quiet));
}

void f32_to_bf16(uint16_t *__restrict__ dst, const float *__restrict__ src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + i), narrow_bf16(_mm512_loadu_si512(src + i)));
    if (i < n) {
        const __mmask16 k = head_mask(n - i);
        _mm256_mask_storeu_epi16(dst + i, k, narrow_bf16(_mm512_maskz_loadu_epi32(k, src + i)));
    }
}

// transpose_block (kernels.h). View the source as 8 rows S_q (q = k/2) of 16 dwords, dword
// n = (M[n][2q], M[n][2q+1]). The destination row T_j (j = n/2) has dword k = (M[2j][k], M[2j+1][k]).
// Qword j of S_q holds (M[2j][2q], M[2j][2q+1], M[2j+1][2q], M[2j+1][2q+1]); swapping its two middle
// halfwords gives (M[2j][2q], M[2j+1][2q], M[2j][2q+1], M[2j+1][2q+1]) = qword q of T_j. So: one
// byte shuffle per row, then an 8 x 8 transpose of qwords (three butterfly stages).
void transpose_block(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src) {
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

// decode_rows (kernels.h), one panel row (32 values) per step. FP8 as in avx2.cpp: the magnitude
// bits as an FP16 times 256 s. _mm512_cvtne2ps_pbh rounds to nearest even and flushes denormals,
// which these products never are (kernels.h).
template <int32_t F>
void decode_rows_as(uint16_t *__restrict__ dst, const uint8_t *__restrict__ src, int64_t rows, const float *scales16) {
    const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(scales16), _mm512_set1_ps(F == KT_FORMAT_FP8_E4M3 ? 256.0f : 1.0f));
    // Value i of a row belongs to column i / 2.
    const __m512 s_lo = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), sc);
    const __m512 s_hi =
        _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), sc);
    for (int64_t q = 0; q < rows; ++q) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + q * 32));
        __m512 lo, hi;
        if (F == KT_FORMAT_FP8_E4M3) {
            const __m512i w = _mm512_cvtepu8_epi16(b);
            const __m512i h = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x7f)), 7),
                                              _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8));
            lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
        } else {
            lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
            hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        }
        _mm512_storeu_si512(dst + q * 32,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s_hi), _mm512_mul_ps(lo, s_lo)));
    }
}

void decode_rows(uint16_t *dst, const uint8_t *src, int64_t rows, const float *scales16, int32_t format) {
    if (format == KT_FORMAT_FP8_E4M3)
        decode_rows_as<KT_FORMAT_FP8_E4M3>(dst, src, rows, scales16);
    else
        decode_rows_as<KT_FORMAT_INT8>(dst, src, rows, scales16);
}

}  // namespace avx512
}  // namespace
}  // namespace kt
