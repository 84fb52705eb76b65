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

void pack_transposed_block(uint16_t *dst, const uint16_t *src, int64_t N, int64_t K, int64_t k0, int64_t kn) {
    const int64_t Kp = round_up(K, kKAlign);
    const int64_t Rp = round_up(N, kKAlign);   // reduction length of the transposed view
    std::memset(dst, 0, sizeof(uint16_t) * Rp * kn);
    // Walk the source panel by panel, one 64-byte row (16 n x one k pair) at a time.
    for (int64_t np = 0; np < (N + 15) / 16; ++np) {
        const uint16_t *panel = src + np * Kp * 16;
        const int64_t ncount = (N - np * 16) < 16 ? (N - np * 16) : 16;
        for (int64_t kk = k0; kk < k0 + kn && kk < K; kk += 2) {
            const uint16_t *row = panel + (kk / 2) * 32;
            for (int b = 0; b < 2 && kk + b < k0 + kn; ++b) {
                const int64_t c = kk + b - k0;              // output column of the transposed view
                uint16_t *out = dst + (c / 16) * Rp * 16 + (c % 16) * 2;
                for (int64_t i = 0; i < ncount; ++i) {
                    const int64_t n = np * 16 + i;          // reduction index
                    out[(n / 2) * 32 + (n % 2)] = row[i * 2 + b];
                }
            }
        }
    }
}

}  // namespace kt
