// The micro-kernels every ISA path implements. One table per ISA (scalar.cpp, avx2.cpp,
// avx512.cpp, amx.cpp); dispatch.cpp picks one at runtime. The scalar table is the oracle.
//
// Kernels are single-threaded and deterministic: the same inputs give the same bits on one
// path, whatever thread runs them. Sizes are int64_t; argument order is outputs -> inputs -> sizes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kt_trl.h"

namespace kt {

// The gated activation of the experts: kind 0 = SiLU gate (h = silu(g) * u); kind 1 = gpt-oss's
// clamped SwiGLU (h = (clamp(u, +-limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)).
struct Activation {
    int32_t kind = 0;
    float alpha = 1.702f;
    float limit = 7.0f;
};

// Where gemm_bf16_wt gets its weight panels: rows(ctx, p0, p1, &ldw) returns BF16 panels [p0, p1)
// (at most kWtPanelRun of them) of the columns the call covers, panel p at the result + (p - p0) *
// ldw; the pointer is used until the next call. BF16 weights hand out their own panels, 8-bit
// ones decode each run into a buffer.
struct WtPanels {
    const uint16_t *(*rows)(const void *ctx, int64_t p0, int64_t p1, int64_t *ldw);
    const void *ctx;
};
constexpr int64_t kWtPanelRun = 4;

// An 8-bit weight's codes and scales from one of its panels on (packed_weight.h): panel p's codes
// at codes + p * Kp * 16 (pack.h positions, one byte a value), its scale block kb at
// scales + (p * nkb + kb) * 16; block kb covers packed rows [kb, kb + 1) * rows_per_block, the
// last one every row past it.
struct Q8Panels {
    const uint8_t *codes;
    const float *scales;
    int64_t Kp, nkb, rows_per_block;
    int32_t format;
};

// Packed rows [q0, q0 + nq) of panel p as BF16 (32 values a row) into dst, one decode per scale block.
template <typename Decode>
inline void decode_panel_rows(uint16_t *dst, const Q8Panels &w, int64_t p, int64_t q0, int64_t nq, Decode decode) {
    for (int64_t q = q0; q < q0 + nq;) {
        const int64_t kb = std::min(q / w.rows_per_block, w.nkb - 1);
        const int64_t end = kb == w.nkb - 1 ? q0 + nq : std::min(q0 + nq, (kb + 1) * w.rows_per_block);
        decode(dst + (q - q0) * 32, w.codes + (p * w.Kp + q * 2) * 16, end - q, w.scales + (p * w.nkb + kb) * 16,
               w.format);
        q = end;
    }
}

// Transposition of one 16 x 16 block of a packed panel (pack.h), the inner step of
// pack_transposed_block. A block is 512 contiguous bytes in both layouts:
//   src: offset(n, k) = (k / 2) * 32 + n * 2 + k % 2     (BF16 pairs along k, 16 n per 64-byte row)
//   dst: offset(n, k) = (n / 2) * 32 + k * 2 + n % 2     (BF16 pairs along n, 16 k per 64-byte row)
using TransposeBlockFn = void (*)(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src);

struct Kernels {
    const char *name;

    // C[m, n] (= or +=) sum_k A[m, k] * W[n, k]                          (FP32 accumulation)
    //   C  FP32 [M, N], row stride ldc
    //   A  BF16 [M, Kp], row stride lda; columns past the weight's true K hold zeros
    //   Wp BF16, N/16 packed panels (pack.h): panel p at Wp + p * ldw (ldw >= Kp * 16; a K-slice
    //      [k0, k0 + Kp) of wider panels is Wp = panels + k0 * 16 with ldw = their full Kp * 16)
    //   M >= 1 (any), N % 16 == 0, Kp % 32 == 0
    void (*gemm_bf16)(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t ldw,
                      int64_t M, int64_t N, int64_t Kp, bool accumulate);

    // FP32 GEMMs of the LoRA terms, C (= or +=) alpha * op(A) op(B):
    //   nt: A [M, K] lda, B [N, K] ldb   (dot products along K)
    //   nn: A [M, K] lda, B [K, N] ldb
    //   tn: A [K, M] lda, B [K, N] ldb
    void (*sgemm_nt)(float *C, int64_t ldc, const float *A, int64_t lda, const float *B, int64_t ldb,
                     int64_t M, int64_t N, int64_t K, float alpha, bool accumulate);
    void (*sgemm_nn)(float *C, int64_t ldc, const float *A, int64_t lda, const float *B, int64_t ldb,
                     int64_t M, int64_t N, int64_t K, float alpha, bool accumulate);
    void (*sgemm_tn)(float *C, int64_t ldc, const float *A, int64_t lda, const float *B, int64_t ldb,
                     int64_t M, int64_t N, int64_t K, float alpha, bool accumulate);

    // dst[i] = float(src[i]); dst[i] = bf16(src[i]) rounded to nearest even (NaN stays NaN).
    void (*bf16_to_f32)(float *dst, const uint16_t *src, int64_t n);
    void (*f32_to_bf16)(uint16_t *dst, const float *src, int64_t n);

    // The gated activation of one row (act.inc): h = bf16(act(g, u)), h_f32 = float(h).
    void (*glu)(uint16_t *h, float *h_f32, const uint16_t *g, const uint16_t *u, int64_t n, const Activation &a);
    // Its backward for one route of weight w, G = dY W_d,eff: dg, du (BF16), h_f32 as above;
    // returns dw = <G, h>.
    float (*glu_backward)(uint16_t *dg, uint16_t *du, float *h_f32, const float *G, float w, const uint16_t *g,
                          const uint16_t *u, int64_t n, const Activation &a);

    // dst = the transposed 16 x 16 block of src (TransposeBlockFn above).
    TransposeBlockFn transpose_block;

    // rows panel rows of 8-bit codes (32 per row, pack.h positions) -> BF16 panel rows:
    //   dst[q * 32 + i] = bf16(value(src[q * 32 + i]) * scales16[i / 2])
    // value() per format (KT_FORMAT_FP8_E4M3 or KT_FORMAT_INT8, packed_weight.h). The codes hold
    // no FP8 NaN and the scales are 0 or in [2^-100, 2^100] (checked at load), so every product is
    // a normal number or zero and one rounding to nearest even is exact on every path.
    void (*decode_rows)(uint16_t *dst, const uint8_t *src, int64_t rows, const float *scales16, int32_t format);

    // The transposed product read from the weight's own panels, for the backward's dX = dY W with
    // few rows; NULL on paths without it (they transpose panels first, pack_transposed_block):
    //   C[m, c] = sum_{n < Rn} A[m, n] * W[n, c]     (FP32 accumulation; = into C)
    //   C  FP32 [M, cn], row stride ldc;  A BF16 [M, Rn], row stride lda (columns past W's N zero)
    //   W  Rn / 16 BF16 panels (pack.h) of a weight's columns [k0, k0 + round_up(cn, 32)), i.e.
    //      packed rows k0 / 2 onwards, asked for in runs of panels in increasing order (WtPanels)
    //   1 <= M <= kWtMaxRows, Rn % 16 == 0, cn % 16 == 0; scratch: wt_scratch_elems(M, Rn, cn) BF16
    void (*gemm_bf16_wt)(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const WtPanels &W, int64_t M,
                         int64_t Rn, int64_t cn, uint16_t *scratch);

    // C[M, N] = A . W^T for an 8-bit W (W8A16) in one pass over its codes: each 32-K step of a pair
    // of panels is decoded into scratch right before the first rows (up to 32) multiply it, and the
    // other rows reread the decoded pair from there. The result is gemm_bf16's on the decoded panels
    // (accumulate = false, Kp = W.Kp); scratch: 2 * W.Kp * 16 BF16. NULL on paths without it (they
    // decode a column block of panels first, bf16_panels).
    void (*gemm_q8)(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const Q8Panels &W, int64_t M, int64_t N,
                    uint16_t *scratch);
};

constexpr int64_t kWtMaxRows = 64;
// Scratch of gemm_bf16_wt in BF16 elements: a 16 x 32 BF16 tile per 8 rows of A and 16 of its
// columns, then a 16 x 16 FP32 accumulator per 8 rows and 32 outputs.
inline int64_t wt_scratch_elems(int64_t M, int64_t Rn, int64_t cn) {
    return (M + 7) / 8 * ((Rn / 16) * 512 + (cn + 31) / 32 * 512);
}
// The most rows for which that scratch fits in L2 (2 MiB a core on the CPUs with AMX): its B
// tiles and accumulators are reread for every run of panels, and where they spill (DeepSeek-V3's
// gate_up at 64 rows, 3.8 MiB) the transposed copy measured faster.
// other_bytes: what else the call keeps in L2 (an 8-bit weight's decoded run of panels).
constexpr int64_t kWtScratchBytes = int64_t(2) << 20;
inline int64_t wt_max_rows(int64_t Rn, int64_t cn, int64_t other_bytes = 0) {
    const int64_t per_group = wt_scratch_elems(8, Rn, cn) * 2;
    return std::min<int64_t>(kWtMaxRows, 8 * (std::max<int64_t>(0, kWtScratchBytes - other_bytes) / per_group));
}

extern const Kernels kernels_scalar;
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
extern const Kernels kernels_amx;

// Per-thread setup a path needs before its first kernel call on a thread (AMX tile config).
// Returns false when the thread cannot use the path.
bool amx_thread_init();

}  // namespace kt
