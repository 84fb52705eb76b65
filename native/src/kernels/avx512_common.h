// AVX-512 helpers shared by avx512.cpp and amx.cpp (both compiled with AVX-512F/BW/VL/DQ/BF16):
// BF16 <-> FP32 conversions and the FP32 LoRA GEMMs of sgemm.inc. Include from those two files
// only. Everything lives in an anonymous namespace, so each file gets its own copy compiled
// with its own flags (no ODR merging of code built for different ISAs).
#pragma once

#include <immintrin.h>

#include <cstdint>

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

}  // namespace avx512
}  // namespace
}  // namespace kt
