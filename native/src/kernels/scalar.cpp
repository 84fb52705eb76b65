// Scalar reference kernels: always built, compiled without ISA flags, the oracle for the others.
#include "kernels.h"

#include "bf16.h"

namespace kt {
namespace {

#define KT_SGEMM_VL 4
#define KT_SGEMM_NV 2
#include "sgemm.inc"
#undef KT_SGEMM_VL
#undef KT_SGEMM_NV
#include "act.inc"

void gemm_bf16(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t ldw,
               int64_t M, int64_t N, int64_t Kp, bool accumulate) {
    for (int64_t p = 0; p < N / 16; ++p) {
        const uint16_t *panel = Wp + p * ldw;
        for (int64_t m = 0; m < M; ++m) {
            float acc[16] = {};
            const uint16_t *a = A + m * lda;
            for (int64_t q = 0; q < Kp / 2; ++q) {
                const float a0 = bf16_to_float(a[2 * q]), a1 = bf16_to_float(a[2 * q + 1]);
                const uint16_t *row = panel + q * 32;
                for (int c = 0; c < 16; ++c)
                    acc[c] += a0 * bf16_to_float(row[2 * c]) + a1 * bf16_to_float(row[2 * c + 1]);
            }
            float *out = C + m * ldc + p * 16;
            for (int c = 0; c < 16; ++c) out[c] = accumulate ? out[c] + acc[c] : acc[c];
        }
    }
}

void bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

void f32_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

// src[kBlock.src[i]] is element i of the transposed block: kernels.h's two offsets with n and k swapped.
struct BlockPermutation {
    uint16_t src[256];
    constexpr BlockPermutation() : src() {
        for (int n = 0; n < 16; ++n)
            for (int k = 0; k < 16; ++k)
                src[(n / 2) * 32 + k * 2 + n % 2] = static_cast<uint16_t>((k / 2) * 32 + n * 2 + k % 2);
    }
};
constexpr BlockPermutation kBlock;

void transpose_block(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src) {
    for (int i = 0; i < 256; ++i) dst[i] = src[kBlock.src[i]];
}

// The FP8 E4M3 ("fn") value of each code: s eeee mmm, exponent bias 7, e = 0 subnormal (m/8 * 2^-6).
struct Fp8Values {
    float v[256];
    constexpr Fp8Values() : v() {
        for (int c = 0; c < 256; ++c) {
            const int e = (c >> 3) & 15, m = c & 7;
            float mag = e == 0 ? m / 8.0f : 1.0f + m / 8.0f;
            for (int i = 0; i < (e == 0 ? 6 : 7 - e); ++i) mag /= 2.0f;   // 2^-6 or 2^(e-7)
            for (int i = 0; i < e - 7; ++i) mag *= 2.0f;
            v[c] = c & 0x80 ? -mag : mag;
        }
    }
};
constexpr Fp8Values kFp8;

void decode_rows(uint16_t *dst, const uint8_t *src, int64_t rows, const float *scales16, int32_t format) {
    for (int64_t i = 0; i < rows * 32; ++i) {
        const float v = format == KT_FORMAT_FP8_E4M3 ? kFp8.v[src[i]] : static_cast<float>(static_cast<int8_t>(src[i]));
        dst[i] = float_to_bf16(v * scales16[(i % 32) / 2]);
    }
}

}  // namespace

const Kernels kernels_scalar = {"scalar",    gemm_bf16,   sgemm_nt, sgemm_nn,     sgemm_tn,
                                bf16_to_f32, f32_to_bf16, glu,      glu_backward, transpose_block,
                                decode_rows, nullptr, nullptr};

}  // namespace kt
