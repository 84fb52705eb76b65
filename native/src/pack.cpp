#include "pack.h"

#include <cstring>

namespace kt {

void pack_weight(uint16_t *dst, const uint16_t *W, int64_t ld, int64_t N, int64_t K) {
    const int64_t Np = round_up(N, kPanelCols), Kp = round_up(K, kKAlign);
    std::memset(dst, 0, sizeof(uint16_t) * Np * Kp);
    for (int64_t n = 0; n < N; ++n) {
        uint16_t *panel = dst + (n / 16) * Kp * 16 + (n % 16) * 2;
        const uint16_t *row = W + n * ld;
        for (int64_t k = 0; k < K; ++k) panel[(k / 2) * 32 + (k % 2)] = row[k];
    }
}

void unpack_weight(uint16_t *W, int64_t ld, const uint16_t *src, int64_t N, int64_t K) {
    const int64_t Kp = round_up(K, kKAlign);
    for (int64_t n = 0; n < N; ++n) {
        const uint16_t *panel = src + (n / 16) * Kp * 16 + (n % 16) * 2;
        uint16_t *row = W + n * ld;
        for (int64_t k = 0; k < K; ++k) row[k] = panel[(k / 2) * 32 + (k % 2)];
    }
}

void pack_transposed_block(uint16_t *dst, const uint16_t *src, int64_t N, int64_t K, int64_t k0, int64_t kn,
                           TransposeBlockFn transpose) {
    const int64_t Kp = round_up(K, kKAlign);
    const int64_t Rp = round_up(N, kKAlign);   // reduction length of the transposed view
    const int64_t n_panels = (N + 15) / 16;
    // Source blocks past K (k0 + kn may exceed K up to the next multiple of 16) and reduction rows
    // past the last source panel are zero.
    for (int64_t kb = 0; kb < kn; kb += 16) {
        uint16_t *out_panel = dst + (kb / 16) * Rp * 16;
        for (int64_t np = 0; np < n_panels; ++np) {
            uint16_t *out = out_panel + np * 256;             // reduction rows 16np .. 16np+15
            const int64_t k = k0 + kb;
            if (k >= Kp) {
                std::memset(out, 0, 512);
                continue;
            }
            const uint16_t *in = src + np * Kp * 16 + (k / 2) * 32;   // 512 contiguous bytes
            transpose(out, in);
        }
        if (Rp > n_panels * 16) std::memset(out_panel + n_panels * 256, 0, sizeof(uint16_t) * (Rp - n_panels * 16) * 16);
    }
}

}  // namespace kt
