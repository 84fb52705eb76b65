// AMX-BF16 kernels (+ the AVX-512 conversions, sgemm_*, activations and transpose of avx512_common.h).
//
// gemm_bf16 with TDPBF16PS: C tile (16 rows x 16 FP32) += A tile (16 rows x 32 BF16, row stride
// lda * 2 bytes) x B tile (16 rows x 64 bytes = one 32-K slice of a packed panel: rows
// k0/2 .. k0/2+15, stride 64 bytes, at panel + k0 * 16 elements). The packed layout (pack.h) is
// exactly the B-tile format, so W is read in place.
//
// Tile registers (palette 1, fixed for the whole file):
//   tmm0..tmm3  C   tmm0 = rows 0-15 x cols 0-15, tmm1 = rows 0-15 x cols 16-31,
//                   tmm2 = rows 16-31 x cols 0-15, tmm3 = rows 16-31 x cols 16-31
//   tmm4, tmm5  A   rows 0-15 and 16-31 of the current 32-K slice
//   tmm6, tmm7  B   panels p and p+1, same K slice
// Register block 2x2 (32 rows x 32 columns, 4 TDPBF16PS per 2 A + 2 B loads) with 2x1 / 1x2 /
// 1x1 tails. C stays in tiles for the whole K loop. A final block of t < 16 rows runs with a
// second tile configuration whose C and A tiles have t rows: no padding copies, and tile loads
// and stores never touch rows past M.
//
// The configuration is loaded at the start of every call (other code on this thread, e.g.
// oneDNN, may have loaded another one) and released before returning.
//
// Note: TDPBF16PS treats denormal inputs as zero and flushes denormal results (DAZ/FTZ); the
// scalar oracle does not. In accumulate mode C is loaded into the tiles and the products are
// added to it step by step (the oracle adds C once at the end): same value up to FP32 rounding.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own _mm512_undefined_* intrinsics as uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "avx512_common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "kt_trl.h"

namespace kt {
namespace {

// The 64-byte LDTILECFG operand.
struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];   // bytes per row of tmm0..tmm15 (8 used in palette 1)
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads exactly 64 bytes");

struct TileConfigs {
    TileConfig with_rows[17];   // [t]: C and A tiles (tmm0..tmm5) have t rows; [16] is the main one
};

constexpr TileConfigs make_configs() {
    TileConfigs all{};
    for (int t = 1; t <= 16; ++t) {
        TileConfig &c = all.with_rows[t];
        c.palette_id = 1;
        for (int i = 0; i < 8; ++i) {
            c.colsb[i] = 64;                               // 16 FP32, 32 BF16 or 16 BF16 pairs
            c.rows[i] = static_cast<uint8_t>(i < 6 ? t : 16);   // B tiles: always 16 K pairs
        }
    }
    return all;
}

// Constant-initialised static storage: LDTILECFG reads it through an asm operand that GCC's
// intrinsic declares as only 8 bytes wide, so the bytes must not depend on compiler-visible stores.
alignas(64) constexpr TileConfigs kConfigs = make_configs();

// Loads (accumulate) or zeroes the C tiles; the rows count comes from the active configuration.
#define KT_C_INIT(tile, ptr) \
    do {                                          \
        if (accumulate) _tile_loadd(tile, ptr, sc); \
        else _tile_zero(tile);                    \
    } while (0)

// Rows [0, 32) x columns [0, 32): A rows at A and A + 16 lda, panels W0 and W1.
void tiles_2x2(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *W0, const uint16_t *W1,
               int64_t Kp, bool accumulate) {
    const int64_t sa = lda * 2, sc = ldc * 4;
    float *C1 = C + 16 * ldc;
    const uint16_t *A1 = A + 16 * lda;
    KT_C_INIT(0, C);
    KT_C_INIT(1, C + 16);
    KT_C_INIT(2, C1);
    KT_C_INIT(3, C1 + 16);
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, A + k, sa);
        _tile_loadd(6, W0 + k * 16, 64);
        _tile_loadd(7, W1 + k * 16, 64);
        _tile_loadd(5, A1 + k, sa);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, sc);
    _tile_stored(1, C + 16, sc);
    _tile_stored(2, C1, sc);
    _tile_stored(3, C1 + 16, sc);
}

// Rows [0, 32) x columns [0, 16): panel W0.
void tiles_2x1(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *W0, int64_t Kp,
               bool accumulate) {
    const int64_t sa = lda * 2, sc = ldc * 4;
    float *C1 = C + 16 * ldc;
    const uint16_t *A1 = A + 16 * lda;
    KT_C_INIT(0, C);
    KT_C_INIT(2, C1);
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, A + k, sa);
        _tile_loadd(6, W0 + k * 16, 64);
        _tile_loadd(5, A1 + k, sa);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, C, sc);
    _tile_stored(2, C1, sc);
}

// Rows [0, rows of tmm0) x columns [0, 32): panels W0 and W1. Also the t < 16 row tail.
void tiles_1x2(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *W0, const uint16_t *W1,
               int64_t Kp, bool accumulate) {
    const int64_t sa = lda * 2, sc = ldc * 4;
    KT_C_INIT(0, C);
    KT_C_INIT(1, C + 16);
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, A + k, sa);
        _tile_loadd(6, W0 + k * 16, 64);
        _tile_loadd(7, W1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, C, sc);
    _tile_stored(1, C + 16, sc);
}

// Rows [0, rows of tmm0) x columns [0, 16): panel W0.
void tiles_1x1(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *W0, int64_t Kp,
               bool accumulate) {
    const int64_t sa = lda * 2, sc = ldc * 4;
    KT_C_INIT(0, C);
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, A + k, sa);
        _tile_loadd(6, W0 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, C, sc);
}

#undef KT_C_INIT

// One band of rows: 32 rows (two_a) or the rows of the active configuration (one A tile).
void row_band(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t pstride,
              int64_t N, int64_t Kp, bool accumulate, bool two_a) {
    int64_t p = 0;
    for (; (p + 2) * 16 <= N; p += 2) {
        const uint16_t *W0 = Wp + p * pstride;
        if (two_a) tiles_2x2(C + p * 16, ldc, A, lda, W0, W0 + pstride, Kp, accumulate);
        else tiles_1x2(C + p * 16, ldc, A, lda, W0, W0 + pstride, Kp, accumulate);
    }
    if (p * 16 < N) {   // one panel left
        if (two_a) tiles_2x1(C + p * 16, ldc, A, lda, Wp + p * pstride, Kp, accumulate);
        else tiles_1x1(C + p * 16, ldc, A, lda, Wp + p * pstride, Kp, accumulate);
    }
}

void gemm_bf16(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *Wp, int64_t ldw,
               int64_t M, int64_t N, int64_t Kp, bool accumulate) {
    // GCC's tile load intrinsics do not declare the memory they read: make every store the
    // compiler may still hold back (e.g. after inlining into a caller) happen first.
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&kConfigs.with_rows[16]);
    int64_t m = 0;
    for (; m + 32 <= M; m += 32) row_band(C + m * ldc, ldc, A + m * lda, lda, Wp, ldw, N, Kp, accumulate, true);
    if (m + 16 <= M) {
        row_band(C + m * ldc, ldc, A + m * lda, lda, Wp, ldw, N, Kp, accumulate, false);
        m += 16;
    }
    if (m < M) {   // 1..15 rows left: C and A tiles of exactly that many rows
        _tile_loadconfig(&kConfigs.with_rows[M - m]);
        row_band(C + m * ldc, ldc, A + m * lda, lda, Wp, ldw, N, Kp, accumulate, false);
    }
    _tile_release();
}

}  // namespace

bool amx_thread_init() {
    // The permission is per process (arch_prctl); request_amx_permission is idempotent.
    if (!request_amx_permission()) return false;
    return (cpu_features() & KT_CPU_AMX_BF16) != 0;
}

const Kernels kernels_amx = {"amx",           gemm_bf16,           avx512::sgemm_nt,
                             avx512::sgemm_nn, avx512::sgemm_tn,    avx512::bf16_to_f32,
                             avx512::f32_to_bf16, avx512::glu,         avx512::glu_backward,
                             avx512::transpose_block, avx512::decode_rows};

}  // namespace kt
