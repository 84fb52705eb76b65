// AVX2 + FMA (+ F16C) kernels.
//
// gemm_bf16: AVX2 has no BF16 dot product, so each 64-byte panel row (16 columns x one K pair;
// lane c = W[c, 2q+1] << 16 | W[c, 2q]) is loaded as two ymm of 8 lanes and split into FP32
// values exactly: even k = lane << 16, odd k = lane & 0xFFFF0000. A is converted to FP32 once per
// block of rows (thread-local scratch), so its two values per pair are plain vbroadcastss loads.
// Register block: up to 5 rows x 16 columns = 10 accumulators + 4 converted panel halves + 1
// broadcast (15 of 16 ymm); the accumulators stay in registers for the whole K loop. Per pair
// and row: acc = fma(a[2q], even, acc); acc = fma(a[2q+1], odd, acc), the same sequence for every
// row whatever its block, so a row's result does not depend on M. The first block of rows reads
// the panels from DRAM one after another (later blocks find them in cache): it prefetches the
// next panel into L2 while it multiplies the current one, one line per K pair.
//
// Conversions: vectorised, bit-identical to bf16.h (round to nearest even, NaN stays NaN).
// sgemm_*: sgemm.inc compiled with this file's flags.
// transpose_block: the AVX-512 derivation (avx512_common.h) on ymm: a halfword swap inside each
// qword, then an 8 x 8 qword transpose done as four 4 x 4 transposes of ymm halves.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own _mm*_undefined_* intrinsics as maybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <vector>

#include "bf16.h"
#include "kernels.h"

namespace kt {
namespace {

#define KT_SGEMM_VL 8
#define KT_SGEMM_NV 2
#include "sgemm.inc"
#undef KT_SGEMM_VL
#undef KT_SGEMM_NV
#include "act.inc"

constexpr int kMaxRows = 5;

inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

void bf16_to_f32(float *__restrict__ dst, const uint16_t *__restrict__ src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
    for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// float_to_bf16 of bf16.h on 8 lanes; the results (0..0xFFFF) are left in the 32-bit lanes.
inline __m256i narrow_bf16(__m256i bits) {
    const __m256i hi = _mm256_srli_epi32(bits, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i rounded = _mm256_srli_epi32(biased, 16);
    const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    // |x| > inf as integers <=> NaN; both sides are non-negative int32.
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

// Eight 32-bit lanes holding 16-bit values -> eight packed uint16 (packus never saturates here).
inline __m128i pack8(__m256i v) { return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)); }

void f32_to_bf16(uint16_t *__restrict__ dst, const float *__restrict__ src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + i),
                         pack8(narrow_bf16(_mm256_castps_si256(_mm256_loadu_ps(src + i)))));
    for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

// C[0..R, 0..16) (= or +=) Af[0..R, :] x panel W. Af: FP32 rows of stride Kp.
template <int R>
void block(float *__restrict__ C, int64_t ldc, const float *__restrict__ Af, const uint16_t *__restrict__ W,
           int64_t Kp, bool accumulate, const uint16_t *pf) {
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t q = 0; q < Kp / 2; ++q) {
        if (pf) _mm_prefetch(reinterpret_cast<const char *>(pf + q * 32), _MM_HINT_T1);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(W + q * 32));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(W + q * 32 + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd_mask));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd_mask));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 a0 = _mm256_broadcast_ss(Af + r * Kp + 2 * q);
            acc[r][0] = _mm256_fmadd_ps(a0, e0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a0, e1, acc[r][1]);
            const __m256 a1 = _mm256_broadcast_ss(Af + r * Kp + 2 * q + 1);
            acc[r][0] = _mm256_fmadd_ps(a1, o0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a1, o1, acc[r][1]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
            float *out = C + r * ldc + h * 8;
            _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[r][h]) : acc[r][h]);
        }
}

using BlockFn = void (*)(float *, int64_t, const float *, const uint16_t *, int64_t, bool, const uint16_t *);
constexpr BlockFn kBlocks[kMaxRows] = {block<1>, block<2>, block<3>, block<4>, block<5>};

// FP32 copy of up to kMaxRows rows of A; grows once per thread to the largest Kp seen.
float *a_scratch(int64_t elems) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < elems) buf.resize(static_cast<size_t>(elems));
    return buf.data();
}

void gemm_bf16(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t ldw,
               int64_t M, int64_t N, int64_t Kp, bool accumulate) {
    float *af = a_scratch(kMaxRows * Kp);
    const int64_t nblocks = (M + kMaxRows - 1) / kMaxRows;
    int64_t m = 0;
    // Row blocks outer: each block of A is converted once and reused for every panel.
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t rows = M / nblocks + (b < M % nblocks ? 1 : 0);   // 1..kMaxRows, near-equal
        for (int64_t r = 0; r < rows; ++r) bf16_to_f32(af + r * Kp, A + (m + r) * lda, Kp);
        for (int64_t p = 0; p < N / 16; ++p)
            kBlocks[rows - 1](C + m * ldc + p * 16, ldc, af, Wp + p * ldw, Kp, accumulate,
                              b == 0 && p + 1 < N / 16 ? Wp + (p + 1) * ldw : nullptr);
        m += rows;
    }
}

// out[c] = column c of the 4 x 4 qword matrix whose rows are x[0..3].
inline void transpose4x4(__m256i out[4], const __m256i x[4]) {
    const __m256i t0 = _mm256_unpacklo_epi64(x[0], x[1]), t1 = _mm256_unpackhi_epi64(x[0], x[1]);
    const __m256i t2 = _mm256_unpacklo_epi64(x[2], x[3]), t3 = _mm256_unpackhi_epi64(x[2], x[3]);
    out[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
    out[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    out[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
    out[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

void transpose_block(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src) {
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

// Round to nearest even to BF16 of FP32 lanes that are never NaN (decode's products, kernels.h),
// the results left in the 32-bit lanes: narrow_bf16 without its NaN select.
inline __m256i round_finite_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}

// decode_rows (kernels.h), 16 values per step. FP8: the 7 magnitude bits shifted into an FP16
// (e4m3 -> e5m10 keeps every value, subnormals included, times 2^-8; F16C converts exactly), so
// value * s = fp16 * (256 s), the same one FP32 rounding as the scalar table.
template <int32_t F>
void decode_rows_as(uint16_t *__restrict__ dst, const uint8_t *__restrict__ src, int64_t rows, const float *scales16) {
    const float unit = F == KT_FORMAT_FP8_E4M3 ? 256.0f : 1.0f;
    __m256 s[4];   // lanes of values 8j .. 8j+7: columns 4j .. 4j+3, each twice
    for (int j = 0; j < 4; ++j)
        s[j] = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(scales16 + 4 * j)),
                                                      _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)),
                             _mm256_set1_ps(unit));
    for (int64_t q = 0; q < rows; ++q)
        for (int half = 0; half < 2; ++half) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + q * 32 + 16 * half));
            __m256 lo, hi;
            if (F == KT_FORMAT_FP8_E4M3) {
                const __m256i w = _mm256_cvtepu8_epi16(b);
                const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7),
                                                  _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
                lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
            } else {
                lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            }
            // packus interleaves the two inputs by 128-bit lane: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> reorder
            const __m256i packed = _mm256_packus_epi32(round_finite_bf16(_mm256_mul_ps(lo, s[2 * half])),
                                                       round_finite_bf16(_mm256_mul_ps(hi, s[2 * half + 1])));
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(dst + q * 32 + 16 * half),
                                _mm256_permute4x64_epi64(packed, 0xD8));
        }
}

void decode_rows(uint16_t *dst, const uint8_t *src, int64_t rows, const float *scales16, int32_t format) {
    if (format == KT_FORMAT_FP8_E4M3)
        decode_rows_as<KT_FORMAT_FP8_E4M3>(dst, src, rows, scales16);
    else
        decode_rows_as<KT_FORMAT_INT8>(dst, src, rows, scales16);
}

}  // namespace

const Kernels kernels_avx2 = {"avx2",      gemm_bf16,   sgemm_nt, sgemm_nn,     sgemm_tn,
                              bf16_to_f32, f32_to_bf16, glu,      glu_backward, transpose_block,
                              decode_rows, nullptr, nullptr};

}  // namespace kt
