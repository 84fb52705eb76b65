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

#include <algorithm>

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

// ---- gemm_q8 (kernels.h): 8-bit weights decoded step by step.

// The first band of rows (32 with TWO_A, else those of the active configuration) against panel p
// (and p + 1 with TWO_B) over all of K, each 32-K step decoded into S0 (S1) just before its tile
// loads, so that the codes stream from DRAM while the tiles multiply.
template <bool TWO_A, bool TWO_B>
void q8_band(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const Q8Panels &W, int64_t p, uint16_t *S0,
             uint16_t *S1) {
    const int64_t sa = lda * 2, sc = ldc * 4;
    const uint16_t *A1 = A + 16 * lda;
    _tile_zero(0);
    if (TWO_B) _tile_zero(1);
    if (TWO_A) _tile_zero(2);
    if (TWO_A && TWO_B) _tile_zero(3);
    for (int64_t k = 0; k < W.Kp; k += 32) {
        decode_panel_rows(S0 + k * 16, W, p, k / 2, 16, avx512::decode_rows);
        if (TWO_B) decode_panel_rows(S1 + k * 16, W, p + 1, k / 2, 16, avx512::decode_rows);
        __asm__ volatile("" ::: "memory");   // the decoded step is stored before the tile loads
        _tile_loadd(4, A + k, sa);
        _tile_loadd(6, S0 + k * 16, 64);
        if (TWO_B) _tile_loadd(7, S1 + k * 16, 64);
        if (TWO_A) _tile_loadd(5, A1 + k, sa);
        _tile_dpbf16ps(0, 4, 6);
        if (TWO_B) _tile_dpbf16ps(1, 4, 7);
        if (TWO_A) _tile_dpbf16ps(2, 5, 6);
        if (TWO_A && TWO_B) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, sc);
    if (TWO_B) _tile_stored(1, C + 16, sc);
    if (TWO_A) _tile_stored(2, C + 16 * ldc, sc);
    if (TWO_A && TWO_B) _tile_stored(3, C + 16 * ldc + 16, sc);
}

void gemm_q8(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const Q8Panels &W, int64_t M, int64_t N,
             uint16_t *scratch) {
    __asm__ volatile("" ::: "memory");
    const int64_t band = M >= 32 ? 32 : std::min<int64_t>(M, 16), ldw = W.Kp * 16;
    uint16_t *S0 = scratch, *S1 = scratch + ldw;
    for (int64_t p = 0; p * 16 < N; p += 2) {
        const bool two_b = (p + 2) * 16 <= N;
        _tile_loadconfig(&kConfigs.with_rows[band == 32 ? 16 : band]);
        if (band == 32 && two_b) q8_band<true, true>(C + p * 16, ldc, A, lda, W, p, S0, S1);
        else if (band == 32) q8_band<true, false>(C + p * 16, ldc, A, lda, W, p, S0, S1);
        else if (two_b) q8_band<false, true>(C + p * 16, ldc, A, lda, W, p, S0, S1);
        else q8_band<false, false>(C + p * 16, ldc, A, lda, W, p, S0, S1);
        if (M > band)   // the remaining rows from the decoded pair (its own tile configuration)
            gemm_bf16(C + band * ldc + p * 16, ldc, A + band * lda, lda, S0, ldw, M - band, two_b ? 32 : 16, W.Kp,
                      false);
    }
    _tile_release();
}

// ---- gemm_bf16_wt (kernels.h): the weight's panels as the A operand.
//
// A panel's 16 consecutive rows are an A tile whose row i holds k-pair q0 + i and whose 32 columns
// run over the panel's 16 weight rows n, each with the pair's two k. TDPBF16PS sums every column
// against B, so B carries the dY value of a row m twice masked: lane pair j < 8 is (dY[m_j, n], 0),
// lane pair j >= 8 is (0, dY[m_j, n]), m_j = 8g + j % 8. C[i][j] is then dX[m_j, 2 (q0 + i) + j / 8]
// summed over the panel; accumulated over all panels it is the reduction over n. Half of every
// product is a zero: twice the tile work of the transposed-copy path, which pays where an expert
// has few rows (its weights are read once and barely reused) and the copy costs more than the math.

// The 16 x 16 matrix of 32-bit lanes x[0..15] transposed in place.
void transpose16(__m512i x[16]) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(x[i]);
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    const auto lo64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    const auto hi64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    for (int k = 0; k < 4; ++k) {
        r[4 * k] = lo64(t[4 * k], t[4 * k + 2]);
        r[4 * k + 1] = hi64(t[4 * k], t[4 * k + 2]);
        r[4 * k + 2] = lo64(t[4 * k + 1], t[4 * k + 3]);
        r[4 * k + 3] = hi64(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 4; ++i) {
            t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        x[j] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
        x[8 + j] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
    }
}

// B tile (g, p): rows 8g .. 8g + 7 of A at columns 16p .. 16p + 15, masked as described above.
void wt_b_tile(uint16_t *dst, const uint16_t *A, int64_t lda, int64_t M, int64_t g, int64_t p) {
    __m512i x[16];
    for (int j = 0; j < 8; ++j) {
        const int64_t m = 8 * g + j;
        x[j] = m < M ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(A + m * lda + 16 * p)))
                     : _mm512_setzero_si512();
        x[8 + j] = _mm512_slli_epi32(x[j], 16);
    }
    transpose16(x);
    for (int t = 0; t < 16; ++t) _mm512_storeu_si512(dst + t * 32, x[t]);
}

// Accumulator tiles (qb, g) .. (qb + TWO_A, g + TWO_B) += panels [p0, p1) (zeroed first when p0 == 0).
// acc holds one 16 x 16 FP32 tile per (32 outputs, 8 rows), tile (qb, g) at acc + (qb * groups + g) * 256.
// Wq: panel p0's rows of the block, panel p at Wq + (p - p0) * ldw.
template <bool TWO_A, bool TWO_B>
void wt_block(float *acc, int64_t groups, int64_t qb, int64_t g, const uint16_t *Wq, int64_t ldw, const uint16_t *bz,
              int64_t panels, int64_t p0, int64_t p1) {
    float *t0 = acc + (qb * groups + g) * 256, *t1 = t0 + 256, *t2 = t0 + groups * 256, *t3 = t2 + 256;
    if (p0 == 0) {
        _tile_zero(0);
        if (TWO_B) _tile_zero(1);
        if (TWO_A) _tile_zero(2);
        if (TWO_A && TWO_B) _tile_zero(3);
    } else {
        _tile_loadd(0, t0, 64);
        if (TWO_B) _tile_loadd(1, t1, 64);
        if (TWO_A) _tile_loadd(2, t2, 64);
        if (TWO_A && TWO_B) _tile_loadd(3, t3, 64);
    }
    const uint16_t *b0 = bz + g * panels * 512, *b1 = b0 + panels * 512;
    for (int64_t p = p0; p < p1; ++p) {
        const uint16_t *a = Wq + (p - p0) * ldw;
        _tile_loadd(4, a, 64);
        _tile_loadd(6, b0 + p * 512, 64);
        if (TWO_B) _tile_loadd(7, b1 + p * 512, 64);
        if (TWO_A) _tile_loadd(5, a + 16 * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (TWO_B) _tile_dpbf16ps(1, 4, 7);
        if (TWO_A) _tile_dpbf16ps(2, 5, 6);
        if (TWO_A && TWO_B) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, t0, 64);
    if (TWO_B) _tile_stored(1, t1, 64);
    if (TWO_A) _tile_stored(2, t2, 64);
    if (TWO_A && TWO_B) _tile_stored(3, t3, 64);
}

// Each run of kWtPanelRun panels is read front to back side by side (long runs of one panel each,
// as the forward's items read theirs), and the accumulators go through L2 once per run.
void gemm_bf16_wt(float *C, int64_t ldc, const uint16_t *A, int64_t lda, const WtPanels &W, int64_t M, int64_t Rn,
                  int64_t cn, uint16_t *scratch) {
    const int64_t groups = (M + 7) / 8, panels = Rn / 16, q_blocks = (cn + 31) / 32;
    uint16_t *bz = scratch;
    float *acc = reinterpret_cast<float *>(scratch + groups * panels * 512);
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t p = 0; p < panels; ++p) wt_b_tile(bz + (g * panels + p) * 512, A, lda, M, g, p);
    __asm__ volatile("" ::: "memory");   // the B tiles are stored before the tile loads read them
    _tile_loadconfig(&kConfigs.with_rows[16]);
    for (int64_t p0 = 0; p0 < panels; p0 += kWtPanelRun) {
        const int64_t p1 = std::min(panels, p0 + kWtPanelRun);
        int64_t ldw = 0;
        const uint16_t *run = W.rows(W.ctx, p0, p1, &ldw);
        __asm__ volatile("" ::: "memory");   // decoded panels are stored before the tile loads
        for (int64_t qb = 0; qb < q_blocks; qb += 2) {
            const bool two_a = qb + 1 < q_blocks;
            const uint16_t *Wq = run + qb * 16 * 32;   // A tiles: 16 panel rows = 32 outputs each
            for (int64_t g = 0; g < groups; g += 2) {
                const bool two_b = g + 1 < groups;
                if (two_a && two_b) wt_block<true, true>(acc, groups, qb, g, Wq, ldw, bz, panels, p0, p1);
                else if (two_a) wt_block<true, false>(acc, groups, qb, g, Wq, ldw, bz, panels, p0, p1);
                else if (two_b) wt_block<false, true>(acc, groups, qb, g, Wq, ldw, bz, panels, p0, p1);
                else wt_block<false, false>(acc, groups, qb, g, Wq, ldw, bz, panels, p0, p1);
            }
        }
    }
    _tile_release();
    __asm__ volatile("" ::: "memory");
    for (int64_t qb = 0; qb < q_blocks; ++qb)
        for (int64_t g = 0; g < groups; ++g) {
            const float *t = acc + (qb * groups + g) * 256;
            for (int j = 0; j < 8 && 8 * g + j < M; ++j) {
                float *row = C + (8 * g + j) * ldc + qb * 32;
                for (int i = 0; i < 16 && qb * 32 + 2 * i < cn; ++i) {
                    row[2 * i] = t[i * 16 + j];
                    row[2 * i + 1] = t[i * 16 + 8 + j];
                }
            }
        }
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
                             avx512::transpose_block, avx512::decode_rows, gemm_bf16_wt,
                             gemm_q8};

}  // namespace kt
